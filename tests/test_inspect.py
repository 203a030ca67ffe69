"""plan / preview / info: library functions (phi3embed.inspection) and their Typer commands."""

from __future__ import annotations

import json
import math
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from conftest import TINY_35, TINY_128K
from PIL import Image, ImageFile
from safetensors import safe_open
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from phi3embed.cli.inspect_commands import register
from phi3embed.core.checkpoint import Checkpoint, resolve
from phi3embed.core.config import ClipConfig, PreprocessConfig, VisionConfig, vision_config_from_dict
from phi3embed.core.model import Phi3VisionModel
from phi3embed.core.preprocess import hd_grid, hd_image, preprocess_image, to_rgb
from phi3embed.errors import ConfigError, ImageError
from phi3embed.inspection import (
    _BACKGROUND,
    _LINE,
    OUT_DTYPE_ITEMSIZE,
    crop_flops,
    image_size,
    model_configs,
    model_info,
    plan,
    preview_layout,
    render_preview,
    tiling_preview,
    token_flops,
)

# --------------------------------------------------------------------------- helpers


def _tiny_vision(golden: Path, name: str = TINY_128K) -> VisionConfig:
    cfg = json.loads((golden / "checkpoints" / name / "config.json").read_text())
    return vision_config_from_dict(cfg)


def _png(path: Path, width: int, height: int, *, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(path)
    return path


def _cases(manifest: dict[str, Any], num_crops: int) -> list[dict[str, Any]]:
    return [c for c in manifest["processor_cases"] if c["num_crops"] == num_crops]


# --------------------------------------------------------------------------- plan


@pytest.mark.parametrize("num_crops", [16, 4])
def test_plan_matches_golden_processor_cases(golden: Path, manifest: dict[str, Any], num_crops: int) -> None:
    cases = _cases(manifest, num_crops)
    assert len(cases) >= 14
    result = plan([golden / c["image"] for c in cases], num_crops=num_crops)
    assert [r.path for r in result.rows] == [str(golden / c["image"]) for c in cases]
    for case, row in zip(cases, result.rows, strict=True):
        assert row.ok, row.error
        info = manifest["images"][Path(case["image"]).name]
        assert (row.width, row.height) == (info["width"], info["height"])
        assert [row.rows, row.cols] == case["crops_hw"], case["image"]
        assert row.crops == case["n_real_crops_incl_global"]
        assert list(row.image_sizes or ()) == case["image_sizes"]
        assert row.num_tokens == case["num_img_tokens"]
    assert result.totals.images == result.totals.ok == len(cases)
    assert result.totals.num_tokens == sum(c["num_img_tokens"] for c in cases)
    assert result.totals.crops == sum(c["n_real_crops_incl_global"] for c in cases)


def test_plan_expands_directories_sorted(golden: Path, manifest: dict[str, Any]) -> None:
    result = plan([golden / "images"], num_crops=4)
    assert [Path(r.path).name for r in result.rows] == sorted(manifest["images"])
    assert all(r.ok for r in result.rows)


def test_plan_never_decodes_pixels(golden: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(self: Image.Image) -> None:
        raise AssertionError("plan decoded pixel data")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    monkeypatch.setattr(Image.Image, "load", no_load)
    result = plan([golden / "images"], num_crops=16, exif_transpose=True)
    assert result.totals.errors == 0 and result.totals.ok == 14


def test_plan_reads_truncated_file_from_its_header(tmp_path: Path) -> None:
    full = _png(tmp_path / "full.png", 900, 500)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:300])  # signature + IHDR + the start of IDAT
    with pytest.raises(ImageError):  # really truncated: decoding fails
        preprocess_image(cut, PreprocessConfig(num_crops=16))
    (row,) = plan([cut], num_crops=16).rows
    assert row.ok and (row.width, row.height) == (900, 500)
    grid = hd_grid(width=900, height=500, num_crops=16)
    assert (row.rows, row.cols) == (grid.rows, grid.cols)


