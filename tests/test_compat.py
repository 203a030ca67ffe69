"""phi3embed.core.compat.Phi3ImageEmbedding: golden parity and one test per problem of docs/pipeline.md §16."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY_35, TINY_128K, load_manifest
from torch import nn
from transformers import PretrainedConfig

from phi3embed import Phi3VisionEmbedder, load_text_embeddings
from phi3embed.core.checkpoint import VISION_PREFIX, resolve
from phi3embed.core.compat import (
    Phi3ImageEmbedding,
    module_to_official_key,
    official_to_module_key,
    vision_state_dict,
)
from phi3embed.core.config import PreprocessConfig
from phi3embed.core.hd import image_tokens, num_image_tokens
from phi3embed.core.preprocess import pad_crops, preprocess_image
from phi3embed.errors import ConfigError, MergeError

MERGE_CASES = load_manifest()["merge_cases"]
S, G2, C, D, VOCAB = 336, 576, 64, 96, 512  # tiny checkpoint: crop, patches per crop, CLIP width, LM width, vocab


@pytest.fixture(scope="module")
def ckpt_dir(golden: Path) -> Path:
    return golden / "checkpoints" / TINY_128K


@pytest.fixture(scope="module")
def config(ckpt_dir: Path) -> dict[str, Any]:
    return json.loads((ckpt_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def table(ckpt_dir: Path) -> torch.Tensor:
    return load_text_embeddings(ckpt_dir)


@pytest.fixture(scope="module")
def weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return vision_state_dict(ckpt_dir)


def _build(
    config: dict[str, Any], weights: dict[str, torch.Tensor], wte: Any = None, **kwargs: Any
) -> Phi3ImageEmbedding:
    """The drop-in flow: construct from config.json, then load the checkpoint's stripped vision tensors."""
    module = Phi3ImageEmbedding(config, wte=wte, **kwargs)
    result = module.load_state_dict(weights, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return module.eval()


@pytest.fixture(scope="module")
def module(config: dict[str, Any], weights: dict[str, torch.Tensor], table: torch.Tensor) -> Phi3ImageEmbedding:
    return _build(config, weights, wte=nn.Embedding.from_pretrained(table))


@pytest.fixture(scope="module")
def merge_inputs(golden: Path) -> dict[str, dict[str, Any]]:
    """Per golden merge case: official-style padded pixel_values, image_sizes, input_ids, expected hidden states."""
    out = {}
    for case in MERGE_CASES:
        nc = case["num_crops"]
        data = np.load(golden / case["file"])
        items = [preprocess_image(golden / p, PreprocessConfig(num_crops=nc)) for p in case["images"]]
        out[case["name"]] = {
            "pixel_values": torch.stack([pad_crops(it.pixel_values, num_crops=nc) for it in items]),  # (B,nc+1,3,S,S)
            "image_sizes": torch.from_numpy(data["image_sizes"]),
            "input_ids": torch.from_numpy(data["input_ids"]),
            "expected": torch.from_numpy(data["hidden_states"]),
            "real_crops": sum(it.num_real_crops for it in items),
        }
    return out


class CropCounter:
    """Counts the crops that reach CLIP (forward pre-hook on img_processor)."""

    def __init__(self, module: Phi3ImageEmbedding) -> None:
        self.calls: list[int] = []
        self.handle = module.img_processor.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        self.calls.append(x.shape[0])

    def __enter__(self) -> CropCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- loading and construction


def test_checkpoint_names_load_and_round_trip(
    module: Phi3ImageEmbedding, weights: dict[str, torch.Tensor], config: dict[str, Any]
) -> None:
    state = module.state_dict()
    assert set(state) == set(weights)  # official names, no wte, nothing extra
    for key, value in weights.items():
        assert torch.equal(state[key], value), key
    assert {n for n, _ in module.named_children()} >= {"img_processor", "img_projection"}
    assert isinstance(module.glb_GN, nn.Parameter) and isinstance(module.sub_GN, nn.Parameter)
    fresh = Phi3ImageEmbedding(config)
    fresh.load_state_dict(state, strict=True)  # round trip through our own state_dict
    nested = nn.ModuleDict({"vision_embed_tokens": Phi3ImageEmbedding(config)})
    nested.load_state_dict({"vision_embed_tokens." + k: v for k, v in weights.items()}, strict=True)
    assert set(nested.state_dict()) == {"vision_embed_tokens." + k for k in weights}


@pytest.mark.parametrize("prefix", ["img_processor.vision_model.", "img_processor."])
def test_key_mapping_is_a_pure_inverse_pair(prefix: str) -> None:
    official = "img_processor.vision_model.encoder.layers.0.mlp.fc1.weight"
    mapped = official_to_module_key(official, clip_prefix=prefix)
    assert mapped == prefix + "encoder.layers.0.mlp.fc1.weight"
    assert module_to_official_key(mapped, clip_prefix=prefix) == official
    for other in ("glb_GN", "img_projection.0.weight"):
        assert (
            official_to_module_key(other, clip_prefix=prefix)
            == other
            == module_to_official_key(other, clip_prefix=prefix)
        )


def test_config_objects_and_official_kwargs(config: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    keys = ("hidden_size", "vocab_size", "img_processor", "embd_layer", "clip_vision_config")
    namespace = SimpleNamespace(**{k: config[k] for k in keys})
    pretrained = PretrainedConfig(**{k: config[k] for k in keys}, embd_pdrop=0.0)
    for cfg in (namespace, pretrained):
        built = _build(cfg, weights)  # type: ignore[arg-type]
        assert built.vision_config.clip.hidden_size == C
    assert isinstance(_build(pretrained, weights).drop, nn.Dropout)  # embd_pdrop -> dropout (identity in eval)
    # Phi3VModel passes config.embd_layer as keyword arguments
    embd = config["embd_layer"]
    assert _build(config, weights, **embd).hd_transform_order == "sub_glb"
    with pytest.raises(ConfigError, match="unknown argument"):
        Phi3ImageEmbedding(config, hd_transform_ordr="sub_glb")


def test_from_pretrained_matches_the_drop_in_flow(ckpt_dir: Path, module: Phi3ImageEmbedding) -> None:
    loaded = Phi3ImageEmbedding.from_pretrained(ckpt_dir)
    ours, theirs = loaded.state_dict(), module.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert isinstance(loaded.wte, torch.Tensor) and loaded.wte.shape == (VOCAB, D)
    ckpt = resolve(ckpt_dir)
    assert {VISION_PREFIX + k for k in ours} == set(ckpt.vision_keys())


# ------------------------------------------------------------- docs/pipeline.md §16 (1, 2): the HD path runs and matches


@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: c["name"])
def test_golden_parity_official_inputs(
    case: dict[str, Any], module: Phi3ImageEmbedding, merge_inputs: dict, manifest: dict
) -> None:
    x = merge_inputs[case["name"]]
    out = module(x["input_ids"], x["pixel_values"], x["image_sizes"])
    diff = _max_diff(out, x["expected"])
    print(f"compat {case['name']}: max|diff| = {diff:.3g}")
    assert diff <= manifest["tolerances"]["merge_hidden_states"]["atol"]


# --------------------------------------------------------------------------- 13: no CLIP on padding crops


def test_only_real_crops_reach_clip(module: Phi3ImageEmbedding, merge_inputs: dict) -> None:
    saved = 0
    for x in merge_inputs.values():
        with CropCounter(module) as counter:
            module(x["input_ids"], x["pixel_values"], x["image_sizes"])
        padded = x["pixel_values"].shape[0] * x["pixel_values"].shape[1]
        assert sum(counter.calls) == x["real_crops"] <= padded
        saved += padded - x["real_crops"]
    assert saved > 0  # the golden prompts do contain padding crops (the portrait uses 3 of 5)


# --------------------------------------------------------------------------- 3, 4: coherent single-crop / non-HD paths


def test_single_crop_input_is_the_num_crops_1_hd_path(
    golden: Path, ckpt_dir: Path, module: Phi3ImageEmbedding, table: torch.Tensor
) -> None:
    """[B, 3, S, S] = images preprocessed with num_crops=1: their global view equals their only tile."""
    embedder = Phi3VisionEmbedder.from_pretrained(ckpt_dir, num_crops=1)
    items = [embedder.preprocess(golden / "images" / n) for n in ("rgb_337x335.png", "portrait_600x1400.png")]
    for it in items:
        assert torch.equal(it.pixel_values[0], it.pixel_values[1])  # what makes the collapse exact
    reference = embedder.embed(items)
    t = num_image_tokens(rows=1, cols=1, tokens_per_side=embedder.vision_config.tokens_per_side)
    assert [r.shape[0] for r in reference] == [t, t]
    pixel_values = torch.stack([it.pixel_values[1] for it in items])  # (2, 3, S, S)
    ids = torch.tensor([[1] + [-1] * t + [7, 8] + [-2] * t + [9]])
    with CropCounter(module) as counter:
        out = module(ids, pixel_values)
    assert counter.calls == [2]  # CLIP once per image
    assert _max_diff(out[0, 1 : 1 + t], reference[0]) <= 1e-5
    assert _max_diff(out[0, 3 + t : 3 + 2 * t], reference[1]) <= 1e-5
    assert torch.equal(out[0, [0, 1 + t, 2 + t, -1]], table[[1, 7, 8, 9]])
    # explicit sizes must say single crop
    assert torch.equal(module(ids, pixel_values, torch.tensor([[S, S], [S, S]])), out)
    with pytest.raises(MergeError, match="single-crop"):
        module(ids, pixel_values, torch.tensor([[2 * S, S], [S, S]]))


def _non_hd_config(config: dict[str, Any], num_img_tokens: int = G2) -> dict[str, Any]:
    cfg = copy.deepcopy(config)
    cfg["embd_layer"].update(use_hd_transform=False, with_learnable_separator=False)
    cfg["img_processor"]["num_img_tokens"] = num_img_tokens
    return cfg


def test_non_hd_model_is_coherent(
    config: dict[str, Any], weights: dict[str, torch.Tensor], table: torch.Tensor, merge_inputs: dict
) -> None:
    torch.manual_seed(0)
    module = Phi3ImageEmbedding(_non_hd_config(config), wte=table)
    clip_only = {k: v for k, v in weights.items() if k.startswith("img_processor.")}
    result = module.load_state_dict(clip_only, strict=False)
    assert sorted(result.missing_keys) == ["img_projection.0.bias", "img_projection.0.weight"] + [
        "img_projection.2.bias",
        "img_projection.2.weight",
    ]
    assert not hasattr(module, "glb_GN") and not hasattr(module, "sub_GN")
    assert module.img_projection[0].in_features == C and module.num_img_tokens == G2
    module.eval()
    x = next(iter(merge_inputs.values()))
    pixel_values = x["pixel_values"][:, 1]  # (B, 3, S, S): one tile per image
    ids = torch.tensor([[1] + [-1] * G2 + [5] + [-2] * G2])
    out = module(ids, pixel_values)
    with torch.no_grad():
        expected = module.img_projection(module.get_img_features(pixel_values)).reshape(-1, D)  # (2*g*g, D)
    assert _max_diff(out[0, 1 : 1 + G2], expected[:G2]) <= 1e-6
    assert _max_diff(out[0, 2 + G2 :], expected[G2:]) <= 1e-6
    with pytest.raises(MergeError, match="no HD transform"):
        module(ids, x["pixel_values"], x["image_sizes"])
    with pytest.raises(MergeError, match="1153 image placeholder tokens"):
        module(torch.tensor([[1] + [-1] * (G2 + 1) + [-2] * G2]), pixel_values)


def test_inconsistent_non_hd_configs_are_rejected(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"576 per image\) but img_processor.num_img_tokens is 144"):
        Phi3ImageEmbedding(_non_hd_config(config, num_img_tokens=144))
    with pytest.raises(ConfigError, match="both be true or both false"):
        Phi3ImageEmbedding(config, use_hd_transform=True, with_learnable_separator=False)


# --------------------------------------------------------------------------- 5: pre-computed features


@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: c["name"])
def test_set_img_features_feeds_the_hd_transform(
    case: dict[str, Any], module: Phi3ImageEmbedding, merge_inputs: dict, manifest: dict
) -> None:
    x = merge_inputs[case["name"]]
    b, k = x["pixel_values"].shape[:2]
    with torch.no_grad():
        features = module.get_img_features(x["pixel_values"].flatten(0, 1)).reshape(b, k, G2, C)  # (B, K, g*g, C)
    module.set_img_features(features)
    with CropCounter(module) as counter:
        out = module(x["input_ids"], None, x["image_sizes"])
    assert counter.calls == []  # CLIP skipped
    assert _max_diff(out, x["expected"]) <= manifest["tolerances"]["merge_hidden_states"]["atol"]


