"""plan (phi3embed.jobs.plan) and its command: header-only predictions, listed and counted as encode does."""

from __future__ import annotations

import json
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
from typer.testing import CliRunner

from phi3embed.core.config import PreprocessConfig, VisionConfig, parse_configs
from phi3embed.core.preprocess import hd_grid, preprocess_image, read_image_size
from phi3embed.errors import ConfigError, ImageError
from phi3embed.inputs.listing import expand_inputs
from phi3embed.jobs.plan import OUT_DTYPE_ITEMSIZE, PlanResult, plan

RELEASED = VisionConfig()


def _plan(inputs: list[Path], num_crops: int, **kwargs: Any) -> PlanResult:
    """plan over the sources encode would list for ``inputs``, with the released models' configs."""
    sources = expand_inputs([str(p) for p in inputs])
    return plan(sources, vision=RELEASED, preprocess=PreprocessConfig(num_crops=num_crops), **kwargs)


def _png(path: Path, width: int, height: int, *, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(path)
    return path


def _cases(manifest: dict[str, Any], num_crops: int) -> list[dict[str, Any]]:
    return [c for c in manifest["processor_cases"] if c["num_crops"] == num_crops]


@pytest.mark.parametrize("num_crops", [16, 4])
def test_plan_matches_golden_processor_cases(golden: Path, manifest: dict[str, Any], num_crops: int) -> None:
    cases = _cases(manifest, num_crops)
    assert len(cases) >= 14
    result = _plan([golden / c["image"] for c in cases], num_crops)
    by_path = {Path(r.path).resolve(): r for r in result.rows}
    assert set(by_path) == {golden / c["image"] for c in cases}
    for case in cases:
        row = by_path[golden / case["image"]]
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


def test_plan_lists_a_folder_by_name_sorted(golden: Path, manifest: dict[str, Any]) -> None:
    result = _plan([golden / "images"], 4)
    assert [r.name for r in result.rows] == sorted(manifest["images"])
    assert all(r.ok and Path(r.path).resolve().parent == golden / "images" for r in result.rows)


def test_plan_never_decodes_pixels(golden: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(self: Image.Image) -> None:
        raise AssertionError("plan decoded pixel data")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    monkeypatch.setattr(Image.Image, "load", no_load)
    result = _plan([golden / "images"], 16, exif_transpose=True)
    assert result.totals.errors == 0 and result.totals.ok == 14


def test_plan_reads_truncated_file_from_its_header(tmp_path: Path) -> None:
    full = _png(tmp_path / "full.png", 900, 500)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:300])  # signature + IHDR + the start of IDAT
    with pytest.raises(ImageError):  # really truncated: decoding fails
        preprocess_image(cut, PreprocessConfig(num_crops=16))
    (row,) = _plan([cut], 16).rows
    assert row.ok and (row.width, row.height) == (900, 500)
    grid = hd_grid(width=900, height=500, num_crops=16)
    assert (row.rows, row.cols) == (grid.rows, grid.cols)


def test_plan_exif_transpose_matches_preprocess(golden: Path) -> None:
    path = golden / "images" / "exif_rot6_640x480.jpg"
    assert read_image_size(path) == (640, 480)
    assert read_image_size(path, exif_transpose=True) == (480, 640)
    pre = preprocess_image(path, PreprocessConfig(num_crops=16), exif_transpose=True)
    (row,) = _plan([path], 16, exif_transpose=True).rows
    assert (row.rows, row.cols, row.num_tokens) == (pre.grid.rows, pre.grid.cols, pre.num_tokens)