def test_plan_exif_transpose_matches_preprocess(golden: Path) -> None:
    path = golden / "images" / "exif_rot6_640x480.jpg"
    assert image_size(path) == (640, 480)
    assert image_size(path, exif_transpose=True) == (480, 640)
    pre = preprocess_image(path, PreprocessConfig(num_crops=16), exif_transpose=True)
    (row,) = plan([path], num_crops=16, exif_transpose=True).rows
    assert (row.rows, row.cols, row.num_tokens) == (pre.grid.rows, pre.grid.cols, pre.num_tokens)


def test_plan_bad_inputs_become_error_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = _png(folder / "good.png", 40, 30)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image at all")
    (folder / "dir.png").mkdir()
    (folder / "broken.png").symlink_to(folder / "missing-target.png")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    _png(folder / "strip.png", 10000, 1)  # the reference cannot tile it (resized height truncates to 0)
    _png(folder / "bomb.png", 120, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 120*100 > 2 * limit: a decompression bomb now
    result = plan([folder, tmp_path / "absent.webp"], num_crops=16)
    by_name = {Path(r.path).name: r for r in result.rows}
    assert set(by_name) == {
        "good.png", "empty.png", "text.jpg", "dir.png", "broken.png", "strip.png", "bomb.png", "absent.webp"
    }  # fmt: skip
    assert by_name["good.png"].ok and by_name["good.png"].path == str(good)
    reasons = {
        "empty.png": "empty file",
        "text.jpg": "not an image",
        "dir.png": "is a directory",
        "broken.png": "broken symbolic link",
        "strip.png": "too extreme",
        "bomb.png": "decompression bomb",
        "absent.webp": "file not found",
    }
    for name, reason in reasons.items():
        row = by_name[name]
        assert not row.ok and row.error is not None
        assert "\n" not in row.error and row.error.startswith(row.path + ": "), row.error
        assert reason in row.error, row.error
        assert row.to_dict()["status"] == "error" and row.num_tokens is None
    assert result.totals.errors == len(reasons) and result.totals.ok == 1
    assert result.totals.num_tokens == by_name["good.png"].num_tokens


@pytest.mark.parametrize("out_dtype", sorted(OUT_DTYPE_ITEMSIZE))
def test_plan_bytes_equal_real_embedding_arrays(golden: Path, manifest: dict[str, Any], out_dtype: str) -> None:
    vision = _tiny_vision(golden)
    cases = [c for c in manifest["embedding_cases"] if c["checkpoint"] == TINY_128K and c["num_crops"] == 16]
    result = plan([golden / c["image"] for c in cases], num_crops=16, out_dtype=out_dtype, vision=vision)
    for case, row in zip(cases, result.rows, strict=True):
        emb = torch.empty(case["embeddings_shape"])  # (T, 96) float32, the golden array's shape
        stored = emb.to(getattr(torch, out_dtype))
        assert row.bytes == stored.numel() * stored.element_size()
        assert row.num_tokens == emb.shape[0] and result.hidden_size == emb.shape[1]
    assert result.totals.bytes == sum(r.bytes or 0 for r in result.rows)


def test_plan_rejects_bad_settings() -> None:
    with pytest.raises(Exception, match="num_crops"):
        plan([], num_crops=0)
    with pytest.raises(Exception, match="out dtype"):
        plan([], num_crops=4, out_dtype="int8")


# --------------------------------------------------------------------------- FLOP


def _counted_flops(model: torch.nn.Module, pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(pixel_values, grids)
    return int(counter.get_total_flops())


def test_flop_formula_equals_torch_count_on_tiny_model(golden: Path) -> None:
    vision = _tiny_vision(golden)
    image = golden / "images" / "photo_1000x750.jpg"
    pre = preprocess_image(image, PreprocessConfig(num_crops=4))
    grids = [(pre.grid.rows, pre.grid.cols)]
    torch.manual_seed(0)
    model = Phi3VisionModel(vision, attn="eager").eval()
    counted = _counted_flops(model, pre.pixel_values, grids)
    (row,) = plan([image], num_crops=4, vision=vision).rows
    # exact: the formula counts what torch counts (patch convolution, linear layers, both attention products)
    assert row.flops == counted, (row.flops, counted)


@pytest.mark.parametrize("full_depth", [False, True])
def test_flop_formula_at_real_size(full_depth: bool) -> None:
    """ViT-L/14-336 on the meta device (no memory, no compute): 23 layers for layer_idx -2, or all 24."""
    vision = VisionConfig()
    with torch.device("meta"):
        model = Phi3VisionModel(vision, full_depth=full_depth, attn="eager")
        crop = torch.empty(1, 3, 336, 336)
    counter = FlopCounterMode(display=False)
    with counter:
        model.crop_features(crop)
    layers = vision.clip.num_hidden_layers if full_depth else vision.layers_needed
    assert layers == (24 if full_depth else 23)
    assert crop_flops(vision.clip, layers=layers) == counter.get_total_flops()
    gflop = crop_flops(vision.clip, layers=layers) / 1e9
    assert gflop == pytest.approx(381.92 if full_depth else 366.03, abs=0.01)


def test_projection_flops_per_token() -> None:
    assert token_flops(VisionConfig()) == 2 * (4096 * 3072 + 3072 * 3072)
    assert token_flops(VisionConfig(projection_cls="linear")) == 2 * 4096 * 3072
    assert crop_flops(ClipConfig(), layers=0) == 2 * 576 * 588 * 1024  # the patch embedding alone


def _fake_hub_cache(cache: Path, repo_id: str, source: Path) -> None:
    """A Hugging Face cache entry holding ``source``'s config files (no weights) at revision main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(source / name, snapshot / name)


def test_model_configs_reads_only_configs(golden: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    # a local directory: configs only (the weights are not even opened)
    vision, pre = model_configs(golden / "checkpoints" / TINY_35)
    assert (vision.lm_hidden_size, vision.clip.hidden_size, pre.num_crops) == (96, 64, 4)
    # presets need no network and no files
    vision, pre = model_configs("microsoft/Phi-3.5-vision-instruct")
    assert (vision.lm_hidden_size, vision.layers_needed, pre.num_crops) == (3072, 23, 4)
    assert model_configs("phi3v")[1].num_crops == 16
    # any other hub id: config files from the cache (offline here), nothing else
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path, "acme/tiny-vision", golden / "checkpoints" / TINY_128K)
    vision, pre = model_configs("acme/tiny-vision")
    assert (vision.lm_hidden_size, pre.num_crops) == (96, 16)
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache") as err:
        model_configs("acme/not-cached")
    assert str(err.value).startswith("acme/not-cached: config.json")
    with pytest.raises(ConfigError, match="not a hub id"):
        model_configs(tmp_path / "no" / "such" / "dir")


# --------------------------------------------------------------------------- preview


def test_preview_shows_the_exact_hd_image_and_grid(golden: Path, manifest: dict[str, Any]) -> None:
    path = golden / "images" / "rgb_336x336.png"
    preview = tiling_preview(path, num_crops=4)
    (case,) = [c for c in _cases(manifest, 4) if c["image"] == "images/rgb_336x336.png"]
    assert preview.caption[1].endswith(f"image_sizes {case['image_sizes']}")
    assert preview.caption[2].startswith(f"{case['num_img_tokens']} image tokens = ")
    picture, grid, layout = preview.image, preview.grid, preview.layout
    assert grid == hd_grid(width=336, height=336, num_crops=4)
    assert layout == preview_layout(grid, caption_lines=preview.caption)
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
    preview = tiling_preview(golden / "images" / "rgb_336x336.png", num_crops=4)
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
    preview = tiling_preview(path, num_crops=16, max_side=800)
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
    preview = tiling_preview(path, num_crops=4)
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
        render_preview(bad, num_crops=4)


# --------------------------------------------------------------------------- info


def _header_params(root: Path) -> tuple[int, set[str]]:
    """Vision parameter count and dtypes from safetensors headers, via the safetensors library."""
    index = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    total, dtypes = 0, set()
    for key, fname in index.items():
        if key.startswith("model.vision_embed_tokens."):
            with safe_open(root / fname, framework="pt") as fh:
                sl = fh.get_slice(key)
                total += math.prod(sl.get_shape())
                dtypes.add(sl.get_dtype())
    return total, dtypes


@pytest.mark.parametrize("name", [TINY_128K, TINY_35])
def test_info_on_golden_checkpoints(
    golden: Path, manifest: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_read(self: Checkpoint, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("info read tensor data")

    root = golden / "checkpoints" / name
    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "read", no_read)
        info = model_info(root)
    assert info.bytes_read == 0 and info.checkpoint.bytes_read == 0
    params, dtypes = _header_params(root)
    assert info.vision_params == params
    facts = manifest["checkpoints"][name]
    assert info.stored_dtypes == sorted(dtypes) == [{"float32": "F32", "bfloat16": "BF16"}[facts["dtype"]]]
    assert info.variant == {"128k": "phi-3-vision-128k-instruct", "3.5": "phi-3.5-vision-instruct"}[facts["style"]]
    assert info.num_crops == facts["preprocessor_num_crops"]
    assert info.num_crops_source == "preprocessor_config.json"
    assert info.lm_hidden_size == facts["lm_hidden_size"] and info.clip.hidden_size == facts["image_dim_out"]
    assert info.layers_run == info.clip.num_hidden_layers - 1 and info.layer_idx == facts["layer_idx"]
    assert info.location == "local directory" and Path(info.root) == root
    by_shard = {s: keys for s, keys in facts["vision_keys_by_shard"].items() if keys}
    assert {Path(w.path).name: w.vision_tensors for w in info.weight_files} == {s: len(k) for s, k in by_shard.items()}
    assert info.tensors_check == "ok"
    # what info says encode reads is what loading the fast model actually reads
    ckpt = resolve(root)
    model, _ = Phi3VisionModel.from_checkpoint(ckpt, vision_config_from_dict(ckpt.config))
    assert ckpt.bytes_read == info.bytes_to_read < info.vision_bytes
    assert sum(p.numel() for p in model.parameters()) == info.vision_params_run < info.vision_params
    json.dumps(info.to_dict())


def test_info_num_crops_override_and_mismatched_config(golden: Path, tmp_path: Path) -> None:
    info = model_info(golden / "checkpoints" / TINY_128K, num_crops=9)
    assert (info.num_crops, info.num_crops_source) == (9, "argument")
    copy = tmp_path / "ckpt"
    shutil.copytree(golden / "checkpoints" / TINY_128K, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["clip_vision_config"]["num_hidden_layers"] = 2
    (copy / "config.json").write_text(json.dumps(cfg))
    info = model_info(copy)
    assert info.tensors_check.startswith("vision tensors do not match config.json: unexpected")
    assert info.bytes_read == 0


# --------------------------------------------------------------------------- CLI


@pytest.fixture()
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture()
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.delenv("PHI3EMBED_MODEL", raising=False)
    return CliRunner()


@pytest.mark.parametrize("command", ["plan", "preview", "info"])
def test_cli_help(app: typer.Typer, runner: CliRunner, command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--model" in result.stdout and "Usage" in result.stdout


def test_cli_plan_json_is_pure_json(app: typer.Typer, runner: CliRunner, golden: Path, manifest: dict) -> None:
    result = runner.invoke(app, ["plan", str(golden / "images"), "--num-crops", "4", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["settings"]["num_crops"] == 4 and doc["settings"]["hidden_size"] == 3072
    assert doc["settings"]["clip_layers_run"] == 23 and doc["settings"]["gflop_per_crop"] == pytest.approx(366.034)
    expect = {Path(c["image"]).name: c["num_img_tokens"] for c in _cases(manifest, 4)}
    assert {Path(r["path"]).name: r["num_tokens"] for r in doc["images"]} == expect
    assert doc["totals"]["num_tokens"] == sum(expect.values())
    assert result.stderr == ""


def test_cli_plan_uses_the_models_configs(app: typer.Typer, runner: CliRunner, golden: Path) -> None:
    model = str(golden / "checkpoints" / TINY_35)
    image = str(golden / "images" / "photo_1000x750.jpg")
    result = runner.invoke(app, ["plan", image, "--model", model, "--json", "--out-dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["settings"]["num_crops"] == 4 and doc["settings"]["hidden_size"] == 96
    assert doc["images"][0]["num_tokens"] == 757 and doc["images"][0]["bytes"] == 757 * 96 * 2
    # the same through the environment variable
    result = runner.invoke(app, ["plan", image, "--json"], env={"PHI3EMBED_MODEL": model})
    assert json.loads(result.stdout)["settings"]["hidden_size"] == 96


def test_cli_plan_table_and_failures(app: typer.Typer, runner: CliRunner, golden: Path, tmp_path: Path) -> None:
    image = str(golden / "images" / "photo_1000x750.jpg")
    result = runner.invoke(app, ["plan", image, "--num-crops", "16"])
    assert result.exit_code == 0, result.output
    assert "photo_1000x750.jpg" in result.stdout and "1,921" in result.stdout and "3x4" in result.stdout
    missing = str(tmp_path / "missing.png")
    result = runner.invoke(app, ["plan", image, missing, "--num-crops", "16", "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert [r["status"] for r in doc["images"]] == ["ok", "error"]
    assert result.stderr.strip() == f"error: {missing}: file not found"


def test_cli_plan_model_errors_exit_2(app: typer.Typer, runner: CliRunner, golden: Path, tmp_path: Path) -> None:
    image = str(golden / "images" / "photo_1000x750.jpg")
    absent = str(tmp_path / "no-such-model")
    result = runner.invoke(app, ["plan", image, "--model", absent])
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and absent in result.stderr
    # a stale environment model does not matter when --num-crops is given
    result = runner.invoke(app, ["plan", image, "--num-crops", "4", "--json"], env={"PHI3EMBED_MODEL": absent})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"][0]["num_tokens"] == 757
    assert "warning" in result.stderr
    # usage errors are exit 2 too
    assert runner.invoke(app, ["plan", image, "--num-crops", "0"]).exit_code == 2
    assert runner.invoke(app, ["plan", image, "--out-dtype", "int8"]).exit_code == 2


def test_cli_preview(app: typer.Typer, runner: CliRunner, golden: Path, tmp_path: Path) -> None:
    image = golden / "images" / "photo_1000x750.jpg"
    out = tmp_path / "tiling.png"
    result = runner.invoke(app, ["preview", str(image), "-o", str(out), "--num-crops", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and "wrote" in result.stderr
    written = Image.open(out)
    assert written.format == "PNG"
    assert np.array_equal(np.asarray(written), np.asarray(render_preview(image, num_crops=4)))
    # num_crops from the model's preprocessor_config.json (16 for the 128k checkpoint)
    model = str(golden / "checkpoints" / TINY_128K)
    result = runner.invoke(app, ["preview", str(image), "-o", str(out), "--model", model])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(render_preview(image, num_crops=16)))


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


def test_cli_info(app: typer.Typer, runner: CliRunner, golden: Path, tmp_path: Path) -> None:
    model = str(golden / "checkpoints" / TINY_35)
    result = runner.invoke(app, ["info", "--model", model, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["bytes_read"] == 0 and doc["variant"] == "phi-3.5-vision-instruct"
    assert doc["stored_dtypes"] == ["BF16"] and doc["vision_params"] == _header_params(Path(model))[0]
    result = runner.invoke(app, ["info"], env={"PHI3EMBED_MODEL": model})
    assert result.exit_code == 0, result.output
    assert "phi-3.5-vision-instruct" in result.stdout and "BF16" in result.stdout
    absent = str(tmp_path / "nothing")
    result = runner.invoke(app, ["info", "--model", absent])
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and absent in result.stderr


def test_png_helper_really_truncates(tmp_path: Path) -> None:
    """Guard for the truncated-file test: 300 bytes keep the IHDR chunk intact and lose the data."""
    data = _png(tmp_path / "a.png", 900, 500).read_bytes()
    assert len(data) > 10_000
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and 8 + 8 + length + 4 < 300
    assert zlib.crc32(data[12 : 16 + length]) == struct.unpack(">I", data[16 + length : 20 + length])[0]
