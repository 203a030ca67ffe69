"""Decode an image and apply the Phi-3-V HD transform, exactly as the reference processor does.

Geometry is pure integer/float arithmetic (:func:`hd_grid`); pixels go through Pillow for decoding,
mode conversion, bilinear resize and white padding (bit-exact with the reference), then through
float32 torch ops for normalisation and the bicubic global view (docs/pipeline.md §2-§8).
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from phi3embed.core.config import PreprocessConfig
from phi3embed.core.hd import num_image_tokens
from phi3embed.errors import DecompressionBombError, ImageError, UnsupportedImageError

AlphaMode = Literal["drop", "white"]
ImageInput = Union[str, "os.PathLike[str]", Image.Image, bytes]  # noqa: UP007 (runtime alias, py3.10)


@dataclass(frozen=True)
class HDGrid:
    """Result of the HD geometry for one image (all sizes in pixels)."""

    width: int  # source width
    height: int  # source height
    transposed: bool  # portrait input: processed transposed, then transposed back
    resized_w: int  # size passed to the resize, in the (possibly transposed) frame
    resized_h: int
    pad_top: int  # white rows added above / below the resized image (transposed frame)
    pad_bottom: int
    out_h: int  # H' (multiple of crop size), final orientation
    out_w: int  # W'
    rows: int  # H' / crop
    cols: int  # W' / crop

    @property
    def num_crops_used(self) -> int:
        return self.rows * self.cols

    @property
    def image_sizes(self) -> tuple[int, int]:
        """[H', W'] as the reference reports it (height first)."""
        return (self.out_h, self.out_w)


def hd_scale(*, ratio: float, num_crops: int) -> int:
    """Largest ``s`` with ``s * ceil(s / ratio) <= num_crops`` (the reference's increment loop)."""
    s = 1
    while s * math.ceil(s / ratio) <= num_crops:
        s += 1
    return s - 1


def hd_grid(*, width: int, height: int, num_crops: int, crop_size: int = 336) -> HDGrid:
    """HD geometry of a ``width x height`` image, reproducing the reference's double-precision rules.

    Raises UnsupportedImageError where the reference itself fails (the resized height truncates to 0).
    """
    if width < 1 or height < 1:
        raise UnsupportedImageError(f"image has no pixels ({width}x{height})")
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    transposed = width < height
    w, h = (height, width) if transposed else (width, height)
    ratio = w / h  # IEEE double, as in the reference
    scale = hd_scale(ratio=ratio, num_crops=num_crops)
    new_w = int(scale * crop_size)
    new_h = int(new_w / ratio)  # double division then truncation: NOT floor(new_w * h / w)
    if new_h <= 0:
        raise UnsupportedImageError(
            f"aspect ratio {width}x{height} is too extreme for num_crops={num_crops}: the resized "
            f"{'width' if transposed else 'height'} truncates to 0 (the reference processor fails here too)"
        )
    target = math.ceil(new_h / crop_size) * crop_size
    top = (target - new_h) // 2
    out_w, out_h = new_w, target
    if transposed:
        out_w, out_h = out_h, out_w
    return HDGrid(
        width=width,
        height=height,
        transposed=transposed,
        resized_w=new_w,
        resized_h=new_h,
        pad_top=top,
        pad_bottom=target - new_h - top,
        out_h=out_h,
        out_w=out_w,
        rows=out_h // crop_size,
        cols=out_w // crop_size,
    )


# --------------------------------------------------------------------------- decoding


def _describe(source: object) -> str | None:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return None


def open_image(source: ImageInput, *, name: str | None = None) -> Image.Image:
    """Open and fully decode one image (first frame). Every failure becomes an ImageError naming the file.

    A path is read by :func:`read_image_file` (a regular file of sane size, identified from its header first)."""
    if isinstance(source, Image.Image):
        return source
    label = name or _describe(source) or "<bytes>"
    if not isinstance(source, (bytes, bytearray, memoryview)):
        source, _ = read_image_file(source, label=label)
    with image_errors(label):
        if len(source) == 0:
            raise ImageError("empty file (0 bytes)", path=label)
        img = Image.open(io.BytesIO(bytes(source)))
        img.load()  # decode now, so truncated files fail here and not later
    return img


_EXIF_ORIENTATION = 0x0112


def read_image_size(
    path: str | os.PathLike[str], *, exif_transpose: bool = False, name: str | None = None
) -> tuple[int, int]:
    """``(width, height)`` from the image header, without decoding pixel data (``plan``).

    The same checks as :func:`open_image` (:func:`check_image_file`, :func:`image_errors`), so a file it
    rejects is an ImageError naming ``name`` (default: the path) here too; damage further inside the file
    only shows when it is decoded. With ``exif_transpose`` the size after the EXIF orientation (5-8 swap
    the sides), as :func:`to_rgb` would produce it.
    """
    label = name or os.fspath(path)
    fd, _ = open_image_file(path, label=label)
    try:
        with open(fd, "rb", closefd=False) as fh:
            return image_size_of(fh, label=label, exif_transpose=exif_transpose)
    finally:
        os.close(fd)


def image_size_of(fh: BinaryIO, *, label: str, exif_transpose: bool = False) -> tuple[int, int]:
    """:func:`read_image_size` of an open file or of bytes (``io.BytesIO``: an image inside an archive)."""
    with image_errors(label, decoding=False), Image.open(fh) as img:
        width, height = img.size
        orientation = _orientation(img) if exif_transpose else 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _orientation(img: Image.Image) -> int:
    """EXIF orientation known after opening (JPEG/WEBP APP1, TIFF tags), without decoding pixels."""
    raw = img.info.get("exif")
    if raw:
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(_EXIF_ORIENTATION, 1))
    tags = getattr(img, "tag_v2", None)  # TIFF keeps its tags here
    return int(tags.get(_EXIF_ORIENTATION, 1)) if tags is not None else 1


