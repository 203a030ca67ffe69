"""Typed, frozen views of a checkpoint's ``config.json`` and ``preprocessor_config.json``.

Dicts are converted once, here, at the boundary; everything downstream reads attributes.
Defaults live in this module only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from phi3embed.errors import ConfigError

CLIP_MODEL_NAME = "openai/clip-vit-large-patch14-336"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Crops per forward pass when the caller does not say. CPU: 4 keeps loading + encoding a 16-crop image in
# float32 under 2 GB of RSS and runs as close to the GEMM rate as larger batches (benchmarks/RESULTS.md).
DEFAULT_BATCH_SIZE = {"cpu": 4, "cuda": 32}


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the platform has one (a batch scheduler such
    as SLURM, ``taskset`` or a container's cpuset narrows it), else every CPU of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_batch_size(device_type: str) -> int:
    """Crops per forward pass when the caller does not say: :data:`DEFAULT_BATCH_SIZE` (8 on other devices)."""
    return DEFAULT_BATCH_SIZE.get(device_type, 8)


def default_workers(device_type: str) -> int:
    """Decode worker processes when ``--workers`` is not given.

    CPU: none (decoding inline costs ~0.17 s of a ~50 s image: workers would gain nothing).
    CUDA: every usable core but one, up to 32. Decoding, resizing and tiling costs ~0.17 CPU-seconds per image
    on the photo set (benchmarks/bench_pipeline.py, 2-core test host) and an H200 encodes ~70 images a second
    in bf16, so feeding one GPU takes about 12 cores; the core left over runs the encoding and writing threads.
    """
    if device_type != "cuda":
        return 0
    return max(1, min(32, usable_cpus() - 1))


@dataclass(frozen=True)
class ClipConfig:
    """CLIP vision tower. Defaults are ViT-L/14 at 336 px, which real checkpoints imply (docs/pipeline.md §9.1)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 336
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        """Patches per side of one crop (24 for 336/14)."""
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        """Tokens the encoder's layers see per crop: the patches and the class token (577 for 336/14)."""
        return self.grid * self.grid + 1

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "num_channels": self.num_channels,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "projection_dim": 768,
        }


@dataclass(frozen=True)
class VisionConfig:
    """Everything about the image-token path that config.json decides."""

    clip: ClipConfig = field(default_factory=ClipConfig)
    image_dim_out: int = 1024
    lm_hidden_size: int = 3072
    vocab_size: int = 32064
    pad_token_id: int = 32000
    layer_idx: int = -2
    type_feature: str = "patch"
    hd_transform_order: str = "sub_glb"
    projection_cls: str = "mlp"

    @property
    def merged_dim(self) -> int:
        """Width of one token after the 2x2 merge (4C)."""
        return 4 * self.image_dim_out

    @property
    def tokens_per_side(self) -> int:
        """Image tokens per side of one crop after the 2x2 merge (12 for 336 px / patch 14)."""
        return self.clip.grid // 2

    @property
    def hidden_state_index(self) -> int:
        """Non-negative index into CLIP's hidden states (0 = embeddings after pre_layrnorm)."""
        n = self.clip.num_hidden_layers + 1
        return self.layer_idx % n

    @property
    def layers_needed(self) -> int:
        """How many encoder layers must run to produce hidden state ``layer_idx``."""
        return self.hidden_state_index


@dataclass(frozen=True)
class PreprocessConfig:
    """preprocessor_config.json, plus the crop geometry of the vision config it serves.

    ``crop_size`` and ``patch_size`` are the CLIP tower's (:func:`preprocess_config_from_dict` copies them), so a
    preprocessed image knows its token count without the model; the defaults are the released models'.
    """

    num_crops: int = 1
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    crop_size: int = ClipConfig.image_size
    patch_size: int = ClipConfig.patch_size

    @property
    def tokens_per_side(self) -> int:
        """Image tokens per side of one crop after the 2x2 merge (``VisionConfig.tokens_per_side``)."""
        return self.crop_size // self.patch_size // 2


def _int(d: dict[str, Any], key: str, default: int, where: str) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    return value


