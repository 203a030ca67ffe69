"""Decoding, RGB conversion and HD geometry (the golden parity cases live in test_parity.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phi3embed import DecompressionBombError, ImageError, UnsupportedImageError, hd_grid, num_image_tokens
from phi3embed.core.config import PreprocessConfig
from phi3embed.core.preprocess import hd_scale, image_errors, open_image, preprocess_image, to_rgb

# docs/pipeline.md §3.10, the worked examples, verified against the official processor: (W, H, num_crops, [H', W'], T)
WORKED = [
    (336, 336, 16, (1344, 1344), 2509),
    (337, 335, 16, (1344, 1344), 2509),
    (7, 9, 16, (1344, 1344), 2509),
    (1, 1, 16, (1344, 1344), 2509),
    (500, 400, 16, (1344, 1344), 2509),
    (1000, 750, 16, (1008, 1344), 1921),
    (600, 1400, 16, (1680, 1008), 2377),
    (4000, 120, 16, (336, 5376), 2473),
    (3000, 200, 16, (336, 5040), 2329),
    (180, 2600, 16, (4704, 336), 2341),
    (640, 360, 16, (1008, 1680), 2353),
    (1000, 750, 4, (672, 672), 757),
    (600, 1400, 4, (672, 336), 469),
    (4000, 120, 4, (336, 1344), 745),
    (180, 2600, 4, (1344, 336), 781),
    (1234, 567, 1, (336, 336), 313),
    (2000, 2000, 9, (1008, 1008), 1489),
    (1050, 950, 16, (1344, 1344), 2509),
    (1050, 950, 4, (672, 672), 757),
    (333, 777, 9, (1344, 672), 1357),
]


@pytest.mark.parametrize(("w", "h", "nc", "sizes", "tokens"), WORKED)
def test_worked_examples(w: int, h: int, nc: int, sizes: tuple[int, int], tokens: int) -> None:
    grid = hd_grid(width=w, height=h, num_crops=nc)
    assert grid.image_sizes == sizes
    assert grid.rows * grid.cols <= nc
    assert num_image_tokens(rows=grid.rows, cols=grid.cols, tokens_per_side=12) == tokens


def test_new_h_uses_double_division_not_exact_arithmetic() -> None:
    # docs/pipeline.md §3.4: 1050x950 -> new_h 1215 (exact integer arithmetic would give 1216); 28x25 -> 1199
    assert hd_grid(width=1050, height=950, num_crops=16).resized_h == 1215
    assert hd_grid(width=28, height=25, num_crops=16).resized_h == 1199


def test_ratio_extremes_with_16_crops() -> None:
    expected = {(3, 1): 1909, (4, 1): 2485, (8, 1): 1321, (16, 1): 2473, (1, 16): 2653}
    for (rw, rh), tokens in expected.items():
        g = hd_grid(width=rw * 100, height=rh * 100, num_crops=16)
        assert num_image_tokens(rows=g.rows, cols=g.cols, tokens_per_side=12) == tokens


@pytest.mark.parametrize("nc", [1, 2, 3, 5, 7, 9, 12, 16, 25, 36])
def test_scale_search_is_the_largest_fitting_scale(nc: int) -> None:
    for ratio in (1.0, 1.33, 2.5, 7.0, 33.3):  # >= 1: portrait inputs are transposed first
        s = hd_scale(ratio=ratio, num_crops=nc)
        assert s >= 1
        assert s * int(np.ceil(s / ratio)) <= nc
        assert (s + 1) * int(np.ceil((s + 1) / ratio)) > nc


def test_strips_the_reference_cannot_tile_raise_a_typed_error() -> None:
    with pytest.raises(UnsupportedImageError, match="too extreme for num_crops=16"):
        hd_grid(width=10000, height=1, num_crops=16)
    with pytest.raises(UnsupportedImageError, match="truncates to 0"):
        hd_grid(width=1, height=5000, num_crops=4)
    img = Image.new("RGB", (5000, 1))
    with pytest.raises(UnsupportedImageError, match="strip.png: aspect ratio 5000x1"):
        preprocess_image(img, PreprocessConfig(num_crops=4), name="strip.png")


def test_portrait_is_transposed_not_rotated() -> None:
    """Portrait images are processed transposed (mirror about the diagonal) and transposed back."""
    rng = np.random.default_rng(0)
    portrait = Image.fromarray(rng.integers(0, 256, (700, 300, 3), dtype=np.uint8))
    landscape = portrait.transpose(Image.Transpose.TRANSPOSE)
    cfg = PreprocessConfig(num_crops=6)
    p, q = preprocess_image(portrait, cfg), preprocess_image(landscape, cfg)
    assert p.grid.transposed and not q.grid.transposed
    assert p.image_sizes == q.image_sizes[::-1]
    # tiles of the transposed image, transposed back, are the landscape's tiles in transposed order
    rows, cols = q.grid.rows, q.grid.cols
    tiles_q = q.pixel_values[1:].reshape(rows, cols, 3, 336, 336)
    tiles_p = p.pixel_values[1:].reshape(cols, rows, 3, 336, 336)
    assert torch.equal(tiles_p, tiles_q.permute(1, 0, 2, 4, 3))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode", ["1", "L", "P", "LA", "RGBA", "PA", "CMYK", "I;16", "I", "F", "RGB", "YCbCr", "HSV", "LAB"]
)
def test_every_mode_converts_to_rgb(mode: str) -> None:
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    if mode == "PA":
        img = base.convert("P").convert("PA")
    elif mode in ("I;16", "I", "F"):
        img = Image.fromarray(
            rng.integers(0, 600, (20, 30)).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
        )
        img = img.convert(mode) if img.mode != mode else img
    else:
        img = base.convert(mode)
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (30, 20)


def test_16bit_grey_is_clipped_like_pillow_not_rescaled() -> None:
    arr = np.array([[0, 100, 254, 255, 256, 40000]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(arr)))
    assert rgb[0, :, 0].tolist() == [0, 100, 254, 255, 255, 255]


def test_float_image_is_clipped_and_truncated() -> None:
    arr = np.array([[-5.0, 100.7, 300.0]], dtype=np.float32)
    rgb = np.asarray(to_rgb(Image.fromarray(arr, mode="F")))
    assert rgb[0, :, 0].tolist() == [0, 100, 255]


def test_48bit_png_keeps_the_most_significant_byte(tmp_path: Path) -> None:
    # 16-bit-per-channel RGB PNG written by hand-free route: Pillow cannot write it, so build it with zlib
    import struct
    import zlib

    w, h = 2, 1
    pixels = [(0x1234, 0xABCD, 0xFF00), (0x0001, 0x8000, 0xFFFF)]
    raw = b"\x00" + b"".join(struct.pack(">HHH", *p) for p in pixels)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path = tmp_path / "rgb48.png"
    path.write_bytes(png)
    rgb = np.asarray(to_rgb(open_image(path)))
    assert rgb[0].tolist() == [[0x12, 0xAB, 0xFF], [0x00, 0x80, 0xFF]]


def test_alpha_drop_keeps_hidden_colour_and_white_composites() -> None:
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 200  # red under ...
    arr[..., 3] = 0  # ... fully transparent pixels
    img = Image.fromarray(arr, mode="RGBA")
    assert np.asarray(to_rgb(img, alpha="drop"))[0, 0].tolist() == [200, 0, 0]
    assert np.asarray(to_rgb(img, alpha="white"))[0, 0].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="alpha must be"):
        to_rgb(img, alpha="black")  # type: ignore[arg-type]


def test_exif_orientation_is_ignored_by_default_and_applied_on_request(golden: Path) -> None:
    path = golden / "images" / "exif_rot6_640x480.jpg"
    cfg = PreprocessConfig(num_crops=4)
    stored = preprocess_image(path, cfg)
    rotated = preprocess_image(path, cfg, exif_transpose=True)
    assert (stored.grid.width, stored.grid.height) == (640, 480)  # as stored, like the reference
    assert (rotated.grid.width, rotated.grid.height) == (480, 640)  # orientation 6: rotate 90 deg clockwise
    manual = open_image(path).transpose(Image.Transpose.ROTATE_270)
    assert torch.equal(rotated.pixel_values, preprocess_image(manual, cfg).pixel_values)


def test_num_crops_one_gives_one_tile_equal_to_the_global_view() -> None:
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (500, 900, 3), dtype=np.uint8))
    p = preprocess_image(img, PreprocessConfig(num_crops=1))
    assert p.pixel_values.shape == (2, 3, 336, 336)
    assert torch.equal(p.pixel_values[0], p.pixel_values[1])  # 336x336 HD image: bicubic to same size is identity
    assert p.num_tokens == 313


BAD_INPUTS = {
    "empty.png": (b"", "empty file (0 bytes)"),
    "text.jpg": (b"hello, I am not an image\n" * 10, "not an image Pillow can identify"),
    "trunc.png": (None, "cannot decode image"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_files_raise_image_error_naming_the_file(tmp_path: Path, name: str) -> None:
    data, reason = BAD_INPUTS[name]
    if data is None:
        full = _encode(Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
        data = full[: len(full) // 2]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageError) as info:
        preprocess_image(path, PreprocessConfig())
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and reason in msg and "\n" not in msg


def test_directory_missing_file_and_broken_symlink(tmp_path: Path) -> None:
    d = tmp_path / "dir.jpg"
    d.mkdir()
    with pytest.raises(ImageError, match="is a directory"):
        open_image(d)
    with pytest.raises(ImageError, match="file not found"):
        open_image(tmp_path / "absent.png")
    link = tmp_path / "broken.png"
    link.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ImageError, match="broken symbolic link"):
        open_image(link)


def test_decompression_bomb_is_reported_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.png"
    Image.new("L", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # 40000 px > 2 x 10000: Pillow refuses
    with pytest.raises(DecompressionBombError, match=r"bomb.png: decompression bomb"):
        open_image(path)


def test_image_errors_words_decoding_and_header_reads_apart() -> None:
    """The one exception -> ImageError mapping behind open_image and inspect.image_size."""
    decoding = r"^x\.jpg: cannot decode image: truncated image data \(image file is truncated\)$"
    with pytest.raises(ImageError, match=decoding), image_errors("x.jpg"):
        raise OSError("image file is truncated")
    header = r"^x\.jpg: cannot read image header: image file is truncated$"
    with pytest.raises(ImageError, match=header), image_errors("x.jpg", decoding=False):
        raise OSError("image file is truncated")
    with pytest.raises(ImageError, match=r"^x\.jpg: out of memory while decoding$"), image_errors("x.jpg"):
        raise MemoryError
    with pytest.raises(MemoryError), image_errors("x.jpg", decoding=False):
        raise MemoryError
    with pytest.raises(ImageError, match=r"^x\.jpg: permission denied$"), image_errors("x.jpg", decoding=False):
        raise PermissionError(13, "denied")
    kept = ImageError("empty file (0 bytes)", path="y.png")
    with pytest.raises(ImageError) as info, image_errors("x.jpg"):
        raise kept
    assert info.value is kept