#: The largest file read as an image. Pillow refuses to decode more than 2 x ``Image.MAX_IMAGE_PIXELS`` pixels
#: (~179 MP: ~1.1 GB even as uncompressed 16-bit RGB TIFF), so a larger file cannot be an image this decodes:
#: it is refused from its size, without being read (a 50 GB ``.jpg``, a runaway log file).
MAX_FILE_BYTES = 2**30

_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "named pipe"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def file_kind(mode: int) -> str:
    """What a file that is neither a regular file nor a directory is, in words (``st_mode`` -> "named pipe")."""
    return next((kind for is_kind, kind in _SPECIAL_KINDS if is_kind(mode)), "special file")


@contextmanager
def file_errors(label: str) -> Iterator[None]:
    """A failing system call on a file (stat, open, read) -> the one-line ImageError naming ``label``."""
    try:
        yield
    except PermissionError:
        raise ImageError("permission denied", path=label) from None
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}", path=label) from None


def check_image_file(
    path: str | os.PathLike[str], label: str, *, max_bytes: int = MAX_FILE_BYTES, st: os.stat_result | None = None
) -> os.stat_result:
    """Why a path cannot be an image file, found from its ``stat`` alone (nothing is opened): a folder, nothing
    there, a broken link, a named pipe, socket or device ("not a regular file"), an empty file, a file over
    ``max_bytes``; as the ImageError naming ``label``. Returns the stat of a file that may be read (``st``: a
    stat already made, e.g. ``fstat`` of the open file)."""
    if st is None:
        with file_errors(label):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                missing = "broken symbolic link" if os.path.islink(path) else "file not found"
                raise ImageError(missing, path=label) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError("is a directory, not an image file", path=label)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"not a regular file ({file_kind(st.st_mode)})", path=label)
    if st.st_size == 0:
        raise ImageError("empty file (0 bytes)", path=label)
    if st.st_size > max_bytes:
        raise ImageError(f"file too large for an image ({st.st_size:,} bytes; the limit is {max_bytes:,})", path=label)
    return st