def test_seed_style_flat_features_are_rejected(module: Phi3ImageEmbedding, merge_inputs: dict) -> None:
    x = merge_inputs["two_images_one_prompt"]
    module.set_img_features(torch.zeros(1226, C))  # what the seed's 3-D path projected with view(-1, C)
    with pytest.raises(MergeError, match="before the HD merge"):
        module(x["input_ids"], None, x["image_sizes"])


# --------------------------------------------------------------------------- 6: set_img_* are not sticky


def test_set_img_sizes_applies_to_one_call_only(module: Phi3ImageEmbedding, merge_inputs: dict, manifest: dict) -> None:
    x = merge_inputs["two_images_one_prompt"]
    module.set_img_sizes(x["image_sizes"])
    first = module(x["input_ids"], x["pixel_values"])
    assert _max_diff(first, x["expected"]) <= manifest["tolerances"]["merge_hidden_states"]["atol"]
    with pytest.raises(MergeError, match="need image_sizes"):  # the stored sizes were cleared
        module(x["input_ids"], x["pixel_values"])
    other = merge_inputs["batch_of_two_prompts"]
    module.set_img_sizes(other["image_sizes"])
    with pytest.raises(MergeError, match="differ"):  # never silently overrides an explicit argument
        module(x["input_ids"], x["pixel_values"], x["image_sizes"])
    # the failed call consumed them too: the next call is unaffected
    assert torch.equal(module(x["input_ids"], x["pixel_values"], x["image_sizes"]), first)


