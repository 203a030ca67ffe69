"""``--stage`` / ``stage=``: the pipeline's own intermediates (docs/pipeline.md §9-§11), their shapes, and the
stage as part of the output settings (records, metadata, resume)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_128K

from phi3embed import Phi3VisionEmbedder
from phi3embed.core.config import VisionConfig
from phi3embed.core.safetensors_io import read_metadata as read_safetensors_metadata
from phi3embed.core.stages import STAGES, parse_stage, stage_shape
from phi3embed.errors import ConfigError
from phi3embed.inputs.listing import Source, expand_inputs
from phi3embed.jobs.core import run_job
from phi3embed.jobs.local import LocalEngine
from phi3embed.outputs.manifest import MANIFEST, iter_manifest
from phi3embed.outputs.records import OutputSettings, Record
from phi3embed.outputs.store import OutputStore

IMAGES = ["photo_1000x750.jpg", "portrait_600x1400.png", "panorama_4000x120.png"]


@pytest.fixture(scope="module")
def embedder(golden: Path) -> Iterator[Phi3VisionEmbedder]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Phi3VisionEmbedder.from_pretrained(golden / "checkpoints" / TINY_128K, num_crops=4, batch_size=3)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def paths(golden: Path) -> list[Path]:
    return [golden / "images" / name for name in IMAGES]


def test_stage_shapes_of_the_real_geometry() -> None:
    """A 4:3 photo at 16 crops is a 3x4 grid: 13 crops of 24x24 patches, 1921 tokens."""
    real = VisionConfig()
    assert stage_shape("clip", rows=3, cols=4, cfg=real) == (13, 576, 1024)
    assert stage_shape("hd", rows=3, cols=4, cfg=real) == (1921, 4096)
    assert stage_shape("projected", rows=3, cols=4, cfg=real) == (1921, 3072)
    assert stage_shape("projected", rows=1, cols=1, cfg=real) == (313, 3072)
    with pytest.raises(ConfigError, match="stage 'pixels'"):
        parse_stage("pixels")


def test_each_stage_is_the_next_ones_input(embedder: Phi3VisionEmbedder, paths: list[Path]) -> None:
    """The HD transform of ``clip`` is ``hd``, and ``hd`` projected is ``projected`` (float32, 1e-5); every
    output has the shape :func:`stage_shape` states."""
    out = {stage: embedder.encode(paths, stage=stage) for stage in STAGES}
    model = embedder.model
    for i, path in enumerate(paths):
        item = embedder.preprocess(path)
        rows, cols = item.grid.rows, item.grid.cols
        for stage in STAGES:
            assert tuple(out[stage][i].shape) == stage_shape(stage, rows=rows, cols=cols, cfg=embedder.vision_config)
            assert out[stage][i].dtype == torch.float32
        with torch.inference_mode():
            tokens = model.tokens(out["clip"][i], rows=rows, cols=cols)
            projected = model.project(out["hd"][i])
        torch.testing.assert_close(tokens, out["hd"][i], rtol=0, atol=1e-5)
        torch.testing.assert_close(projected, out["projected"][i], rtol=0, atol=1e-5)
    assert embedder.output_shape(1000, 750, stage="clip") == tuple(out["clip"][0].shape)


def test_plain_path_gives_the_same_stages(embedder: Phi3VisionEmbedder, golden: Path, paths: list[Path]) -> None:
    plain = Phi3VisionEmbedder.from_pretrained(golden / "checkpoints" / TINY_128K, num_crops=4, plain=True, stage="hd")
    for fast, ref in zip(embedder.encode(paths[:2], stage="hd"), plain.encode(paths[:2]), strict=True):
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    (clip,) = plain.encode(paths[:1], stage="clip")
    assert clip.shape[0] == 1 + plain.preprocess(paths[0]).grid.rows * plain.preprocess(paths[0]).grid.cols


def _settings(e: Phi3VisionEmbedder, **over: object) -> OutputSettings:
    base: dict[str, object] = dict(
        model=TINY_128K, fingerprint=e.fingerprint, num_crops=e.num_crops, dtype=e.dtype, compute_dtype=e.dtype
    )
    return OutputSettings(**{**base, **over})  # type: ignore[arg-type]


def _run(e: Phi3VisionEmbedder, sources: list[Source], out: Path, stage: str, fmt: str = "npy") -> int:
    """One local job at ``stage``; returns how many images it encoded (the rest were skipped)."""
    e.stage = parse_stage(stage)
    try:
        engine = LocalEngine(e, workers=0)
        with OutputStore(out, engine.info.output_settings(model=TINY_128K, format=fmt, pack_bytes=None)) as store:  # type: ignore[arg-type]
            summary = run_job(sources, store, engine)
    finally:
        e.stage = "projected"
    assert summary.failed == 0
    return summary.ok


def test_stage_is_recorded_and_part_of_resume(embedder: Phi3VisionEmbedder, golden: Path, tmp_path: Path) -> None:
    sources = [s for s in expand_inputs([str(golden / "images")]) if s.name in IMAGES]
    out = tmp_path / "emb"
    assert _run(embedder, sources, out, "hd", fmt="safetensors") == 3
    assert _run(embedder, sources, out, "hd", fmt="safetensors") == 0  # same stage: skipped
    records = list(iter_manifest(out / MANIFEST))
    assert {r.stage for r in records} == {"hd"}
    r = records[0]
    assert r.shape == [r.num_tokens, embedder.vision_config.merged_dim]
    assert read_safetensors_metadata(out / str(r.output))["stage"] == "hd"
    assert _run(embedder, sources, out, "clip", fmt="safetensors") == 3  # another stage: encoded again
    assert _run(embedder, sources, out, "projected", fmt="safetensors") == 3
    assert _run(embedder, sources, out, "projected", fmt="safetensors") == 0


def test_manifests_from_before_stages_resume_as_projected(
    embedder: Phi3VisionEmbedder, golden: Path, tmp_path: Path
) -> None:
    sources = [s for s in expand_inputs([str(golden / "images")]) if s.name in IMAGES]
    out = tmp_path / "emb"
    assert _run(embedder, sources, out, "projected") == 3
    manifest = out / MANIFEST
    old = [json.loads(line) for line in manifest.read_text().splitlines()]
    for data in old:
        del data["stage"]  # as an earlier version wrote them
    manifest.write_text("".join(json.dumps(d) + "\n" for d in old))
    assert all(r.stage == "projected" for r in iter_manifest(manifest))
    with OutputStore(out, _settings(embedder)) as store:
        assert all(store.is_done(s) for s in sources)
    with OutputStore(out, _settings(embedder, stage="hd")) as store:
        assert not any(store.is_done(s) for s in sources)
    assert Record.from_json({**old[0], "stage": None}).stage == "projected"  # type: ignore[union-attr]


def test_settings_refuse_an_unknown_stage(embedder: Phi3VisionEmbedder) -> None:
    with pytest.raises(ConfigError, match="stage"):
        _settings(embedder, stage="pixels")


def test_encode_command_stores_the_stage(golden: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from phi3embed.cli.app import app

    image = golden / "images" / IMAGES[0]
    out = tmp_path / "emb"
    ckpt = str(golden / "checkpoints" / TINY_128K)
    args = ["encode", str(image), "--out", str(out), "--model", ckpt, "--num-crops", "4", "--device", "cpu", "-q"]
    r = CliRunner().invoke(app, [*args, "--stage", "clip"], env={"HF_HUB_OFFLINE": "1"}, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (record,) = iter_manifest(out / MANIFEST)
    assert record.stage == "clip" and record.shape == [5, 576, 64] and record.num_tokens == 757
    assert np.load(out / str(record.output)).shape == (5, 576, 64)


def test_plan_reports_every_stage(golden: Path) -> None:
    from phi3embed.core.config import PreprocessConfig
    from phi3embed.jobs.plan import plan

    sources = [s for s in expand_inputs([str(golden / "images")]) if s.name == "photo_1000x750.jpg"]
    result = plan(sources, vision=VisionConfig(), preprocess=PreprocessConfig(num_crops=16), stage="clip")
    row = result.to_dict()["images"][0]
    assert row["crops_grid"] == [3, 4] and row["shape"] == [13, 576, 1024]
    sizes = {"projected": 1921 * 3072 * 4, "hd": 1921 * 4096 * 4, "clip": 13 * 576 * 1024 * 4}
    assert row["bytes_by_stage"] == sizes and row["bytes"] == sizes["clip"]
    assert result.to_dict()["totals"]["bytes_by_stage"] == sizes
    assert result.to_dict()["settings"]["stage"] == "clip" and result.output == "[crops, 576, 1024]"
