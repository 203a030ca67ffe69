"""The stored file formats: safetensors written deterministically, its metadata read back, dtype names.

Both writers (:mod:`phi3embed.outputs.files`, :mod:`phi3embed.outputs.packs`) write through
:func:`write_safetensors`, so a file's bytes depend only on its tensors, their order and the metadata.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from phi3embed.errors import Phi3EmbedError

EMBED_KEY = "image_embeds"  # the tensor key of a per-image safetensors file

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A CPU contiguous tensor -> its little-endian bytes as a flat uint8 array (no copy)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def write_safetensors(
    fh: IO[bytes], tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file deterministically (tensors in the given order, JSON header padded to 8)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": ST_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    blob += b" " * (-len(blob) % 8)
    fh.write(struct.pack("<Q", len(blob)))
    fh.write(blob)
    for _, tensor in tensors:
        fh.write(_tensor_bytes(tensor).data)


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (header only)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise Phi3EmbedError("not a safetensors file (shorter than 8 bytes)", path=Path(path))
        (n,) = struct.unpack("<Q", head)
        if n > 1 << 30:
            raise Phi3EmbedError("not a safetensors file (header length is implausible)", path=Path(path))
        header = json.loads(fh.read(n))
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}