def vision_config_from_dict(cfg: dict[str, Any], *, where: str = "config.json") -> VisionConfig:
    """Parse the image-relevant part of a Phi-3-V config.json, rejecting what the model cannot run."""
    embd = cfg.get("embd_layer", "default")
    if not isinstance(embd, dict):
        raise ConfigError(f"{where}: embd_layer is {embd!r}: this model has no image embedding")
    img = cfg.get("img_processor")
    if not isinstance(img, dict):
        raise ConfigError(f"{where}: img_processor is missing or not an object")
    if img.get("name", "clip_vision_model") != "clip_vision_model":
        raise ConfigError(f"{where}: img_processor.name is {img.get('name')!r}, only 'clip_vision_model' exists")
    if embd.get("use_hd_transform", True) is not True:
        raise ConfigError(f"{where}: embd_layer.use_hd_transform must be true (both released models use it)")
    if embd.get("with_learnable_separator", True) is not True:
        raise ConfigError(f"{where}: embd_layer.with_learnable_separator must be true with the HD transform")
    order = embd.get("hd_transform_order", "sub_glb")
    if order not in ("sub_glb", "glb_sub"):
        raise ConfigError(f"{where}: embd_layer.hd_transform_order {order!r} is not 'sub_glb' or 'glb_sub'")
    projection = embd.get("projection_cls", "mlp")
    if projection not in ("mlp", "linear"):
        raise ConfigError(f"{where}: embd_layer.projection_cls {projection!r} is not 'mlp' or 'linear'")
    type_feature = img.get("type_feature", "patch")
    if type_feature != "patch":
        raise ConfigError(
            f"{where}: img_processor.type_feature {type_feature!r} is not supported: the HD transform needs the "
            "patch grid without the CLS token ('patch')"
        )

    clip_raw = cfg.get("clip_vision_config")
    if clip_raw is None:
        model_name = img.get("model_name", CLIP_MODEL_NAME)
        if model_name != CLIP_MODEL_NAME:
            raise ConfigError(f"{where}: img_processor.model_name {model_name!r}: only {CLIP_MODEL_NAME} is defined")
        clip = ClipConfig()
    elif isinstance(clip_raw, dict):
        base = ClipConfig()
        clip = ClipConfig(
            hidden_size=_int(clip_raw, "hidden_size", base.hidden_size, where),
            intermediate_size=_int(clip_raw, "intermediate_size", base.intermediate_size, where),
            num_hidden_layers=_int(clip_raw, "num_hidden_layers", base.num_hidden_layers, where),
            num_attention_heads=_int(clip_raw, "num_attention_heads", base.num_attention_heads, where),
            patch_size=_int(clip_raw, "patch_size", base.patch_size, where),
            image_size=_int(clip_raw, "image_size", base.image_size, where),
            num_channels=_int(clip_raw, "num_channels", base.num_channels, where),
            hidden_act=str(clip_raw.get("hidden_act", base.hidden_act)),
            layer_norm_eps=float(clip_raw.get("layer_norm_eps", base.layer_norm_eps)),
        )
    else:
        raise ConfigError(f"{where}: clip_vision_config must be an object")

    image_dim_out = _int(img, "image_dim_out", clip.hidden_size, where)
    if image_dim_out != clip.hidden_size:
        raise ConfigError(
            f"{where}: img_processor.image_dim_out {image_dim_out} differs from the CLIP width {clip.hidden_size}"
        )
    _check_geometry(clip, where)
    layer_idx = _int(img, "layer_idx", -2, where)
    n_states = clip.num_hidden_layers + 1
    if not -n_states <= layer_idx < n_states:
        raise ConfigError(f"{where}: img_processor.layer_idx {layer_idx} is outside [-{n_states}, {n_states - 1}]")
    if "hidden_size" not in cfg:
        raise ConfigError(f"{where}: hidden_size (the language-model width) is missing")
    return VisionConfig(
        clip=clip,
        image_dim_out=image_dim_out,
        lm_hidden_size=_int(cfg, "hidden_size", 3072, where),
        vocab_size=_int(cfg, "vocab_size", 32064, where),
        pad_token_id=_int(cfg, "pad_token_id", 32000, where) if cfg.get("pad_token_id") is not None else 32000,
        layer_idx=layer_idx,
        type_feature=type_feature,
        hd_transform_order=order,
        projection_cls=projection,
    )