def test_set_img_features_applies_to_one_call_only(module: Phi3ImageEmbedding, merge_inputs: dict) -> None:
    x = merge_inputs["two_images_one_prompt"]
    module.set_img_features(torch.zeros(2, 5, G2, C))
    zeros_out = module(x["input_ids"], None, x["image_sizes"])
    with pytest.raises(MergeError, match="neither pixel_values nor img_features"):
        module(x["input_ids"], None, x["image_sizes"])
    real_out = module(x["input_ids"], x["pixel_values"], x["image_sizes"])
    assert not torch.equal(zeros_out, real_out)


# --------------------------------------------------------------------------- 7: default order


def test_default_hd_transform_order_is_the_released_one(
    config: dict[str, Any], weights: dict[str, torch.Tensor], table: torch.Tensor, merge_inputs: dict, manifest: dict
) -> None:
    cfg = copy.deepcopy(config)
    del cfg["embd_layer"]["hd_transform_order"]
    module = _build(cfg, weights, wte=table)
    assert module.hd_transform_order == "sub_glb"
    x = merge_inputs["two_images_one_prompt"]
    out = module(x["input_ids"], x["pixel_values"], x["image_sizes"])
    assert _max_diff(out, x["expected"]) <= manifest["tolerances"]["merge_hidden_states"]["atol"]


