"""The safetensors format, once: the dtype table, where a tensor lies, header parsing and deterministic writing.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (an object: per tensor
``dtype``, ``shape`` and ``data_offsets`` relative to the data, optionally ``__metadata__``: strings), then the
data from byte ``8 + n``. Checkpoint reading (:mod:`phi3embed.core.checkpoint`), the hub's ranged fetches and
its cache entries (:mod:`phi3embed.core.hub`), the output writers and ``phi3embed.open``
(:mod:`phi3embed.outputs.mapping`) all parse and write it here.

Parsing never reads tensor data and checks what a reader relies on: the length is within bounds and inside
the file, the JSON is an object, each entry is well formed with a known dtype, ``0 <= start <= end``, its
byte count is what its shape and dtype need, and it ends inside the file (when the file's size is known).
Writing is deterministic: the same tensors in the same order with the same metadata give the same bytes
(compact JSON, ASCII, padded with spaces to a multiple of 8), which resume and golden parity rely on.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from phi3embed.errors import Phi3EmbedError

LENGTH_BYTES = 8  # the little-endian u64 before the JSON header
MAX_HEADER = 100 * 1024 * 1024  # a longer header is not a safetensors file (the reference reader refuses it too)
METADATA_KEY = "__metadata__"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}


class SafetensorsFormatError(Phi3EmbedError):
    """A file (or a fetched header) is not a valid safetensors file; the reason says what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: ``[start, end)`` are absolute byte offsets in ``file``."""

    file: Path
    dtype: str  # a key of DTYPES
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Header:
    """A parsed header: the tensors (in file order) and the ``__metadata__`` strings."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # 8 + the JSON header's length


def header_length(prefix: bytes, *, file_size: int | None, where: str | Path) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against MAX_HEADER and the file size."""
    if len(prefix) < LENGTH_BYTES:
        raise SafetensorsFormatError("not a safetensors file (shorter than 8 bytes)", path=where)
    (n,) = struct.unpack("<Q", prefix[:LENGTH_BYTES])
    if n > MAX_HEADER or (file_size is not None and LENGTH_BYTES + n > file_size):
        raise SafetensorsFormatError(f"not a safetensors file (header length {n})", path=where)
    return int(n)


def parse_header(
    raw: bytes, *, file: Path, file_size: int | None, where: str | Path, data_start: int | None = None
) -> Header:
    """The tensors and metadata of JSON header bytes ``raw`` (the data starts at ``8 + len(raw)``)."""
    base = LENGTH_BYTES + len(raw) if data_start is None else data_start
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SafetensorsFormatError("safetensors header is not valid JSON", path=where) from None
    if not isinstance(doc, dict):
        raise SafetensorsFormatError("safetensors header is not a JSON object", path=where)
    meta = doc.get(METADATA_KEY) or {}
    if not isinstance(meta, dict):
        raise SafetensorsFormatError("safetensors __metadata__ is not a JSON object", path=where)
    tensors: dict[str, TensorInfo] = {}
    for key, entry in doc.items():
        if key == METADATA_KEY:
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"safetensors entry {key} is malformed", path=where) from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise SafetensorsFormatError(f"tensor {key} has unsupported dtype {dtype}", path=where)
        if min(shape, default=0) < 0 or not 0 <= start <= end:
            raise SafetensorsFormatError(f"safetensors entry {key} is malformed", path=where)
        need = math.prod(shape) * DTYPES[dtype].itemsize
        if end - start != need:
            raise SafetensorsFormatError(
                f"tensor {key} has {end - start} bytes, its shape {list(shape)} and dtype {dtype} need {need}",
                path=where,
            )
        if file_size is not None and base + end > file_size:
            raise SafetensorsFormatError(
                f"truncated: tensor {key} ends at byte {base + end}, the file has {file_size}", path=where
            )
        tensors[key] = TensorInfo(file=file, dtype=dtype, shape=shape, start=base + start, end=base + end)
    return Header(tensors=tensors, metadata={str(k): str(v) for k, v in meta.items()}, data_start=base)


def read_header_with(read: Callable[[int, int], bytes], *, file: Path, file_size: int, where: str | Path) -> Header:
    """Parse the header of a file whose bytes ``read(size, offset)`` returns (two reads, no tensor data)."""
    n = header_length(read(LENGTH_BYTES, 0), file_size=file_size, where=where)
    raw = read(n, LENGTH_BYTES)
    if len(raw) != n:
        raise SafetensorsFormatError("safetensors header is truncated", path=where)
    return parse_header(raw, file=file, file_size=file_size, where=where)


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse the header of a local file. OSError passes through to the caller."""
    p = Path(path)
    with open(p, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        return read_header_with(lambda n, offset: os.pread(fh.fileno(), n, offset), file=p, file_size=size, where=p)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (header only)."""
    return read_header(path).metadata


# --------------------------------------------------------------------------- writing


def encode_header(
    entries: Sequence[tuple[str, str, Sequence[int]]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[int]]:
    """The bytes before the data of a file holding ``(key, dtype, shape)`` entries in this order (length and
    JSON padded to 8), and each entry's absolute start offset; the data follows without gaps."""
    doc: dict[str, Any] = {}
    if metadata:
        doc[METADATA_KEY] = dict(metadata)
    offset = 0
    relative = []
    for key, dtype, shape in entries:
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        doc[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        relative.append(offset)
        offset += nbytes
    blob = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()
    blob += b" " * (-len(blob) % 8)
    base = LENGTH_BYTES + len(blob)
    return struct.pack("<Q", len(blob)) + blob, [base + r for r in relative]


def write_safetensors(
    fh: IO[bytes], tensors: Sequence[tuple[str, torch.Tensor]], metadata: Mapping[str, str] | None = None
) -> None:
    """Write CPU contiguous ``tensors`` in this order, deterministically (see :func:`encode_header`)."""
    header, _ = encode_header([(key, CODES[t.dtype], tuple(t.shape)) for key, t in tensors], metadata)
    fh.write(header)
    for _, tensor in tensors:
        fh.write(tensor.reshape(-1).view(torch.uint8).numpy().data)  # its little-endian bytes, no copy
