"""The approximate index of one kind's vectors, saved beside them (``phi3embed index DIR``)::

    DIR/vectors/<kind>/index/index.json          which build is current, and the shards it was built from
    DIR/vectors/<kind>/index/<build>.faiss       the graph (phi3embed.core.ann)
    DIR/vectors/<kind>/index/<build>.keys.parquet  key, name, content: whose vector each key is

A vector's *content* is what determines it: the image's bytes (sha256) and the settings of its record
(weights fingerprint, num_crops, dtypes, alpha, EXIF). Where its row sits does not matter: runs move live rows
to new shards (phi3embed.outputs.vectors), and a moved row is the same vector. A key is given to a vector
once and kept: extending an index forgets the keys whose image is gone or has other content now (their
vectors stay in the graph, unused, until the index is rebuilt: when they would be more than half as many as
the vectors in use) and adds the new ones under new keys, so a large graph survives a run that added or
changed a few images.
The index is *fresh* when every key is valid (its name is there with the same content) and every vector has
one; only a fresh index is searched.

A build writes new files under a new build name and replaces ``index.json`` last, so a build killed at any
moment leaves the previous index whole (its leftovers are deleted by the next build); one build at a time
(a lock file).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phi3embed.core.ann import LIBRARY, AnnIndex, library_version
from phi3embed.core.similarity import normalize
from phi3embed.errors import Phi3EmbedError
from phi3embed.outputs.publish import write_file_atomically
from phi3embed.outputs.records import Record
from phi3embed.outputs.vector_set import VectorSet
from phi3embed.outputs.vectors import require_pyarrow

INDEX_DIR = "index"
META = "index.json"
LOCK = ".lock"
FORMAT = 1
REBUILD_FRACTION = 0.5  # rebuild when the forgotten vectors in the graph would exceed this fraction of those in use
ADD_ROWS = 4096  # vectors added to the graph per call (progress granularity)

Progress = Callable[[int, int], None]  # (vectors added so far, vectors to add)


@dataclass
class Match:
    """How a saved index relates to the current vectors."""

    key_ids: np.ndarray  # key -> current id, -1 where the key is not valid
    new_ids: np.ndarray  # current ids without a valid key
    invalid_keys: np.ndarray  # keys in the index that are not valid

    @property
    def fresh(self) -> bool:
        return not len(self.new_ids) and not len(self.invalid_keys)


@dataclass
class SavedIndex:
    """``index.json`` and the key table of the current build."""

    folder: Path
    meta: dict[str, Any]
    keys: np.ndarray  # int64
    names: list[str] = field(repr=False)
    contents: list[str] = field(repr=False)

    @property
    def graph_path(self) -> Path:
        return self.folder / f"{self.meta['build']}.{LIBRARY}"

    def match(self, vset: VectorSet) -> Match:
        """Which keys are valid for ``vset`` and which of its ids have none (module docstring)."""
        key_ids = np.full(int(self.meta["next_key"]), -1, dtype=np.int64)
        covered = np.zeros(len(vset), dtype=bool)
        for key, name, content in zip(self.keys.tolist(), self.names, self.contents, strict=True):
            i = vset.id_of(name)
            if i is not None and not covered[i] and content_of(vset.records[name]) == content:
                key_ids[key] = i
                covered[i] = True
        valid = key_ids[self.keys] >= 0
        return Match(key_ids, np.flatnonzero(~covered), self.keys[~valid])


def content_of(record: Record) -> str:
    """What determines a record's vectors: its image's bytes and its settings (module docstring)."""
    where = record.sha256 or f"{record.source}@{record.mtime_ns}"
    return "|".join(
        str(v)
        for v in (
            where, record.fingerprint, record.num_crops, record.dtype, record.compute_dtype, record.alpha,
            record.exif_transpose,
        )
    )  # fmt: skip


def index_folder(vset: VectorSet) -> Path:
    return vset.folder / INDEX_DIR


def read_index(vset: VectorSet) -> SavedIndex | None:
    """The saved index of ``vset``'s kind; None when there is none. A broken one is a Phi3EmbedError (whose
    reason reads after "the index": ``phi3embed index`` builds it anew)."""
    folder = index_folder(vset)
    meta_path = folder / META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("library") != LIBRARY:
            raise ValueError(f"format {meta.get('format')} of {meta.get('library')}, expected {FORMAT} of {LIBRARY}")
        pq = require_pyarrow()
        table = pq.read_table(folder / f"{meta['build']}.keys.parquet")
        keys = np.asarray(table.column("key").to_numpy(), dtype=np.int64)
        saved = SavedIndex(
            folder,
            meta,
            keys,
            [str(n) for n in table.column("name").to_pylist()],
            [str(c) for c in table.column("content").to_pylist()],
        )
    except Phi3EmbedError:
        raise
    except Exception as exc:  # json, KeyError, pyarrow's and OSError: all mean the same to the user
        raise Phi3EmbedError(
            f"it cannot be read: {exc}",
            path=folder,
        ) from None
    if not saved.graph_path.is_file():
        raise Phi3EmbedError(
            f"its file {saved.graph_path.name} is missing",
            path=folder,
        )
    return saved


@dataclass
class BuildReport:
    action: str  # "built", "extended" or "unchanged"
    count: int  # vectors in the index now
    added: int
    removed: int
    seconds: float


def build_index(vset: VectorSet, *, rebuild: bool = False, progress: Progress | None = None) -> BuildReport:
    """Make ``vset``'s index fresh: build it, extend it, or leave it as it is (module docstring)."""
    start = time.perf_counter()
    folder = index_folder(vset)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        saved = None if rebuild else _readable_index(vset)
        match = saved.match(vset) if saved is not None else None
        if saved is not None and match is not None and match.fresh:
            return BuildReport("unchanged", len(vset), 0, 0, time.perf_counter() - start)
        dead = 0 if saved is None or match is None else int(saved.meta.get("dead", 0)) + len(match.invalid_keys)
        if saved is None or match is None or dead > REBUILD_FRACTION * max(len(vset), 1):
            ann = AnnIndex.new(vset.dim)
            ids = np.arange(len(vset), dtype=np.int64)
            keys_of_ids = ids.copy()  # key = id for a new build
            next_key, dead = len(vset), 0
            _add(ann, vset, ids, keys_of_ids, progress)
            action, removed = "built", 0
        else:
            ann = AnnIndex.load(saved.graph_path, writable=True)
            next_key = int(saved.meta["next_key"])
            new_keys = np.arange(next_key, next_key + len(match.new_ids), dtype=np.int64)
            next_key += len(match.new_ids)
            _add(ann, vset, match.new_ids, new_keys, progress)
            keys_of_ids = np.full(len(vset), -1, dtype=np.int64)
            valid_keys = np.flatnonzero(match.key_ids >= 0)
            keys_of_ids[match.key_ids[valid_keys]] = valid_keys
            keys_of_ids[match.new_ids] = new_keys
            ids = match.new_ids
            action, removed = "extended", len(match.invalid_keys)
        _save(folder, vset, ann, keys_of_ids, next_key, dead)
    return BuildReport(action, len(vset), len(ids), removed, time.perf_counter() - start)