# --------------------------------------------------------------------------- 8: linear projection with HD


def test_linear_projection_with_hd_takes_the_merged_width(
    config: dict[str, Any], weights: dict[str, torch.Tensor], table: torch.Tensor, merge_inputs: dict
) -> None:
    module = Phi3ImageEmbedding(config, wte=table, projection_cls="linear")
    assert isinstance(module.img_projection, nn.Linear)
    assert (module.img_projection.in_features, module.img_projection.out_features) == (4 * C, D)
    result = module.load_state_dict(
        {k: v for k, v in weights.items() if not k.startswith("img_projection.")}, strict=False
    )
    assert sorted(result.missing_keys) == ["img_projection.bias", "img_projection.weight"]
    module.eval()
    x = merge_inputs["two_images_one_prompt"]
    out = module(x["input_ids"], x["pixel_values"], x["image_sizes"])
    with torch.no_grad():
        feats = module.get_img_features(x["pixel_values"][0, :5])  # image 1: 2x2 grid + global
        tokens = image_tokens(feats, rows=2, cols=2, sub_gn=module.sub_GN.reshape(-1), glb_gn=module.glb_GN.reshape(-1))
        expected = module.img_projection(tokens)
    start = int(torch.nonzero(x["input_ids"][0] < 0)[0])
    assert _max_diff(out[0, start : start + expected.shape[0]], expected) <= 1e-6


