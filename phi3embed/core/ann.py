"""The approximate nearest-neighbour index: one adapter over the library (faiss), imported only when used.

An HNSW graph (faiss ``IndexHNSWSQ`` under an ``IndexIDMap2``, so vectors carry our integer keys) over
unit-length vectors kept as float16 codes (half the memory of float32, the same recall in
benchmarks/RESULTS.md; the callers score the candidates again exactly from the stored vectors); similarity is
the inner product, i.e. cosine for the normalised vectors the callers give
(phi3embed.core.similarity.normalize). A saved index is memory-mapped for searching. faiss cannot remove a
vector from an HNSW graph: the callers forget its key instead (phi3embed.outputs.vector_index). Why faiss and
these settings: benchmarks/RESULTS.md ("Search").
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from phi3embed.errors import Phi3EmbedError

LIBRARY = "faiss"
INSTALL = "pip install 'phi3embed[index]'"
CONNECTIVITY = 16  # graph edges per node (HNSW's M)
EXPANSION_ADD = 128  # candidates kept while inserting (efConstruction)
EXPANSION_SEARCH = 128  # candidates kept while searching (efSearch); raised to the number asked for when smaller


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise Phi3EmbedError(f"an approximate index needs faiss: {INSTALL}") from None
    return faiss


def library_version() -> str:
    return str(_faiss().__version__)


class AnnIndex:
    """Keys -> unit vectors, searched approximately. Build with :meth:`new`, or :meth:`load` a saved one."""

    def __init__(self, index: Any) -> None:
        self._index = index
        self._graph = _faiss().downcast_index(index.index)  # the IndexHNSWSQ inside the key map

    @classmethod
    def new(cls, dim: int) -> AnnIndex:
        faiss = _faiss()
        graph = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, CONNECTIVITY, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = EXPANSION_ADD
        return cls(faiss.IndexIDMap2(graph))

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, writable: bool = False) -> AnnIndex:
        """A saved index: memory-mapped for searching, read into memory when it will be changed."""
        faiss = _faiss()
        try:
            index = faiss.read_index(os.fspath(path), 0 if writable else faiss.IO_FLAG_MMAP)
            return cls(index)
        except Exception as exc:  # faiss raises RuntimeError for a torn or foreign file
            raise Phi3EmbedError(
                f"cannot read the index: {' '.join(str(exc).split())[:200]}", path=os.fspath(path)
            ) from None

    def __len__(self) -> int:
        """Vectors in the graph (forgotten keys included)."""
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert ``vectors [n, d]`` (unit length) under ``keys [n]`` (unused non-negative ints)."""
        self._index.add_with_ids(
            np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(keys, dtype=np.int64)
        )

    def search(self, queries: np.ndarray, count: int) -> list[np.ndarray]:
        """The keys of about the ``count`` most similar vectors of each of ``queries [q, d]`` (unit length),
        most similar first (fewer when the index holds fewer)."""
        self._graph.hnsw.efSearch = max(EXPANSION_SEARCH, count)
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        _, keys = self._index.search(queries, min(count, max(len(self), 1)))
        return [row[row >= 0] for row in keys.astype(np.int64)]

    def save(self, path: str | os.PathLike[str]) -> None:
        _faiss().write_index(self._index, os.fspath(path))
