"""Look before you encode: plan a job, picture an image's tiling, describe a checkpoint.

Nothing here runs the encoder or reads tensor data:

* :func:`plan` reads image *headers* only (``PIL.Image.open`` without ``load()``) and predicts, per image,
  the crop grid, token count, output size and compute cost.
* :func:`render_preview` draws the HD image exactly as the model sees it, with its crop grid.
* :func:`model_info` resolves a checkpoint and reports what it holds from config files and safetensors
  headers (``Checkpoint.bytes_read`` stays 0).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from phi3embed.core.checkpoint import Checkpoint, check_vision_tensors, module_to_checkpoint_key, resolve
from phi3embed.core.config import (
    ClipConfig,
    PreprocessConfig,
    VisionConfig,
    find_preset,
    preprocess_config_from_dict,
    presets,
    read_json,
    vision_config_from_dict,
)
from phi3embed.core.hd import num_image_tokens
from phi3embed.core.preprocess import (
    AlphaMode,
    HDGrid,
    ImageInput,
    check_image_file,
    global_crop,
    hd_grid,
    hd_image,
    image_errors,
    normalize,
    open_image,
    to_rgb,
)
from phi3embed.errors import ConfigError, ImageError, Phi3EmbedError

#: Bytes per element of the stored output dtypes.
OUT_DTYPE_ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}

#: File name endings collected when a directory is expanded (explicitly named files are always taken).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

_EXIF_ORIENTATION = 0x0112

#: The released models' image path (ViT-L/14-336, layer_idx -2, MLP projection to 3072).
RELEASED_VISION = VisionConfig()
_CLIP_PREPROCESS = PreprocessConfig()


# --------------------------------------------------------------------------- compute cost


def crop_flops(clip: ClipConfig, *, layers: int) -> int:
    """FLOP of the CLIP vision encoder on one crop, running its first ``layers`` layers.

    A multiply-add counts as 2 FLOP; norms, softmax, activations and biases are not counted (as
    ``torch.utils.flop_counter`` does). With ``g = image_size / patch_size``, ``N = g*g + 1`` tokens (CLS
    included), width ``C``, MLP width ``I``, ``k = num_channels * patch_size**2``::

        patch embedding (conv)        2 * g*g * k * C
        per layer  Q, K, V, out proj  2 * N * C * 4C   = 8 N C^2
                   scores Q K^T       2 * N^2 * C
                   weighted sum A V   2 * N^2 * C
                   MLP fc1 + fc2      2 * N * C * I * 2 = 4 N C I
        crop = 2 g^2 k C + layers * (8 N C^2 + 4 N^2 C + 4 N C I)

    ViT-L/14-336 (N = 577, C = 1024, I = 4096): 366.03 GFLOP with the 23 layers the fast path runs for
    ``layer_idx = -2``, 381.92 GFLOP with all 24.
    """
    g = clip.image_size // clip.patch_size
    n = g * g + 1
    c, i = clip.hidden_size, clip.intermediate_size
    patch = 2 * g * g * clip.num_channels * clip.patch_size**2 * c
    per_layer = 8 * n * c * c + 4 * n * n * c + 4 * n * c * i
    return patch + layers * per_layer


def token_flops(vision: VisionConfig) -> int:
    """FLOP of the projection on one image token: ``2 (4C D + D D)`` for the MLP, ``2 * 4C D`` for linear."""
    d4, d = vision.merged_dim, vision.lm_hidden_size
    return 2 * (d4 * d + d * d) if vision.projection_cls == "mlp" else 2 * d4 * d


def image_flops(vision: VisionConfig, *, rows: int, cols: int) -> int:
    """FLOP of one image on the fast path: CLIP on its ``1 + rows*cols`` real crops, projection on its tokens."""
    tokens = num_image_tokens(rows=rows, cols=cols)
    return (1 + rows * cols) * crop_flops(vision.clip, layers=vision.layers_needed) + tokens * token_flops(vision)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PlanRow:
    """One input: its predicted geometry and cost, or the reason it cannot be encoded."""

    path: str
    width: int | None = None
    height: int | None = None
    rows: int | None = None
    cols: int | None = None
    image_sizes: tuple[int, int] | None = None  # (H', W')
    num_tokens: int | None = None
    bytes: int | None = None  # [num_tokens, hidden] * itemsize (array payload; npy/safetensors add a header)
    flops: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def crops(self) -> int | None:
        """CLIP crops encoded: the grid plus the global view."""
        return None if self.rows is None or self.cols is None else 1 + self.rows * self.cols

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": "ok" if self.ok else "error",
            "error": self.error,
            "width": self.width,
            "height": self.height,
            "crops_grid": None if self.rows is None else [self.rows, self.cols],
            "crops": self.crops,
            "image_sizes": None if self.image_sizes is None else list(self.image_sizes),
            "num_tokens": self.num_tokens,
            "bytes": self.bytes,
            "gflop": None if self.flops is None else round(self.flops / 1e9, 3),
        }


@dataclass(frozen=True)
class PlanTotals:
    images: int
    ok: int
    errors: int
    crops: int
    num_tokens: int
    bytes: int
    flops: int

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        out["gflop"] = round(out.pop("flops") / 1e9, 3)
        return out


@dataclass(frozen=True)
class PlanResult:
    num_crops: int
    out_dtype: str
    hidden_size: int
    layers_run: int
    layers_total: int
    flops_per_crop: int
    flops_per_token: int
    rows: list[PlanRow]
    totals: PlanTotals

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": {
                "num_crops": self.num_crops,
                "out_dtype": self.out_dtype,
                "hidden_size": self.hidden_size,
                "clip_layers_run": self.layers_run,
                "clip_layers_total": self.layers_total,
                "gflop_per_crop": round(self.flops_per_crop / 1e9, 3),
                "mflop_per_token": round(self.flops_per_token / 1e6, 3),
            },
            "images": [r.to_dict() for r in self.rows],
            "totals": self.totals.to_dict(),
        }


def _expand(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Files as given; directories recursed (sorted) for names with an image extension.

    Entries named like images that are not readable files (directories, broken links) are yielded too,
    so they show up as error rows. Minimal on purpose: ``phi3embed.inputs.listing`` is the full version.
    """
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            yield path
            continue
        found: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in (*dirnames, *filenames):
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(Path(dirpath, name))
        yield from sorted(found)


