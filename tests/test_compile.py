"""``encode --compile``: torch.compile of the encoder layers before the first image, its cost reported, and a
compile that fails falls back to the eager encoder instead of failing the job.

* the command with ``--compile`` writes outputs within the golden tolerance and says what compiling cost;
* ``compile_now`` compiles both batch shapes a job gives the layers (a full batch, a single crop), so the job's
  batches meet no compile of their own;
* a compile that fails (here: a backend that refuses every graph) leaves the layers eager, packs bfloat16 CPU
  linears as an embedder without compile has them, gives the eager bits, and says why;
* ``--compile`` with ``--engine ray`` is refused as a usage error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import GOLDEN, golden_embeddings, load_manifest

from phi3embed import Phi3VisionEmbedder
from phi3embed.core.cpu import PackedLinear, packing_available
from phi3embed.core.embedder import CompileOutcome
from phi3embed.errors import ConfigError

MANIFEST = load_manifest()
ATOL = MANIFEST.get("tolerances", {}).get("embeddings", {}).get("atol", 1e-4)
CLI = [sys.executable, "-m", "phi3embed"]
CHECKPOINT = "tiny-phi3v-128k-f32"
TINY_128K = GOLDEN / "checkpoints" / CHECKPOINT
IMAGES = ["images/rgb_336x336.png", "images/photo_1000x750.jpg", "images/tiny_7x9.png"]


def _cases(checkpoint: str, num_crops: int) -> dict[str, dict[str, Any]]:
    return {
        Path(c["image"]).name: c
        for c in MANIFEST["embedding_cases"]
        if c["checkpoint"] == checkpoint and c["num_crops"] == num_crops and c["image"] in IMAGES
    }


def test_encode_compile_matches_golden_and_reports_its_cost(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for image in IMAGES:
        (src / Path(image).name).write_bytes((GOLDEN / image).read_bytes())
    out = tmp_path / "out"
    cmd = [*CLI, "encode", str(src), "-o", str(out), "--model", str(TINY_128K), "--num-crops", "4", "--compile"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"COLUMNS": "300", **_env()})
    assert run.returncode == 0, run.stderr
    assert "torch.compile of the encoder layers:" in run.stderr, run.stderr
    cases = _cases(CHECKPOINT, 4)
    assert len(cases) == len(IMAGES)
    for name, case in cases.items():
        got = np.load(out / (name + ".npy"))
        assert golden_embeddings(case["file"]).max_abs(got) <= ATOL, name


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PHI3EMBED_MODEL"}


def test_compile_now_compiles_every_batch_shape_a_job_gives() -> None:
    emb = Phi3VisionEmbedder.from_pretrained(TINY_128K, num_crops=4, batch_size=4, compile=True)
    outcome = emb.compile_now()
    assert outcome.error is None and outcome.seconds > 0
    assert "torch.compile of the encoder layers" in outcome.line()
    import torch._dynamo.utils as dynamo_utils

    before = dict(dynamo_utils.counters["stats"])
    (got,) = emb.encode([GOLDEN / "images/photo_1000x750.jpg"])  # 5 crops: a batch of 4, then one of 1
    after = dict(dynamo_utils.counters["stats"])
    assert after.get("unique_graphs", 0) == before.get("unique_graphs", 0), "a batch compiled during the job"
    case = _cases(CHECKPOINT, 4)["photo_1000x750.jpg"]
    assert golden_embeddings(case["file"]).max_abs(got.numpy()) <= ATOL


def _refusing_backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
    raise RuntimeError("this backend compiles nothing")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_failed_compile_falls_back_to_the_eager_encoder(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    image = GOLDEN / "images/photo_1000x750.jpg"
    eager = Phi3VisionEmbedder.from_pretrained(TINY_128K, num_crops=4, dtype=dtype)
    (want,) = eager.encode([image])

    real_compile = torch.compile

    def refusing_compile(model: Any = None, **kwargs: Any) -> Any:
        return real_compile(model, **{**kwargs, "backend": _refusing_backend})

    emb = Phi3VisionEmbedder.from_pretrained(TINY_128K, num_crops=4, dtype=dtype, compile=True)
    monkeypatch.setattr(torch, "compile", refusing_compile)
    outcome = emb.compile_now()
    monkeypatch.undo()
    assert outcome.error is not None and "this backend compiles nothing" in outcome.error
    assert "failed" in outcome.line() and "ran eagerly" in outcome.line()
    assert all(layer._compiled_call_impl is None for layer in emb.model.encoder_layers())
    packed = any(isinstance(m, PackedLinear) for m in emb.model.modules())
    assert packed == (dtype == "bfloat16" and packing_available())
    (got,) = emb.encode([image])
    assert torch.equal(got, want)


def test_compile_now_refuses_an_embedder_not_loaded_for_it() -> None:
    emb = Phi3VisionEmbedder.from_pretrained(TINY_128K, num_crops=4)
    with pytest.raises(ConfigError, match="compile=True"):
        emb.compile_now()


def test_compile_outcome_lines() -> None:
    assert CompileOutcome(12.34).line() == "torch.compile of the encoder layers: 12.3 s at start, once per process"
    assert "failed after 1.0 s (X: y)" in CompileOutcome(1.0, "X: y").line()


def test_compile_is_refused_with_the_ray_engine(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes((GOLDEN / IMAGES[0]).read_bytes())
    cmd = [*CLI, "encode", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--model", str(TINY_128K),
           "--compile", "--engine", "ray"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert run.returncode == 2
    assert "--compile is for the local engine" in run.stderr
    assert not (tmp_path / "out").exists()
