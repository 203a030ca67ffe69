"""A corrected drop-in ``Phi3ImageEmbedding`` for code written against the cookbook ("seed") or official class.

Same constructor ``Phi3ImageEmbedding(config, wte=None, **kwargs)`` (``kwargs`` = the ``embd_layer`` entries,
as the official ``Phi3VModel`` passes them), same ``forward(input_ids, pixel_values, image_sizes=None)``
returning the merged ``hidden_states``, same ``set_img_features`` / ``set_img_sizes`` / ``get_img_features``,
and the official parameter names (``img_processor``, ``img_projection``, ``glb_GN``, ``sub_GN``), so the
checkpoint's ``model.vision_embed_tokens.*`` tensors (prefix stripped, see :func:`vision_state_dict`) load with
``load_state_dict`` under transformers 4 and 5 alike. The numbers come from phi3embed's own pieces
(:mod:`phi3embed.core.hd`, :mod:`phi3embed.core.model`, :mod:`phi3embed.core.prompt`), which match the official code.

What is accepted (``S`` = crop size 336, ``g`` = patches per side 24, ``C`` = CLIP width):

* HD model (``use_hd_transform`` true; both released models):

  - ``pixel_values [B, K, 3, S, S]`` + ``image_sizes [B, 2]`` (the processor's output): image ``i`` uses its
    first ``1 + h_i*w_i`` crops (global view first); the zero padding crops never reach CLIP.
  - ``pixel_values [B, 3, S, S]`` (``image_sizes`` absent or all ``[S, S]``): ``B`` single-crop images. The crop
    is both the global view and the only tile, which is exactly what the processor produces with
    ``num_crops=1`` (its bicubic ``S -> S`` global view is the identity): ``num_image_tokens(rows=1, cols=1)``
    tokens per image (313), CLIP run once per image.

* Non-HD model (``use_hd_transform`` and ``with_learnable_separator`` false; no released weights exist):
  ``pixel_values [B, 3, S, S]``, one token per CLIP patch (``g*g`` = 576 per image) projected from width ``C``
  (``linear``: ``Linear(C, D)``; ``mlp``: ``Linear(C, D) -> GELU -> Linear(D, D)``). ``img_processor.num_img_tokens``
  must be ``g*g`` when given (the seed grouped placeholders by 144 while producing 576 features).

* ``set_img_features(f)`` replaces CLIP for the next call: ``f`` is what CLIP gives for the ``pixel_values``
  above, i.e. the same crop axes with each ``[3, S, S]`` crop replaced by its patch features ``[g*g, C]``
  (hidden state ``layer_idx``, CLS dropped; :meth:`Phi3ImageEmbedding.get_img_features`):
  ``[B, K, g*g, C]`` with image sizes, or ``[B, g*g, C]`` for single-crop images. They go through the HD
  transform before the ``4C``-wide projection.

The problems of the seed class (docs/pipeline.md §16) and what this class does instead:

1, 2. no undefined ``bs`` / ``start_time``: the HD path runs and matches the golden outputs;
3, 4. one coherent single-crop path per model kind (above), token counts checked at construction;
5. pre-computed features are pre-merge CLIP features and go through the HD transform;
6. ``set_img_sizes`` and ``set_img_features`` apply to the next ``forward`` only, and are cleared by it
   (even when it raises); sizes given both ways must agree;
7. ``hd_transform_order`` defaults to the released ``sub_glb``;
8. ``projection_cls="linear"`` with HD is ``Linear(4C, D)``, the width the HD transform produces;
9. ``type_feature="cls_patch"`` is rejected at construction (ConfigError);
10. image rows go to the placeholder positions in row-major order (:func:`phi3embed.core.prompt.merge_image_embeddings`),
    however the runs are split over rows;
11. ids are clamped into ``[0, vocab_size - 1]`` on a copy: ``input_ids`` is never modified;
12. CLIP dimensions come from the config (``clip_vision_config``, else ViT-L/14-336); attention is SDPA, as
    the official class gets by default (its flash-attention swap computes the same maths);
13. only real crops go through CLIP;
14. the MLP's GELU is the exact erf form;
15. ``wte`` is borrowed, not owned: it is not part of the state dict (the checkpoint has no
    ``vision_embed_tokens.wte`` key), can be given later with :meth:`Phi3ImageEmbedding.set_wte` (or by
    assigning ``.wte``), and ``forward`` without one raises a clear :class:`~phi3embed.errors.MergeError`.
    :meth:`Phi3ImageEmbedding.image_embeddings` needs no table at all.

Text-only calls (no placeholders in ``input_ids``, e.g. generation steps after the prompt) return the token
embeddings and do not encode ``pixel_values``, as the official model does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from phi3embed.core.checkpoint import VISION_PREFIX, checkpoint_to_module_key, module_to_checkpoint_key, resolve
from phi3embed.core.config import VisionConfig, vision_config_from_dict
from phi3embed.core.hd import image_tokens, num_image_tokens
from phi3embed.core.model import build_clip, build_projection, load_vision_tensors
from phi3embed.core.prompt import image_mask, merge_image_embeddings, read_text_embeddings
from phi3embed.errors import ConfigError, MergeError

OFFICIAL_CLIP_PREFIX = "img_processor.vision_model."  # how the checkpoint names CLIP (after the vision prefix)
EMBD_LAYER_KEYS = (
    "embedding_cls",
    "use_hd_transform",
    "with_learnable_separator",
    "hd_transform_order",
    "projection_cls",
)
_CONFIG_ATTRS = (
    "hidden_size",
    "n_embd",
    "vocab_size",
    "img_processor",
    "embd_layer",
    "embd_pdrop",
    "embed_pdrop",
    "clip_vision_config",
    "pad_token_id",
    "_attn_implementation",
)

Sizes = list[tuple[int, int]]


# --------------------------------------------------------------------------- key mapping (pure)


def official_to_module_key(key: str, *, clip_prefix: str) -> str:
    """Official name (``img_processor.vision_model.X``) -> this module's name (``clip_prefix + X``).

    ``clip_prefix`` is ``img_processor.vision_model.`` under transformers 4 and ``img_processor.`` under 5.
    Other keys are unchanged. An official name is the checkpoint key without ``model.vision_embed_tokens.``,
    so this is the checkpoint's own mapping (:func:`~phi3embed.core.checkpoint.checkpoint_to_module_key`).
    """
    return checkpoint_to_module_key(VISION_PREFIX + key, clip_prefix=clip_prefix) or key


def module_to_official_key(key: str, *, clip_prefix: str) -> str:
    """Inverse of :func:`official_to_module_key`."""
    if key.startswith(OFFICIAL_CLIP_PREFIX):  # already official (transformers 4 names are the official ones)
        return key
    return module_to_checkpoint_key(key, clip_prefix=clip_prefix).removeprefix(VISION_PREFIX)


# --------------------------------------------------------------------------- config


def _config_dict(config: Any) -> dict[str, Any]:
    """A PretrainedConfig-like object or a dict -> a plain dict of the fields the image path reads."""
    if isinstance(config, Mapping):
        raw = dict(config)
    else:
        raw = {k: getattr(config, k) for k in _CONFIG_ATTRS if hasattr(config, k)}
    if "n_embd" in raw and "hidden_size" not in raw:
        raw["hidden_size"] = raw["n_embd"]
    return raw


def _embd_layer(raw: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``config.embd_layer`` overridden by the constructor's keyword arguments (as ``Phi3VModel`` passes them)."""
    unknown = sorted(set(kwargs) - set(EMBD_LAYER_KEYS))
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(EMBD_LAYER_KEYS)}")
    base = raw.get("embd_layer")
    return {**(base if isinstance(base, Mapping) else {}), **kwargs}


