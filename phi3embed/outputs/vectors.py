"""Vector shards (``encode --vectors``): one vector per image in ``npy`` shards with aligned parquet metadata.

Layout, per vector kind (:mod:`phi3embed.core.vectors`), the one embedding-reader reads with
``file_format="parquet_npy"`` and autofaiss indexes as is (it pairs ``img_emb/X.npy`` with ``metadata/X.parquet``)::

    DIR/vectors/<kind>/img_emb/<stem>.npy         [n, d] float32 (float16 with --out-dtype float16)
    DIR/vectors/<kind>/metadata/<stem>.parquet    n rows: name, source, width, height, sha256, num_tokens, duplicate_of

``<stem>`` is ``00000``, ``00001``... (``<I>of<N>-00000`` for a ``--shard`` part, so parts never collide). A
shard is the unit of commit, as a pack is: its rows wait in memory until it is full (or the run ends), every
file of it is published atomically, and only then are the records of its images appended to the manifest,
each naming its shard and row (``vectors``, ``vector_row``). So a record never names a row that is not on
disk, and an image whose shard was not published has no such record: it is encoded again.

What is on disk is made to agree with the manifest when a run opens and when it closes
(:meth:`VectorShards.reconcile`): a row is live when the latest record of its name names that shard and row
(and that kind); a shard with no live row is deleted, one with some is rewritten under a new stem with the
live rows only (their records appended again, naming the new place), so every name has exactly one row per
kind, whatever was killed when (a rerun of a changed image, ``--overwrite``, other kinds, a half-published
shard, a file without its pair).
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from phi3embed.errors import Phi3EmbedError
from phi3embed.inputs.listing import Source
from phi3embed.outputs.names import exact_bytes, from_bytes, readable
from phi3embed.outputs.publish import OutputError, Publisher, save_npy, write_file_atomically
from phi3embed.outputs.records import ImageFacts, OutputSettings, Record, new_record

VECTORS_DIR = "vectors"
EMB_DIR, META_DIR = "img_emb", "metadata"
METADATA_COLUMNS = ("name", "source", "width", "height", "sha256", "num_tokens", "duplicate_of")
NAME_BYTES = "name_bytes"  # each row's name, exact bytes (``name`` is UTF-8 text: readable form where it is not)
DEFAULT_SHARD_ROWS = 10_000
DEFAULT_SHARD_SECONDS = 300.0  # rows wait at most this long for their shard (what a kill can cost)


def require_pyarrow() -> Any:
    """``pyarrow.parquet``, or a Phi3EmbedError saying how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise Phi3EmbedError("--vectors writes parquet metadata: pip install 'phi3embed[parquet]'") from None
    return pq


def npy_path(root: Path, kind: str, stem: str) -> Path:
    return root / VECTORS_DIR / kind / EMB_DIR / f"{stem}.npy"


def parquet_path(root: Path, kind: str, stem: str) -> Path:
    return root / VECTORS_DIR / kind / META_DIR / f"{stem}.parquet"


def metadata_table(records: Sequence[Record]) -> Any:
    """The parquet metadata rows of ``records`` (one per row of the shard, in order). Parquet strings are
    UTF-8: a name (or source) that is not is written in its readable form (``\\xNN`` per byte, as the manifest
    does), and ``name_bytes`` holds every name's exact bytes, so that a row always leads back to its image."""
    import pyarrow as pa

    ints = {"width", "height", "num_tokens"}

    def cell(value: Any) -> Any:
        return readable(value) if isinstance(value, str) else value

    columns = {
        col: pa.array([cell(getattr(r, col)) for r in records], type=pa.int64() if col in ints else pa.string())
        for col in METADATA_COLUMNS
    }
    columns[NAME_BYTES] = pa.array([exact_bytes(r.name) for r in records], type=pa.binary())
    return pa.table(columns)


def read_names(path: Path) -> list[str]:
    """The names of one metadata parquet file's rows, as the manifest's records have them (from ``name_bytes``
    where the file has it; files written before it hold UTF-8 names in ``name``)."""
    pq = require_pyarrow()
    schema = pq.read_schema(path)
    if NAME_BYTES in schema.names:
        return [from_bytes(n) for n in pq.read_table(path, columns=[NAME_BYTES]).column(NAME_BYTES).to_pylist()]
    return [str(n) for n in pq.read_table(path, columns=["name"]).column("name").to_pylist()]