def _readable_index(vset: VectorSet) -> SavedIndex | None:
    """The saved index, or None when it cannot be read (the build replaces it)."""
    try:
        return read_index(vset)
    except Phi3EmbedError:
        return None


def _add(ann: AnnIndex, vset: VectorSet, ids: np.ndarray, keys: np.ndarray, progress: Progress | None) -> None:
    """Add the vectors of ``ids`` (ascending) under ``keys``, a block at a time."""
    done = 0
    if progress is not None:
        progress(0, len(ids))
    for start in range(0, len(ids), ADD_ROWS):
        chunk = ids[start : start + ADD_ROWS]
        ann.add(keys[start : start + ADD_ROWS], normalize(vset.take(chunk)))
        done += len(chunk)
        if progress is not None:
            progress(done, len(ids))


def _save(folder: Path, vset: VectorSet, ann: AnnIndex, keys_of_ids: np.ndarray, next_key: int, dead: int) -> None:
    """Write the new build's files, then ``index.json`` (the commit), then delete other builds' files."""
    import pyarrow as pa

    pq = require_pyarrow()
    build = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
    graph = folder / f"{build}.{LIBRARY}"
    tmp = folder / f".{graph.name}.tmp"
    ann.save(tmp)
    _sync_file(tmp)
    os.replace(tmp, graph)
    table = pa.table(
        {
            "key": pa.array(keys_of_ids, type=pa.int64()),
            "name": pa.array(vset.names, type=pa.string()),
            "content": pa.array([content_of(vset.records[n]) for n in vset.names], type=pa.string()),
        }
    )
    write_file_atomically(folder / f"{build}.keys.parquet", lambda fh: pq.write_table(table, fh))
    meta = {
        "format": FORMAT,
        "library": LIBRARY,
        "version": library_version(),
        "kind": vset.kind,
        "dim": vset.dim,
        "count": len(vset),
        "next_key": next_key,
        "dead": dead,
        "build": build,
    }
    write_file_atomically(folder / META, lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
    _sync_dir(folder)
    for entry in folder.iterdir():  # earlier builds and what killed builds left
        if entry.name not in (META, graph.name, f"{build}.keys.parquet", LOCK) and entry.is_file():
            entry.unlink(missing_ok=True)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / LOCK, "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Phi3EmbedError("another phi3embed index is building this index", path=folder) from None
        yield


def _sync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- searching


@dataclass
class OpenIndex:
    """A fresh saved index, ready to search: its graph (memory-mapped) and key -> id."""

    ann: AnnIndex
    key_ids: np.ndarray

    def candidates(self, queries: np.ndarray, count: int) -> list[np.ndarray]:
        """Ids of about ``count`` vectors near each of ``queries`` (unit length)."""
        live = max(int((self.key_ids >= 0).sum()), 1)
        out = []
        for keys in self.ann.search(queries, -(-count * len(self.ann) // live)):  # forgotten ones come too
            keys = keys[(keys >= 0) & (keys < len(self.key_ids))]
            ids = self.key_ids[keys]
            out.append(ids[ids >= 0])
        return out


def open_index(vset: VectorSet) -> tuple[OpenIndex | None, str | None]:
    """``(index, None)`` when ``vset`` has a fresh index; ``(None, why)`` when it has one that cannot be used
    (stale, unreadable, or the library is missing: the reason, for people); ``(None, None)`` when it has none."""
    try:
        saved = read_index(vset)
        if saved is None:
            return None, None
        match = saved.match(vset)
        if not match.fresh:
            return None, (
                f"it is out of date: {len(match.new_ids)} vectors new and {len(match.invalid_keys)} gone or changed "
                "since it was built"
            )
        return OpenIndex(AnnIndex.load(saved.graph_path), match.key_ids), None
    except Phi3EmbedError as exc:
        return None, exc.reason
