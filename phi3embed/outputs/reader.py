"""Read what ``phi3embed encode`` wrote: ``for record, tensor in phi3embed.read("emb/"): ...``.

Works the same for one file per image (npy or safetensors) and for packed shards. Only the latest record
of each image counts, and only images whose latest record is ``ok`` are yielded (failed ones are in the
manifest: see :func:`latest_records`). Records are :class:`phi3embed.outputs.records.Record` objects:
``record.name`` and the dict-style ``record["name"]`` both work.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phi3embed.errors import Phi3EmbedError
from phi3embed.outputs.formats import EMBED_KEY
from phi3embed.outputs.manifest import latest_records
from phi3embed.outputs.records import Record


def read(out_dir: str | os.PathLike[str]) -> Iterator[tuple[Record, torch.Tensor]]:
    """Yield ``(record, embeddings [num_tokens, D])`` for every image whose latest record is ``ok``.

    Images come in name order. A missing or unreadable output raises Phi3EmbedError naming it.
    """
    from safetensors import SafetensorError, safe_open

    root = Path(out_dir)
    open_name: str | None = None
    handle: Any = None
    for record in latest_records(root).values():
        if not record.ok:
            continue
        output = record.output
        if not output:
            raise Phi3EmbedError("ok record without an output", path=record.name)
        path = root / output
        try:
            if output.endswith(".npy"):
                tensor = torch.from_numpy(np.load(path, allow_pickle=False))
            else:
                if output != open_name:
                    handle = safe_open(str(path), framework="pt")
                    open_name = output
                tensor = handle.get_tensor(record.key or EMBED_KEY)
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise Phi3EmbedError(f"cannot read the embeddings of {record.name}: {exc}", path=path) from None
        yield record, tensor