def npy_rows(path: Path) -> int:
    """Rows of an npy file, from its header (memory-mapped, nothing read)."""
    return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])


class VectorShards:
    """The vector shards of one run: rows held until their shard is published, then their records committed.

    ``append`` appends records to the manifest (and syncs it): the commit point.
    """

    def __init__(
        self,
        settings: OutputSettings,
        publisher: Publisher,
        append: Callable[[Sequence[Record]], object],
        *,
        shard: tuple[int, int] | None = None,
        rows: int = DEFAULT_SHARD_ROWS,
        seconds: float = DEFAULT_SHARD_SECONDS,
    ) -> None:
        require_pyarrow()
        self.settings, self.publisher, self.append = settings, publisher, append
        self.kinds = settings.vectors
        self.root = publisher.real
        self.prefix = f"{shard[0]}of{shard[1]}-" if shard else ""
        self.rows, self.seconds = rows, seconds
        self.dtype = np.float16 if settings.dtype == torch.float16 else np.float32
        self._pending: list[tuple[Record, dict[str, np.ndarray]]] = []
        self._by_name: dict[str, dict[str, np.ndarray]] = {}
        self._since = 0.0
        self._next = 0
        self._stems: set[str] = set()  # our complete shards (every kind of this run on disk)

    # ------------------------------------------------------------------ where

    def stem(self, index: int) -> str:
        return f"{self.prefix}{index:05d}"

    def _index(self, stem: str) -> int | None:
        match = re.fullmatch(re.escape(self.prefix) + r"(\d{5,})", stem)
        return int(match.group(1)) if match else None

    def present(self, record: Record) -> bool:
        """Whether ``record``'s row is in a complete shard of this run's kinds (for resume)."""
        return (
            record.vectors is not None
            and record.vector_row is not None
            and list(record.vector_kinds or ()) == list(self.kinds)
            and record.vectors in self._stems
        )

    # ------------------------------------------------------------------ rows

    def hold(self, record: Record, vectors: Mapping[str, np.ndarray]) -> None:
        """Keep ``record`` (ok) and its vectors (one ``[d]`` array per kind) for the current shard; publish the
        shard when it is full or its oldest row has waited long enough."""
        missing = [k for k in self.kinds if k not in vectors]
        assert not missing, f"no {missing} vector for {record.name}"
        if not self._pending:
            self._since = time.monotonic()
        row = {k: np.asarray(vectors[k], dtype=self.dtype) for k in self.kinds}
        self._pending.append((record, row))
        self._by_name[record.name] = row
        if len(self._pending) >= self.rows or time.monotonic() - self._since >= self.seconds:
            self.flush()

    def pending(self, name: str) -> Record | None:
        """The record of ``name`` when it waits here for its shard."""
        for record, _ in reversed(self._pending):
            if record.name == name:
                return record
        return None

    def vectors_of(self, record: Record) -> dict[str, np.ndarray] | None:
        """The vectors of ``record`` (waiting here, or in a published shard); None when they are not there."""
        waiting = self._by_name.get(record.name)
        if waiting is not None:
            return waiting
        if not self.present(record):
            return None
        assert record.vectors is not None and record.vector_row is not None
        out = {}
        for kind in self.kinds:
            array = np.load(npy_path(self.root, kind, record.vectors), mmap_mode="r", allow_pickle=False)
            out[kind] = np.array(array[record.vector_row], dtype=self.dtype)
        return out

    def flush(self) -> None:
        """Publish the current shard (every kind), then append its records."""
        if not self._pending:
            return
        records = [r for r, _ in self._pending]
        arrays = {k: np.stack([v[k] for _, v in self._pending]) for k in self.kinds}  # (n, d) each
        stem = self._publish(records, arrays)
        self._pending, self._by_name = [], {}
        self.append([replace(r, vectors=stem, vector_row=i) for i, r in enumerate(records)])

    def _publish(self, records: Sequence[Record], arrays: Mapping[str, np.ndarray]) -> str:
        """Write one new shard of ``records`` rows (npy files first, then the parquet files); its stem."""
        pq = require_pyarrow()
        stem = self.stem(self._next)
        self._next += 1
        table = metadata_table(records)
        for kind in self.kinds:
            array = np.ascontiguousarray(arrays[kind])
            final = self.publisher.safe_path(npy_path(self.root, kind, stem).relative_to(self.root).as_posix())
            self.publisher.atomic_write(final, functools.partial(_write_npy, array))
        for kind in self.kinds:
            final = self.publisher.safe_path(parquet_path(self.root, kind, stem).relative_to(self.root).as_posix())
            self.publisher.atomic_write(final, lambda fh: _write_parquet(pq, table, fh))
        self._stems.add(stem)
        return stem

    # ------------------------------------------------------------------ agreeing with the manifest

    def reconcile(self, latest: Mapping[str, Record]) -> int:
        """Make this part's shards hold exactly the rows the latest records name (module docstring).
        ``latest``: name -> latest record. Returns the number of rows moved to a new shard."""
        found = self._scan()
        if found:
            self._next = max(self._next, max(i for i in (self._index(s) for s, _ in found) if i is not None) + 1)
        stems = sorted({s for s, _ in found})
        files_of = {s: sorted(k for t, k in found if t == s) for s in stems}
        moved = 0
        for stem in stems:
            names = {kind: self._names(stem, kind) for kind in files_of[stem]}  # None: a broken file pair
            first = names.get(self.kinds[0]) if self.kinds else None  # rows are judged on every kind by _is_live
            live = [
                (row, rec)
                for row, name in enumerate(first or ())
                if (rec := latest.get(name)) is not None and self._is_live(rec, stem, row, names)
            ]
            complete = set(files_of[stem]) == set(self.kinds)
            if complete and all(n is not None and len(n) == len(live) for n in names.values()):
                self._stems.add(stem)  # all rows live in every kind: keep as is
                continue
            if live:
                arrays = {
                    k: np.load(npy_path(self.root, k, stem), mmap_mode="r", allow_pickle=False)[[r for r, _ in live]]
                    for k in self.kinds
                }
                records = [rec for _, rec in live]
                new = self._publish(records, arrays)
                self.append([replace(rec, vectors=new, vector_row=i) for i, rec in enumerate(records)])
                moved += len(live)
            self._delete(stem, files_of[stem])
        self.publisher.sync_folders()
        return moved

    def _is_live(self, rec: Record, stem: str, row: int, names: Mapping[str, list[str] | None]) -> bool:
        if not rec.ok or rec.vectors != stem or rec.vector_row != row:
            return False
        if list(rec.vector_kinds or ()) != list(self.kinds):
            return False
        return all((n := names.get(k)) is not None and row < len(n) and n[row] == rec.name for k in self.kinds)

    def _names(self, stem: str, kind: str) -> list[str] | None:
        """The names of one kind's rows in ``stem``; None when the pair is broken or unreadable."""
        npy, meta = npy_path(self.root, kind, stem), parquet_path(self.root, kind, stem)
        try:
            names = read_names(meta)
            if npy_rows(npy) != len(names):
                return None
        except Exception:  # a torn or foreign file (OSError, pyarrow's and numpy's errors): not ours to keep
            return None
        return names

    def _scan(self) -> list[tuple[str, str]]:
        """``(stem, kind)`` of every file of this part under DIR/vectors (any kind, either half of a pair)."""
        base = self.root / VECTORS_DIR
        found = set()
        if not base.is_dir():
            return []
        for kind_dir in base.iterdir():
            if not kind_dir.is_dir():
                continue
            for sub, suffix in ((EMB_DIR, ".npy"), (META_DIR, ".parquet")):
                folder = kind_dir / sub
                if not folder.is_dir():
                    continue
                for entry in folder.iterdir():
                    if entry.name.endswith(suffix) and self._index(entry.name[: -len(suffix)]) is not None:
                        found.add((entry.name[: -len(suffix)], kind_dir.name))
        return sorted(found)

    def _delete(self, stem: str, kinds: Sequence[str]) -> None:
        try:
            for kind in kinds:  # the npy first: a parquet file alone is what a rerun deletes too
                self.publisher.remove(npy_path(self.root, kind, stem))
                self.publisher.remove(parquet_path(self.root, kind, stem))
        except OSError as exc:
            raise OutputError(f"cannot delete vector shard {stem}: {exc.strerror or exc}", path=self.root) from None
        self._stems.discard(stem)