# --------------------------------------------------------------------------- the module


class Phi3ImageEmbedding(nn.Module):
    """Drop-in replacement of the official/seed ``Phi3ImageEmbedding`` with every problem of docs/pipeline.md §16 fixed.

    See the module documentation for the accepted inputs and the list of fixes.
    """

    def __init__(self, config: Any, wte: nn.Embedding | torch.Tensor | None = None, **kwargs: Any) -> None:
        super().__init__()
        raw = _config_dict(config)
        embd = _embd_layer(raw, kwargs)
        use_hd = embd.get("use_hd_transform", True)
        separator = embd.get("with_learnable_separator", use_hd)
        if not isinstance(use_hd, bool) or use_hd is not separator:
            raise ConfigError(
                f"use_hd_transform ({use_hd!r}) and with_learnable_separator ({separator!r}) must both be true or "
                "both false: the learnable separators exist only for the HD transform"
            )
        # Parse the shared fields once (it rejects cls_patch, unknown projections and orders, bad layer_idx).
        cfg = vision_config_from_dict(
            {**raw, "embd_layer": {**embd, "use_hd_transform": True, "with_learnable_separator": True}},
            where="config",
        )
        grid = cfg.clip.grid
        tokens_per_crop = cfg.tokens_per_side**2 if use_hd else grid * grid
        img = raw.get("img_processor") or {}
        declared = img.get("num_img_tokens") if isinstance(img, Mapping) else None
        if not use_hd and declared is not None and declared != tokens_per_crop:
            raise ConfigError(
                f"config: use_hd_transform=false gives one token per CLIP patch ({grid}x{grid} = {tokens_per_crop} "
                f"per image) but img_processor.num_img_tokens is {declared}"
            )

        self.vision_config: VisionConfig = cfg
        self.use_hd_transform: bool = use_hd
        self.with_learnable_separator: bool = use_hd
        self.hd_transform_order: str = cfg.hd_transform_order
        self.projection_cls: str = cfg.projection_cls
        self.layer_idx: int = cfg.layer_idx
        self.type_feature: str = cfg.type_feature
        self.image_dim_out: int = cfg.image_dim_out
        self.num_img_tokens: int = tokens_per_crop
        self.vocab_size: int = cfg.vocab_size
        self.hidden_size: int = cfg.lm_hidden_size

        # The official class builds CLIP from its own CLIPVisionConfig (transformers' default attention, SDPA)
        # whatever config._attn_implementation says; only flash_attention_2 swaps in a module with the same maths.
        self.img_processor = build_clip(cfg, num_layers=cfg.clip.num_hidden_layers, attn="sdpa")
        if use_hd:
            self.glb_GN = nn.Parameter(torch.zeros(1, 1, cfg.merged_dim))
            self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, cfg.merged_dim))
        width = cfg.merged_dim if use_hd else cfg.image_dim_out
        self.img_projection = build_projection(cfg.projection_cls, in_dim=width, out_dim=cfg.lm_hidden_size)
        pdrop = raw.get("embd_pdrop", raw.get("embed_pdrop"))
        self.drop: nn.Dropout | None = nn.Dropout(float(pdrop)) if pdrop is not None else None

        self._pending_features: torch.Tensor | None = None
        self._pending_sizes: Any = None
        self._wte: nn.Embedding | torch.Tensor | None = None
        self.set_wte(wte)
        self.register_load_state_dict_pre_hook(self._official_names_in)
        self.register_state_dict_post_hook(self._official_names_out)

    # ------------------------------------------------------------------ loading

    @property
    def clip_prefix(self) -> str:
        """Where CLIP's modules sit in this module's own names (transformers 5 dropped ``vision_model.``)."""
        return OFFICIAL_CLIP_PREFIX if hasattr(self.img_processor, "vision_model") else "img_processor."

    @staticmethod
    def _official_names_in(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """load_state_dict pre-hook: accept the checkpoint's (official) names under any transformers version."""
        assert isinstance(module, Phi3ImageEmbedding)
        clip_prefix = module.clip_prefix
        for key in [k for k in state_dict if k.startswith(prefix + OFFICIAL_CLIP_PREFIX)]:
            new = prefix + official_to_module_key(key[len(prefix) :], clip_prefix=clip_prefix)
            if new != key:
                state_dict[new] = state_dict.pop(key)

    @staticmethod
    def _official_names_out(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """state_dict post-hook: always report the checkpoint's (official) names."""
        assert isinstance(module, Phi3ImageEmbedding)
        clip_prefix = module.clip_prefix
        for key in [k for k in state_dict if k.startswith(prefix + clip_prefix)]:
            new = prefix + module_to_official_key(key[len(prefix) :], clip_prefix=clip_prefix)
            if new != key:
                state_dict[new] = state_dict.pop(key)

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike[str],
        *,
        with_wte: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        revision: str | None = None,
    ) -> Phi3ImageEmbedding:
        """Build from a checkpoint's config.json and load its vision tensors (and ``embed_tokens`` as ``wte``).

        Reads only ``model.vision_embed_tokens.*`` (and ``model.embed_tokens.weight`` when ``with_wte``).
        """
        ckpt = resolve(source, revision=revision, with_text_embeddings=with_wte)
        with torch.device("meta"):
            module = cls(ckpt.config)
        # the embedder's loading path; this module's state dict always carries the official names
        load_vision_tensors(module, ckpt, clip_prefix=OFFICIAL_CLIP_PREFIX, dtype=dtype, device=device)
        if with_wte:
            module.set_wte(read_text_embeddings(ckpt, dtype=dtype, device=device))
        return module

    # ------------------------------------------------------------------ state for the next call

    @property
    def wte(self) -> nn.Embedding | torch.Tensor | None:
        """The borrowed token-embedding table (not part of this module's parameters or state dict)."""
        return self._wte

    def set_wte(self, wte: nn.Embedding | torch.Tensor | None) -> None:
        """Give (or replace) the token-embedding table: an ``nn.Embedding`` or a ``[V, D]`` tensor."""
        if wte is not None:
            weight = wte.weight if isinstance(wte, nn.Embedding) else wte
            if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != self.hidden_size:
                shape = list(weight.shape) if isinstance(weight, torch.Tensor) else type(wte).__name__
                raise ConfigError(f"wte must be [vocab, {self.hidden_size}] (an nn.Embedding or a tensor), got {shape}")
        object.__setattr__(self, "_wte", wte)  # plain attribute: never registered as a submodule

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "wte":
            self.set_wte(value)
        else:
            super().__setattr__(name, value)

    def set_img_features(self, img_features: torch.Tensor) -> None:
        """CLIP patch features to use instead of ``pixel_values`` in the NEXT ``forward`` only (see module doc)."""
        if not isinstance(img_features, torch.Tensor):
            raise MergeError(f"img_features must be a tensor, got {type(img_features).__name__}")
        self._pending_features = img_features

    def set_img_sizes(self, img_sizes: torch.Tensor | Sequence[Sequence[int]]) -> None:
        """Image sizes ``[B, 2]`` (height, width) for the NEXT ``forward`` only."""
        self._pending_sizes = img_sizes

    # ------------------------------------------------------------------ stages

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.img_projection.parameters()).dtype

    @property
    def _device(self) -> torch.device:
        return next(self.img_projection.parameters()).device

    def get_img_features(self, img_embeds: torch.Tensor) -> torch.Tensor:
        """Crops ``[N, 3, S, S]`` -> CLIP hidden state ``layer_idx`` without CLS, ``[N, g*g, C]``."""
        x = img_embeds.to(device=self._device, dtype=self._dtype)
        out = self.img_processor(pixel_values=x, output_hidden_states=True)
        return out.hidden_states[self.vision_config.hidden_state_index][:, 1:]  # (N, g*g, C)

    def image_embeddings(
        self,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
        *,
        img_features: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Projected image tokens, one ``[T_i, D]`` tensor per image (no table needed)."""
        sizes = None if image_sizes is None else _sizes_list(image_sizes)
        if img_features is not None:
            per_image, grids = self._split_features(img_features, sizes)
        elif pixel_values is not None:
            per_image, grids = self._encode(pixel_values, sizes)
        else:
            raise MergeError("the prompt has image placeholders but neither pixel_values nor img_features were given")
        if not self.use_hd_transform:
            tokens = [f.reshape(-1, f.shape[-1]) for f in per_image]  # (g*g, C) each
        else:
            sub_gn, glb_gn = self.sub_GN.reshape(-1), self.glb_GN.reshape(-1)  # (4C,), (4C,)
            tokens = [
                image_tokens(f, rows=r, cols=c, sub_gn=sub_gn, glb_gn=glb_gn, order=self.hd_transform_order)
                for f, (r, c) in zip(per_image, grids, strict=True)
            ]  # (T_i, 4C) each
            side = self.vision_config.tokens_per_side
            for t, (r, c) in zip(tokens, grids, strict=True):
                assert t.shape[0] == num_image_tokens(rows=r, cols=c, tokens_per_side=side), (t.shape, r, c)
        if not tokens:
            return []
        projected = self.img_projection(torch.cat(tokens).to(device=self._device, dtype=self._dtype))  # (sum T, D)
        return list(torch.split(projected, [t.shape[0] for t in tokens]))

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """``input_ids [B, L]`` (placeholders negative) + images -> ``hidden_states [B, L, D]`` (``inputs_embeds``)."""
        features, pending_sizes = self._pending_features, self._pending_sizes
        self._pending_features = self._pending_sizes = None  # one call only, whatever happens below
        sizes = _agree(image_sizes, pending_sizes)
        if self._wte is None:
            raise MergeError(
                "no token-embedding table: pass wte= to the constructor or call set_wte() "
                "(e.g. with phi3embed.load_text_embeddings(checkpoint))"
            )
        images: list[torch.Tensor] = []
        if bool(image_mask(input_ids).any()):
            images = self.image_embeddings(pixel_values, sizes, img_features=features)
        hidden = merge_image_embeddings(input_ids, images, self._wte, vocab_size=self.vocab_size)
        return self.drop(hidden) if self.drop is not None else hidden

    # ------------------------------------------------------------------ input handling

    def _grids(self, sizes: Sizes | None, count: int, slots: int | None) -> list[tuple[int, int]]:
        """Crop grids ``(rows, cols)`` of ``count`` images; ``slots`` = crops per image available (HD input)."""
        s = self.vision_config.clip.image_size
        if sizes is None:
            raise MergeError(f"pixel_values with a crop axis need image_sizes ([{count}, 2], height and width)")
        if len(sizes) != count:
            raise MergeError(f"{count} image(s) in pixel_values but {len(sizes)} image size(s)")
        grids = []
        for i, (h, w) in enumerate(sizes):
            if h <= 0 or w <= 0 or h % s or w % s:
                raise MergeError(f"image {i + 1}: size {h}x{w} is not a positive multiple of the crop size {s}")
            rows, cols = h // s, w // s
            if slots is not None and 1 + rows * cols > slots:
                raise MergeError(f"image {i + 1}: size {h}x{w} needs {1 + rows * cols} crops but {slots} were given")
            grids.append((rows, cols))
        return grids

    def _single_crop_sizes_ok(self, sizes: Sizes | None, count: int) -> None:
        s = self.vision_config.clip.image_size
        if sizes is not None and (len(sizes) != count or any(tuple(hw) != (s, s) for hw in sizes)):
            raise MergeError(f"single-crop pixel_values [B, 3, {s}, {s}] mean image sizes [{s}, {s}]; got {sizes}")

    def _check_pixels(self, x: torch.Tensor) -> None:
        c, s = self.vision_config.clip.num_channels, self.vision_config.clip.image_size
        if tuple(x.shape[-3:]) != (c, s, s) or x.ndim not in (4, 5):
            raise MergeError(f"pixel_values must be [B, {c}, {s}, {s}] or [B, K, {c}, {s}, {s}], got {list(x.shape)}")
        if x.ndim == 5 and not self.use_hd_transform:
            raise MergeError(
                f"this module has no HD transform (use_hd_transform=false): pixel_values must be [B, {c}, {s}, {s}]"
            )

    def _encode(
        self, pixel_values: torch.Tensor, sizes: Sizes | None
    ) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Pixels -> per-image CLIP features of the real crops only, and the crop grids."""
        self._check_pixels(pixel_values)
        n = pixel_values.shape[0]
        if pixel_values.ndim == 4:  # single-crop images: CLIP once per image
            self._single_crop_sizes_ok(sizes, n)
            feats = self.get_img_features(pixel_values)  # (B, g*g, C)
            return self._single_crop(feats)
        grids = self._grids(sizes, n, pixel_values.shape[1])
        real = torch.cat([pixel_values[i, : 1 + r * c] for i, (r, c) in enumerate(grids)])  # (sum 1+n_i, 3, S, S)
        feats = self.get_img_features(real)  # (sum 1+n_i, g*g, C)
        return list(torch.split(feats, [1 + r * c for r, c in grids])), grids

    def _split_features(
        self, features: torch.Tensor, sizes: Sizes | None
    ) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Pre-computed CLIP features (the pixel_values layout, crops replaced by ``[g*g, C]``) -> per image."""
        g2, c = self.vision_config.clip.grid**2, self.image_dim_out
        if features.ndim not in (3, 4) or tuple(features.shape[-2:]) != (g2, c):
            raise MergeError(
                f"img_features must be CLIP patch features [B, {g2}, {c}] or [B, K, {g2}, {c}] (hidden state "
                f"layer_idx without CLS, before the HD merge), got {list(features.shape)}"
            )
        if features.ndim == 4 and not self.use_hd_transform:
            raise MergeError(
                f"this module has no HD transform (use_hd_transform=false): img_features must be [B, {g2}, {c}]"
            )
        n = features.shape[0]
        if features.ndim == 3:
            self._single_crop_sizes_ok(sizes, n)
            return self._single_crop(features)
        grids = self._grids(sizes, n, features.shape[1])
        return [features[i, : 1 + r * c] for i, (r, c) in enumerate(grids)], grids

    def _single_crop(self, feats: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """``[B, g*g, C]`` -> per image ``[2, g*g, C]`` (HD: the crop is global view and tile) or ``[1, g*g, C]``."""
        copies = 2 if self.use_hd_transform else 1
        per_image = [f.unsqueeze(0).expand(copies, -1, -1) for f in feats]  # (copies, g*g, C) each
        return per_image, [(1, 1)] * len(per_image)


def _sizes_list(sizes: torch.Tensor | Sequence[Sequence[int]]) -> Sizes:
    """``[B, 2]`` (or one ``[2]``) sizes -> ``[(h, w), ...]``."""
    values = sizes.tolist() if isinstance(sizes, torch.Tensor) else [list(s) for s in sizes]
    if values and not isinstance(values[0], list):
        values = [values]  # a single [h, w]
    if any(len(v) != 2 for v in values):
        raise MergeError(f"image sizes must be [B, 2] (height, width), got {values}")
    return [(int(h), int(w)) for h, w in values]


def _agree(
    given: torch.Tensor | Sequence[Sequence[int]] | None, pending: torch.Tensor | Sequence[Sequence[int]] | None
) -> Sizes | None:
    """Sizes from forward() and from set_img_sizes(): either one, or both when they agree."""
    a = None if given is None else _sizes_list(given)
    b = None if pending is None else _sizes_list(pending)
    if a is not None and b is not None and a != b:
        raise MergeError(f"image sizes given to forward() {a} differ from those given to set_img_sizes() {b}")
    return a if a is not None else b


def vision_state_dict(
    source: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, revision: str | None = None
) -> dict[str, torch.Tensor]:
    """The checkpoint's ``model.vision_embed_tokens.*`` tensors with that prefix stripped (official names).

    Only those tensors are read. ``Phi3ImageEmbedding.load_state_dict`` accepts these names directly.
    """
    ckpt = resolve(source, revision=revision)
    return {k[len(VISION_PREFIX) :]: v for k, v in ckpt.read(ckpt.vision_keys(), dtype=dtype).items()}
