"""The one runtime policy both engines are assembled from (phi3embed.jobs.runtime)."""

from __future__ import annotations

import dataclasses
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from conftest import TINY_35, TINY_128K

from phi3embed.core import allocator
from phi3embed.core.config import DEFAULT_BATCH_SIZE, default_workers
from phi3embed.errors import ConfigError
from phi3embed.jobs import local
from phi3embed.jobs.runtime import RAY_DECODE_THREADS, EngineOptions, Runtime, build_engine, decide


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_auto_settings_follow_the_device(device: str, engine: str) -> None:
    runtime = decide(device, EngineOptions(model="m", engine=engine, output_format="safetensors"))
    gpu = device.startswith("cuda")
    workers = (RAY_DECODE_THREADS if gpu else 0) if engine == "ray" else default_workers("cuda" if gpu else "cpu")
    assert runtime == Runtime(
        device=device,
        compute_dtype=torch.bfloat16 if gpu else torch.float32,
        stored_dtype=torch.bfloat16 if gpu else torch.float32,
        batch_size=DEFAULT_BATCH_SIZE["cuda" if gpu else "cpu"],
        workers=workers,
    )


def test_what_is_given_is_kept_and_npy_never_gets_bfloat16() -> None:
    given = EngineOptions(model="m", dtype="float16", out_dtype="float32", batch_size=3, workers=2)
    assert decide("cuda", given) == Runtime("cuda", torch.float16, torch.float32, 3, 2)
    # auto on CUDA stores the compute dtype, except where npy cannot hold it
    assert decide("cuda", EngineOptions(model="m", output_format="npy")).stored_dtype == torch.float32
    assert decide("cuda", EngineOptions(model="m", output_format="pack")).stored_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="float8"):
        decide("cpu", EngineOptions(model="m", dtype="float8"))


@pytest.mark.parametrize("name", [TINY_128K, TINY_35])
def test_both_engines_state_the_same_settings_for_the_same_options(
    golden: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local engine (weights loaded here) and the Ray engine (planned on the driver, no Ray started)
    state one EngineInfo: what the outputs record cannot depend on the engine."""
    pytest.importorskip("ray")
    monkeypatch.setattr(allocator, "_state", "off (test)")  # the test process is not ours to tune
    options = EngineOptions(
        model=str(golden / "checkpoints" / name),
        device="cpu",
        out_dtype="float16",
        output_format="safetensors",
        num_crops=4,
        alpha="white",
        exif_transpose=True,
        stage="hd",
        workers=0,
    )
    local_engine = build_engine(options)
    ray_engine = build_engine(dataclasses.replace(options, engine="ray", actors=3))
    try:
        assert isinstance(local_engine, local.LocalEngine)
        assert dataclasses.replace(ray_engine.info, workers=0) == local_engine.info
        assert ray_engine.info.workers == 3
        assert local_engine.info.stored_dtype == torch.float16 and local_engine.info.stage == "hd"
    finally:
        local_engine.close()
        ray_engine.close()


def test_the_local_engine_is_planned_with_the_timeout_the_command_promises(
    golden: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from phi3embed.jobs.runtime import DEFAULT_IMAGE_TIMEOUT

    monkeypatch.setattr(allocator, "_state", "off (test)")
    model = str(golden / "checkpoints" / TINY_128K)
    engine = local.plan(EngineOptions(model=model, device="cpu"))
    assert engine.pool.timeout == DEFAULT_IMAGE_TIMEOUT and engine.pool.workers == 1  # one reader process
    engine = local.plan(EngineOptions(model=model, device="cpu", image_timeout=0))
    assert engine.pool.timeout is None and engine.pool.workers == 0


def test_ray_missing_is_a_usage_error_before_any_work(
    golden: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from phi3embed.cli.app import app
    from phi3embed.errors import Phi3EmbedError
    from phi3embed.jobs import runtime

    monkeypatch.setattr(runtime, "find_spec", lambda name: None if name == "ray" else find_spec(name))
    model = str(golden / "checkpoints" / TINY_128K)
    with pytest.raises(Phi3EmbedError, match=r"--engine ray needs Ray: pip install 'phi3embed\[ray\]'"):
        build_engine(EngineOptions(model=model, engine="ray"))
    image = str(golden / "images" / "tiny_7x9.png")
    run = CliRunner().invoke(app, ["encode", image, "-o", str(tmp_path / "out"), "--model", model, "--engine", "ray"])
    assert run.exit_code == 2 and "--engine ray needs Ray" in run.output
    assert not (tmp_path / "out").exists()