def _write_npy(array: np.ndarray, fh: IO[bytes]) -> None:
    save_npy(fh, array)


def _write_parquet(pq: Any, table: Any, fh: IO[bytes]) -> None:
    pq.write_table(table, fh)


# --------------------------------------------------------------------------- reading


def read_vectors(root: str | os.PathLike[str], kind: str, latest: Mapping[str, Record]) -> tuple[list[str], np.ndarray]:
    """``(names, array [n, d])`` of ``kind`` for every name whose latest record has a row of it, names sorted.

    One shard whose rows are exactly those (the usual case after a run that ended) is memory-mapped; otherwise
    the rows are gathered into one array. ``latest``: name -> latest record (relative outputs as ``root``'s).
    The live rows are found by :class:`phi3embed.outputs.vector_set.VectorSet`.
    """
    from phi3embed.outputs.vector_set import VectorSet

    vset = VectorSet(Path(root), kind, latest)
    names = list(vset.names)
    vectors = vset.rows(0, len(vset))  # one whole shard: a slice of its memory map
    order = sorted(range(len(names)), key=names.__getitem__)
    if order != list(range(len(names))):
        vectors = vectors[order]
        names = [names[i] for i in order]
    return names, vectors


class VectorOnlyWriter:
    """The embedding writer of ``--stage none``: no token matrix is stored; the record (``output`` None) only
    carries the image's facts, and its vectors go to the shards (:class:`VectorShards`)."""

    concurrent = False

    def __init__(self, settings: OutputSettings) -> None:
        self.settings = settings

    def expected_output(self, source: Source) -> None:
        return None

    def write(self, source: Source, facts: ImageFacts, tensor: object) -> Record:
        return new_record(self.settings, source, facts, status="ok")

    def write_duplicate(self, source: Source, facts: ImageFacts, first: Record) -> Record:
        return new_record(self.settings, source, facts, status="ok", duplicate_of=first.name)

    def pending(self, name: str) -> None:
        return None

    def flush(self) -> None:
        """Nothing waits here."""


