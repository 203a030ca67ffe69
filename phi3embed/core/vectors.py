"""One vector per image, computed in the same pass as the image tokens (docs/pipeline.md §9-§11).

Three kinds, each a float32 vector per image:

* ``cls``: CLIP's pooled feature of the global 336 px view: the encoder's last layer, its final layer norm
  applied to the class token (``pooler_output`` of transformers' ``CLIPVisionModel``; Phi-3's checkpoint has
  no CLIP projection head). The fast path stops at ``layer_idx``, so :class:`VectorHead` runs the remaining
  layers on the global view alone, ``[C]``;
* ``mean``: the mean of the global view's patch features at ``layer_idx`` (CLS excluded), the features
  Phi-3 feeds the HD transform, ``[C]``;
* ``tokens``: the mean of the image's projected tokens with the ``sub_GN`` / ``glb_GN`` separators left out
  (:func:`token_mask`), what the language model sees, ``[D]``.

Means are taken in float32 whatever the compute dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, cast

import torch
from torch import nn

from phi3embed.core.checkpoint import CLIP_PREFIX, Checkpoint
from phi3embed.core.config import VisionConfig
from phi3embed.core.hd import num_image_tokens
from phi3embed.core.model import build_clip
from phi3embed.errors import ConfigError

VectorKind = Literal["cls", "mean", "tokens"]
VECTOR_KINDS: tuple[VectorKind, ...] = ("cls", "mean", "tokens")


def parse_vectors(value: str | Iterable[str]) -> tuple[VectorKind, ...]:
    """``"cls,mean"`` or ``["mean", "cls"]`` -> the kinds in canonical order (``cls, mean, tokens``), each
    once; an unknown kind or an empty list is a ConfigError."""
    items = value.split(",") if isinstance(value, str) else list(value)
    wanted = {item.strip() for item in items if item.strip()}
    unknown = sorted(wanted - set(VECTOR_KINDS))
    if unknown:
        raise ConfigError(f"vector kind {unknown[0]!r} is not one of {', '.join(VECTOR_KINDS)}")
    if not wanted:
        raise ConfigError(f"no vector kind given (use one or more of {', '.join(VECTOR_KINDS)})")
    return tuple(kind for kind in VECTOR_KINDS if kind in wanted)


def vector_width(kind: VectorKind, cfg: VisionConfig) -> int:
    """The length of one image's ``kind`` vector."""
    return cfg.lm_hidden_size if kind == "tokens" else cfg.clip.hidden_size


def token_mask(*, rows: int, cols: int, tokens_per_side: int, order: str = "sub_glb") -> torch.Tensor:
    """``[T]`` booleans, True for the image tokens of one image and False for its separators.

    The layout of :func:`phi3embed.core.hd.image_tokens`: the sub-crops' ``m*rows`` lines of ``m*cols`` tokens
    each ended by ``sub_GN``, one ``glb_GN``, the global view's ``m`` lines of ``m`` tokens each ended by
    ``sub_GN`` (``glb_sub``: the global part first).
    """
    m = tokens_per_side
    sub = torch.ones(rows * m, cols * m + 1, dtype=torch.bool)  # (rows*m, cols*m + 1)
    sub[:, -1] = False  # sub_GN ends every line
    glb = torch.ones(m, m + 1, dtype=torch.bool)  # (m, m + 1)
    glb[:, -1] = False
    sep = torch.zeros(1, dtype=torch.bool)  # glb_GN
    parts = [sub.reshape(-1), sep, glb.reshape(-1)]
    mask = torch.cat(parts if order == "sub_glb" else parts[::-1])
    assert mask.numel() == num_image_tokens(rows=rows, cols=cols, tokens_per_side=m)
    return mask


class VectorHead(nn.Module):
    """The CLIP layers after ``layer_idx`` and the final layer norm: hidden state ``layer_idx`` of a view,
    CLS included, ``[N, 1 + g*g, C]`` -> its pooled feature ``[N, C]`` (``CLIPVisionModel.pooler_output``)."""

    def __init__(self, cfg: VisionConfig, *, attn: str = "sdpa") -> None:
        super().__init__()
        self.first = cfg.layers_needed  # checkpoint index of our layer 0
        count = cfg.clip.num_hidden_layers - self.first
        clip = build_clip(cfg, num_layers=max(count, 1), attn=attn)
        vision = getattr(clip, "vision_model", clip)  # transformers 5 dropped the extra level
        self.encoder = vision.encoder if count > 0 else None
        self.post_layernorm = vision.post_layernorm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, 1 + g*g, C]`` -> ``[N, C]``."""
        if self.encoder is not None:
            hidden = self.encoder(inputs_embeds=hidden).last_hidden_state  # (N, 1 + g*g, C)
        return cast(torch.Tensor, self.post_layernorm(hidden[:, 0]))  # (N, C)

    def checkpoint_key(self, name: str) -> str:
        """Our state-dict key -> the checkpoint's (``encoder.layers.i`` is layer ``first + i`` there)."""
        if name.startswith("encoder.layers."):
            index, rest = name.removeprefix("encoder.layers.").split(".", 1)
            return f"{CLIP_PREFIX}encoder.layers.{self.first + int(index)}.{rest}"
        return CLIP_PREFIX + name

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Checkpoint,
        cfg: VisionConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        attn: str = "sdpa",
    ) -> VectorHead:
        """Build on the meta device and read exactly its tensors (the model's strict check has already
        compared every vision tensor of ``ckpt`` with the config)."""
        with torch.device("meta"):
            head = cls(cfg, attn=attn)
        names = list(head.state_dict())
        keys = {head.checkpoint_key(name): name for name in names}
        raw = ckpt.read(sorted(keys), dtype=dtype, device=device)
        head.load_state_dict({keys[k]: t for k, t in raw.items()}, strict=True, assign=True)
        head.requires_grad_(False)
        return head.eval()


@torch.inference_mode()
def image_vectors(
    kinds: Sequence[VectorKind],
    *,
    global_hidden: torch.Tensor,
    projected: Sequence[torch.Tensor] | None,
    grids: Sequence[tuple[int, int]],
    cfg: VisionConfig,
    head: VectorHead | None,
) -> dict[VectorKind, torch.Tensor]:
    """The ``kinds`` vectors of several images at once, float32 ``[N, d]`` each, on the model's device.

    ``global_hidden``: hidden state ``layer_idx`` of each image's global view, CLS first, ``[N, 1 + g*g, C]``;
    ``projected``: each image's projected tokens ``[T_i, D]`` (needed for ``tokens``); ``head``: needed for
    ``cls``.
    """
    out: dict[VectorKind, torch.Tensor] = {}
    for kind in kinds:
        if kind == "cls":
            assert head is not None, "cls needs the VectorHead"
            out[kind] = head(global_hidden).float()  # (N, C)
        elif kind == "mean":
            out[kind] = global_hidden[:, 1:].float().mean(dim=1)  # (N, C)
        else:
            assert projected is not None, "tokens needs the projected tokens"
            means = []
            for tokens, (rows, cols) in zip(projected, grids, strict=True):
                mask = token_mask(
                    rows=rows, cols=cols, tokens_per_side=cfg.tokens_per_side, order=cfg.hd_transform_order
                ).to(tokens.device)
                means.append(tokens[mask].float().mean(dim=0))  # (D,)
            out[kind] = torch.stack(means)  # (N, D)
    return out