def open_image_file(
    path: str | os.PathLike[str], *, label: str, max_bytes: int = MAX_FILE_BYTES
) -> tuple[int, os.stat_result]:
    """A file descriptor of ``path`` after :func:`check_image_file` said it may be read, and its ``fstat``.

    Opened with ``O_NONBLOCK``: a path swapped for a named pipe since the ``stat`` cannot block the open, and the
    ``fstat`` checks again what was opened. The caller closes the descriptor."""
    check_image_file(path, label, max_bytes=max_bytes)
    with file_errors(label):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        with file_errors(label):
            st = os.fstat(fd)
        return fd, check_image_file(path, label, max_bytes=max_bytes, st=st)
    except BaseException:
        os.close(fd)
        raise


def read_image_file(
    path: str | os.PathLike[str], *, label: str, max_bytes: int = MAX_FILE_BYTES
) -> tuple[bytes, os.stat_result]:
    """The bytes of an image file, read once, and its stat: checked from the stat first (:func:`check_image_file`),
    identified by Pillow from its header (a file that is no image costs a header read, not a full read), then
    read whole: ``st_size`` bytes and no more, so a file that keeps growing is still a bounded read."""
    fd, st = open_image_file(path, label=label, max_bytes=max_bytes)
    try:
        with image_errors(label), open(fd, "rb", closefd=False) as fh, Image.open(fh):
            pass  # identified: Pillow read what it needs of the header
        chunks: list[bytes] = []
        done = 0
        while done < st.st_size:
            with file_errors(label):
                chunk = os.pread(fd, st.st_size - done, done)
            if not chunk:
                raise ImageError(f"file shrank while being read ({done:,} of {st.st_size:,} bytes)", path=label)
            chunks.append(chunk)
            done += len(chunk)
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks), st


@contextmanager
def image_errors(label: str, *, decoding: bool = True) -> Iterator[None]:
    """Pillow's failures inside the block -> the one-line ImageErrors of :func:`open_image`, naming ``label``
    (decompression-bomb warnings are silenced; ImageErrors pass through as they are).

    ``decoding=False`` is for header-only reads (:func:`read_image_size`): a damaged file
    "cannot read image header" there, and a MemoryError is not turned into an ImageError.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecompressionBombError(f"decompression bomb: {exc}", path=label) from None
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can identify (corrupt or not an image)", path=label) from None
    except PermissionError:
        raise ImageError("permission denied", path=label) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        if not decoding:
            raise ImageError(f"cannot read image header: {reason}", path=label) from None
        if "truncated" in reason.lower():
            reason = f"truncated image data ({reason})"
        raise ImageError(f"cannot decode image: {reason}", path=label) from None
    except MemoryError:
        if not decoding:
            raise
        raise ImageError("out of memory while decoding", path=label) from None


def to_rgb(img: Image.Image, *, alpha: AlphaMode = "drop", exif_transpose: bool = False) -> Image.Image:
    """RGB conversion as the reference processor does it (docs/pipeline.md §2).

    ``alpha="drop"`` is the official behaviour (transformers 4.x: the colour under transparent pixels is
    kept); ``alpha="white"`` composites over opaque white first (transformers 5.x behaviour).
    EXIF orientation is ignored by the reference; ``exif_transpose=True`` applies it first.
    """
    if exif_transpose:
        img = ImageOps.exif_transpose(img)
    if alpha == "white":
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
    elif alpha != "drop":
        raise ValueError(f"alpha must be 'drop' or 'white', got {alpha!r}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


# --------------------------------------------------------------------------- HD image


def hd_image(rgb: Image.Image, grid: HDGrid) -> Image.Image:
    """Resize (Pillow BILINEAR) and pad with white to ``grid``; returns the uint8 RGB image W' x H'."""
    img = rgb.transpose(Image.Transpose.TRANSPOSE) if grid.transposed else rgb
    if img.size != (grid.resized_w, grid.resized_h):
        img = img.resize((grid.resized_w, grid.resized_h), Image.Resampling.BILINEAR)
    target_h = grid.resized_h + grid.pad_top + grid.pad_bottom
    if target_h != grid.resized_h:
        canvas = Image.new("RGB", (grid.resized_w, target_h), (255, 255, 255))
        canvas.paste(img, (0, grid.pad_top))
        img = canvas
    if grid.transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    assert img.size == (grid.out_w, grid.out_h), (img.size, grid)
    return img


def normalize(hd: Image.Image | np.ndarray, *, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 RGB image -> float32 ``[3, H', W']``: ``(x / 255 - mean) / std`` with true divisions."""
    array = np.asarray(hd, dtype=np.uint8)  # (H', W', 3)
    x = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div(255)  # (3, H', W')
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(mean_t).div_(std_t)


