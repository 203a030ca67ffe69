"""The vectors of one kind in an output folder, as ``search``, ``neighbors`` and ``index`` read them.

A :class:`VectorSet` is the rows that the latest ``ok`` records name (phi3embed.outputs.vectors), in a fixed
order: shards by stem, rows ascending within a shard. Row ``i`` of that order is the vector's *id*
(:attr:`VectorSet.names` ``[i]`` is its image). The shards stay memory-mapped and are read a block at a
time (:meth:`VectorSet.blocks`), so a million vectors of width 3072 (12 GB in float32) are searched in the
memory of one block.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phi3embed.errors import Phi3EmbedError
from phi3embed.outputs.manifest import MANIFEST, iter_manifest
from phi3embed.outputs.records import Record
from phi3embed.outputs.vectors import VECTORS_DIR, npy_path

BLOCK_BYTES = 64 << 20  # float32 bytes of one block of rows (search memory is about twice this)


@dataclass(frozen=True)
class Shard:
    """The live rows of one shard file: ``rows`` ascending, ``first`` the id of the first of them."""

    stem: str
    rows: np.ndarray  # int64, ascending
    first: int
    whole: bool  # every row of the file is live, in order


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """An output folder (its ``manifest.jsonl``) or a manifest file (e.g. one written by ``combine -o``)."""
    p = Path(path)
    manifest = p / MANIFEST if p.is_dir() else p
    if not manifest.is_file():
        raise Phi3EmbedError("no manifest.jsonl here: not a phi3embed output directory", path=p)
    return manifest


def latest_of(manifest: Path) -> dict[str, Record]:
    """Image name -> its latest record."""
    return {record.name: record for record in iter_manifest(manifest)}


def written_kinds(latest: Mapping[str, Record]) -> list[str]:
    """The vector kinds the latest ok records have rows of, in canonical order."""
    from phi3embed.core.vectors import VECTOR_KINDS

    seen = {k for r in latest.values() if r.ok and r.vectors is not None for k in (r.vector_kinds or ())}
    return [k for k in VECTOR_KINDS if k in seen] + sorted(seen - set(VECTOR_KINDS))


class VectorSet:
    """The ``kind`` vectors of the latest ``ok`` records of an output folder (module docstring)."""

    def __init__(self, root: Path, kind: str, latest: Mapping[str, Record]) -> None:
        self.root, self.kind = root, kind
        where: dict[str, list[tuple[int, str]]] = {}  # stem -> (row, name)
        for name, rec in latest.items():
            if rec.ok and rec.vectors is not None and rec.vector_row is not None and kind in (rec.vector_kinds or ()):
                where.setdefault(rec.vectors, []).append((rec.vector_row, name))
        if not where:
            kinds = sorted({k for r in latest.values() for k in (r.vector_kinds or ())})
            raise Phi3EmbedError(
                f"no {kind!r} vectors here (written: {', '.join(kinds) or 'none'}; encode --vectors {kind})", path=root
            )
        self.names: list[str] = []
        self.shards: list[Shard] = []
        self._arrays: list[np.ndarray] = []
        for stem in sorted(where):
            path = npy_path(root, kind, stem)
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise Phi3EmbedError(f"cannot read vector shard {stem} of {kind}: {exc}", path=path) from None
            pairs = sorted(where[stem])
            rows = np.fromiter((r for r, _ in pairs), dtype=np.int64, count=len(pairs))
            if array.ndim != 2 or (len(rows) and rows[-1] >= array.shape[0]):
                raise Phi3EmbedError(f"vector shard {stem} of {kind} has fewer rows than the manifest names", path=path)
            if self._arrays and array.shape[1] != self._arrays[0].shape[1]:
                raise Phi3EmbedError(f"vector shard {stem} of {kind} has width {array.shape[1]}", path=path)
            whole = len(rows) == array.shape[0] and bool((rows == np.arange(len(rows))).all())
            self.shards.append(Shard(stem, rows, len(self.names), whole))
            self._arrays.append(array)
            self.names.extend(n for _, n in pairs)
        self.records = {name: latest[name] for name in self.names}
        self._ids: dict[str, int] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], kind: str) -> VectorSet:
        """The ``kind`` vectors of an output folder or manifest file."""
        manifest = manifest_path(path)
        return cls(manifest.parent, kind, latest_of(manifest))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self._arrays[0].shape[1])

    @property
    def folder(self) -> Path:
        """``DIR/vectors/<kind>``."""
        return self.root / VECTORS_DIR / self.kind

    def id_of(self, name: str) -> int | None:
        """The id of ``name``'s vector, or None."""
        if self._ids is None:
            self._ids = {name: i for i, name in enumerate(self.names)}
        return self._ids.get(name)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """The vectors of ids ``start .. stop-1`` (within one shard or across), as stored, ``[n, d]``."""
        parts = []
        for shard, array in zip(self.shards, self._arrays, strict=True):
            lo, hi = max(start, shard.first), min(stop, shard.first + len(shard.rows))
            if lo >= hi:
                continue
            if shard.whole:
                parts.append(array[lo - shard.first : hi - shard.first])  # still memory-mapped
            else:
                parts.append(np.asarray(array[shard.rows[lo - shard.first : hi - shard.first]]))
        if not parts:
            return np.empty((0, self.dim), dtype=self._arrays[0].dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of ``ids`` (any order), as stored, ``[len(ids), d]``."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=self._arrays[0].dtype)
        firsts = np.array([shard.first for shard in self.shards], dtype=np.int64)
        which = np.searchsorted(firsts, ids, side="right") - 1
        for s in np.unique(which).tolist():
            shard, sel = self.shards[s], np.flatnonzero(which == s)
            out[sel] = self._arrays[s][shard.rows[ids[sel] - shard.first]]
        return out

    def block_rows(self) -> int:
        """Rows per block: about :data:`BLOCK_BYTES` of float32."""
        return max(1, BLOCK_BYTES // (4 * self.dim))

    def blocks(self, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """``(first id, [n, d])`` blocks of the vectors, as stored, from the block holding id ``start`` on. Blocks
        never cross a shard and are always cut at the same ids."""
        size = self.block_rows()
        for shard in self.shards:
            end = shard.first + len(shard.rows)
            if end <= start:
                continue
            for first in range(shard.first, end, size):
                if first + size <= start:
                    continue
                yield first, self.rows(first, min(first + size, end))
