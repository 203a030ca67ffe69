"""bfloat16 on the CPU (phi3embed/core/cpu.py): close to float32, packing changes speed only, float32 untouched.

* every golden embedding case, encoded in bfloat16 on the CPU (the packed fast path), is within per-token
  cosine ``BF16_MIN_COSINE`` of the float32 result (which the parity tests hold to the official numbers);
* a packed linear gives the same bits as ``F.linear`` for every row count and input layout encode produces;
* packing applies to bfloat16 on the CPU only, never to float32, the plain path, or when vetoed; packed and
  unpacked bfloat16 runs give the same bits, token matrices and ``cls`` vectors alike;
* (slow) the real-size random model: bfloat16 vs float32 per-token cosine on a photo.
"""

from __future__ import annotations

import sys
from functools import cache
from itertools import groupby
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import GOLDEN, REPO, load_manifest

from phi3embed import Phi3VisionEmbedder
from phi3embed.core.cpu import BF16_MIN_COSINE, PackedLinear, pack_linears, packing_available

MANIFEST = load_manifest()
CASES = sorted(MANIFEST["embedding_cases"], key=lambda c: (c["checkpoint"], c["num_crops"], c["image"]))
GROUPS = {k: [c["image"] for c in v] for k, v in groupby(CASES, key=lambda c: (c["checkpoint"], c["num_crops"]))}
needs_packing = pytest.mark.skipif(not packing_available(), reason="this PyTorch cannot pack bfloat16 for oneDNN")


@cache
def embedder(checkpoint: str, num_crops: int, dtype: str, plain: bool = False) -> Phi3VisionEmbedder:
    return Phi3VisionEmbedder.from_pretrained(
        GOLDEN / "checkpoints" / checkpoint, num_crops=num_crops, dtype=dtype, plain=plain, batch_size=3
    )


def min_token_cosine(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    return float(torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=-1).min())


def packed_count(emb: Phi3VisionEmbedder) -> int:
    return sum(isinstance(m, PackedLinear) for m in emb.model.modules())


@pytest.mark.parametrize("group", sorted(GROUPS), ids=[f"{c}/{n}" for c, n in sorted(GROUPS)])
def test_bf16_on_the_cpu_is_within_the_cosine_bound_of_float32(group: tuple[str, int]) -> None:
    images = [GOLDEN / name for name in GROUPS[group]]
    f32 = embedder(*group, "float32").encode(images)
    bf16 = embedder(*group, "bfloat16").encode(images)
    for path, got, want in zip(images, bf16, f32, strict=True):
        assert got.dtype == torch.bfloat16 and want.dtype == torch.float32
        cos = min_token_cosine(got, want)
        assert cos >= BF16_MIN_COSINE, f"{path.name}: bf16 vs float32 min per-token cosine {cos:.5f}"
        assert not torch.equal(got.float(), want), "bf16 compute gave float32's exact numbers: was it bf16 at all?"


@needs_packing
@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (577, 96), (2, 577, 64), (3, 5, 40)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_a_packed_linear_gives_the_bits_of_f_linear(shape: tuple[int, ...], layout: str) -> None:
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    inner, outer = shape[-1], 48
    linear = torch.nn.Linear(inner, outer).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(outer, inner, generator=gen) * 0.1)
        linear.bias.copy_(torch.randn(outer, generator=gen))
    x = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    want = torch.nn.functional.linear(x, linear.weight, linear.bias)
    if layout == "transposed":  # the same values in another memory layout: the packed product does not care
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    packed = PackedLinear(linear, rows_hint=64)
    with torch.inference_mode():
        assert torch.equal(packed(x), want)


@needs_packing
def test_packing_applies_to_bfloat16_on_the_cpu_fast_path_only(monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt, crops = sorted(GROUPS)[0]
    bf16 = embedder(ckpt, crops, "bfloat16")
    layers = len(bf16.model.encoder_layers())
    projection = sum(isinstance(m, torch.nn.Linear | PackedLinear) for m in bf16.model.img_projection.modules())
    assert packed_count(bf16) == 6 * layers + projection  # q, k, v, out, fc1, fc2 per layer
    assert not any(type(m) is torch.nn.Linear for m in bf16.model.modules())
    assert packed_count(embedder(ckpt, crops, "float32")) == 0
    assert packed_count(embedder(ckpt, crops, "bfloat16", plain=True)) == 0
    monkeypatch.setenv("PHI3EMBED_BF16_PACKING", "0")
    vetoed = Phi3VisionEmbedder.from_pretrained(GOLDEN / "checkpoints" / ckpt, num_crops=crops, dtype="bfloat16")
    assert packed_count(vetoed) == 0
    # float32 modules are never touched, whoever asks
    f32 = embedder(ckpt, crops, "float32")
    assert pack_linears(f32.model, rows_hint=8) == 0


@needs_packing
@pytest.mark.parametrize("group", sorted(GROUPS), ids=[f"{c}/{n}" for c, n in sorted(GROUPS)])
def test_packed_and_unpacked_bf16_give_the_same_bits(group: tuple[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    images = [GOLDEN / name for name in GROUPS[group]]
    packed = embedder(*group, "bfloat16")
    packed.vector_head()  # made now: packing was decided when the embedder was built, not when the head is
    monkeypatch.setenv("PHI3EMBED_BF16_PACKING", "0")
    plain_linears = Phi3VisionEmbedder.from_pretrained(
        GOLDEN / "checkpoints" / group[0], num_crops=group[1], dtype="bfloat16", batch_size=3
    )
    assert packed_count(packed) > 0 and packed_count(plain_linears) == 0
    for got, want in zip(packed.encode(images), plain_linears.encode(images), strict=True):
        assert torch.equal(got, want)
    got_v = packed.vectors(images, kinds=["cls", "mean"])
    want_v = plain_linears.vectors(images, kinds=["cls", "mean"])
    assert any(isinstance(m, PackedLinear) for m in packed.vector_head().modules())
    for kind in ("cls", "mean"):
        assert torch.equal(got_v[kind], want_v[kind]), kind


@pytest.mark.slow
def test_real_size_bf16_on_the_cpu_is_within_the_cosine_bound(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Real shapes (ViT-L/14-336, 3072-wide projection), random weights, a 3-crop image: about 20 s on 2 cores."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import make_checkpoint  # type: ignore[import-not-found]
    from images import ensure_images  # type: ignore[import-not-found]

    ckpt: Path = make_checkpoint.build(tmp_path_factory.mktemp("ckpt") / "phi3v-vision-only", lm_layers=0)
    ((_, path),) = ensure_images(["panorama"])
    out: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        emb = Phi3VisionEmbedder.from_pretrained(ckpt, dtype=dtype, num_crops=4)
        (out[dtype],) = emb.encode([path])
        del emb
    cos = min_token_cosine(out["bfloat16"], out["float32"])
    print(f"real-size bf16 vs float32: {out['float32'].shape[0]} tokens, min per-token cosine {cos:.6f}")
    assert cos >= BF16_MIN_COSINE
