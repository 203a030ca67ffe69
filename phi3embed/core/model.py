"""The image-token module: CLIP encoder (truncated at ``layer_idx``), separators, projection.

Variants are chosen once, when the module is built:

* ``full_depth=False`` (default, the fast path): the CLIP stack is built with only the layers needed for
  hidden state ``layer_idx`` and its last output is the feature; no hidden states are stored.
* ``full_depth=True`` (the plain path, the yardstick): every layer runs and the feature is picked from the
  stored hidden states, as the reference does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from phi3embed.core.checkpoint import (
    Checkpoint,
    check_vision_tensors,
    checkpoint_to_module_key,
    module_to_checkpoint_key,
    new_hasher,
)
from phi3embed.core.config import VisionConfig
from phi3embed.core.hd import image_tokens
from phi3embed.core.stages import Stage
from phi3embed.errors import CheckpointError


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 * x)`` with one temporary instead of three: the same operations on the same
    values as transformers' QuickGELUActivation (so the same bits), with half of its peak memory on the
    widest activation of the encoder (``[B, 577, 4C]``: 75 MB per 8 crops in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1.702 * x).sigmoid_().mul_(x)  # (..., M): one temporary holds 1.702x, its sigmoid, the product


def build_clip(cfg: VisionConfig, *, num_layers: int, attn: str, lean: bool = False) -> CLIPVisionModel:
    """The transformers CLIP vision tower of ``cfg`` with ``num_layers`` encoder layers.

    ``lean`` swaps in the memory-lean :class:`QuickGELU` (same numbers, less memory).
    """
    hf = CLIPVisionConfig(**{**cfg.clip.to_hf_dict(), "num_hidden_layers": num_layers})
    hf._attn_implementation = attn
    model = CLIPVisionModel(hf)
    if lean and cfg.clip.hidden_act == "quick_gelu":
        for module in model.modules():
            if hasattr(module, "fc1") and hasattr(module, "activation_fn"):  # CLIPMLP
                module.activation_fn = QuickGELU()
    return model


def clip_encoder_layers(clip: CLIPVisionModel) -> nn.ModuleList:
    """The encoder layers of a transformers CLIP vision tower (under ``vision_model.`` before transformers 5)."""
    layers = clip.get_submodule("vision_model.encoder" if hasattr(clip, "vision_model") else "encoder").layers
    assert isinstance(layers, nn.ModuleList)
    return layers


def build_projection(kind: str, *, in_dim: int, out_dim: int) -> nn.Module:
    """``mlp``: ``Linear(in, out) -> GELU -> Linear(out, out)`` (weights ``0.*``, ``2.*``); ``linear``: ``Linear(in, out)``.

    ``nn.GELU()`` is the exact erf form, as the reference uses (the tanh form fails the tolerance).
    """
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    raise ValueError(f"unknown projection {kind!r}")


class Phi3VisionModel(nn.Module):
    """Crops in, image-token embeddings out. Weight names follow the checkpoint (minus its prefix)."""

    def __init__(self, cfg: VisionConfig, *, full_depth: bool = False, attn: str = "sdpa") -> None:
        super().__init__()
        self.cfg = cfg
        self.full_depth = full_depth
        n_layers = cfg.clip.num_hidden_layers if full_depth else cfg.layers_needed
        self.clip = build_clip(cfg, num_layers=n_layers, attn=attn, lean=not full_depth)
        d4 = cfg.merged_dim
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, d4))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, d4))
        self.img_projection = build_projection(cfg.projection_cls, in_dim=d4, out_dim=cfg.lm_hidden_size)

    @property
    def clip_prefix(self) -> str:
        """Where CLIP's own modules sit in our state dict (transformers 5 dropped ``vision_model.``)."""
        return "clip.vision_model." if hasattr(self.clip, "vision_model") else "clip."

    @property
    def dtype(self) -> torch.dtype:
        return self.glb_GN.dtype

    @property
    def device(self) -> torch.device:
        return self.glb_GN.device

    def encoder_layers(self) -> nn.ModuleList:
        """The CLIP encoder layers this model runs."""
        return clip_encoder_layers(self.clip)

    def compile_encoder(self, *, dynamic: bool | None = None) -> None:
        """``torch.compile`` every encoder layer (elementwise ops fused around the matmuls).

        All layers run the same code with their weights as inputs, so one compiled graph serves them all;
        a new batch shape compiles once more (after the second shape, with a dynamic batch dimension).
        ``dynamic=True`` makes the batch dimension dynamic from the first compile (a batch of 1 still gets a
        graph of its own).
        """
        for layer in self.encoder_layers():
            layer.compile(dynamic=dynamic)

    def uncompile_encoder(self) -> None:
        """Undo :meth:`compile_encoder`: the layers run eagerly again."""
        for layer in self.encoder_layers():
            layer._compiled_call_impl = None

    # ------------------------------------------------------------------ stages

    def crop_hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> CLIP hidden state ``layer_idx`` with CLS first, ``[N, 1 + g*g, C]``."""
        if self.full_depth:
            out = self.clip(pixel_values=pixel_values, output_hidden_states=True)
            return out.hidden_states[self.cfg.hidden_state_index]
        return self.clip(pixel_values=pixel_values).last_hidden_state

    def crop_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> CLIP hidden state ``layer_idx`` without CLS, ``[N, g*g, C]``."""
        return self.crop_hidden(pixel_values)[:, 1:]  # drop CLS: (N, g*g, C)

    def tokens(self, features: torch.Tensor, *, rows: int, cols: int) -> torch.Tensor:
        """Features of one image ``[1 + rows*cols, g*g, C]`` -> unprojected tokens ``[T, 4C]``."""
        return image_tokens(
            features,
            rows=rows,
            cols=cols,
            sub_gn=self.sub_GN.reshape(-1),
            glb_gn=self.glb_GN.reshape(-1),
            order=self.cfg.hd_transform_order,
        )

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[T, 4C]`` -> ``[T, D]`` in the projection's dtype."""
        return self.img_projection(tokens.to(self.dtype))

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Real crops of several images, concatenated in order, -> one ``[T_i, D]`` tensor per image.

        ``pixel_values``: ``[sum_i (1 + rows_i*cols_i), 3, S, S]``; ``grids``: ``(rows_i, cols_i)`` per image.
        """
        counts = [1 + r * c for r, c in grids]
        assert pixel_values.shape[0] == sum(counts), (pixel_values.shape, grids)
        features = self.crop_features(pixel_values)  # (N, g*g, C)
        return self.embed_features(features, grids)

    def embed_features(
        self, features: torch.Tensor, grids: Sequence[tuple[int, int]], *, stage: Stage = "projected"
    ) -> list[torch.Tensor]:
        """CLIP features of several images (concatenated) -> one tensor per image at ``stage``
        (:mod:`phi3embed.core.stages`): the data flow below, left at the stage asked for.

        ``clip``: each image's own features ``[1 + rows*cols, g*g, C]``; ``hd``: its tokens ``[T, 4C]``;
        ``projected``: the tokens of all images projected in one call, ``[T, D]`` each.
        """
        counts = [1 + r * c for r, c in grids]
        per_image = torch.split(features, counts)  # (1 + rows_i*cols_i, g*g, C) each
        if stage == "clip":
            return list(per_image)
        tokens = [self.tokens(f, rows=r, cols=c) for f, (r, c) in zip(per_image, grids, strict=True)]  # (T_i, 4C)
        if stage == "hd":
            return tokens
        projected = self.project(torch.cat(tokens))  # (sum T_i, D)
        return list(torch.split(projected, [t.shape[0] for t in tokens]))

    # ------------------------------------------------------------------ loading

    def expected_checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint key -> shape of every vision tensor a checkpoint for this config must hold."""
        with torch.device("meta"):
            full = Phi3VisionModel(self.cfg, full_depth=True, attn="eager")
        prefix = full.clip_prefix
        return {module_to_checkpoint_key(k, clip_prefix=prefix): tuple(v.shape) for k, v in full.state_dict().items()}

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Checkpoint,
        cfg: VisionConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        full_depth: bool = False,
        attn: str = "sdpa",
    ) -> tuple[Phi3VisionModel, str]:
        """Build on the meta device, check the checkpoint strictly, read only the needed tensors.

        Returns the model and a fingerprint of the weights that determine its output.
        """
        with torch.device("meta"):
            model = cls(cfg, full_depth=full_depth, attn=attn)
        prefix = model.clip_prefix
        keys = {module_to_checkpoint_key(k, clip_prefix=prefix) for k in model.state_dict()}
        hasher = new_hasher()
        load_vision_tensors(
            model,
            ckpt,
            clip_prefix=prefix,
            expected=model.expected_checkpoint_shapes(),
            dtype=dtype,
            device=device,
            hash_keys=keys if not full_depth else _output_determining_keys(cfg, keys),
            hasher=hasher,
        )
        model.requires_grad_(False)
        return model, hasher.hexdigest()


