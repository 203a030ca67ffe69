"""Training loaders over an opened store: a torch ``Dataset`` and a collate function that pads.

```python
store = phi3embed.open("emb/")
loader = DataLoader(EmbeddingDataset(store), batch_size=32, num_workers=4, collate_fn=pad_collate)
for batch in loader:
    batch.embeds  # [B, T_max, D], zero rows after each image's own T_i
    batch.mask    # [B, T_max] bool, True where a row is real
    batch.keys    # the names (or indices) of the images, in batch order
```

The dataset holds the store and an array of positions, no Python object per image, so forked workers
share its memory; each worker opens the files it reads itself (:mod:`phi3embed.outputs.mapping`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from phi3embed.outputs.mapping import EmbeddingStore, open_outputs


class EmbeddingDataset(Dataset[tuple[Any, torch.Tensor]]):
    """``(name, tensor)`` for every image of ``store`` (an :class:`EmbeddingStore` or a folder), in name order,
    or for ``names`` in the given order (a name the store does not have raises KeyError here, not in a
    worker). ``with_names=False`` gives ``(index, tensor)`` instead, the index into this dataset."""

    def __init__(
        self,
        store: EmbeddingStore | str | os.PathLike[str],
        names: Iterable[str] | None = None,
        *,
        with_names: bool = True,
    ) -> None:
        self.store = store if isinstance(store, EmbeddingStore) else open_outputs(store)
        self.with_names = with_names
        if names is None:
            self.positions = np.arange(len(self.store), dtype=np.int64)
        else:
            self.positions = np.fromiter((self.store.index(n) for n in names), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        position = int(self.positions[i])
        key = self.store.name_at(position) if self.with_names else i
        return key, self.store.tensor_at(position)


class PaddedBatch(NamedTuple):
    """What :func:`pad_collate` makes of a list of ``(key, tensor)``."""

    keys: list[Any]  # names or indices, in batch order
    embeds: torch.Tensor  # [B, T_max, ...], zero past each tensor's own length
    mask: torch.Tensor  # [B, T_max] bool, True on real rows


def pad_collate(batch: Sequence[tuple[Any, torch.Tensor]], *, pad_value: float = 0.0) -> PaddedBatch:
    """Stack tensors of different lengths ``[T_i, ...]`` (the same trailing shape and dtype) into
    ``[B, T_max, ...]`` with a ``[B, T_max]`` mask (True where a row is one of the tensor's own)."""
    if not batch:
        raise ValueError("pad_collate needs at least one item")
    keys = [key for key, _ in batch]
    tensors = [t for _, t in batch]
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape[1:] != first.shape[1:] or t.dtype != first.dtype:
            raise ValueError(
                f"cannot pad {list(t.shape)} {t.dtype} with {list(first.shape)} {first.dtype}: "
                "the trailing shape and dtype must agree (one stage, one model)"
            )
    lengths = torch.tensor([t.shape[0] for t in tensors])
    longest = int(lengths.max())
    embeds = first.new_full((len(tensors), longest, *first.shape[1:]), pad_value)  # (B, T_max, ...)
    for row, t in enumerate(tensors):
        embeds[row, : t.shape[0]] = t
    mask = torch.arange(longest)[None, :] < lengths[:, None]  # (B, T_max)
    return PaddedBatch(keys, embeds, mask)