def _orientation(img: Image.Image) -> int:
    """EXIF orientation known after opening (JPEG/WEBP APP1, TIFF tags), without decoding pixels."""
    raw = img.info.get("exif")
    if raw:
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(_EXIF_ORIENTATION, 1))
    tags = getattr(img, "tag_v2", None)  # TIFF keeps its tags here
    return int(tags.get(_EXIF_ORIENTATION, 1)) if tags is not None else 1


def image_size(path: str | os.PathLike[str], *, exif_transpose: bool = False) -> tuple[int, int]:
    """``(width, height)`` from the image header, without decoding pixel data.

    With ``exif_transpose`` the size after applying the EXIF orientation (orientations 5-8 swap the sides).
    Raises ImageError (naming the file) for everything :func:`phi3embed.core.preprocess.open_image` would reject
    at open time; damage further inside the file only shows when it is decoded.
    """
    label = os.fspath(path)
    p = Path(path)
    with image_errors(label, decoding=False):
        check_image_file(p, label)
        with Image.open(p) as img:
            width, height = img.size
            orientation = _orientation(img) if exif_transpose else 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def plan(
    paths: Iterable[str | os.PathLike[str]],
    *,
    num_crops: int,
    out_dtype: str = "float32",
    vision: VisionConfig = RELEASED_VISION,
    exif_transpose: bool = False,
) -> PlanResult:
    """Predict, per image, what encoding it would produce and cost; read headers only.

    ``paths``: files and directories (recursed for image extensions). ``vision`` supplies the CLIP
    size, ``layer_idx`` (layers run), projection and the output width (``lm_hidden_size``); the default
    is the released models'. Unreadable or untileable images become rows with ``error`` set.
    """
    if num_crops < 1:
        raise ConfigError(f"num_crops must be >= 1, got {num_crops}")
    if out_dtype not in OUT_DTYPE_ITEMSIZE:
        raise ConfigError(f"out dtype {out_dtype!r} is not one of {', '.join(OUT_DTYPE_ITEMSIZE)}")
    itemsize = OUT_DTYPE_ITEMSIZE[out_dtype]
    hidden = vision.lm_hidden_size
    rows: list[PlanRow] = []
    for path in _expand(paths):
        try:
            width, height = image_size(path, exif_transpose=exif_transpose)
            grid = hd_grid(width=width, height=height, num_crops=num_crops, crop_size=vision.clip.image_size)
        except ImageError as exc:
            rows.append(PlanRow(path=str(path), error=str(exc) if exc.path else f"{path}: {exc.reason}"))
            continue
        tokens = num_image_tokens(rows=grid.rows, cols=grid.cols)
        rows.append(
            PlanRow(
                path=str(path),
                width=width,
                height=height,
                rows=grid.rows,
                cols=grid.cols,
                image_sizes=grid.image_sizes,
                num_tokens=tokens,
                bytes=tokens * hidden * itemsize,
                flops=image_flops(vision, rows=grid.rows, cols=grid.cols),
            )
        )
    good = [r for r in rows if r.ok]
    totals = PlanTotals(
        images=len(rows),
        ok=len(good),
        errors=len(rows) - len(good),
        crops=sum(r.crops or 0 for r in good),
        num_tokens=sum(r.num_tokens or 0 for r in good),
        bytes=sum(r.bytes or 0 for r in good),
        flops=sum(r.flops or 0 for r in good),
    )
    return PlanResult(
        num_crops=num_crops,
        out_dtype=out_dtype,
        hidden_size=hidden,
        layers_run=vision.layers_needed,
        layers_total=vision.clip.num_hidden_layers,
        flops_per_crop=crop_flops(vision.clip, layers=vision.layers_needed),
        flops_per_token=token_flops(vision),
        rows=rows,
        totals=totals,
    )


