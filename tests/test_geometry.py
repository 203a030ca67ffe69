"""Geometry comes from the config: a 28 px patch (12x12 patch grid, 6 tokens per crop side) flows through
preprocessing, the HD transform, the embedder, plan and encode alike; geometry the HD transform cannot tile
is a ConfigError at load that names the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN
from factory import make_checkpoint
from typer.testing import CliRunner

from phi3embed import Phi3VisionEmbedder
from phi3embed.cli.app import app
from phi3embed.core.checkpoint import resolve_configs
from phi3embed.core.hd import num_image_tokens
from phi3embed.errors import ConfigError
from phi3embed.inputs.listing import expand_inputs
from phi3embed.jobs.plan import plan

IMAGES = ["photo_1000x750.jpg", "portrait_600x1400.png", "panorama_4000x120.png"]


@pytest.fixture(scope="module")
def patch28(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "patch28", clip={"patch_size": 28}, num_crops=4)


def test_tokens_per_side_follow_the_patch_size(patch28: Path) -> None:
    vision, pre = resolve_configs(patch28)
    assert (vision.clip.grid, vision.tokens_per_side, pre.tokens_per_side) == (12, 6, 6)
    emb = Phi3VisionEmbedder.from_pretrained(patch28)
    paths = [GOLDEN / "images" / name for name in IMAGES]
    planned = {r.path: r for r in plan(expand_inputs([str(p) for p in paths]), vision=vision, preprocess=pre).rows}
    for path, out in zip(paths, emb.encode(paths), strict=True):
        item = emb.preprocess(path)
        rows, cols = item.grid.rows, item.grid.cols
        expected = num_image_tokens(rows=rows, cols=cols, tokens_per_side=6)
        features = torch.zeros(1 + rows * cols, 12 * 12, vision.image_dim_out)  # (1 + n, g*g, C)
        assert emb.model.tokens(features, rows=rows, cols=cols).shape[0] == expected  # the HD transform's length
        assert out.shape[0] == item.num_tokens == emb.num_tokens(item.grid.width, item.grid.height) == expected
        (row,) = [r for p, r in planned.items() if Path(p).name == path.name]
        assert row.num_tokens == expected


def test_encode_writes_the_planned_rows(patch28: Path, tmp_path: Path) -> None:
    image = str(GOLDEN / "images" / "photo_1000x750.jpg")
    out = tmp_path / "out"
    args = ["--model", str(patch28), "--num-crops", "4"]
    planned = CliRunner().invoke(app, ["plan", image, *args, "--json"])
    assert planned.exit_code == 0, planned.output
    (row,) = json.loads(planned.stdout)["images"]
    encoded = CliRunner().invoke(app, ["encode", image, *args, "--device", "cpu", "--out", str(out), "-q"])
    assert encoded.exit_code == 0, encoded.output
    (record,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert record["num_tokens"] == row["num_tokens"] == num_image_tokens(rows=2, cols=2, tokens_per_side=6)


@pytest.mark.parametrize(
    ("clip", "reason"),
    [
        ({"patch_size": 48}, "patch grid 7 is odd"),
        ({"patch_size": 20}, "image_size 336 is not a multiple of patch_size 20"),
        ({"patch_size": 0}, "must be positive"),
    ],
)
def test_unsupported_geometry_is_a_config_error_naming_the_config(
    patch28: Path, tmp_path: Path, clip: dict[str, int], reason: str
) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    for f in patch28.iterdir():
        (root / f.name).symlink_to(f)
    config = json.loads((patch28 / "config.json").read_text())
    config["clip_vision_config"].update(clip)
    (root / "config.json").unlink()
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=reason) as err:
        Phi3VisionEmbedder.from_pretrained(root)
    assert str(err.value).startswith(str(root / "config.json"))
    with pytest.raises(ConfigError, match=reason):
        resolve_configs(root)
