"""Merge image-token embeddings into a prompt's token embeddings, as the official model does (docs/pipeline.md §14.2).

A prompt from ``Phi3VProcessor`` carries image placeholders as negative ids: ``<|image_k|>`` becomes
``num_img_tokens`` copies of ``-k``. The official ``Phi3ImageEmbedding.forward`` then

1. looks up every id, clamped into the vocabulary (placeholders become id 0), in ``model.embed_tokens``;
2. enumerates the placeholder positions (``-1e9 < id < 0``) in row-major order (batch row, then position)
   and writes the k-th row of the concatenated image tokens (images in ``pixel_values`` order) there.

:func:`merge_image_embeddings` does exactly that, without touching its inputs. What it does with the
placeholder *values* is a choice:

* ``by_id=False`` (default, the official behaviour): the values are ignored. The first placeholder run
  receives the first image, whatever number its tag carried (docs/pipeline.md §14.2 item 4).
* ``by_id=True`` (fixes docs/pipeline.md §14.2 item 4, §16.10): every run of ``-k`` receives image ``k`` of its prompt.
  Ids are numbered per prompt (batch row) as ``Phi3VProcessor`` writes them: each row uses ``1..N_row``, and
  the images are given in batch order (row 0's ``N_0`` images, then row 1's, ...). A run may repeat a tag
  (its length is then a multiple of the image's token count).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phi3embed.core.checkpoint import Checkpoint, resolve
from phi3embed.core.embedder import parse_dtype
from phi3embed.core.layout import TEXT_EMBED_KEY, TIED_TEXT_ALIAS
from phi3embed.errors import CheckpointError, MergeError

MAX_INPUT_ID = 10**9  # ids in (-MAX_INPUT_ID, 0) are image placeholders


@dataclass(frozen=True)
class PlaceholderRun:
    """A maximal stretch of equal image placeholders in one prompt row."""

    row: int  # batch row
    start: int  # first position in the row
    length: int  # number of placeholder tokens
    image_id: int  # k of ``<|image_k|>`` (the stored value is -k)


def _as_batch(input_ids: torch.Tensor) -> torch.Tensor:
    """``[L]`` or ``[B, L]`` integer ids -> ``[B, L]`` (a view; never modified)."""
    if not isinstance(input_ids, torch.Tensor):
        raise MergeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise MergeError(f"input_ids must hold integer ids, got dtype {input_ids.dtype}")
    if input_ids.ndim not in (1, 2):
        raise MergeError(f"input_ids must be [L] or [B, L], got shape {list(input_ids.shape)}")
    return input_ids if input_ids.ndim == 2 else input_ids.unsqueeze(0)  # (B, L)


def image_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """``[L]`` or ``[B, L]`` ids -> ``[B, L]`` bool, True at image placeholders (``-1e9 < id < 0``)."""
    ids = _as_batch(input_ids)
    return (ids < 0) & (ids > -MAX_INPUT_ID)


def placeholder_runs(input_ids: torch.Tensor) -> list[PlaceholderRun]:
    """Placeholder runs in row-major order. A run ends where the id changes or a non-placeholder starts."""
    ids = _as_batch(input_ids).cpu()
    mask = image_mask(ids)
    runs: list[PlaceholderRun] = []
    for row in range(ids.shape[0]):
        pos = torch.nonzero(mask[row]).flatten()  # (P_row,)
        if pos.numel() == 0:
            continue
        vals = ids[row, pos]  # (P_row,)
        breaks = (pos[1:] != pos[:-1] + 1) | (vals[1:] != vals[:-1])  # (P_row - 1,)
        starts = [0, *(torch.nonzero(breaks).flatten() + 1).tolist()]
        ends = [*starts[1:], pos.numel()]
        for s, e in zip(starts, ends, strict=True):
            runs.append(PlaceholderRun(row=row, start=int(pos[s]), length=e - s, image_id=-int(vals[s])))
    return runs


def _table(embed_tokens: torch.Tensor | nn.Embedding) -> torch.Tensor:
    """The ``[V, D]`` weight of a table given as a tensor or an ``nn.Embedding``."""
    weight = embed_tokens.weight if isinstance(embed_tokens, nn.Embedding) else embed_tokens
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise MergeError("embed_tokens must be a [vocab, hidden] tensor or an nn.Embedding")
    return weight


def _check_images(image_embeds: Sequence[torch.Tensor], hidden: int) -> list[torch.Tensor]:
    if isinstance(image_embeds, torch.Tensor):
        raise MergeError("image_embeds must be a list of [T_i, D] tensors (one per image), not a single tensor")
    out = []
    for i, emb in enumerate(image_embeds):
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or not emb.dtype.is_floating_point:
            shape = list(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise MergeError(f"image {i + 1}: expected a float [T, {hidden}] tensor, got {shape}")
        if emb.shape[1] != hidden:
            raise MergeError(
                f"image {i + 1}: embeddings are {emb.shape[1]} wide but the token embeddings are {hidden} wide"
            )
        out.append(emb)
    return out


def _rows_in_order(images: list[torch.Tensor], n_positions: int) -> list[torch.Tensor]:
    """Official rule: the k-th placeholder position gets the k-th row of all images' tokens."""
    total = sum(e.shape[0] for e in images)
    if total != n_positions:
        counts = " + ".join(str(e.shape[0]) for e in images) or "0"
        raise MergeError(
            f"the prompt has {n_positions} image placeholder tokens but the {len(images)} image(s) have "
            f"{counts} = {total} tokens; each image needs exactly as many placeholders as it has tokens"
        )
    return images


