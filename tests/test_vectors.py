"""One vector per image (phi3embed.core.vectors) against an independent computation.

``cls`` and ``mean`` are compared with transformers' own ``CLIPVisionModel`` at full depth, its weights read
straight from the golden checkpoints' safetensors files and run on the official global-view pixels (their
sha256 is in the golden MANIFEST); ``tokens`` with the golden (official) token matrices, whose separator rows
are found by value (the projection of ``sub_GN`` / ``glb_GN`` computed here from the raw weights).
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import GOLDEN, TINY_35, TINY_128K, golden_embeddings, load_manifest
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from phi3embed import Phi3VisionEmbedder
from phi3embed.core.config import PreprocessConfig
from phi3embed.core.hd import num_image_tokens
from phi3embed.core.preprocess import open_image, preprocess_rgb, to_rgb
from phi3embed.core.vectors import VECTOR_KINDS, parse_vectors, token_mask
from phi3embed.errors import ConfigError

MANIFEST = load_manifest()
ATOL = 1e-4
VISION = "model.vision_embed_tokens."
IMAGES = [
    "images/rgb_337x335.png",
    "images/portrait_600x1400.png",
    "images/panorama_4000x120.png",
    "images/tiny_7x9.png",
]


@cache
def raw_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    """Every vision tensor of the checkpoint, float32, read with safetensors alone."""
    folder = GOLDEN / "checkpoints" / checkpoint
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(file).items() if k.startswith(VISION)})
    return out


@cache
def reference_clip(checkpoint: str) -> CLIPVisionModel:
    """transformers' CLIPVisionModel at full depth with the checkpoint's CLIP weights, eager attention."""
    config = json.loads((GOLDEN / "checkpoints" / checkpoint / "config.json").read_text())
    hf = CLIPVisionConfig(**config["clip_vision_config"])
    hf._attn_implementation = "eager"
    model = CLIPVisionModel(hf).eval()
    raw = raw_weights(checkpoint)
    state = {}
    for key in model.state_dict():
        tail = key if key.startswith("vision_model.") else "vision_model." + key  # transformers 5: no extra level
        state[key] = raw[VISION + "img_processor." + tail]
    model.load_state_dict(state, strict=True)
    return model


@cache
def embedder(checkpoint: str, num_crops: int, plain: bool = False, batch_size: int = 8) -> Phi3VisionEmbedder:
    return Phi3VisionEmbedder.from_pretrained(
        GOLDEN / "checkpoints" / checkpoint, num_crops=num_crops, plain=plain, batch_size=batch_size
    )


def official_global_view(image: str, num_crops: int) -> torch.Tensor:
    """The global view ``[1, 3, 336, 336]``, checked bit for bit against the official processor's."""
    (case,) = [c for c in MANIFEST["processor_cases"] if c["image"] == image and c["num_crops"] == num_crops]
    item = preprocess_rgb(to_rgb(open_image(GOLDEN / image), alpha="drop"), PreprocessConfig(num_crops=num_crops))
    view = item.pixel_values[:1]
    assert hashlib.sha256(view[0].numpy().tobytes()).hexdigest() == case["global_crop_sha256"]
    return view


def reference_vectors(checkpoint: str, image: str, num_crops: int) -> dict[str, np.ndarray]:
    model = reference_clip(checkpoint)
    config = json.loads((GOLDEN / "checkpoints" / checkpoint / "config.json").read_text())
    layer_idx = config["img_processor"].get("layer_idx", -2)
    with torch.inference_mode():
        out = model(pixel_values=official_global_view(image, num_crops), output_hidden_states=True)
    return {
        "cls": out.pooler_output[0].numpy(),
        "mean": out.hidden_states[layer_idx][0, 1:].mean(dim=0).numpy(),
    }


@pytest.mark.parametrize("checkpoint", [TINY_128K, TINY_35])
@pytest.mark.parametrize("num_crops", [4, 16])
def test_cls_and_mean_match_transformers_clip(checkpoint: str, num_crops: int) -> None:
    ours = embedder(checkpoint, num_crops).vectors([GOLDEN / i for i in IMAGES], kinds=("cls", "mean"))
    for row, image in enumerate(IMAGES):
        ref = reference_vectors(checkpoint, image, num_crops)
        for kind in ("cls", "mean"):
            got = ours[kind][row].numpy()  # type: ignore[index]
            assert got.dtype == np.float32 and got.shape == ref[kind].shape
            diff = float(np.abs(got - ref[kind]).max())
            assert diff <= ATOL, f"{kind} of {image}: max|diff| {diff}"
    # the kinds differ from each other (a wrong kind would not pass the comparison above by accident)
    assert not torch.allclose(ours["cls"], ours["mean"], atol=1e-2)


def projected_separators(checkpoint: str) -> torch.Tensor:
    """The projection of ``sub_GN`` and ``glb_GN`` ``[2, D]``, from the raw weights (Linear, exact GELU, Linear)."""
    raw = raw_weights(checkpoint)
    seps = torch.stack([raw[VISION + "sub_GN"].reshape(-1), raw[VISION + "glb_GN"].reshape(-1)])
    hidden = torch.nn.functional.gelu(
        seps @ raw[VISION + "img_projection.0.weight"].T + raw[VISION + "img_projection.0.bias"]
    )
    return hidden @ raw[VISION + "img_projection.2.weight"].T + raw[VISION + "img_projection.2.bias"]


