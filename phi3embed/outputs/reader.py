"""Read what ``phi3embed encode`` wrote: ``for record, tensor in phi3embed.read("emb/"): ...``.

Works the same for one file per image (npy or safetensors) and for packed shards. Only the latest record
of each image counts, and only images whose latest record is ``ok`` are yielded (failed ones are in the
manifest: see :func:`latest_records`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phi3embed.errors import Phi3EmbedError
from phi3embed.outputs.store import EMBED_KEY, MANIFEST, iter_manifest


def latest_records(out_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Image name -> its latest manifest record (``ok`` or ``error``), names sorted."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise Phi3EmbedError("no manifest.jsonl here: not a phi3embed output directory", path=Path(out_dir))
    latest: dict[str, dict[str, Any]] = {}
    for record in iter_manifest(path):
        latest[record["name"]] = record
    return {name: latest[name] for name in sorted(latest)}


def read(out_dir: str | os.PathLike[str]) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """Yield ``(record, embeddings [num_tokens, D])`` for every image whose latest record is ``ok``.

    Images come in name order. A missing or unreadable output raises Phi3EmbedError naming it.
    """
    from safetensors import SafetensorError, safe_open

    root = Path(out_dir)
    open_name: str | None = None
    handle: Any = None
    for record in latest_records(root).values():
        if record.get("status") != "ok":
            continue
        output = record.get("output")
        if not output:
            raise Phi3EmbedError("ok record without an output", path=record["name"])
        path = root / output
        try:
            if output.endswith(".npy"):
                tensor = torch.from_numpy(np.load(path, allow_pickle=False))
            else:
                if output != open_name:
                    handle = safe_open(str(path), framework="pt")
                    open_name = output
                tensor = handle.get_tensor(record.get("key") or EMBED_KEY)
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise Phi3EmbedError(f"cannot read the embeddings of {record['name']}: {exc}", path=path) from None
        yield record, tensor