def test_plan_bad_inputs_become_error_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = _png(folder / "good.png", 40, 30)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image at all")
    (folder / "dir.png").mkdir()  # a folder: recursed (empty), as encode does
    (folder / "broken.png").symlink_to(folder / "missing-target.png")
    (folder / "notes.txt").write_text("ignored: neither an image extension nor an image signature")
    _png(folder / "strip.png", 10000, 1)  # the reference cannot tile it (resized height truncates to 0)
    _png(folder / "bomb.png", 120, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 120*100 > 2 * limit: a decompression bomb now
    result = _plan([folder], 16)
    by_name = {r.name: r for r in result.rows}
    assert set(by_name) == {"good.png", "empty.png", "text.jpg", "broken.png", "strip.png", "bomb.png"}
    assert by_name["good.png"].ok and by_name["good.png"].path == str(good)
    reasons = {
        "empty.png": "empty file",
        "text.jpg": "not an image",
        "broken.png": "broken symbolic link",
        "strip.png": "too extreme",
        "bomb.png": "decompression bomb",
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
    root = golden / "checkpoints" / TINY_128K
    vision, pre = parse_configs(json.loads((root / "config.json").read_text()), None, where="config.json")
    cases = [c for c in manifest["embedding_cases"] if c["checkpoint"] == TINY_128K and c["num_crops"] == 16]
    sources = expand_inputs([str(golden / c["image"]) for c in cases])
    result = plan(sources, vision=vision, preprocess=PreprocessConfig(num_crops=16), out_dtype=out_dtype)
    by_path = {Path(r.path).resolve(): r for r in result.rows}
    for case in cases:
        row = by_path[golden / case["image"]]
        emb = torch.empty(case["embeddings_shape"])  # (T, 96) float32, the golden array's shape
        stored = emb.to(getattr(torch, out_dtype))
        assert row.bytes == stored.numel() * stored.element_size()
        assert row.num_tokens == emb.shape[0] and result.hidden_size == emb.shape[1]
    assert result.totals.bytes == sum(r.bytes or 0 for r in result.rows)


def test_plan_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="out dtype"):
        plan([], vision=RELEASED, preprocess=PreprocessConfig(num_crops=4), out_dtype="int8")
    with pytest.raises(ConfigError, match="geometry"):
        plan([], vision=RELEASED, preprocess=PreprocessConfig(num_crops=4, patch_size=28))


def test_png_helper_really_truncates(tmp_path: Path) -> None:
    """Guard for the truncated-file test: 300 bytes keep the IHDR chunk intact and lose the data."""
    data = _png(tmp_path / "a.png", 900, 500).read_bytes()
    assert len(data) > 10_000
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and 8 + 8 + length + 4 < 300
    assert zlib.crc32(data[12 : 16 + length]) == struct.unpack(">I", data[16 + length : 20 + length])[0]


# --------------------------------------------------------------------------- the command


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
    assert {r["name"]: r["num_tokens"] for r in doc["images"]} == expect
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
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    result = runner.invoke(app, ["plan", image, str(empty), "--num-crops", "16", "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert sorted(r["status"] for r in doc["images"]) == ["error", "ok"]
    assert result.stderr.strip() == f"error: {empty}: empty file (0 bytes)"
    # an INPUT that names nothing is a usage error before any work, as in encode
    missing = str(tmp_path / "missing.png")
    result = runner.invoke(app, ["plan", image, missing, "--num-crops", "16"])
    assert result.exit_code == 2 and result.stdout == "" and missing in result.stderr


def test_cli_plan_shard_splits_as_encode_does(app: typer.Typer, runner: CliRunner, golden: Path) -> None:
    from phi3embed.inputs.listing import select_shard

    names: list[str] = []
    for i in range(3):
        result = runner.invoke(app, ["plan", str(golden / "images"), "--num-crops", "4", "--json", "--shard", f"{i}/3"])
        assert result.exit_code == 0, result.output
        got = [r["name"] for r in json.loads(result.stdout)["images"]]
        assert got == [s.name for s in select_shard(expand_inputs([str(golden / "images")]), i, 3)]
        names += got
    assert sorted(names) == sorted(p.name for p in (golden / "images").iterdir())
    assert runner.invoke(app, ["plan", str(golden / "images"), "--num-crops", "4", "--shard", "3/3"]).exit_code == 2


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
