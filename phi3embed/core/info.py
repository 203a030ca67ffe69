"""Describe a checkpoint without reading its tensors (``phi3embed info``).

The checkpoint is found as encode finds it (:func:`phi3embed.core.checkpoint.resolve`), except that a hub id
that is not cached is never fetched (``fetch=False``): its weight files' headers are read by range requests,
and the report says what encode would fetch. Everything reported comes from config files and safetensors headers, so
``ModelInfo.bytes_read`` is 0.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from phi3embed.core.checkpoint import Checkpoint, check_vision_tensors, module_to_checkpoint_key, resolve
from phi3embed.core.config import ClipConfig, VisionConfig, find_preset, parse_configs, presets
from phi3embed.core.cost import crop_flops
from phi3embed.errors import ConfigError, Phi3EmbedError


@dataclass(frozen=True)
class WeightFile:
    path: str
    size: int  # of the whole file
    vision_tensors: int
    vision_bytes: int  # all vision tensors stored in this file
    bytes_to_read: int  # of those, what the fast path reads
    bytes_to_fetch: int  # from the hub before encoding (header and coalesced ranges; 0 when local or cached)


@dataclass(frozen=True)
class ModelInfo:
    source: str
    root: str
    location: str  # "local directory", "hub cache" (Hugging Face's), "phi3embed cache", or "hub" (not cached)
    commit: str | None  # of a hub id
    variant: str | None  # preset name, or None when nothing identifies it
    variant_evidence: str
    config_torch_dtype: str | None
    stored_dtypes: list[str]  # of the vision tensors
    vision_tensors: int
    vision_params: int  # every vision tensor in the checkpoint
    vision_params_run: int  # the tensors the fast path loads (layers beyond layer_idx are skipped)
    vision_bytes: int
    bytes_to_read: int
    weight_files: list[WeightFile]
    num_crops: int
    num_crops_source: str
    clip: ClipConfig
    layer_idx: int
    layers_run: int
    image_dim_out: int
    lm_hidden_size: int
    projection_cls: str
    hd_transform_order: str
    gflop_per_crop: float
    tensors_check: str  # "ok" or why the vision tensors do not match config.json
    bytes_to_fetch: int  # weight-file bytes encode will fetch from the hub first (0 when local or cached)
    whole_files_bytes: int  # the weight files holding vision tensors, whole (what downloading them moves)
    bytes_read: int  # tensor payload bytes read to produce this report (0)
    checkpoint: Checkpoint = field(repr=False, compare=False)
    vision: VisionConfig = field(repr=False, compare=False)  # the parsed config (``clip`` and the rest above)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("checkpoint", "vision")}
        out["clip"] = asdict(self.clip)
        return out


def _variant(source: str, ckpt: Checkpoint, pre: dict[str, Any] | None) -> tuple[str | None, str]:
    preset = find_preset(source) if not Path(source).expanduser().exists() else None
    if preset is not None:
        return preset.name, f"{source!r} names the preset"
    by_name = {p.name: p for p in presets().values()}
    cfg = ckpt.config
    window = cfg.get("sliding_window")
    if window == 262144 and "phi-3.5-vision-instruct" in by_name:
        return "phi-3.5-vision-instruct", "config.json sliding_window 262144 (Phi-3.5)"
    if window == 131072 and "phi-3-vision-128k-instruct" in by_name:
        return "phi-3-vision-128k-instruct", "config.json sliding_window 131072 (128k context)"
    name = str(cfg.get("_name_or_path", "")).lower().replace("_", "-")
    for preset_name in sorted(by_name):
        if preset_name in name:
            return preset_name, f"config.json _name_or_path {cfg.get('_name_or_path')!r}"
    crops = (pre or {}).get("num_crops")
    matches = [p.name for p in by_name.values() if p.num_crops == crops]
    if len(matches) == 1:
        return matches[0], f"preprocessor_config.json num_crops {crops} (weak evidence)"
    return None, "no preset matches (sliding_window, _name_or_path and num_crops are inconclusive)"


def model_info(
    source: str | os.PathLike[str], *, num_crops: int | None = None, revision: str | None = None
) -> ModelInfo:
    """Describe a checkpoint from its config files and safetensors headers; never reads tensor data.

    Resolution is :func:`phi3embed.core.checkpoint.resolve`'s, but a hub id that is not cached is not
    fetched: its configs come through ``hf_hub_download`` and its weight files' headers by range requests.
    """
    text = os.fspath(source)
    ckpt = resolve(text, revision=revision, fetch=False)
    fetch = ckpt.plan if ckpt.location == "hub" else None  # what encode would fetch first
    from phi3embed.core.model import Phi3VisionModel  # heavy (transformers): after a model is found, not before

    vision, pre = parse_configs(ckpt.config, ckpt.preprocessor_config, where=str(ckpt.root / "config.json"))
    if num_crops is not None:
        if num_crops < 1:
            raise ConfigError(f"num_crops must be >= 1, got {num_crops}")
        pre, crops_source = replace(pre, num_crops=num_crops), "argument"
    elif ckpt.preprocessor_config is not None and "num_crops" in ckpt.preprocessor_config:
        crops_source = "preprocessor_config.json"
    else:
        crops_source = "processor default (no num_crops in preprocessor_config.json)"

    import torch

    with torch.device("meta"):
        fast = Phi3VisionModel(vision, full_depth=False, attn="eager")
    try:
        check_vision_tensors(ckpt, fast.expected_checkpoint_shapes())
        tensors_check = "ok"
    except Phi3EmbedError as exc:
        tensors_check = exc.reason
    run_keys = {module_to_checkpoint_key(k, clip_prefix=fast.clip_prefix) for k in fast.state_dict()}

    keys = ckpt.vision_keys()
    files: dict[Path, list[str]] = {}
    for key in keys:
        files.setdefault(ckpt.tensors[key].file, []).append(key)
    weight_files = [
        WeightFile(
            path=str(f),
            size=fetch.file(f.name).size if fetch is not None else f.stat().st_size,
            bytes_to_fetch=fetch.file_fetch_bytes(f.name) if fetch is not None else 0,
            vision_tensors=len(ks),
            vision_bytes=sum(ckpt.tensors[k].nbytes for k in ks),
            bytes_to_read=sum(ckpt.tensors[k].nbytes for k in ks if k in run_keys),
        )
        for f, ks in sorted(files.items())
    ]
    variant, evidence = _variant(text, ckpt, ckpt.preprocessor_config)
    dtype = ckpt.config.get("torch_dtype")
    return ModelInfo(
        source=text,
        root=str(ckpt.root),
        location=ckpt.location,
        commit=ckpt.commit,
        variant=variant,
        variant_evidence=evidence,
        config_torch_dtype=None if dtype is None else str(dtype),
        stored_dtypes=sorted(ckpt.stored_dtypes),
        vision_tensors=len(keys),
        vision_params=sum(math.prod(ckpt.tensors[k].shape) for k in keys),
        vision_params_run=sum(math.prod(ckpt.tensors[k].shape) for k in keys if k in run_keys),
        vision_bytes=sum(w.vision_bytes for w in weight_files),
        bytes_to_read=sum(w.bytes_to_read for w in weight_files),
        weight_files=weight_files,
        num_crops=pre.num_crops,
        num_crops_source=crops_source,
        clip=vision.clip,
        layer_idx=vision.layer_idx,
        layers_run=vision.layers_needed,
        image_dim_out=vision.image_dim_out,
        lm_hidden_size=vision.lm_hidden_size,
        projection_cls=vision.projection_cls,
        hd_transform_order=vision.hd_transform_order,
        gflop_per_crop=round(crop_flops(vision.clip, layers=vision.layers_needed) / 1e9, 3),
        tensors_check=tensors_check,
        bytes_to_fetch=sum(w.bytes_to_fetch for w in weight_files),
        whole_files_bytes=sum(w.size for w in weight_files),
        bytes_read=ckpt.bytes_read,
        checkpoint=ckpt,
        vision=vision,
    )