FULL_CASES = [
    c
    for c in MANIFEST["embedding_cases"]
    if c["file"] in MANIFEST.get("subset", {}).get("full_embeddings", []) and "tf5" not in c["file"]
] or [c for c in MANIFEST["embedding_cases"]][:6]


@pytest.mark.parametrize(
    "case", FULL_CASES, ids=lambda c: f"{c['checkpoint']}/{c['num_crops']}/{Path(c['image']).stem}"
)
def test_tokens_is_the_mean_of_the_official_tokens_without_separators(case: dict[str, Any]) -> None:
    golden = golden_embeddings(case["file"])
    assert golden.array is not None
    tokens = torch.from_numpy(golden.array.astype(np.float32))  # (T, D)
    seps = projected_separators(case["checkpoint"])
    is_sep = torch.cdist(tokens.double(), seps.double()).min(dim=1).values < 1e-4  # found by value
    rows, cols = case["image_sizes"][0] // 336, case["image_sizes"][1] // 336
    assert int(is_sep.sum()) == 12 * rows + 1 + 12  # a sub_GN per line, glb_GN, a sub_GN per global line
    assert torch.equal(~is_sep, token_mask(rows=rows, cols=cols, tokens_per_side=12))
    want = tokens[~is_sep].double().mean(dim=0).numpy()
    got = embedder(case["checkpoint"], case["num_crops"]).vectors(GOLDEN / case["image"], kinds=["tokens"])["tokens"]
    assert float(np.abs(got[0].numpy() - want).max()) <= ATOL


def test_fast_plain_and_batch_sizes_agree() -> None:
    """Crops of one image spread over several batches, or the plain path: the same vectors (to float rounding)."""
    images = [GOLDEN / i for i in IMAGES]
    base = embedder(TINY_128K, 16).vectors(images)
    for other in (embedder(TINY_128K, 16, batch_size=3), embedder(TINY_128K, 16, plain=True)):
        again = other.vectors(images)
        for kind in VECTOR_KINDS:
            assert torch.allclose(again[kind], base[kind], atol=1e-5, rtol=0), kind


def test_vectors_with_tokens_in_one_pass() -> None:
    """embed_vectors_stream gives the usual embeddings (bit for bit) and the vectors of those same tokens."""
    emb = embedder(TINY_128K, 4)
    items = [(i, emb.preprocess(GOLDEN / name)) for i, name in enumerate(IMAGES)]
    plain = emb.embed([item for _, item in items])
    out = list(emb.embed_vectors_stream(items, kinds=("tokens", "mean")))
    for (_, item, tokens, vecs), want in zip(out, plain, strict=True):
        assert tokens is not None and torch.equal(tokens, want)
        mask = token_mask(rows=item.grid.rows, cols=item.grid.cols, tokens_per_side=12)
        assert torch.equal(vecs["tokens"], want[mask].mean(dim=0))
        assert set(vecs) == {"tokens", "mean"}
    hd = list(emb.embed_vectors_stream(items, kinds=("tokens",), stage="hd"))
    for (_, _, tokens, vecs), (_, _, _, want) in zip(hd, out, strict=True):
        assert tokens is not None and tokens.shape[1] == emb.vision_config.merged_dim
        assert torch.equal(vecs["tokens"], want["tokens"])
    only = list(emb.embed_vectors_stream(items, kinds=("mean",), stage=None))
    assert all(t is None for _, _, t, _ in only)
    assert all(torch.equal(a[3]["mean"], b[3]["mean"]) for a, b in zip(only, out, strict=True))


def test_token_mask_counts() -> None:
    for rows, cols, m in [(1, 1, 12), (2, 3, 12), (4, 1, 2), (1, 7, 3)]:
        mask = token_mask(rows=rows, cols=cols, tokens_per_side=m)
        assert mask.numel() == num_image_tokens(rows=rows, cols=cols, tokens_per_side=m)
        assert int(mask.sum()) == m * m * (rows * cols + 1)  # every merged patch once, no separator
        flipped = token_mask(rows=rows, cols=cols, tokens_per_side=m, order="glb_sub")
        assert int(flipped.sum()) == int(mask.sum()) and not flipped[m * (m + 1)]  # glb_GN after the global part


def test_parse_vectors() -> None:
    assert parse_vectors("tokens,cls") == ("cls", "tokens")
    assert parse_vectors(["mean", "mean", " cls "]) == ("cls", "mean")
    with pytest.raises(ConfigError, match="'pooled'"):
        parse_vectors("cls,pooled")
    with pytest.raises(ConfigError, match="no vector kind"):
        parse_vectors(",")


def test_empty_input_gives_empty_arrays() -> None:
    out = embedder(TINY_128K, 4).vectors([])
    assert {k: tuple(v.shape) for k, v in out.items()} == {"cls": (0, 64), "mean": (0, 64), "tokens": (0, 96)}