# --------------------------------------------------------------------------- 9: cls_patch


def test_cls_patch_is_rejected_at_construction(config: dict[str, Any]) -> None:
    cfg = copy.deepcopy(config)
    cfg["img_processor"]["type_feature"] = "cls_patch"
    with pytest.raises(ConfigError, match="type_feature 'cls_patch' is not supported"):
        Phi3ImageEmbedding(cfg)


# --------------------------------------------------------------------------- 10: placeholder runs


def test_placeholders_split_over_runs_and_rows(
    module: Phi3ImageEmbedding, merge_inputs: dict, table: torch.Tensor
) -> None:
    x = merge_inputs["two_images_one_prompt"]
    pixel_values = x["pixel_values"][:, 1]  # two single-crop images, 313 tokens each
    t = num_image_tokens(rows=1, cols=1, tokens_per_side=module.vision_config.tokens_per_side)
    with torch.no_grad():
        rows = torch.cat(module.image_embeddings(pixel_values))  # (2t, D)
    ids = torch.full((2, 400), 3, dtype=torch.long)
    mask = torch.zeros(2, 400, dtype=torch.bool)
    mask[0, 10:110] = mask[0, 120:400] = mask[1, 0:100] = mask[1, 150:296] = True  # 626 = 2t positions
    assert int(mask.sum()) == 2 * t
    ids[mask] = torch.tensor([-1] * t + [-2] * t)
    out = module(ids, pixel_values)
    expected = table[ids.clamp(0, VOCAB - 1)]
    it = iter(rows)
    for b in range(2):
        for p in range(400):
            if mask[b, p]:
                expected[b, p] = next(it)
    assert _max_diff(out, expected) <= 1e-6


# --------------------------------------------------------------------------- 11: clamp, no mutation


def test_ids_clamped_to_vocab_minus_one_and_never_modified(
    module: Phi3ImageEmbedding, merge_inputs: dict, table: torch.Tensor
) -> None:
    x = merge_inputs["two_images_one_prompt"]
    ids = x["input_ids"].clone()
    ids[0, :4] = torch.tensor([VOCAB, VOCAB + 7, 10**6, VOCAB - 1])  # the seed's clamp_max(vocab) crashes here
    before, version = ids.clone(), ids._version
    out = module(ids, x["pixel_values"], x["image_sizes"])
    assert torch.equal(ids, before) and ids._version == version
    assert torch.equal(out[0, :4], table[[VOCAB - 1] * 4])