def _rows_by_id(images: list[torch.Tensor], runs: list[PlaceholderRun], batch: int) -> list[torch.Tensor]:
    """``by_id`` rule: every run of ``-k`` in row ``b`` gets image ``k`` of row ``b`` (images in batch order)."""
    base: list[int] = []  # index of row b's image 1 in ``images``
    offset = 0
    for row in range(batch):
        ids = sorted({r.image_id for r in runs if r.row == row})
        if ids != list(range(1, len(ids) + 1)):
            raise MergeError(
                f"row {row}: image ids {ids} are not 1..N; with by_id=True each prompt numbers its images "
                "1..N, as Phi3VProcessor writes <|image_1|>..<|image_N|>"
            )
        base.append(offset)
        offset += len(ids)
    if offset != len(images):
        raise MergeError(f"the prompts refer to {offset} image(s) but {len(images)} were given")
    pieces = []
    for run in runs:  # row-major, the order of the placeholder positions
        index = base[run.row] + run.image_id - 1
        emb = images[index]
        tokens = emb.shape[0]
        if tokens == 0 or run.length % tokens:
            raise MergeError(
                f"row {run.row}: the run of <|image_{run.image_id}|> placeholders at position {run.start} has "
                f"{run.length} tokens but image {index + 1} has {tokens}"
            )
        pieces.append(emb if run.length == tokens else emb.repeat(run.length // tokens, 1))  # (run.length, D)
    return pieces


def merge_image_embeddings(
    input_ids: torch.Tensor,
    image_embeds: Sequence[torch.Tensor],
    embed_tokens: torch.Tensor | nn.Embedding,
    *,
    vocab_size: int | None = None,
    by_id: bool = False,
) -> torch.Tensor:
    """Token embeddings of a prompt with the image tokens written at the placeholders: ``inputs_embeds``.

    ``input_ids``: ``[B, L]`` or ``[L]`` (treated as ``[1, L]``), placeholders negative (``-1e9 < id < 0``).
    ``image_embeds``: one ``[T_i, D]`` tensor per image, in image order (e.g. ``Phi3VisionEmbedder.encode``).
    ``embed_tokens``: the language model's ``[V, D]`` table (``model.embed_tokens.weight``, see
    :func:`load_text_embeddings`) or an ``nn.Embedding``. ``vocab_size`` (default ``V``) bounds the lookup:
    text ids are clamped into ``[0, vocab_size - 1]`` and placeholders look up id 0, as the official code does.

    Returns ``[B, L, D]`` in the table's dtype and on its device. Inputs are never modified.
    Raises :class:`MergeError` when placeholders and image tokens do not match (see the module doc for
    ``by_id``).
    """
    ids = _as_batch(input_ids)  # (B, L)
    weight = _table(embed_tokens)  # (V, D)
    rows_in_table, hidden = weight.shape
    vocab = rows_in_table if vocab_size is None else vocab_size
    if not 1 <= vocab <= rows_in_table:
        raise MergeError(f"vocab_size {vocab} must be between 1 and the table's {rows_in_table} rows")
    images = _check_images(image_embeds, hidden)

    safe_ids = ids.to(weight.device).clamp(0, vocab - 1)  # a new tensor: the caller's ids stay as they are
    embeds = embed_tokens(safe_ids) if isinstance(embed_tokens, nn.Embedding) else F.embedding(safe_ids, weight)
    # embeds: (B, L, D)

    mask = image_mask(ids).to(weight.device)  # (B, L)
    n_positions = int(mask.sum())
    runs = placeholder_runs(ids) if by_id else []
    pieces = _rows_by_id(images, runs, ids.shape[0]) if by_id else _rows_in_order(images, n_positions)
    if n_positions == 0:
        return embeds
    rows = torch.cat([p.to(device=embeds.device, dtype=embeds.dtype) for p in pieces])  # (P, D)
    positions = torch.nonzero(mask, as_tuple=True)  # row-major (b, t) pairs
    return embeds.index_put(positions, rows)  # out of place


# --------------------------------------------------------------------------- the table


def read_text_embeddings(
    ckpt: Checkpoint, *, dtype: str | torch.dtype | None = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Read only the token-embedding table ``[V, D]`` from a checkpoint resolved with text embeddings:
    ``model.embed_tokens.weight``, or its alias ``model.vision_embed_tokens.wte.weight`` when only that is stored.

    ``dtype=None`` keeps the stored dtype.
    """
    key = TEXT_EMBED_KEY if TEXT_EMBED_KEY in ckpt.tensors else TIED_TEXT_ALIAS
    info = ckpt.tensors.get(key)
    if info is None:
        raise CheckpointError(
            f"neither {TEXT_EMBED_KEY} nor {TIED_TEXT_ALIAS} is in the checkpoint (resolve it with "
            "with_text_embeddings=True)",
            path=ckpt.root,
        )
    if len(info.shape) != 2:
        raise CheckpointError(f"{key} has shape {list(info.shape)}, expected [vocab, hidden]", path=info.file)
    torch_dtype = None if dtype is None else parse_dtype(dtype)
    return ckpt.read([key], dtype=torch_dtype, device=device)[key]


def load_text_embeddings(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    dtype: str | torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The token-embedding table ``[V, D]`` of a checkpoint (local dir, hub id or preset name).

    Reads ONLY ``model.embed_tokens.weight`` (or its ``wte`` alias; plus the configs and safetensors
    headers); no other tensor is read, and from the hub only the table's bytes are fetched (into the
    phi3embed cache). ``dtype=None`` keeps the stored dtype.
    """
    ckpt = resolve(source, revision=revision, with_text_embeddings=True, with_vision=False)
    return read_text_embeddings(ckpt, dtype=dtype, device=device)