def load_vision_tensors(
    module: nn.Module,
    ckpt: Checkpoint,
    *,
    clip_prefix: str,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    hash_keys: set[str] | None = None,
    hasher: Any | None = None,
) -> None:
    """Fill ``module`` (built on the meta device) with exactly its tensors from ``ckpt``, strictly.

    The one loading path of :class:`Phi3VisionModel` and the drop-in ``phi3embed.core.compat`` module: the
    checkpoint's vision tensors are checked against ``expected`` (checkpoint key -> shape; None: the
    module's own tensors), then only the module's tensors are read (named through
    :func:`~phi3embed.core.checkpoint.module_to_checkpoint_key` with ``clip_prefix``, where CLIP sits in the
    module's state dict) and assigned. ``hash_keys`` / ``hasher`` as in :meth:`Checkpoint.read`.
    """
    wanted = {module_to_checkpoint_key(k, clip_prefix=clip_prefix): k for k in module.state_dict()}
    if expected is None:
        expected = {key: tuple(module.state_dict()[name].shape) for key, name in wanted.items()}
    check_vision_tensors(ckpt, expected)
    raw = ckpt.read(sorted(wanted), dtype=dtype, device=device, hash_keys=hash_keys, hasher=hasher)
    state = {}
    for key, tensor in raw.items():
        name = checkpoint_to_module_key(key, clip_prefix=clip_prefix)
        if name is None or name != wanted[key]:
            raise CheckpointError(f"cannot place tensor {key}", path=ckpt.root)
        state[name] = tensor
    module.load_state_dict(state, strict=True, assign=True)
    materialise_buffers(module, device)
    module.eval()


def _output_determining_keys(cfg: VisionConfig, keys: set[str]) -> set[str]:
    """Checkpoint keys the truncated (fast) model reads: same fingerprint for both paths."""
    keep = set()
    for k in keys:
        marker = ".encoder.layers."
        if marker in k:
            layer = int(k.split(marker, 1)[1].split(".", 1)[0])
            if layer >= cfg.layers_needed:
                continue
        keep.add(k)
    return keep


def materialise_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Non-persistent buffers stay on the meta device after ``assign`` loading; rebuild them."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name == "position_ids":
                value = torch.arange(buf.shape[-1], device=device).expand(buf.shape)
                module.register_buffer(name, value, persistent=False)
            else:  # pragma: no cover - a transformers change we do not know about
                raise CheckpointError(f"buffer {type(module).__name__}.{name} has no value after loading")