# --------------------------------------------------------------------------- 14: exact GELU


def test_projection_gelu_is_the_exact_erf_form(module: Phi3ImageEmbedding) -> None:
    gelu = module.img_projection[1]
    assert isinstance(gelu, nn.GELU) and gelu.approximate == "none"
    x = torch.randn(7, 4 * C, generator=torch.Generator().manual_seed(1)) * 3
    lin0, lin2 = module.img_projection[0], module.img_projection[2]
    with torch.no_grad():
        h = lin0(x)
        exact = lin2(0.5 * h * (1 + torch.erf(h / math.sqrt(2))))
        tanh = lin2(nn.functional.gelu(h, approximate="tanh"))
        ours = module.img_projection(x)
    assert _max_diff(ours, exact) <= 1e-5
    assert _max_diff(ours, tanh) > 1e-4


# --------------------------------------------------------------------------- 15: wte


def test_missing_wte_is_a_clear_error_and_can_be_given_later(
    config: dict[str, Any], weights: dict[str, torch.Tensor], table: torch.Tensor, merge_inputs: dict, manifest: dict
) -> None:
    module = _build(config, weights)
    x = merge_inputs["two_images_one_prompt"]
    with pytest.raises(MergeError, match="no token-embedding table.*set_wte"):
        module(x["input_ids"], x["pixel_values"], x["image_sizes"])
    with torch.no_grad():
        images = module.image_embeddings(x["pixel_values"], x["image_sizes"])  # no table needed
    assert [e.shape[0] for e in images] == [757, 469]
    embedding = nn.Embedding.from_pretrained(table)
    module.wte = embedding  # assignment routes through set_wte
    assert module.wte is embedding
    assert not any(name.startswith("wte") for name in module.state_dict())
    assert all(m is not embedding for m in module.modules())
    out = module(x["input_ids"], x["pixel_values"], x["image_sizes"])
    assert _max_diff(out, x["expected"]) <= manifest["tolerances"]["merge_hidden_states"]["atol"]
    with pytest.raises(ConfigError, match=f"wte must be \\[vocab, {D}\\]"):
        module.set_wte(torch.zeros(VOCAB, D + 1))


# --------------------------------------------------------------------------- text-only calls


def test_text_only_call_does_not_encode_images(
    module: Phi3ImageEmbedding, merge_inputs: dict, table: torch.Tensor
) -> None:
    x = merge_inputs["two_images_one_prompt"]
    ids = torch.tensor([[1, 2, 3]])
    with CropCounter(module) as counter:
        out = module(ids, x["pixel_values"], x["image_sizes"])
    assert counter.calls == []
    assert torch.equal(out[0], table[[1, 2, 3]])


# --------------------------------------------------------------------------- the Phi-3.5 style checkpoint (bf16)


def test_bf16_checkpoint_upcast_matches_golden_embeddings(golden: Path, manifest: dict) -> None:
    """from_pretrained on the Phi-3.5-style bf16 checkpoint (vision tensors spread over both shards)."""
    module = Phi3ImageEmbedding.from_pretrained(golden / "checkpoints" / TINY_35, with_wte=False)
    assert module.wte is None
    for image in ("photo_1000x750.jpg", "portrait_600x1400.png"):
        item = preprocess_image(golden / "images" / image, PreprocessConfig(num_crops=4))
        stem = image.rsplit(".", 1)[0]
        expected = torch.from_numpy(np.load(golden / "expected" / TINY_35 / "4" / f"{stem}.npz")["embeddings"])
        pixel_values = pad_crops(item.pixel_values, num_crops=4)[None]  # (1, 5, 3, S, S)
        with torch.no_grad():
            (emb,) = module.image_embeddings(pixel_values, [item.image_sizes])
        assert _max_diff(emb, expected) <= manifest["tolerances"]["embeddings"]["atol"]
