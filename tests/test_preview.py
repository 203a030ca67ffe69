"""preview (phi3embed.core.preview) and its command: the model's own pixels, grid and token count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from conftest import TINY_128K
from PIL import Image
from typer.testing import CliRunner

from phi3embed.core.config import PreprocessConfig
from phi3embed.core.preprocess import hd_grid, hd_image, to_rgb
from phi3embed.core.preview import _BACKGROUND, _LINE, preview_layout, render_preview
from phi3embed.errors import ImageError


def _cases(manifest: dict[str, Any], num_crops: int) -> list[dict[str, Any]]:
    return [c for c in manifest["processor_cases"] if c["num_crops"] == num_crops]


def test_preview_shows_the_exact_hd_image_and_grid(golden: Path, manifest: dict[str, Any]) -> None:
    path = golden / "images" / "rgb_336x336.png"
    preview = render_preview(path, PreprocessConfig(num_crops=4))
    (case,) = [c for c in _cases(manifest, 4) if c["image"] == "images/rgb_336x336.png"]
    assert preview.caption[1].endswith(f"image_sizes {case['image_sizes']}")
    assert preview.caption[2].startswith(f"{case['num_img_tokens']} image tokens = ")
    picture, grid, layout = preview.image, preview.grid, preview.layout
    assert grid == hd_grid(width=336, height=336, num_crops=4)
    assert layout == preview_layout(grid, crop_size=336, caption_lines=preview.caption)
    assert layout.scale == 1.0 and (grid.rows, grid.cols) == (2, 2)
    assert picture.size == layout.size and picture.mode == "RGB"
    shown = np.asarray(picture)
    hd = np.asarray(hd_image(to_rgb(Image.open(path)), grid))
    golden_hd = np.asarray(Image.open(golden / "expected/processor/4/rgb_336x336.hd.png").convert("RGB"))
    assert np.array_equal(hd, golden_hd)
    x0, y0 = layout.hd_origin
    s = 336
    for r in range(grid.rows):
        for c in range(grid.cols):
            # the crop's interior, clear of the lines (3 px) and of the number badge in its top-left corner
            top, left = r * s + 80, c * s + 3
            interior = shown[y0 + top : y0 + (r + 1) * s - 2, x0 + left : x0 + (c + 1) * s - 2]
            assert np.array_equal(interior, hd[top : (r + 1) * s - 2, left : (c + 1) * s - 2]), (r, c)
    # grid lines sit exactly on the crop boundaries, edges included
    for c in range(grid.cols + 1):
        x = layout.col_x(c)
        assert x == x0 + c * s
        assert (shown[y0 + 100 : y0 + 300, x] == _LINE).all()
    for r in range(grid.rows + 1):
        y = layout.row_y(r)
        assert (shown[y, x0 + 100 : x0 + 300] == _LINE).all()
    # and nowhere else inside a crop: the middle column of a crop is image, not line
    assert not (shown[y0 + 100 : y0 + 300, x0 + s // 2] == _LINE).all(axis=-1).all()


def test_preview_global_view_is_the_models_global_crop(golden: Path) -> None:
    preview = render_preview(golden / "images" / "rgb_336x336.png", PreprocessConfig(num_crops=4))
    picture, layout = np.asarray(preview.image).astype(int), preview.layout
    ref = np.load(golden / "expected/processor/4/rgb_336x336.npz")["global_crop"]  # (3, 336, 336) normalised
    cfg = PreprocessConfig()
    mean, std = np.array(cfg.image_mean).reshape(3, 1, 1), np.array(cfg.image_std).reshape(3, 1, 1)
    expect = np.clip(np.rint((ref * std + mean) * 255), 0, 255).transpose(1, 2, 0)  # (336, 336, 3)
    gx, gy = layout.global_origin
    shown = picture[gy + 80 : gy + 336, gx : gx + 336]  # below the "G" badge
    assert np.abs(shown - expect[80:]).max() <= 1


def test_preview_scales_large_images_and_keeps_lines_on_boundaries(golden: Path) -> None:
    path = golden / "images" / "panorama_4000x120.png"
    preview = render_preview(path, PreprocessConfig(num_crops=16), max_side=800)
    picture, grid, layout = preview.image, preview.grid, preview.layout
    assert layout.hd_size == (800, round(336 * 800 / 5376)) and picture.size == layout.size
    assert max(picture.size) < 1400
    shown = np.asarray(picture)
    mid_y = layout.hd_origin[1] + layout.hd_size[1] // 2
    for c in range(grid.cols + 1):
        assert (shown[mid_y, layout.col_x(c)] == _LINE).all(), c
    assert (shown[0, 0] == _BACKGROUND).all()


def test_preview_portrait_and_padding(golden: Path) -> None:
    path = golden / "images" / "portrait_600x1400.png"
    preview = render_preview(path, PreprocessConfig(num_crops=4))
    picture, grid, layout = np.asarray(preview.image), preview.grid, preview.layout
    assert grid.transposed and (grid.rows, grid.cols) == (2, 1) and grid.pad_top > 0
    hd = np.asarray(Image.open(golden / "expected/processor/4/portrait_600x1400.hd.png").convert("RGB"))
    x0, y0 = layout.hd_origin
    # white padding left of the resized image, then image pixels, as in the golden HD image
    band = picture[y0 + 100 : y0 + 300, x0 + 3 : x0 + grid.pad_top - 2]
    assert (band == 255).all()
    inner = picture[y0 + 100 : y0 + 300, x0 + grid.pad_top + 3 : x0 + 300]
    assert np.array_equal(inner, hd[100:300, grid.pad_top + 3 : 300])


def test_preview_unreadable_image_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match="bad.png"):
        render_preview(bad, PreprocessConfig(num_crops=4))


def test_cli_preview(app: typer.Typer, runner: CliRunner, golden: Path, tmp_path: Path) -> None:
    image = golden / "images" / "photo_1000x750.jpg"
    out = tmp_path / "tiling.png"
    result = runner.invoke(app, ["preview", str(image), "-o", str(out), "--num-crops", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and "wrote" in result.stderr
    written = Image.open(out)
    assert written.format == "PNG"
    assert np.array_equal(np.asarray(written), np.asarray(render_preview(image, PreprocessConfig(num_crops=4)).image))
    # num_crops from the model's preprocessor_config.json (16 for the 128k checkpoint)
    model = str(golden / "checkpoints" / TINY_128K)
    result = runner.invoke(app, ["preview", str(image), "-o", str(out), "--model", model])
    assert result.exit_code == 0, result.output
    assert np.array_equal(
        np.asarray(Image.open(out)), np.asarray(render_preview(image, PreprocessConfig(num_crops=16)).image)
    )


def test_cli_preview_errors(app: typer.Typer, runner: CliRunner, golden: Path, tmp_path: Path) -> None:
    image = str(golden / "images" / "photo_1000x750.jpg")
    result = runner.invoke(app, ["preview", image, "-o", str(tmp_path / "x.unknown"), "--num-crops", "4"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    result = runner.invoke(app, ["preview", str(bad), "-o", str(tmp_path / "p.png"), "--num-crops", "4"])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {bad}: ")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.png").exists()
    result = runner.invoke(app, ["preview", image, "-o", str(tmp_path / "no" / "dir" / "p.png"), "--num-crops", "4"])
    assert result.exit_code == 2 and "cannot write the preview" in result.stderr
    assert runner.invoke(app, ["preview", image, "--num-crops", "4"]).exit_code == 2  # -o is required
