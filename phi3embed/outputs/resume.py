"""Which images are done: the index of every image's latest record, and the resume rule.

An image is done when its latest record is ``ok``, was made with the same model fingerprint and settings
(:meth:`phi3embed.outputs.records.OutputSettings.signature`), names an output that is whole
(:class:`OutputCheck`: the expected file for per-image formats, any pack file for ``--pack``), and the source
file still has the recorded size and modification time.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import struct
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

from phi3embed.inputs.listing import Source
from phi3embed.outputs.records import Record, Signature

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@lru_cache(maxsize=1024)
def npy_size(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of the ``.npy`` file ``numpy.save`` writes for a C-order array of ``shape`` and ``dtype``."""
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return len(header.getvalue()) + math.prod(shape) * np.dtype(dtype).itemsize


class OutputCheck:
    """Whether an ok record's output is whole, from one ``stat`` (no read) for a per-image file: its size is the
    record's ``output_size`` (records written before that field: for ``.npy`` the size shape and dtype give;
    for safetensors at least the tensor's bytes and a header). A pack member's byte range must lie inside its
    pack file, whose header is read once per file and size. A truncated or replaced output is not whole: the
    image is encoded again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._packs: dict[tuple[str, int, int], dict[str, int] | None] = {}  # (file, size, mtime) -> key: end

    def whole(self, record: Record) -> bool:
        if not record.output:
            return False
        try:
            st = os.stat(self.root / record.output)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        if record.format == "pack":
            ends = self._pack_ends(record.output, st)
            return ends is not None and record.key in ends and ends[str(record.key)] <= st.st_size
        if record.output_size is not None:
            return st.st_size == record.output_size
        shape = tuple(record.shape or ())
        if record.dtype not in _ITEMSIZE or not shape:
            return True  # nothing to compare with
        if record.output.endswith(".npy"):
            return st.st_size == npy_size(shape, record.dtype)
        return st.st_size >= math.prod(shape) * _ITEMSIZE[record.dtype] + 16  # safetensors: 8-byte length, header

    def _pack_ends(self, output: str, st: os.stat_result) -> dict[str, int] | None:
        """Where each tensor of a pack file ends (from its header), or None when it is not a readable one."""
        key = (output, st.st_size, st.st_mtime_ns)
        if key not in self._packs:
            self._packs[key] = _safetensors_ends(self.root / output)
        return self._packs[key]


def _safetensors_ends(path: Path) -> dict[str, int] | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if length > 1 << 31:
                return None
            header = json.loads(fh.read(length))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    start = 8 + length
    ends = {}
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if name != "__metadata__" and isinstance(offsets, list) and len(offsets) == 2:
            ends[name] = start + int(offsets[1])
    return ends


class ResumeIndex:
    """Latest record per image name, kept current as records are appended."""

    def __init__(
        self,
        root: Path,
        signature: Signature,
        *,
        overwrite: bool = False,
        vectors_present: Callable[[Record], bool] | None = None,
    ) -> None:
        self.root, self.signature, self.overwrite = root, signature, overwrite
        self.vectors_present = vectors_present  # with encode --vectors: is the record's vector row on disk
        self._latest: dict[str, Record] = {}
        self.outputs = OutputCheck(root)
        self._by_sha256: dict[str, str] | None = None  # sha256 -> a name with an ok record; built on first use

    def note(self, record: Record) -> None:
        self._latest[record.name] = record
        if self._by_sha256 is not None:
            self._index_sha256(record)

    def latest_records(self) -> dict[str, Record]:
        """A copy of name -> latest record."""
        return dict(self._latest)

    def latest(self, name: str) -> Record | None:
        """The latest record of ``name`` (this run's included), or None."""
        return self._latest.get(name)

    def identical(self, sha256: str) -> Record | None:
        """An ok record made with the same settings from a source with these bytes whose output still
        exists (None under ``overwrite``): what a duplicate of those bytes may share instead of being encoded.

        Uses the index of :meth:`index_sha256` (built here when it was not)."""
        if self.overwrite:
            return None
        by_sha256 = self.index_sha256()
        name = by_sha256.get(sha256)
        seen = self._latest.get(name) if name is not None else None
        if seen is None or not self._usable(seen) or seen.sha256 != sha256:
            return None  # that name has a newer record since (failed, or other bytes)
        return seen if self._present(seen) else None

    def index_sha256(self) -> dict[str, str]:
        """Index every ok record by sha256, once (one dict entry per image, about 30 bytes: the strings are
        the records' own); records noted later are indexed as they come. Call it before other threads
        note records."""
        if self._by_sha256 is None:
            self._by_sha256 = {}
            for record in self._latest.values():
                self._index_sha256(record)
        return self._by_sha256

    def _index_sha256(self, record: Record) -> None:
        """Note ``record`` under its sha256 if usable; an encoded original wins over a duplicate of it."""
        assert self._by_sha256 is not None
        if self._usable(record) and (record.duplicate_of is None or record.sha256 not in self._by_sha256):
            self._by_sha256[record.sha256 or ""] = record.name

    def _usable(self, record: Record) -> bool:
        stored = bool(record.output) or (record.output is None and record.vectors is not None)  # --stage none
        return record.ok and bool(record.sha256) and stored and record.signature() == self.signature

    def _present(self, record: Record) -> bool:
        """The record's output file (if any) is whole and its vector row (with --vectors) is on disk."""
        if record.output is not None and not self.outputs.whole(record):
            return False
        if self.vectors_present is not None:
            return self.vectors_present(record)
        return record.output is not None

    def is_done(self, source: Source, expected_output: str | None) -> bool:
        """The rule of the module docstring; ``expected_output`` None accepts any output (packs)."""
        if self.overwrite:
            return False
        seen = self._latest.get(source.name)
        if seen is None or not seen.ok or seen.signature() != self.signature:
            return False
        if expected_output is not None and seen.output != expected_output:
            return False
        if not self._present(seen):
            return False
        try:
            st = os.stat(source.path)
        except OSError:
            return False
        return st.st_size == seen.size and st.st_mtime_ns == seen.mtime_ns
