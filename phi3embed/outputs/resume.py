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
import threading
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np

from phi3embed.inputs.listing import Source
from phi3embed.outputs.manifest import MANIFEST
from phi3embed.outputs.manifest_index import ManifestIndex, sha_prefix
from phi3embed.outputs.records import Record, Signature

OutputOf = Callable[[str], "str | None"]  # the output an image name is expected at (None: any)
#: Records of this run held before they are folded into the columns (:meth:`ResumeIndex.note`).
FOLD_RECORDS = 50_000
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
        self._root = str(root)
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

    def has_size(self, output: str | None, size: int) -> bool:
        """A per-image output file is there, a regular file of ``size`` bytes (one ``stat``)."""
        if not output:
            return False
        try:
            st = os.stat(os.path.join(self._root, output))
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == size

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
    """Latest record per image name: the manifest's columns as they were when the run opened it
    (:class:`phi3embed.outputs.manifest_index.ManifestIndex`, about 100 bytes per image, no object per image) and
    the records this run noted since. Records of earlier runs are read back from the manifest only when one is
    asked for, or when its row cannot be judged from the columns (packs, vector rows, lines of old versions)."""

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
        self.columns = ManifestIndex(root / MANIFEST, ())  # empty until load()
        self._sig = -1  # this run's settings' id among the columns' signatures
        self._recent: dict[str, Record] = {}  # noted by this run (newer than the columns)
        self._lock = threading.RLock()  # the writer thread notes (and folds) while the job's thread asks
        self.on_fold: Callable[[], None] | None = None  # after this run's records were folded into the columns
        self.outputs = OutputCheck(root)
        self._by_sha256: dict[str, str] | None = None  # this run's ok records by sha256, once asked
        self._sha_order: np.ndarray | None = None  # rows of the columns sorted by sha256 prefix, once asked
        self._sha_sorted = np.zeros(0, dtype=np.uint64)  # their sha256 prefixes, in that order

    def load(self, *, save: bool | int = False) -> int:
        """Read the manifest's columns (its index file, and the lines after it); returns the lines that are not
        records (skipped). ``save``: as :meth:`ManifestIndex.load`."""
        self.columns = ManifestIndex.load(self.root / MANIFEST, save=save)
        self._sig = self.columns.signature_id(self.signature)
        self._recent.clear()
        return self.columns.unreadable

    def save(self, archives: Mapping[str, tuple[str, int]] = {}, expected: OutputOf | None = None) -> bool:
        """Bring the columns up to the manifest's end (this run's lines, and any another part appended), note the
        completion record of each of ``archives`` (name -> (path, images listed)) whose every image is done now
        (:meth:`archive_done`; others lose theirs) and write the index file. False when it cannot be written
        (never an error: the manifest is the truth)."""
        if not self.columns.columns:
            return False
        try:
            self.columns.update()
        except OSError:
            return False
        self._recent.clear()  # the columns hold them now
        self._sig = self.columns.signature_id(self.signature)  # (a first run's settings are new to the columns)
        before = dict(self.columns.archives)
        for name, (path, images) in archives.items():
            try:
                st = os.stat(path)
            except OSError:
                self.columns.set_archive(name, None)
                continue
            done = expected is not None and self.archive_done(name, images, st, expected)
            record = {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "images": images}
            self.columns.set_archive(name, record if done else None)
        if self.columns.file_covered == self.columns.covered and self.columns.archives == before:
            return True  # the file already says all this
        return self.columns.save()

    def archive_done(self, name: str, images: int, st: os.stat_result, expected: OutputOf) -> bool:
        """Every image of the archive named ``name`` (``images`` of them, the archive's ``stat`` ``st``) is done:
        exactly what :meth:`is_done` says of each, judged from the columns (a row that needs its record, such as
        a pack member's, makes this False: the archive is then listed as usual). ``expected``: the output a name
        is expected at (the writer's rule)."""
        if self.overwrite or self.vectors_present is not None or self._sig < 0 or self._recent:
            return False
        lo, hi = self.columns.archive_rows(name)
        if hi - lo != images:
            return False
        cols = {c: a[lo:hi] for c, a in self.columns.cols.items()}
        if not (
            (cols["status"] == 1).all()
            and (cols["sig"] == self._sig).all()
            and (cols["fast"] == 1).all()
            and (cols["size"] == st.st_size).all()
            and (cols["mtime"] == st.st_mtime_ns).all()
        ):
            return False
        for row, output_size in zip(range(lo, hi), cols["output_size"].tolist(), strict=True):
            output = self.columns.output_at(row)
            if output != expected(self.columns.name_at(row)) or not self.outputs.has_size(output, output_size):
                return False
        return True

    def note(self, record: Record) -> None:
        """Take a record this run appended to the manifest. Past :data:`FOLD_RECORDS` (or a sixteenth of the
        columns' rows) the records noted so far are folded into the columns (read back from the manifest's
        new lines): a long first run holds a bounded number of records, not one per image it wrote."""
        with self._lock:
            self._recent[record.name] = record
            if self._by_sha256 is not None:
                self._index_sha256(record)
            if len(self._recent) >= max(FOLD_RECORDS, len(self.columns) // 16) and self.columns.columns:
                self._fold()

    def _fold(self) -> None:
        try:
            self.columns.update()
        except OSError:
            return  # the records stay as they are: the manifest cannot be read now
        self._sig = self.columns.signature_id(self.signature)
        self._recent.clear()
        if self._by_sha256 is not None:
            self._by_sha256 = {}  # the columns' sha256 order covers them now
        self._sha_order = None
        if self.on_fold is not None:
            self.on_fold()

    def attempts(self, name: str) -> int:
        """How many records ``name`` has in the columns (when the manifest was loaded, or last folded)."""
        with self._lock:
            row = self.columns.find(name)
            return 0 if row is None else int(self.columns.cols["attempts"][row])

    def latest_records(self) -> Mapping[str, Record]:
        """Name -> latest record (this run's included), each read from the manifest when looked up (``encode
        --vectors`` reconciles its rows with it): no record is held."""
        return _Latest(self)

    def latest(self, name: str) -> Record | None:
        """The latest record of ``name`` (this run's included), or None."""
        with self._lock:
            seen = self._recent.get(name)
            if seen is not None:
                return seen
            row = self.columns.find(name)
            return None if row is None else self.columns.record_at(row)

    def identical(self, sha256: str) -> Record | None:
        """An ok record made with the same settings from a source with these bytes whose output still
        exists (None under ``overwrite``): what a duplicate of those bytes may share instead of being encoded.
        An encoded original is preferred over a duplicate of it, this run's records over earlier ones."""
        if self.overwrite:
            return None
        with self._lock:
            return self._identical(sha256)

    def _identical(self, sha256: str) -> Record | None:
        self._prepare_sha256()
        assert self._by_sha256 is not None and self._sha_order is not None
        candidates: list[Record] = []
        name = self._by_sha256.get(sha256)
        if name is not None:
            candidates.append(self._recent[name])
        prefix = sha_prefix(sha256)
        cols = self.columns.cols
        if prefix and len(self._sha_order):
            shas = self._sha_sorted
            lo, hi = np.searchsorted(shas, prefix, "left"), np.searchsorted(shas, prefix, "right")
            rows = sorted(self._sha_order[lo:hi].tolist(), key=lambda r: -int(cols["line"][r]))  # newest first
            for row in rows:
                record = self.columns.record_at(row)
                if record.name not in self._recent:
                    candidates.append(record)
        candidates.sort(key=lambda r: r.duplicate_of is not None)  # stable: originals first
        for seen in candidates:
            if self._usable(seen) and seen.sha256 == sha256 and self._present(seen):
                return seen
        return None

    def index_sha256(self) -> None:
        """Prepare :meth:`identical`: this run's records by sha256, the columns' rows by sha256 prefix (16 bytes
        per image)."""
        with self._lock:
            self._prepare_sha256()

    def _prepare_sha256(self) -> None:
        if self._by_sha256 is None:
            self._by_sha256 = {}
            for record in self._recent.values():
                self._index_sha256(record)
        if self._sha_order is None:
            cols = self.columns.cols
            if "sha" in cols and len(cols["sha"]) and self._sig >= 0:
                candidates = np.flatnonzero((cols["status"] == 1) & (cols["sig"] == self._sig) & (cols["sha"] != 0))
                self._sha_order = candidates[np.argsort(cols["sha"][candidates], kind="stable")]
            else:
                self._sha_order = np.zeros(0, dtype=np.int64)
            self._sha_sorted = cols["sha"][self._sha_order] if len(self._sha_order) else np.zeros(0, np.uint64)

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
        with self._lock:
            return self._is_done(source, expected_output)

    def _is_done(self, source: Source, expected_output: str | None) -> bool:
        seen = self._recent.get(source.name)
        if seen is None:
            row = self.columns.find(source.name)
            if row is None:
                return False
            cols = self.columns.cols
            if self._sig < 0 or not cols["status"][row] or cols["sig"][row] != self._sig:
                return False  # (no record has this run's settings: -1)
            if not cols["fast"][row] or self.vectors_present is not None:
                return self._done(self.columns.record_at(row), source, expected_output)
            output = self.columns.output_at(row)
            if expected_output is not None and output != expected_output:
                return False
            if not self.outputs.has_size(output, int(cols["output_size"][row])):
                return False
            return _source_unchanged(source, int(cols["size"][row]), int(cols["mtime"][row]))
        return self._done(seen, source, expected_output)

    def _done(self, seen: Record, source: Source, expected_output: str | None) -> bool:
        if not seen.ok or seen.signature() != self.signature:
            return False
        if expected_output is not None and seen.output != expected_output:
            return False
        if not self._present(seen):
            return False
        return _source_unchanged(source, seen.size, seen.mtime_ns)


class _Latest(Mapping[str, Record]):
    """:meth:`ResumeIndex.latest_records`: a view, records read when looked up."""

    def __init__(self, index: ResumeIndex) -> None:
        self.index = index

    def __getitem__(self, name: str) -> Record:
        found = self.index.latest(name)
        if found is None:
            raise KeyError(name)
        return found

    def __iter__(self) -> Iterator[str]:
        columns, recent = self.index.columns, self.index._recent
        yield from (n for n in (columns.name_at(i) for i in range(len(columns))) if n not in recent)
        yield from list(recent)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _source_unchanged(source: Source, size: int | None, mtime_ns: int | None) -> bool:
    try:
        st = os.stat(source.path)
    except OSError:
        return False
    return st.st_size == size and st.st_mtime_ns == mtime_ns
