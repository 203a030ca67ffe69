"""The manifest in columns: every image's latest record as a row of numpy arrays, and the file that keeps them.

``manifest.jsonl`` is the truth: an append-only JSON Lines log people read with ``jq``. Reading it whole costs a
JSON parse per line and, kept as :class:`~phi3embed.outputs.records.Record` objects, about 2 kB per image: at ten
million images, minutes and tens of GB before a rerun can start. A :class:`ManifestIndex` keeps, per image name,
only what resume, duplicates, ``combine`` and :func:`phi3embed.open` decide on: where the name's latest line
starts, how many lines it has, its status, settings (an id into a small table), output (a template id, as
:mod:`phi3embed.outputs.mapping` finds outputs from names), output size, the source's size and modification time
and a sha256 prefix. Rows are sorted by the name's exact bytes (one blob plus offsets): about 100 bytes per image
and no Python object per image. The full :class:`Record` is read back from the manifest (one positioned read)
only when asked (:meth:`ManifestIndex.record_at`).

The columns are saved beside the manifest as ``<manifest>.idx`` (written when an encode run ends, by ``combine``,
and by :func:`phi3embed.open` after reading many new lines). The file says how many bytes of the manifest it
covers, with hashes of the first and the last 4 KiB of them. Loading checks those: a manifest that grew since is
read from where the file ends (only the new lines are parsed); a manifest that was replaced, shortened or edited
is read again from its start. A missing, damaged or older index file is never an error: it is rebuilt. The
file also keeps the *completion records* of archives (:meth:`ManifestIndex.archive_done`): an archive whose
every image is done is not listed again on a rerun.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import struct
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from phi3embed.core.stages import DEFAULT_STAGE
from phi3embed.outputs.names import exact_bytes, from_bytes, output_path
from phi3embed.outputs.records import SIGNATURE_FIELDS, Record, Signature

_ROW_FIELDS = ("name", "status", "output", "key", "format", "output_size", "size", "mtime_ns", "vectors",
               "vector_kinds", "sha256", *SIGNATURE_FIELDS)  # fmt: skip

INDEX_SUFFIX = ".idx"
_MAGIC = b"PHI3EMBED-INDEX\n"
_VERSION = 1
_decode = json.JSONDecoder().decode
_EDGE = 4096  # bytes hashed at each end of the covered manifest
_CHUNK = 65_536  # new names merged into the columns at a time (bounds the memory of a rebuild: ~50 MB)
NONE = np.iinfo(np.int64).min  # an integer field the record does not have

PLAIN, STORED, LITERAL = 0, 1, 2  # output = prefix + name + suffix / prefix + output_path(name, suffix) / prefix
Template = tuple[str, str, int]
NO_KEY, KEY_IS_NAME = -1, -2  # key codes besides indices into the interned keys
FAST_FORMATS = ("npy", "safetensors")

#: column -> dtype. ``fast``: the row's output can be judged from the columns alone (a per-image file with its
#: size recorded, no vector rows); other rows are judged from their record.
COLUMNS: dict[str, str] = {
    "line": "<i8",
    "attempts": "<i4",
    "status": "u1",
    "fast": "u1",
    "sig": "<i4",
    "out_id": "<i4",
    "key_id": "<i4",
    "output_size": "<i8",
    "size": "<i8",
    "mtime": "<i8",
    "sha": "<u8",
}
#: What :func:`phi3embed.open` reads.
OPEN_COLUMNS = ("line", "status", "out_id", "key_id")


def file_template(name: str, output: str) -> Template:
    """How ``output`` follows from ``name`` (per-image files, also under a combined manifest's ``../part-3/``):
    ``(prefix, suffix, PLAIN)`` around the name, ``(prefix, suffix, STORED)`` around the storable form of a
    name that could not be stored as it is, else ``(output, "", LITERAL)`` (a pack file)."""
    dot = output.rfind(".")
    stem = output[:dot] if dot >= 0 else output
    if stem.endswith(name):
        return output[: len(stem) - len(name)], output[len(stem) :], PLAIN
    if "~" in output:  # every storable form has one (a pack file's name has none)
        suffix = output[dot:] if dot >= 0 else ""
        stored = output_path(name, suffix)
        if output.endswith(stored) and stored != name + suffix:
            return output[: len(output) - len(stored)], suffix, STORED
    return output, "", LITERAL


def template_output(template: Template, name: str) -> str:
    """The output a template gives for ``name`` (inverse of :func:`file_template`)."""
    prefix, suffix, how = template
    if how == LITERAL:
        return prefix
    return prefix + (name + suffix if how == PLAIN else output_path(name, suffix))


class SortedNames(Sequence[bytes]):
    """Names' exact bytes (:func:`phi3embed.outputs.names.exact_bytes`) in one blob with offsets, sorted by those
    bytes: a sequence :mod:`bisect` can search. :meth:`find` remembers where it last found a name, so names
    looked up in sorted order (a listing) cost a comparison or two each, not a bisection."""

    def __init__(self, blob: bytes | bytearray, offsets: np.ndarray) -> None:
        self.blob, self.offsets = blob, offsets
        self._cursor = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:  # type: ignore[override]
        return self.blob[self.offsets[i] : self.offsets[i + 1]]  # type: ignore[return-value]  # bytearray compares alike

    def find_bytes(self, key: bytes) -> int | None:
        n = len(self)
        c = self._cursor
        for i in (c, c + 1, c + 2):
            if i < n and self[i] == key:
                self._cursor = i
                return i
        i = bisect.bisect_left(self, key)
        if i < n and self[i] == key:
            self._cursor = i
            return i
        return None

    def find(self, name: str) -> int | None:
        """The position of ``name``, or None."""
        return self.find_bytes(exact_bytes(name))

    def prefix_range(self, prefix: bytes) -> tuple[int, int]:
        """Positions ``[lo, hi)`` of the names starting with ``prefix`` (non-empty, ending in ``/``)."""
        lo = bisect.bisect_left(self, prefix)
        hi = bisect.bisect_left(self, prefix[:-1] + bytes([prefix[-1] + 1]), lo)
        return lo, hi


class _Chunk:
    """Lines read but not yet in the columns: each name's slot, and the newest values per column (one
    ``array`` per column, no object per line), its line count in ``attempts``."""

    def __init__(self) -> None:
        self.slots: dict[bytes, int] = {}
        self.values = [array("Q" if c == "sha" else "q") for c in COLUMNS]

    def add(self, key: bytes, values: tuple[int, ...]) -> None:
        slot = self.slots.get(key)
        if slot is None:
            self.slots[key] = len(self.values[0])
            for column, value in zip(self.values, values, strict=True):
                column.append(value)
            return
        lines = self.values[1][slot] + 1  # the newer line wins; its lines add up
        for column, value in zip(self.values, values, strict=True):
            column[slot] = value
        self.values[1][slot] = lines


class ManifestIndex:
    """The columns of one manifest (module docstring). Build with :meth:`load`."""

    def __init__(self, manifest: Path, columns: Sequence[str]) -> None:
        self.manifest = manifest
        self.columns = tuple(columns)
        self.names = SortedNames(bytearray(), np.zeros(1, dtype=np.int64))
        self.cols: dict[str, np.ndarray] = {c: np.zeros(0, dtype=COLUMNS[c]) for c in self.columns}
        self.covered = 0  # manifest bytes the columns hold (up to the end of its last complete line)
        self.unreadable = 0  # complete lines that are not records
        self.signatures: list[Signature] = []
        self._sig_ids: dict[Signature, int] = {}
        self._stated_sig: dict[tuple[Any, ...], int] = {}  # signature fields as a line states them -> id
        self.templates: list[Template] = []
        self._template_ids: dict[Template, int] = {}
        self.keys: list[str] = []
        self._key_ids: dict[str, int] = {}
        self.archives: dict[str, dict[str, Any]] = {}  # archive name -> its completion record
        self.vectors = False  # some line of the manifest names a vector row (encode --vectors)
        self.loaded_from_file = False
        self._fd: int | None = None  # the manifest, for record_at
        self._fd_pid = 0
        self.file_covered = -1  # manifest bytes the index file on disk covers (-1: no valid file)
        self.lines_read = 0  # manifest lines parsed by this load (0: all came from the index file)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls, manifest: str | os.PathLike[str], *, columns: Sequence[str] = tuple(COLUMNS), save: bool | int = False
    ) -> ManifestIndex:
        """The columns of ``manifest`` now: from its index file where that still describes it, plus the lines
        written after it. ``save``: write the index file back when any line had to be read (an int: when at
        least that many); failing to write it is not an error."""
        index = cls(Path(manifest), columns)
        if not set(index.columns) <= set(COLUMNS):
            raise ValueError(f"unknown columns {sorted(set(index.columns) - set(COLUMNS))}")
        index._read_file()
        index.update()
        if save is not False and index.lines_read >= int(save) and index.lines_read:
            index.save()
        return index

    @property
    def path(self) -> Path:
        """The index file."""
        return self.manifest.with_name(self.manifest.name + INDEX_SUFFIX)

    def __len__(self) -> int:
        return len(self.names)

    def _edges(self, fh: Any, covered: int) -> tuple[str, str]:
        fh.seek(0)
        head = fh.read(min(covered, _EDGE))
        fh.seek(max(0, covered - _EDGE))
        tail = fh.read(covered - max(0, covered - _EDGE))
        return hashlib.blake2b(head, digest_size=16).hexdigest(), hashlib.blake2b(tail, digest_size=16).hexdigest()

    @classmethod
    def uncovered(cls, manifest: str | os.PathLike[str]) -> int:
        """Bytes of ``manifest`` its index file does not cover (all of them without a valid one): what a load
        would have to read."""
        try:
            size = os.stat(manifest).st_size
        except OSError:
            return 0
        meta = cls._stored_meta(manifest)
        return size - int(meta["covered"]) if meta is not None else size

    @classmethod
    def completed_archives(cls, manifest: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
        """The archives' completion records in ``manifest``'s index file (none without a valid one), read without
        the columns: what listing consults before the output folder is opened."""
        meta = cls._stored_meta(manifest)
        archives = meta.get("archives") if meta is not None else None
        return dict(archives) if isinstance(archives, dict) else {}

    @classmethod
    def _stored_meta(cls, manifest: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The description in ``manifest``'s index file (:meth:`_meta`), without its columns; None without one."""
        index = cls(Path(manifest), ())
        try:
            with open(index.path, "rb") as fh:
                return index._meta(fh)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            return None

    def _meta(self, fh: Any) -> dict[str, Any] | None:
        """The index file's description when it is ours and still describes the manifest's first bytes."""
        if fh.read(len(_MAGIC)) != _MAGIC:
            return None
        (meta_len,) = struct.unpack("<Q", fh.read(8))
        if meta_len > 1 << 30:
            return None
        meta = json.loads(fh.read(meta_len))
        if not isinstance(meta, dict) or meta.get("version") != _VERSION:
            return None
        covered = int(meta["covered"])
        with open(self.manifest, "rb") as mf:
            if os.fstat(mf.fileno()).st_size < covered or self._edges(mf, covered) != tuple(meta["edges"]):
                return None  # replaced, shortened or edited: read it again
        return meta

    def _read_file(self) -> None:
        """Take the columns from the index file when it is ours, whole, and describes the manifest's first bytes."""
        try:
            with open(self.path, "rb") as fh:
                meta = self._meta(fh)
                if meta is None:
                    return
                covered = int(meta["covered"])
                pos = fh.tell()
                arrays: dict[str, np.ndarray | bytearray] = {}
                for name, dtype, count in meta["arrays"]:
                    pos += -pos % 8
                    nbytes = np.dtype(dtype).itemsize * count
                    if name == "names" or name in self.columns or name == "offsets":
                        fh.seek(pos)
                        buf = bytearray(nbytes)
                        if fh.readinto(buf) != nbytes:
                            return
                        arrays[name] = buf if name == "names" else np.frombuffer(buf, dtype=dtype)
                    pos += nbytes
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            return
        offsets = arrays.get("offsets")
        names = arrays.get("names")
        if not isinstance(offsets, np.ndarray) or not isinstance(names, bytearray):
            return
        n = len(offsets) - 1
        if n < 0 or offsets[-1] != len(names) or any(len(arrays.get(c, ())) != n for c in self.columns):
            return
        self.names = SortedNames(names, offsets)
        self.cols = {c: arrays[c] for c in self.columns}  # type: ignore[misc]
        self.covered, self.unreadable = covered, int(meta["unreadable"])
        self.signatures = [_signature(s) for s in meta["signatures"]]
        self._sig_ids = {s: i for i, s in enumerate(self.signatures)}
        self.templates = [(p, s, int(h)) for p, s, h in meta["templates"]]
        self._template_ids = {t: i for i, t in enumerate(self.templates)}
        self.keys = list(meta["keys"])
        self._key_ids = {k: i for i, k in enumerate(self.keys)}
        self.archives = dict(meta.get("archives") or {})
        self.vectors = bool(meta.get("vectors"))
        self.loaded_from_file = True
        self.file_covered = covered

    def update(self) -> int:
        """Read the manifest lines written since the columns were made (all of them the first time) into the
        columns; returns how many lines were read."""
        chunk = _Chunk()
        read = 0
        for offset, end, data in _lines_from(self.manifest, self.covered):
            self.covered = end
            if data == {}:
                continue  # a blank line
            read += 1
            if data is None:
                self.unreadable += 1
                continue
            key, values = self._row(data, offset)
            chunk.add(key, values)
            if len(chunk.slots) >= _CHUNK:
                self._merge(chunk)
                chunk = _Chunk()
        self._merge(chunk)
        self.lines_read += read
        return read

    def _row(self, data: dict[str, Any], offset: int) -> tuple[bytes, tuple[int, ...]]:
        """The columns of one line's object (what :meth:`Record.from_json` would read from it)."""
        if "raw" in data:  # text that is not UTF-8: its exact bytes are in "raw"
            record = Record.from_json(data)
            assert record is not None
            data = {f: getattr(record, f) for f in _ROW_FIELDS}
        get = data.get
        name: str = data["name"]
        output, key, fmt = get("output"), get("key"), get("format")
        output = output if isinstance(output, str) else None
        output_size, size, mtime = get("output_size"), get("size"), get("mtime_ns")
        fast = (
            output is not None
            and fmt in FAST_FORMATS
            and type(output_size) is int
            and type(size) is int
            and type(mtime) is int
            and get("vectors") is None
            and get("vector_kinds") is None
        )
        if get("vectors") is not None:
            self.vectors = True
        stated = tuple(map(get, SIGNATURE_FIELDS))  # the common case: seen before, as stated
        try:
            sig = self._stated_sig.get(stated)
        except TypeError:  # a list (vector_kinds): not hashable as stated
            sig = None
        if sig is None:
            signature = tuple(
                (get(f) or DEFAULT_STAGE) if f == "stage" else tuple(v) if isinstance(v := get(f), list) else v
                for f in SIGNATURE_FIELDS
            )
            sig = self._id(self._sig_ids, self.signatures, signature)
            with contextlib.suppress(TypeError):
                self._stated_sig[stated] = sig
        values = (
            offset,
            1,
            int(get("status") == "ok"),
            int(fast),
            sig,
            -1 if output is None else self._id(self._template_ids, self.templates, file_template(name, output)),
            NO_KEY
            if not isinstance(key, str)
            else KEY_IS_NAME
            if key == name
            else self._id(self._key_ids, self.keys, key),
            _int(output_size),
            _int(size),
            _int(mtime),
            sha_prefix(get("sha256")),
        )
        return exact_bytes(name), values

    @staticmethod
    def _id(ids: dict[Any, int], table: list[Any], value: Any) -> int:
        try:
            found = ids.get(value)
        except TypeError:  # not hashable: a hand-edited line; it matches nothing
            return -1
        if found is None:
            found = ids[value] = len(table)
            table.append(value)
        return found

    def _merge(self, chunk: _Chunk) -> None:
        """Put a chunk of rows into the columns: names already there get the newer values (their line counts
        added), new names are inserted in sorted order."""
        if not chunk.slots:
            return
        all_cols = list(COLUMNS)
        wanted = [(all_cols.index(c), c) for c in self.columns]
        got = [np.frombuffer(a, dtype=np.dtype(a.typecode)) for a in chunk.values]
        new: list[tuple[bytes, int]] = []
        for key, slot in chunk.slots.items():
            i = self.names.find_bytes(key)
            if i is None:
                new.append((key, slot))
                continue
            for j, c in wanted:
                col = self.cols[c]
                if not col.flags.writeable:
                    col = self.cols[c] = col.copy()
                col[i] = col[i] + got[j][slot] if c == "attempts" else got[j][slot]
        if not new:
            return
        new.sort()
        positions = self._insertion_points([k for k, _ in new])
        slots = np.fromiter((slot for _, slot in new), dtype=np.int64, count=len(new))
        old_off = self.names.offsets
        lengths = np.diff(old_off)
        new_lengths = np.fromiter((len(k) for k, _ in new), dtype=np.int64, count=len(new))
        blob = np.frombuffer(self.names.blob, dtype=np.uint8) if len(self.names.blob) else np.zeros(0, np.uint8)
        inserted = np.frombuffer(b"".join(k for k, _ in new), dtype=np.uint8)
        merged = np.insert(blob, np.repeat(old_off[positions], new_lengths), inserted)
        offsets = np.zeros(len(lengths) + len(new) + 1, dtype=np.int64)
        np.cumsum(np.insert(lengths, positions, new_lengths), out=offsets[1:])
        self.names = SortedNames(bytearray(merged.tobytes()), offsets)
        del merged
        for j, c in wanted:
            self.cols[c] = np.insert(self.cols[c], positions, got[j][slots].astype(COLUMNS[c]))

    def _insertion_points(self, keys: list[bytes]) -> np.ndarray:
        """Where each of the sorted ``keys`` (none present) goes among the names (``np.insert`` positions)."""
        names, n = self.names, len(self.names)
        if n == 0 or keys[0] > names[n - 1]:  # all after the last: a manifest written in name order
            return np.full(len(keys), n, dtype=np.int64)
        if len(keys) * 24 < n:
            return np.fromiter((bisect.bisect_left(names, k) for k in keys), dtype=np.int64, count=len(keys))
        points = np.empty(len(keys), dtype=np.int64)
        i = 0
        for j, key in enumerate(keys):  # one merge pass over both sorted lists
            while i < n and names[i] < key:
                i += 1
            points[j] = i
        return points

    # ------------------------------------------------------------------ saving

    def save(self) -> bool:
        """Write the index file (a temporary file renamed into place; the columns not loaded are read from the
        manifest first). False when it cannot be written (a read-only folder): the manifest stays the truth."""
        if set(self.columns) != set(COLUMNS):
            return False  # a partial load (phi3embed.open) cannot write the whole file
        with open(self.manifest, "rb") as mf:
            edges = self._edges(mf, self.covered)
        arrays: list[tuple[str, np.ndarray]] = [
            ("names", np.frombuffer(self.names.blob, dtype=np.uint8) if len(self.names.blob) else np.zeros(0, "u1")),
            ("offsets", self.names.offsets.astype("<i8", copy=False)),
            *((c, self.cols[c].astype(COLUMNS[c], copy=False)) for c in COLUMNS),
        ]
        meta = {
            "version": _VERSION,
            "covered": self.covered,
            "edges": list(edges),
            "unreadable": self.unreadable,
            "signatures": [list(s) for s in self.signatures],
            "templates": [list(t) for t in self.templates],
            "keys": self.keys,
            "archives": self.archives,
            "vectors": self.vectors,
            "arrays": [[name, a.dtype.str, int(a.size)] for name, a in arrays],
        }
        head = json.dumps(meta, ensure_ascii=True).encode()
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(_MAGIC + struct.pack("<Q", len(head)) + head)
                for _, a in arrays:
                    fh.write(b"\0" * (-fh.tell() % 8))
                    if a.size:
                        fh.write(np.ascontiguousarray(a).data.cast("B"))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return False
        self.file_covered = self.covered
        return True

    # ------------------------------------------------------------------ reading rows

    def find(self, name: str) -> int | None:
        """The row of ``name``, or None."""
        return self.names.find(name)

    def name_at(self, row: int) -> str:
        return from_bytes(self.names[row])

    def signature_id(self, signature: Signature) -> int:
        """The id of ``signature`` in this manifest (-1: no record has it)."""
        return self._sig_ids.get(signature, -1)

    def output_at(self, row: int) -> str | None:
        """The recorded output of ``row`` (None: none)."""
        out = int(self.cols["out_id"][row])
        return None if out < 0 else template_output(self.templates[out], self.name_at(row))

    def record_at(self, row: int) -> Record:
        """The latest record of ``row``, read again from the manifest (positioned reads: any thread may ask)."""
        fd = self._fd
        if fd is None or self._fd_pid != os.getpid():
            fd = self._fd = os.open(self.manifest, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._fd_pid = os.getpid()
        return record_at_offset(fd, int(self.cols["line"][row]))

    def close(self) -> None:
        """Close the manifest descriptor :meth:`record_at` keeps."""
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # ------------------------------------------------------------------ archives

    def archive_rows(self, archive_name: str) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of the images inside the archive named ``archive_name``."""
        return self.names.prefix_range(exact_bytes(archive_name) + b"/")

    def set_archive(self, archive_name: str, completion: dict[str, Any] | None) -> None:
        """Note (or, None, forget) an archive's completion record; saved with the index file."""
        if completion is None:
            self.archives.pop(archive_name, None)
        else:
            self.archives[archive_name] = completion


def record_at_offset(fd: int, offset: int) -> Record:
    """The record whose manifest line starts at byte ``offset`` of the open manifest ``fd`` (positioned reads:
    any thread may ask)."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.pread(fd, 1 << 12 if not line else 1 << 16, offset + len(line))
        if not chunk:
            break
        cut = chunk.find(b"\n")
        line += chunk if cut < 0 else chunk[: cut + 1]
    record = Record.from_json(json.loads(line))
    assert record is not None, offset
    return record


def _lines_from(path: Path, start: int) -> Iterator[tuple[int, int, dict[str, Any] | None]]:
    """``(offset, end, object)`` of every complete line from byte ``start`` on: the object is None for a line
    that is not a record, ``{}`` for a blank line (neither counts). A torn last line (no newline) ends it: it is
    not covered yet."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return
    with fh:
        fh.seek(start)
        offset = start
        for line in fh:
            begin, offset = offset, offset + len(line)
            if not line.endswith(b"\n"):
                return
            if not line.strip():
                yield begin, offset, {}
                continue
            try:
                data = _decode(line.decode("utf-8"))
            except ValueError:  # not JSON, or not UTF-8
                data = None
            yield begin, offset, data if isinstance(data, dict) and isinstance(data.get("name"), str) else None


def _int(value: object) -> int:
    if type(value) is int and NONE < value < 1 << 63:
        return value
    return NONE


def sha_prefix(sha: object) -> int:
    """The first 8 bytes of a sha256 hex digest as an integer (0: none, or not a digest)."""
    if not isinstance(sha, str) or len(sha) < 16:
        return 0
    try:
        return int(sha[:16], 16)
    except ValueError:
        return 0


def _signature(value: Iterable[Any]) -> Signature:
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)