# --------------------------------------------------------------------------- configs without weights


def model_configs(
    source: str | os.PathLike[str], *, revision: str | None = None
) -> tuple[VisionConfig, PreprocessConfig]:
    """The vision and preprocessor configs of a checkpoint, reading config files only (never weights).

    A local directory is read directly; a preset name or a preset's hub id uses the shipped preset (no
    network); any other hub id fetches only ``config.json`` and ``preprocessor_config.json``.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    preset = None if path.exists() else find_preset(text)
    if path.is_dir():
        config = read_json(path / "config.json")
        pre_path = path / "preprocessor_config.json"
        pre = read_json(pre_path) if pre_path.exists() else None
        where = str(path / "config.json")
    elif preset is not None:
        config, pre, where = preset.config, preset.preprocessor_config, f"preset {preset.name}"
    elif path.exists():
        raise ConfigError("expected a checkpoint directory, got a file", path=path)
    else:
        if text.count("/") != 1 or text.startswith((".", "/", "~")):
            raise ConfigError("no such checkpoint directory, and not a hub id (owner/name) or preset name", path=text)
        config, pre = _hub_configs(text, revision=revision)
        where = f"{text}/config.json"
    vision = vision_config_from_dict(config, where=where)
    return vision, preprocess_config_from_dict(pre, crop_size=vision.clip.image_size)


def _hub_configs(repo_id: str, *, revision: str | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``config.json`` (required) and ``preprocessor_config.json`` (optional) from the hub or its cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def fetch(filename: str, *, required: bool) -> dict[str, Any] | None:
        try:
            return read_json(Path(hf_hub_download(repo_id, filename, revision=revision)))
        except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError in recent huggingface_hub: first
            raise ConfigError(
                f"{filename} is not in the local Hugging Face cache and the hub cannot be reached "
                "(offline mode or no network); pass --num-crops, or a local checkpoint directory",
                path=repo_id,
            ) from None
        except EntryNotFoundError:
            if required:
                raise ConfigError(f"{filename} not found in the repository", path=repo_id) from None
            return None
        except Phi3EmbedError:
            raise
        except Exception as exc:  # unknown repo, auth, network: one clear line
            raise ConfigError(f"cannot get {filename}: {type(exc).__name__}: {exc}", path=repo_id) from None

    config = fetch("config.json", required=True)
    assert config is not None
    return config, fetch("preprocessor_config.json", required=False)


# --------------------------------------------------------------------------- preview

_LINE = (230, 0, 70)  # grid lines and crop numbers
_CONTENT = (0, 110, 255)  # outline of the resized image inside the white padding
_BACKGROUND = (228, 228, 228)  # canvas, so white padding stays visible
_TEXT = (20, 20, 20)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (AttributeError, ImportError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


@dataclass(frozen=True)
class PreviewLayout:
    """Where everything sits on the preview canvas (pixels). Positions of the HD image are scaled by ``scale``."""

    scale: float
    crop_size: int
    rows: int
    cols: int
    hd_origin: tuple[int, int]  # top-left of the (scaled) HD image
    hd_size: tuple[int, int]  # (width, height) of the scaled HD image
    global_origin: tuple[int, int]
    global_size: int
    caption_origin: tuple[int, int]
    size: tuple[int, int]  # canvas (width, height)
    label_font_size: int
    text_font_size: int

    def col_x(self, col: int) -> int:
        """Canvas x of the boundary left of crop column ``col`` (``col == cols``: the right edge)."""
        return self.hd_origin[0] + round(col * self.crop_size * self.scale)

    def row_y(self, row: int) -> int:
        return self.hd_origin[1] + round(row * self.crop_size * self.scale)


def preview_layout(
    grid: HDGrid, *, crop_size: int = 336, max_side: int = 1024, caption_lines: Sequence[str] = ()
) -> PreviewLayout:
    """Geometry of :func:`render_preview`: the HD image scaled to fit ``max_side`` (never enlarged)."""
    scale = min(1.0, max_side / max(grid.out_w, grid.out_h))
    hd_w, hd_h = round(grid.out_w * scale), round(grid.out_h * scale)
    text_size = 16
    margin, gap, title = 16, 24, text_size + 10
    global_size = crop_size
    hd_origin = (margin, margin + title)
    global_origin = (margin + hd_w + gap, margin + title)
    body_h = max(hd_h, global_size)
    caption_origin = (margin, hd_origin[1] + body_h + 14)
    font = _font(text_size)
    text_w = max((int(math.ceil(font.getlength(line))) for line in caption_lines), default=0)
    width = max(global_origin[0] + global_size + margin, margin + text_w + margin)
    height = caption_origin[1] + len(caption_lines) * (text_size + 6) + margin
    crop_px = crop_size * scale
    label = max(11, min(36, round(crop_px * 0.14)))
    return PreviewLayout(
        scale=scale,
        crop_size=crop_size,
        rows=grid.rows,
        cols=grid.cols,
        hd_origin=hd_origin,
        hd_size=(hd_w, hd_h),
        global_origin=global_origin,
        global_size=global_size,
        caption_origin=caption_origin,
        size=(width, height),
        label_font_size=label,
        text_font_size=text_size,
    )


def global_view(hd: Image.Image, *, crop_size: int = 336, cfg: PreprocessConfig = _CLIP_PREPROCESS) -> Image.Image:
    """The global crop exactly as computed for the model (bicubic on the normalised HD image), back in uint8.

    ``x * std + mean`` then ``* 255``, rounded and clipped (bicubic overshoots a little at sharp edges).
    """
    x = normalize(hd, mean=cfg.image_mean, std=cfg.image_std)  # (3, H', W')
    glb = global_crop(x, crop_size=crop_size)[0].numpy()  # (3, S, S)
    mean = np.asarray(cfg.image_mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(cfg.image_std, dtype=np.float32).reshape(3, 1, 1)
    pixels = np.clip(np.rint((glb * std + mean) * 255.0), 0, 255).astype(np.uint8)  # (3, S, S)
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB")  # (S, S, 3)


def _caption(grid: HDGrid, *, name: str | None, num_crops: int, merged_side: int) -> list[str]:
    resized = (grid.resized_h, grid.resized_w) if grid.transposed else (grid.resized_w, grid.resized_h)
    pad = grid.pad_top + grid.pad_bottom
    pad_where = "left/right" if grid.transposed else "top/bottom"
    tokens = num_image_tokens(rows=grid.rows, cols=grid.cols, merged_side=merged_side)
    m = merged_side
    n = grid.rows * grid.cols
    crops_label = f"crops 1-{n}" if n > 1 else "crop 1"
    return [
        f"{name + ': ' if name else ''}{grid.width}x{grid.height} px, resized to {resized[0]}x{resized[1]}, "
        + (f"padded with white to {grid.out_w}x{grid.out_h} ({pad} px {pad_where})" if pad else "no padding needed"),
        f"num_crops {num_crops}: grid {grid.rows} x {grid.cols} = {n} crop{'s' if n > 1 else ''} + 1 global view, "
        f"image_sizes [{grid.out_h}, {grid.out_w}]",
        f"{tokens} image tokens = {m * grid.rows} x ({m * grid.cols} + 1 sub_GN) for {crops_label} "
        f"+ 1 glb_GN + {m} x ({m} + 1) for the global view",
    ]


@dataclass(frozen=True)
class TilingPreview:
    """A rendered preview with the facts it shows (tests and callers can locate every element)."""

    image: Image.Image
    grid: HDGrid
    layout: PreviewLayout
    caption: list[str]


def render_preview(
    image: ImageInput,
    *,
    num_crops: int,
    crop_size: int = 336,
    alpha: AlphaMode = "drop",
    exif_transpose: bool = False,
    max_side: int = 1024,
    name: str | None = None,
) -> Image.Image:
    """A picture of how ``image`` is tiled for the model.

    Left: the resized, white-padded HD image (:func:`phi3embed.core.preprocess.hd_image`, so exactly the
    pixels the crops are cut from), scaled down to fit ``max_side`` if larger, with the crop grid drawn
    and each crop numbered 1..n in row-major order, its position in ``pixel_values`` after the global view
    (0); its 12x12 tokens land in token rows interleaved with its row neighbours'. The resized image's own
    extent is outlined in blue where white padding was added. Right: the global view (the model's bicubic
    crop of the normalised HD image, converted back to uint8; see :func:`global_view`). Below: a caption
    with the source size, grid, ``image_sizes`` and token count. Raises ImageError for unreadable images.
    """
    return tiling_preview(
        image,
        num_crops=num_crops,
        crop_size=crop_size,
        alpha=alpha,
        exif_transpose=exif_transpose,
        max_side=max_side,
        name=name,
    ).image


def tiling_preview(
    image: ImageInput,
    *,
    num_crops: int,
    crop_size: int = 336,
    alpha: AlphaMode = "drop",
    exif_transpose: bool = False,
    max_side: int = 1024,
    name: str | None = None,
) -> TilingPreview:
    """:func:`render_preview` plus the grid, layout and caption it drew."""
    label = name or (os.fspath(image) if isinstance(image, (str, os.PathLike)) else None)
    img = open_image(image, name=label)
    try:
        rgb = to_rgb(img, alpha=alpha, exif_transpose=exif_transpose)
        grid = hd_grid(width=rgb.width, height=rgb.height, num_crops=num_crops, crop_size=crop_size)
        hd = hd_image(rgb, grid)
    except ImageError as exc:
        if exc.path is None and label is not None:
            raise type(exc)(exc.reason, path=label) from None
        raise
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot convert image: {exc}", path=label) from None
    glb = global_view(hd, crop_size=crop_size)
    merged_side = crop_size // 14 // 2 if crop_size % 28 == 0 else 12
    caption = _caption(grid, name=Path(label).name if label else None, num_crops=num_crops, merged_side=merged_side)
    layout = preview_layout(grid, crop_size=crop_size, max_side=max_side, caption_lines=caption)

    canvas = Image.new("RGB", layout.size, _BACKGROUND)
    shown = hd if layout.scale == 1.0 else hd.resize(layout.hd_size, Image.Resampling.LANCZOS)
    canvas.paste(shown, layout.hd_origin)
    canvas.paste(glb, layout.global_origin)
    draw = ImageDraw.Draw(canvas)
    text_font = _font(layout.text_font_size)
    title_y = layout.hd_origin[1] - layout.text_font_size - 6
    draw.text(
        (layout.hd_origin[0], title_y),
        f"HD image {grid.out_w}x{grid.out_h}" + ("" if layout.scale == 1.0 else f" (shown at {layout.scale:.0%})"),
        fill=_TEXT,
        font=text_font,
    )
    draw.text((layout.global_origin[0], title_y), f"global view {crop_size}x{crop_size}", fill=_TEXT, font=text_font)
    _outline_content(draw, grid, layout)
    _draw_grid(draw, layout)
    gx, gy = layout.global_origin
    draw.rectangle((gx - 1, gy - 1, gx + layout.global_size, gy + layout.global_size), outline=_LINE, width=1)
    _badge(draw, (gx + 6, gy + 6), "G", _font(max(11, min(36, round(crop_size * 0.14)))))
    cx, cy = layout.caption_origin
    for i, line in enumerate(caption):
        draw.text((cx, cy + i * (layout.text_font_size + 6)), line, fill=_TEXT, font=text_font)
    return TilingPreview(image=canvas, grid=grid, layout=layout, caption=caption)


def _outline_content(draw: ImageDraw.ImageDraw, grid: HDGrid, layout: PreviewLayout) -> None:
    """Blue outline of the resized image where white padding surrounds it."""
    if grid.pad_top + grid.pad_bottom == 0:
        return
    s, (x0, y0) = layout.scale, layout.hd_origin
    if grid.transposed:  # padding was added left/right
        box = (grid.pad_top, 0, grid.pad_top + grid.resized_h, grid.resized_w)
    else:
        box = (0, grid.pad_top, grid.resized_w, grid.pad_top + grid.resized_h)
    left, top, right, bottom = (round(v * s) for v in box)
    draw.rectangle((x0 + left, y0 + top, x0 + right - 1, y0 + bottom - 1), outline=_CONTENT, width=1)


def _draw_grid(draw: ImageDraw.ImageDraw, layout: PreviewLayout) -> None:
    """Lines 3 px wide centred on every crop boundary (edges included), and crop numbers."""
    top, bottom = layout.row_y(0), layout.row_y(layout.rows)
    left, right = layout.col_x(0), layout.col_x(layout.cols)
    for c in range(layout.cols + 1):
        x = layout.col_x(c)
        draw.rectangle((x - 1, top - 1, x + 1, bottom + 1), fill=_LINE)
    for r in range(layout.rows + 1):
        y = layout.row_y(r)
        draw.rectangle((left - 1, y - 1, right + 1, y + 1), fill=_LINE)
    font = _font(layout.label_font_size)
    for r in range(layout.rows):
        for c in range(layout.cols):
            _badge(draw, (layout.col_x(c) + 6, layout.row_y(r) + 6), str(r * layout.cols + c + 1), font)


def _badge(draw: ImageDraw.ImageDraw, at: tuple[int, int], text: str, font: Any) -> None:
    x, y = at
    left, top, right, bottom = draw.textbbox((x, y), text, font=font)
    pad = max(2, (bottom - top) // 5)
    draw.rectangle((left - pad, top - pad, right + pad, bottom + pad), fill=_LINE)
    draw.text((x, y), text, fill=(255, 255, 255), font=font)


# --------------------------------------------------------------------------- model info


@dataclass(frozen=True)
class WeightFile:
    path: str
    vision_tensors: int
    vision_bytes: int  # all vision tensors stored in this file
    bytes_to_read: int  # of those, what the fast path reads


@dataclass(frozen=True)
class ModelInfo:
    source: str
    root: str
    location: str  # "local directory" or "hub cache"
    variant: str | None  # preset name, or None when nothing identifies it
    variant_evidence: str
    config_torch_dtype: str | None
    stored_dtypes: list[str]  # of the vision tensors
    vision_tensors: int
    vision_params: int  # every vision tensor in the checkpoint
    vision_params_run: int  # the tensors the fast path loads (layers beyond layer_idx are skipped)
    vision_bytes: int
    bytes_to_read: int
    weight_files: list[WeightFile]
    num_crops: int
    num_crops_source: str
    clip: ClipConfig
    layer_idx: int
    layers_run: int
    image_dim_out: int
    lm_hidden_size: int
    projection_cls: str
    hd_transform_order: str
    gflop_per_crop: float
    tensors_check: str  # "ok" or why the vision tensors do not match config.json
    bytes_read: int  # tensor payload bytes read to produce this report (0)
    checkpoint: Checkpoint = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "checkpoint"}
        out["clip"] = asdict(self.clip)
        return out


def _variant(source: str, ckpt: Checkpoint, pre: dict[str, Any] | None) -> tuple[str | None, str]:
    preset = find_preset(source) if not Path(source).expanduser().exists() else None
    if preset is not None:
        return preset.name, f"{source!r} names the preset"
    by_name = {p.name: p for p in presets().values()}
    cfg = ckpt.config
    window = cfg.get("sliding_window")
    if window == 262144 and "phi-3.5-vision-instruct" in by_name:
        return "phi-3.5-vision-instruct", "config.json sliding_window 262144 (Phi-3.5)"
    if window == 131072 and "phi-3-vision-128k-instruct" in by_name:
        return "phi-3-vision-128k-instruct", "config.json sliding_window 131072 (128k context)"
    name = str(cfg.get("_name_or_path", "")).lower().replace("_", "-")
    for preset_name in sorted(by_name):
        if preset_name in name:
            return preset_name, f"config.json _name_or_path {cfg.get('_name_or_path')!r}"
    crops = (pre or {}).get("num_crops")
    matches = [p.name for p in by_name.values() if p.num_crops == crops]
    if len(matches) == 1:
        return matches[0], f"preprocessor_config.json num_crops {crops} (weak evidence)"
    return None, "no preset matches (sliding_window, _name_or_path and num_crops are inconclusive)"


def model_info(
    source: str | os.PathLike[str], *, num_crops: int | None = None, revision: str | None = None
) -> ModelInfo:
    """Describe a checkpoint from its config files and safetensors headers; never reads tensor data.

    Resolution is :func:`phi3embed.core.checkpoint.resolve`: a hub id not yet in the cache is fetched as
    ``encode`` would fetch it (configs and the shards holding vision tensors).
    """
    from phi3embed.core.model import Phi3VisionModel  # heavy import (transformers), only needed here

    text = os.fspath(source)
    ckpt = resolve(text, revision=revision)
    vision = vision_config_from_dict(ckpt.config, where=str(ckpt.root / "config.json"))
    pre = preprocess_config_from_dict(ckpt.preprocessor_config, crop_size=vision.clip.image_size)
    if num_crops is not None:
        if num_crops < 1:
            raise ConfigError(f"num_crops must be >= 1, got {num_crops}")
        pre, crops_source = replace(pre, num_crops=num_crops), "argument"
    elif ckpt.preprocessor_config is not None and "num_crops" in ckpt.preprocessor_config:
        crops_source = "preprocessor_config.json"
    else:
        crops_source = "processor default (no num_crops in preprocessor_config.json)"

    import torch

    with torch.device("meta"):
        fast = Phi3VisionModel(vision, full_depth=False, attn="eager")
    try:
        check_vision_tensors(ckpt, fast.expected_checkpoint_shapes())
        tensors_check = "ok"
    except Phi3EmbedError as exc:
        tensors_check = exc.reason
    run_keys = {module_to_checkpoint_key(k, clip_prefix=fast.clip_prefix) for k in fast.state_dict()}

    keys = ckpt.vision_keys()
    files: dict[Path, list[str]] = {}
    for key in keys:
        files.setdefault(ckpt.tensors[key].file, []).append(key)
    weight_files = [
        WeightFile(
            path=str(f),
            vision_tensors=len(ks),
            vision_bytes=sum(ckpt.tensors[k].nbytes for k in ks),
            bytes_to_read=sum(ckpt.tensors[k].nbytes for k in ks if k in run_keys),
        )
        for f, ks in sorted(files.items())
    ]
    variant, evidence = _variant(text, ckpt, ckpt.preprocessor_config)
    dtype = ckpt.config.get("torch_dtype")
    return ModelInfo(
        source=text,
        root=str(ckpt.root),
        location="hub cache" if ckpt.from_hub else "local directory",
        variant=variant,
        variant_evidence=evidence,
        config_torch_dtype=None if dtype is None else str(dtype),
        stored_dtypes=sorted(ckpt.stored_dtypes),
        vision_tensors=len(keys),
        vision_params=sum(math.prod(ckpt.tensors[k].shape) for k in keys),
        vision_params_run=sum(math.prod(ckpt.tensors[k].shape) for k in keys if k in run_keys),
        vision_bytes=sum(w.vision_bytes for w in weight_files),
        bytes_to_read=sum(w.bytes_to_read for w in weight_files),
        weight_files=weight_files,
        num_crops=pre.num_crops,
        num_crops_source=crops_source,
        clip=vision.clip,
        layer_idx=vision.layer_idx,
        layers_run=vision.layers_needed,
        image_dim_out=vision.image_dim_out,
        lm_hidden_size=vision.lm_hidden_size,
        projection_cls=vision.projection_cls,
        hd_transform_order=vision.hd_transform_order,
        gflop_per_crop=round(crop_flops(vision.clip, layers=vision.layers_needed) / 1e9, 3),
        tensors_check=tensors_check,
        bytes_read=ckpt.bytes_read,
        checkpoint=ckpt,
    )