@lru_cache(maxsize=16)
def normalization_table(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``[3, 256]`` float32: entry ``[c, v]`` is what :func:`normalize` gives value ``v`` in channel ``c``.

    Built by :func:`normalize` itself on the 256 possible values, so a lookup gives the same bits as the
    arithmetic, on every device (a lookup on CUDA cannot round differently from the CPU).
    """
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # (1, 256, 3)
    return normalize(ramp, mean=mean, std=std)[:, 0, :].contiguous()  # (3, 256)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def normalize_tiles(tiles: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 crops ``[n, 3, S, S]`` -> normalised crops in ``table``'s dtype, on ``tiles``' device.

    A pure lookup (no arithmetic), so the values are the table's bits on every device. On the CPU numpy's
    ``take`` indexes with the uint8 values directly (the fastest lookup there: 14 ms for 13 crops, against
    27 ms for the arithmetic); the table's bits travel as same-size integers, so bfloat16 works too.
    """
    return _lookup_numpy(tiles, table) if tiles.device.type == "cpu" else _lookup_torch(tiles, table)


def _lookup_numpy(tiles: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    lookup = table.detach().cpu().view(_SAME_SIZE_INT[table.element_size()]).numpy()  # (3, 256): the exact bits
    pixels = tiles.numpy()
    out = np.empty(pixels.shape, dtype=lookup.dtype)
    for channel in range(pixels.shape[1]):
        np.take(lookup[channel], pixels[:, channel], out=out[:, channel])
    return torch.from_numpy(out).view(table.dtype)


def _lookup_torch(tiles: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    offsets = torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=tiles.device).view(3, 1, 1)
    index = tiles.to(torch.int32).add_(offsets)  # (n, 3, S, S): row of the flattened table
    return table.to(tiles.device).reshape(-1).index_select(0, index.reshape(-1)).view(tiles.shape)


def global_crop(x: torch.Tensor, *, crop_size: int) -> torch.Tensor:
    """Normalised HD image ``[3, H', W']`` -> the global view ``[1, 3, S, S]`` (bicubic, as the reference)."""
    return F.interpolate(x[None], size=(crop_size, crop_size), mode="bicubic", align_corners=False)


def tile_pixels(hd: Image.Image | np.ndarray, *, crop_size: int) -> torch.Tensor:
    """uint8 HD image ``(H', W', 3)`` -> its tiles ``[rows*cols, 3, S, S]`` uint8, row-major
    (left to right, then top to bottom)."""
    array = torch.from_numpy(np.asarray(hd, dtype=np.uint8))  # (H', W', 3)
    h, w, c = array.shape
    rows, cols = h // crop_size, w // crop_size
    return (
        array.view(rows, crop_size, cols, crop_size, c)  # (rows, S, cols, S, 3)
        .permute(0, 2, 4, 1, 3)  # (rows, cols, 3, S, S)
        .reshape(rows * cols, c, crop_size, crop_size)  # (n, 3, S, S): a copy, contiguous
    )


def pad_crops(pixel_values: torch.Tensor, *, num_crops: int) -> torch.Tensor:
    """``[1 + n, 3, S, S]`` -> ``[num_crops + 1, 3, S, S]`` with all-zero crops, as the reference batches them."""
    n = pixel_values.shape[0]
    if n > num_crops + 1:
        raise ValueError(f"{n} crops do not fit num_crops={num_crops}")
    pad = pixel_values.new_zeros((num_crops + 1 - n, *pixel_values.shape[1:]))
    return torch.cat([pixel_values, pad], dim=0)


@dataclass(frozen=True)
class Preprocessed:
    """One image, ready for the encoder.

    The tiles stay in uint8 (a quarter of the float32 bytes) until they reach the encoder's device, where
    :func:`normalize_tiles` turns them into exactly the reference's float values; only the global view,
    a bicubic resample of the normalised image, is float32. Workers hand these to the encoder through
    shared memory, and on CUDA through pinned memory and PCIe: a 13-crop image is 5.4 MB instead of 17.6.
    """

    global_view: torch.Tensor  # (1, 3, S, S) float32, normalised
    tiles: torch.Tensor  # (rows*cols, 3, S, S) uint8, raw HD pixels
    grid: HDGrid
    num_tokens: int
    mean: tuple[float, ...]  # normalisation of the tiles (normalization_table)
    std: tuple[float, ...]
    source: str | None = None

    @property
    def image_sizes(self) -> tuple[int, int]:
        return self.grid.image_sizes

    @property
    def num_real_crops(self) -> int:
        return 1 + self.tiles.shape[0]

    @property
    def table(self) -> torch.Tensor:
        return normalization_table(self.mean, self.std)

    @property
    def pixel_values(self) -> torch.Tensor:
        """``[1 + rows*cols, 3, S, S]`` float32, the reference processor's crops: global view first, then tiles."""
        return torch.cat([self.global_view, normalize_tiles(self.tiles, self.table)])


def image_geometry(*, width: int, height: int, cfg: PreprocessConfig) -> tuple[HDGrid, int]:
    """The crop grid and token count of a ``width x height`` image under ``cfg``: what encode produces
    (:func:`preprocess_rgb`), ``plan`` predicts and ``Phi3VisionEmbedder.num_tokens`` reports."""
    grid = hd_grid(width=width, height=height, num_crops=cfg.num_crops, crop_size=cfg.crop_size)
    return grid, num_image_tokens(rows=grid.rows, cols=grid.cols, tokens_per_side=cfg.tokens_per_side)


def preprocess_rgb(rgb: Image.Image, cfg: PreprocessConfig, *, source: str | None = None) -> Preprocessed:
    grid, num_tokens = image_geometry(width=rgb.width, height=rgb.height, cfg=cfg)
    hd = np.array(hd_image(rgb, grid), dtype=np.uint8)  # (H', W', 3), writable (torch.from_numpy)
    glb = global_crop(normalize(hd, mean=cfg.image_mean, std=cfg.image_std), crop_size=cfg.crop_size)
    return Preprocessed(
        global_view=glb,
        tiles=tile_pixels(hd, crop_size=cfg.crop_size),
        grid=grid,
        num_tokens=num_tokens,
        mean=tuple(cfg.image_mean),
        std=tuple(cfg.image_std),
        source=source,
    )


@contextmanager
def conversion_errors(label: str | None) -> Iterator[None]:
    """Failures after decoding (mode conversion, tiling) -> ImageErrors naming ``label``."""
    try:
        yield
    except ImageError as exc:
        if exc.path is None and label is not None:
            raise type(exc)(exc.reason, path=label) from None
        raise
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot convert image: {exc}", path=label) from None


def preprocess_image(
    image: ImageInput,
    cfg: PreprocessConfig,
    *,
    alpha: AlphaMode = "drop",
    exif_transpose: bool = False,
    name: str | None = None,
) -> Preprocessed:
    """Path, bytes or PIL image -> :class:`Preprocessed`. Raises ImageError (naming the file) on bad input."""
    label = name or _describe(image)
    img = open_image(image, name=label)
    with conversion_errors(label):
        rgb = to_rgb(img, alpha=alpha, exif_transpose=exif_transpose)
        return preprocess_rgb(rgb, cfg, source=label)