def _check_geometry(clip: ClipConfig, where: str) -> None:
    """Reject crop geometry the HD transform cannot tile: every crop must split into an even square grid of
    whole patches, so that the 2x2 merge gives ``grid / 2`` tokens per side (docs/pipeline.md)."""
    if clip.patch_size < 1 or clip.image_size < 1:
        raise ConfigError(f"{where}: image_size {clip.image_size} and patch_size {clip.patch_size} must be positive")
    if clip.image_size % clip.patch_size:
        raise ConfigError(
            f"{where}: image_size {clip.image_size} is not a multiple of patch_size {clip.patch_size}; "
            "the HD transform needs crops made of whole patches"
        )
    if clip.grid % 2:
        raise ConfigError(f"{where}: patch grid {clip.grid} is odd; the 2x2 merge needs an even grid")


def preprocess_config_from_dict(
    cfg: dict[str, Any] | None, *, clip: ClipConfig, where: str = "preprocessor_config.json"
) -> PreprocessConfig:
    """Parse preprocessor_config.json; a missing file means the processor's own defaults (num_crops 1).

    ``clip`` is the vision config's CLIP tower: its crop and patch sizes set the crop geometry.
    """
    cfg = cfg or {}
    mean = tuple(float(x) for x in cfg.get("image_mean", OPENAI_CLIP_MEAN))
    std = tuple(float(x) for x in cfg.get("image_std", OPENAI_CLIP_STD))
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"{where}: image_mean and image_std must have 3 values")
    num_crops = _int(cfg, "num_crops", 1, where)
    if num_crops < 1:
        raise ConfigError(f"{where}: num_crops must be >= 1, got {num_crops}")
    return PreprocessConfig(
        num_crops=num_crops,
        image_mean=(mean[0], mean[1], mean[2]),
        image_std=(std[0], std[1], std[2]),
        crop_size=clip.image_size,
        patch_size=clip.patch_size,
    )


def parse_configs(
    config: dict[str, Any], preprocessor_config: dict[str, Any] | None, *, where: str
) -> tuple[VisionConfig, PreprocessConfig]:
    """``config.json`` and ``preprocessor_config.json`` (None: absent) -> the typed configs, geometry shared.

    ``where`` names config.json (a path, or a preset) in error messages.
    """
    vision = vision_config_from_dict(config, where=where)
    return vision, preprocess_config_from_dict(preprocessor_config, clip=vision.clip)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("file not found", path=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot parse JSON: {exc}", path=path) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a JSON object", path=path)
    return data


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str
    aliases: tuple[str, ...]
    num_crops: int
    config: dict[str, Any]
    preprocessor_config: dict[str, Any]


def presets() -> dict[str, Preset]:
    """Named presets shipped in ``configs/`` (keyed by name; aliases resolve through :func:`find_preset`)."""
    out: dict[str, Preset] = {}
    try:
        folder: Any = resources.files("phi3embed.configs")
    except ModuleNotFoundError:  # running from a source tree on PYTHONPATH, not installed
        folder = Path(__file__).resolve().parents[2] / "configs"
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            raw = json.loads(entry.read_text(encoding="utf-8"))
            out[raw["name"]] = Preset(
                name=raw["name"],
                hub_id=raw["hub_id"],
                aliases=tuple(raw.get("aliases", ())),
                num_crops=int(raw["num_crops"]),
                config=raw["config"],
                preprocessor_config=raw["preprocessor_config"],
            )
    return out


def find_preset(name: str) -> Preset | None:
    """A preset by name, alias or hub id (case-insensitive), or None."""
    key = name.lower()
    for preset in presets().values():
        if key in (preset.name.lower(), preset.hub_id.lower(), *(a.lower() for a in preset.aliases)):
            return preset
    return None
