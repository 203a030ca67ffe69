"""Build small random checkpoints in the real Hugging Face layout, for configs the golden set does not cover."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from phi3embed.core.checkpoint import module_to_checkpoint_key
from phi3embed.core.config import vision_config_from_dict
from phi3embed.core.model import Phi3VisionModel


def make_checkpoint(
    root: Path,
    *,
    clip: dict[str, Any] | None = None,
    hidden_size: int = 40,
    layer_idx: int | None = None,
    projection_cls: str = "mlp",
    order: str = "sub_glb",
    num_crops: int = 4,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    clip = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        **(clip or {}),
    }
    img_processor: dict[str, Any] = {"name": "clip_vision_model", "image_dim_out": clip["hidden_size"]}
    if layer_idx is not None:
        img_processor["layer_idx"] = layer_idx
    config = {
        "model_type": "phi3_v",
        "hidden_size": hidden_size,
        "vocab_size": 64,
        "img_processor": img_processor,
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": order,
            "projection_cls": projection_cls,
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "clip_vision_config": clip,
    }
    cfg = vision_config_from_dict(config)
    torch.manual_seed(seed)
    model = Phi3VisionModel(cfg, full_depth=True, attn="eager")
    tensors = {}
    for name, value in model.state_dict().items():
        key = module_to_checkpoint_key(name, clip_prefix=model.clip_prefix)
        noise = torch.randn(value.shape) * (0.5 if value.ndim <= 1 else 0.05)
        base = torch.ones(value.shape) if name.endswith("layer_norm1.weight") or "layrnorm.weight" in name else 0
        tensors[key] = (noise + base).to(dtype).contiguous()
    tensors["model.embed_tokens.weight"] = torch.randn(64, hidden_size).to(dtype)
    tensors["lm_head.weight"] = torch.randn(64, hidden_size).to(dtype)
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(config))
    (root / "preprocessor_config.json").write_text(json.dumps({"num_crops": num_crops}))
    return root
