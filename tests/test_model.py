"""The module on configs the golden set does not cover: dimensions from config, layer_idx, linear, glb_sub."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from factory import make_checkpoint
from PIL import Image

from phi3embed import ConfigError, Phi3VisionEmbedder
from phi3embed.core.config import ClipConfig, vision_config_from_dict

IMG = Image.fromarray(np.random.default_rng(5).integers(0, 256, (300, 520, 3), dtype=np.uint8))


def test_real_checkpoints_imply_clip_vit_l_14_336() -> None:
    cfg = vision_config_from_dict(
        {"hidden_size": 3072, "img_processor": {"name": "clip_vision_model", "image_dim_out": 1024}, "embd_layer": {}}
    )
    assert cfg.clip == ClipConfig()
    assert (cfg.clip.hidden_size, cfg.clip.num_hidden_layers, cfg.clip.num_attention_heads) == (1024, 24, 16)
    assert (cfg.clip.intermediate_size, cfg.clip.grid, cfg.clip.hidden_act) == (4096, 24, "quick_gelu")
    assert cfg.layer_idx == -2 and cfg.layers_needed == 23 and cfg.hd_transform_order == "sub_glb"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"img_processor": {"name": "siglip"}}, "only 'clip_vision_model' exists"),
        ({"embd_layer": "default"}, "no image embedding"),
        ({"img_processor": {"type_feature": "cls_patch"}}, "type_feature 'cls_patch' is not supported"),
        ({"img_processor": {"model_name": "openai/clip-vit-base-patch32"}}, "only openai/clip-vit-large-patch14-336"),
        ({"img_processor": {"layer_idx": -30}}, "layer_idx -30 is outside"),
        ({"embd_layer": {"use_hd_transform": False}}, "use_hd_transform must be true"),
        ({"img_processor": {"image_dim_out": 768}}, "differs from the CLIP width 1024"),
    ],
)
def test_unsupported_configs_are_rejected_clearly(patch: dict, message: str) -> None:
    base = {"hidden_size": 3072, "img_processor": {"name": "clip_vision_model"}, "embd_layer": {}}
    for key, value in patch.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=message):
        vision_config_from_dict(base)


def test_dimensions_come_from_the_config(tmp_path: Path) -> None:
    root = make_checkpoint(tmp_path / "c", clip={"hidden_size": 48, "num_attention_heads": 3}, hidden_size=40)
    emb = Phi3VisionEmbedder.from_pretrained(root)
    (out,) = emb.encode([IMG])
    assert out.shape == (emb.num_tokens(520, 300), 40)
    assert emb.model.glb_GN.shape == (1, 1, 4 * 48)


@pytest.mark.parametrize("layer_idx", [-1, -2, -3, 0, 1])
def test_layer_idx_fast_path_equals_all_hidden_states(tmp_path: Path, layer_idx: int) -> None:
    root = make_checkpoint(tmp_path / "c", layer_idx=layer_idx)
    fast = Phi3VisionEmbedder.from_pretrained(root)
    plain = Phi3VisionEmbedder.from_pretrained(root, plain=True)
    assert len(fast.model.clip.state_dict()) < len(plain.model.clip.state_dict()) or layer_idx in (-1, 2)
    a, b = fast.encode([IMG])[0], plain.encode([IMG])[0]
    assert float((a - b).abs().max()) <= 1e-4


def test_layer_idx_zero_is_the_embedding_output(tmp_path: Path) -> None:
    """Hidden state 0 = patch + position embeddings after pre_layrnorm: no encoder layer runs."""
    root = make_checkpoint(tmp_path / "c", layer_idx=0)
    emb = Phi3VisionEmbedder.from_pretrained(root)
    item = emb.preprocess(IMG)
    clip = emb.model.clip
    inner = getattr(clip, "vision_model", clip)
    with torch.inference_mode():
        feats = emb.model.crop_features(item.pixel_values)
        patches = inner.embeddings.patch_embedding(item.pixel_values).flatten(2).transpose(1, 2)  # (N, 576, C)
        cls = inner.embeddings.class_embedding.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + inner.embeddings.position_embedding.weight
        by_hand = inner.pre_layrnorm(x)[:, 1:]
    assert float((feats - by_hand).abs().max()) <= 1e-5


def test_linear_projection_and_glb_sub_order(tmp_path: Path) -> None:
    mlp = Phi3VisionEmbedder.from_pretrained(make_checkpoint(tmp_path / "a", order="sub_glb"))
    glb_sub = Phi3VisionEmbedder.from_pretrained(make_checkpoint(tmp_path / "b", order="glb_sub"))
    a, b = mlp.encode([IMG])[0], glb_sub.encode([IMG])[0]  # same seed: same weights, other order
    n_glb = 12 * 13
    assert torch.equal(b[:n_glb], a[-n_glb:])
    assert torch.equal(b[n_glb], a[-n_glb - 1])  # glb_GN sits between the parts in both orders
    assert torch.equal(b[n_glb + 1 :], a[: -n_glb - 1])

    linear = Phi3VisionEmbedder.from_pretrained(make_checkpoint(tmp_path / "c", projection_cls="linear"))
    assert isinstance(linear.model.img_projection, torch.nn.Linear)
    item = linear.preprocess(IMG)
    with torch.inference_mode():
        feats = linear.model.crop_features(item.pixel_values)
        tokens = linear.model.tokens(feats, rows=item.grid.rows, cols=item.grid.cols)
        by_hand = tokens @ linear.model.img_projection.weight.T + linear.model.img_projection.bias
    assert float((linear.embed([item])[0] - by_hand).abs().max()) <= 1e-5


def test_gelu_is_the_exact_erf_form(golden: Path) -> None:
    emb = Phi3VisionEmbedder.from_pretrained(golden / "checkpoints" / "tiny-phi3v-128k-f32")
    gelu = emb.model.img_projection[1]
    assert isinstance(gelu, torch.nn.GELU) and gelu.approximate == "none"