# --------------------------------------------------------------------------- combining --shard parts

COMBINED_PREFIX = "combined-"


def combine_vectors(
    records: Sequence[tuple[Record, Path]], folder: Path, *, rows: int = DEFAULT_SHARD_ROWS
) -> list[Record]:
    """Rows of ``records`` (each with the folder its ``vectors`` stem lives in) that live outside ``folder``,
    copied into new ``combined-NNNNN`` shards there (earlier ones replaced); returns the records, those moved
    naming their new place. Files are written to a temporary name and renamed."""
    pq = require_pyarrow()
    base = folder / VECTORS_DIR
    if base.is_dir():  # what an earlier combine wrote here
        for path in sorted(base.glob(f"*/*/{COMBINED_PREFIX}*")):
            path.unlink()
    real = os.path.realpath(folder)
    out = [rec for rec, _ in records]
    moving = [
        i
        for i, (rec, root) in enumerate(records)
        if rec.ok and rec.vectors is not None and rec.vector_row is not None and os.path.realpath(root) != real
    ]
    for n, start in enumerate(range(0, len(moving), rows)):
        chunk = moving[start : start + rows]
        stem = f"{COMBINED_PREFIX}{n:05d}"
        kinds = list(records[chunk[0]][0].vector_kinds or ())
        chosen = [records[i][0] for i in chunk]
        for kind in kinds:
            array = np.stack([_row(records[i][1], kind, records[i][0]) for i in chunk])  # (n, d)
            write_file_atomically(npy_path(folder, kind, stem), functools.partial(_write_npy, array))
        table = metadata_table(chosen)
        for kind in kinds:
            write_file_atomically(parquet_path(folder, kind, stem), functools.partial(_write_parquet, pq, table))
        for j, i in enumerate(chunk):
            out[i] = replace(out[i], vectors=stem, vector_row=j)
    return out


def _row(root: Path, kind: str, record: Record) -> np.ndarray:
    assert record.vectors is not None and record.vector_row is not None
    path = npy_path(root, kind, record.vectors)
    try:
        return np.array(np.load(path, mmap_mode="r", allow_pickle=False)[record.vector_row])
    except (OSError, ValueError, IndexError) as exc:
        raise Phi3EmbedError(f"cannot read the {kind} vector of {record.name}: {exc}", path=path) from None
