"""Fast path vs plain path: the same numbers on every golden embedding case, whatever the batching.

The plain path (``plain=True``: padded crops, all layers, stored hidden states, eager attention, one image at
a time) mirrors the reference compute; the fast path (default: real crops only, truncated encoder, SDPA,
crops of many images packed into batches) must agree with it and with the golden embeddings to 1e-4 in
float32. Each (checkpoint, num_crops) group is encoded as ONE stream, so batches mix images with different
crop grids, and batch sizes 1, 3, 7 and 64 split images across forward passes in different places.
"""

from __future__ import annotations

from functools import cache
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import GOLDEN, GoldenEmbeddings, golden_embeddings, load_manifest
from transformers.activations import QuickGELUActivation

from phi3embed import Phi3VisionEmbedder, Preprocessed
from phi3embed.core.batching import encode_stream
from phi3embed.core.model import QuickGELU

MANIFEST = load_manifest()
ATOL = MANIFEST.get("tolerances", {}).get("embeddings", {}).get("atol", 1e-4)
BATCH_SIZES = (1, 3, 7, 64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """One intra-op thread: the tiny model's ops are too small to split, and on a shared 2-core host a
    second thread mostly waits for the scheduler (the numbers are the same; measured noise <= 5e-6)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _group_key(case: dict[str, Any]) -> tuple[str, int]:
    return (case["checkpoint"], case["num_crops"])


GROUPS = {
    key: list(cases)
    for key, cases in groupby(sorted(MANIFEST["embedding_cases"], key=_group_key), key=_group_key)  # type: ignore[arg-type]
}


@cache
def _embedder(checkpoint: str, num_crops: int, plain: bool) -> Phi3VisionEmbedder:
    return Phi3VisionEmbedder.from_pretrained(
        GOLDEN / "checkpoints" / checkpoint, num_crops=num_crops, plain=plain, dtype="float32"
    )


@cache
def _group(checkpoint: str, num_crops: int) -> tuple[list[str], list[Preprocessed], list[GoldenEmbeddings]]:
    """(case names, preprocessed images, golden embeddings) of one group, in manifest order."""
    fast = _embedder(checkpoint, num_crops, False)
    cases = GROUPS[(checkpoint, num_crops)]
    names = [Path(c["image"]).stem for c in cases]
    items = [fast.preprocess(GOLDEN / c["image"]) for c in cases]
    golden = [golden_embeddings(c["file"]) for c in cases]
    return names, items, golden


@cache
def _plain(checkpoint: str, num_crops: int) -> tuple[torch.Tensor, ...]:
    _, items, _ = _group(checkpoint, num_crops)
    return tuple(_embedder(checkpoint, num_crops, True).embed(items))


def _max_abs(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray | GoldenEmbeddings) -> float:
    if isinstance(b, GoldenEmbeddings):  # full golden array, or the trimmed set's sha256 / sample / row statistics
        return b.max_abs(np.asarray(a))
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_every_golden_embedding_case_is_in_a_group() -> None:
    assert (GOLDEN / "MANIFEST.json").is_file(), f"golden data missing at {GOLDEN}"
    assert sum(len(v) for v in GROUPS.values()) == len(MANIFEST["embedding_cases"]) > 0
    assert {ck for ck, _ in GROUPS} == set(MANIFEST["checkpoints"])


@pytest.mark.parametrize("group", sorted(GROUPS), ids=lambda g: f"{g[0]}/{g[1]}")
def test_plain_path_matches_golden(group: tuple[str, int]) -> None:
    names, _, golden = _group(*group)
    plain = _plain(*group)
    for name, got, want in zip(names, plain, golden, strict=True):
        assert got.shape == want.shape, name
        assert _max_abs(got, want) <= ATOL, f"{name}: plain vs golden {_max_abs(got, want):.2e}"


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("group", sorted(GROUPS), ids=lambda g: f"{g[0]}/{g[1]}")
def test_fast_path_matches_plain_and_golden(group: tuple[str, int], batch_size: int) -> None:
    names, items, golden = _group(*group)
    plain = _plain(*group)
    model = _embedder(*group, False).model
    crops = [it.num_real_crops for it in items]
    if batch_size < max(crops):  # this batch size really splits images across forward passes
        starts = np.cumsum([0, *crops[:-1]])
        assert any(s // batch_size != (s + n - 1) // batch_size for s, n in zip(starts, crops, strict=True))
    out = list(encode_stream(model, enumerate(items), batch_size=batch_size))
    assert [k for k, _, _ in out] == list(range(len(items)))  # one output per image, in input order
    for (_, item, fast), name, ref, want in zip(out, names, plain, golden, strict=True):
        assert fast.shape == (item.num_tokens, want.shape[1]), name
        assert _max_abs(fast, ref) <= ATOL, f"{name} bs={batch_size}: fast vs plain {_max_abs(fast, ref):.2e}"
        assert _max_abs(fast, want) <= ATOL, f"{name} bs={batch_size}: fast vs golden {_max_abs(fast, want):.2e}"


def test_mixed_stream_across_checkpoint_groups_keeps_images_apart() -> None:
    """Different crop grids (num_crops 16 and 4 images of one checkpoint) in one stream, batch size 5."""
    ck = "tiny-phi3v-128k-f32"
    _, items16, golden16 = _group(ck, 16)
    _, items4, golden4 = _group(ck, 4)
    items = [x for pair in zip(items16, items4, strict=False) for x in pair]
    golden = [x for pair in zip(golden16, golden4, strict=False) for x in pair]
    model = _embedder(ck, 16, False).model
    out = [emb for _, _, emb in encode_stream(model, enumerate(items), batch_size=5)]
    assert len({it.num_real_crops for it in items}) > 2
    for i, (got, want) in enumerate(zip(out, golden, strict=True)):
        assert _max_abs(got, want) <= ATOL, f"image {i}: {_max_abs(got, want):.2e}"


def test_fast_path_is_really_fast_shaped() -> None:
    """The fast model runs fewer layers with SDPA; the plain one all layers, eager."""
    ck = "tiny-phi3v-128k-f32"
    fast, plain = _embedder(ck, 16, False), _embedder(ck, 16, True)
    n_fast, n_plain = len(fast.model.encoder_layers()), len(plain.model.encoder_layers())
    assert n_fast == fast.vision_config.layers_needed < n_plain == plain.vision_config.clip.num_hidden_layers
    assert fast.model.clip.config._attn_implementation == "sdpa"
    assert plain.model.clip.config._attn_implementation == "eager"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lean_quick_gelu_is_bit_identical_to_transformers(dtype: torch.dtype) -> None:
    x = (torch.randn(3, 577, 256, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    with torch.inference_mode():
        want = QuickGELUActivation()(x)
        got = QuickGELU()(x.clone())
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


@pytest.mark.slow
def test_compiled_fast_path_matches_golden() -> None:
    """``compile=True`` (torch.compile of the encoder layers): same numbers, two batch shapes (7 and a tail)."""
    ck, nc = "tiny-phi3v-128k-f32", 16
    names, items, golden = _group(ck, nc)
    emb = Phi3VisionEmbedder.from_pretrained(GOLDEN / "checkpoints" / ck, num_crops=nc, compile=True)
    out = [e for _, _, e in encode_stream(emb.model, enumerate(items[:3]), batch_size=7)]
    for name, got, want in zip(names, out, golden, strict=False):
        assert _max_abs(got, want) <= ATOL, f"{name}: compiled vs golden {_max_abs(got, want):.2e}"


def test_default_batch_size_follows_the_device_and_is_validated() -> None:
    from phi3embed.core.config import DEFAULT_BATCH_SIZE
    from phi3embed.errors import ConfigError

    root = GOLDEN / "checkpoints" / "tiny-phi3v-128k-f32"
    assert Phi3VisionEmbedder.from_pretrained(root).batch_size == DEFAULT_BATCH_SIZE["cpu"]
    assert Phi3VisionEmbedder.from_pretrained(root, batch_size=5).batch_size == 5
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        Phi3VisionEmbedder.from_pretrained(root, batch_size=0)
