"""Parity on CUDA (``pytest -m gpu``; part of benchmarks/gpu_check.sh). Not in the default run.

* float32 on CUDA (TF32 off) equals the golden embeddings to 1e-4, fast path (mixed batches) and plain path;
* bf16 / fp16 compute vs the float32 reference: per-token cosine >= 0.999 (max |diff| is reported);
* the same on a full-size random checkpoint (real shapes), bf16 vs float32 on the same GPU.

Figures go to stdout (``-s``) and, when ``PHI3EMBED_GPU_REPORT`` names a file, into that JSON file.
``PHI3EMBED_GPU_TESTS_DEVICE=cpu`` runs the same checks on the CPU (a dry run of this module, slow in bf16).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from functools import cache
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import GOLDEN, REPO, GoldenEmbeddings, golden_embeddings, load_manifest

from phi3embed import Phi3VisionEmbedder, Preprocessed
from phi3embed.core.batching import encode_stream

pytestmark = pytest.mark.gpu

MANIFEST = load_manifest()
ATOL = MANIFEST.get("tolerances", {}).get("embeddings", {}).get("atol", 1e-4)
MIN_COSINE = 0.999
REPORT: dict[str, Any] = {}
DEVICE = os.environ.get("PHI3EMBED_GPU_TESTS_DEVICE", "cuda")


def _key(case: dict[str, Any]) -> tuple[str, int]:
    return (case["checkpoint"], case["num_crops"])


GROUPS = {k: list(v) for k, v in groupby(sorted(MANIFEST["embedding_cases"], key=_key), key=_key)}  # type: ignore[arg-type]


@pytest.fixture(scope="module", autouse=True)
def device() -> Iterator[torch.device]:
    dev = torch.device(DEVICE)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("CUDA is not available: the gpu tests need a CUDA device (run them with -m gpu on a GPU machine)")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32
    torch.backends.cudnn.allow_tf32 = False
    REPORT["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    REPORT["torch"] = torch.__version__
    yield dev
    text = json.dumps(REPORT, indent=2, sort_keys=True)
    print("\n" + text)
    target = os.environ.get("PHI3EMBED_GPU_REPORT")
    if target:
        Path(target).write_text(text + "\n")


@cache
def _embedder(checkpoint: str, num_crops: int, dtype: str, plain: bool = False) -> Phi3VisionEmbedder:
    return Phi3VisionEmbedder.from_pretrained(
        GOLDEN / "checkpoints" / checkpoint, device=DEVICE, dtype=dtype, num_crops=num_crops, plain=plain
    )


@cache
def _items(checkpoint: str, num_crops: int) -> tuple[list[str], list[Preprocessed], list[GoldenEmbeddings]]:
    emb = _embedder(checkpoint, num_crops, "float32")
    cases = GROUPS[(checkpoint, num_crops)]
    return (
        [Path(c["image"]).stem for c in cases],
        [emb.preprocess(GOLDEN / c["image"]) for c in cases],
        [golden_embeddings(c["file"]) for c in cases],
    )


def _encode(emb: Phi3VisionEmbedder, items: list[Preprocessed], batch_size: int) -> list[torch.Tensor]:
    if emb.plain:
        return [e.float().cpu() for e in emb.embed(items)]
    return [e.float().cpu() for _, _, e in encode_stream(emb.model, enumerate(items), batch_size=batch_size)]


def _max_abs(a: torch.Tensor, b: np.ndarray | torch.Tensor | GoldenEmbeddings) -> float:
    if isinstance(b, GoldenEmbeddings):  # full golden array, or the trimmed set's sha256 / sample / row statistics
        return b.max_abs(a.numpy())
    return float((a.double() - torch.as_tensor(b).double()).abs().max())


def _min_token_cosine(a: torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), torch.as_tensor(b).double(), dim=-1).min())


GROUP_IDS = [f"{c}/{n}" for c, n in sorted(GROUPS)]


@pytest.mark.parametrize("plain", [False, True], ids=["fast", "plain"])
@pytest.mark.parametrize("group", sorted(GROUPS), ids=GROUP_IDS)
def test_float32_on_cuda_matches_golden(group: tuple[str, int], plain: bool) -> None:
    names, items, golden = _items(*group)
    out = _encode(_embedder(*group, "float32", plain), items, batch_size=7)
    worst = 0.0
    for name, got, want in zip(names, out, golden, strict=True):
        assert got.shape == want.shape, name
        diff = _max_abs(got, want)
        worst = max(worst, diff)
        assert diff <= ATOL, f"{name}: float32 CUDA vs golden max|diff| {diff:.2e}"
    REPORT[f"float32_{'plain' if plain else 'fast'}_vs_golden_max_abs/{group[0]}/{group[1]}"] = worst


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("group", sorted(GROUPS), ids=GROUP_IDS)
def test_low_precision_close_to_float32_reference(group: tuple[str, int], dtype: str) -> None:
    names, items, golden = _items(*group)
    emb = _embedder(*group, dtype)
    assert emb.dtype == getattr(torch, dtype)
    out = _encode(emb, items, batch_size=16)
    # compact golden files (trimmed set): the float32 result on this device stands in (it matches golden to 1e-4)
    f32 = _encode(_embedder(*group, "float32"), items, batch_size=16)
    golden = [g.array if g.array is not None else r for g, r in zip(golden, f32, strict=True)]
    cos = [_min_token_cosine(got, want) for got, want in zip(out, golden, strict=True)]
    diff = [_max_abs(got, want) for got, want in zip(out, golden, strict=True)]
    REPORT[f"{dtype}_vs_float32_golden/{group[0]}/{group[1]}"] = {"min_token_cosine": min(cos), "max_abs": max(diff)}
    for name, c in zip(names, cos, strict=True):
        assert c >= MIN_COSINE, f"{name}: {dtype} vs float32 min per-token cosine {c:.5f}"


def _full_size_checkpoint(tmp_root: Path) -> Path:
    given = os.environ.get("PHI3EMBED_BENCH_CHECKPOINT")
    if given:
        return Path(given)
    sys.path.insert(0, str(REPO / "benchmarks"))
    import make_checkpoint  # type: ignore[import-not-found]

    return make_checkpoint.build(tmp_root / "phi3v-vision-only", lm_layers=0)


def test_full_size_bf16_close_to_float32(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Real shapes (ViT-L/14-336, 3072-wide projection), random weights: bf16 vs float32, same GPU."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from images import ensure_images  # type: ignore[import-not-found]

    ckpt = _full_size_checkpoint(tmp_path_factory.mktemp("ckpt"))
    ((_, path),) = ensure_images(["photo"])
    f32 = Phi3VisionEmbedder.from_pretrained(ckpt, device=DEVICE, dtype="float32", batch_size=8)
    item = f32.preprocess(path)
    (ref,) = _encode(f32, [item], batch_size=8)
    del f32
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    bf16 = Phi3VisionEmbedder.from_pretrained(ckpt, device=DEVICE, dtype="bfloat16", batch_size=8)
    (got,) = _encode(bf16, [item], batch_size=8)
    cos, diff = _min_token_cosine(got, ref), _max_abs(got, ref)
    REPORT["full_size_bf16_vs_float32"] = {
        "tokens": int(ref.shape[0]),
        "min_token_cosine": cos,
        "max_abs": diff,
        "ref_max_abs": float(ref.abs().max()),
    }
    assert cos >= MIN_COSINE, f"full-size bf16 vs float32 min per-token cosine {cos:.5f}"


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_local_job_on_cuda_writes_the_golden_numbers(tmp_path: Path, stored: str) -> None:
    """The CLI's job on the device: worker processes, uint8 tiles through pinned memory, results copied to
    the host on the side stream (pipeline.HostCopier), written by the writer thread."""
    from phi3embed import read
    from phi3embed.inputs.listing import expand_inputs
    from phi3embed.jobs.core import run_job
    from phi3embed.jobs.local import LocalEngine
    from phi3embed.outputs.records import OutputSettings
    from phi3embed.outputs.store import OutputStore

    checkpoint, num_crops = sorted(GROUPS)[0]
    emb = Phi3VisionEmbedder.from_pretrained(
        GOLDEN / "checkpoints" / checkpoint, device=DEVICE, num_crops=num_crops, batch_size=5
    )
    cases = GROUPS[(checkpoint, num_crops)]
    sources = expand_inputs([str(GOLDEN / c["image"]) for c in cases])
    settings = OutputSettings(
        model=checkpoint,
        fingerprint=emb.fingerprint,
        num_crops=num_crops,
        dtype=getattr(torch, stored),
        compute_dtype=emb.dtype,
        format="safetensors",
        device=str(emb.device),
    )
    with OutputStore(tmp_path / "out", settings) as store:
        summary = run_job(sources, store, LocalEngine(emb, stored_dtype=getattr(torch, stored), workers=2))
    assert (summary.ok, summary.failed, summary.fatal) == (len(cases), 0, None)
    got = {Path(record["name"]).name: tensor for record, tensor in read(tmp_path / "out")}
    worst = 0.0
    for case in cases:
        expected = golden_embeddings(case["file"])
        tensor = got[Path(case["image"]).name]
        assert tensor.dtype == getattr(torch, stored)
        if stored == "float32":
            worst = max(worst, _max_abs(tensor, expected))
        else:  # the float32 result rounded once: within half a bf16 step of the golden values (plus float noise)
            want = torch.as_tensor(expected.sample)  # every value, or the trimmed set's sample
            step = want.abs() * 2**-8 + 1e-4
            assert bool(((tensor.double().reshape(-1)[expected.sample_index] - want).abs() <= step).all())
    REPORT.setdefault("local_job_on_device", {})[stored] = {"images": len(cases), "max_abs_float32": worst}
    assert worst <= ATOL
