"""Cosine similarity over many vectors, in bounded memory: exact top-k search and near-duplicate pairs.

Pure numpy over *blocks*: the caller hands the vectors as ``(first_id, array [n, d])`` blocks in id order (the
rows of memory-mapped shards, read a block at a time), so nothing here holds more than one block of scores.
Vectors are L2-normalised block by block (:func:`normalize`): cosine similarity is then a dot product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

Blocks = Callable[[int], Iterable[tuple[int, np.ndarray]]]  # (first id, [n, d]) blocks from an id on


def normalize(vectors: np.ndarray) -> np.ndarray:
    """``[n, d]`` (any float dtype) -> float32 rows of unit length; an all-zero row stays zero."""
    out = np.array(vectors, dtype=np.float32, copy=True)
    norms = np.linalg.norm(out, axis=1, keepdims=True)  # (n, 1)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def cosines(unit: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Cosine similarity of unit-length ``unit [q, d]`` with every row of ``block [n, d]`` (any float dtype),
    ``[q, n]``: dot products divided by the rows' norms, so the block is read twice and never copied when it is
    float32 (a zero row scores 0)."""
    rows = block if block.dtype == np.float32 else block.astype(np.float32)
    dots = unit @ rows.T  # (q, n)
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))  # (n,)
    norms[norms == 0] = 1.0
    dots /= norms
    return dots


def _best(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest of each row of ``scores [q, m]`` (with their ``ids [q, m]``), highest first, ties by
    the lower id; ``[q, min(k, m)]`` each."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (q, k), unordered
        scores = np.take_along_axis(scores, part, axis=1)
        ids = np.take_along_axis(ids, part, axis=1)
    order = np.lexsort((ids, -scores), axis=1) if scores.size else np.zeros(scores.shape, dtype=np.int64)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def top_k(
    queries: np.ndarray, blocks: Iterable[tuple[int, np.ndarray]], k: int, *, exclude: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact cosine search: for each of ``queries [q, d]``, the ``k`` most similar vectors of ``blocks``.

    Returns per query ``(scores [k'], ids [k'])`` (``k' <= k``: fewer when there are fewer vectors), highest
    first, equal scores by the lower id. ``exclude``: one id per query left out of its results (-1: none),
    e.g. the query's own row.
    """
    q = normalize(queries)
    keep = k + (exclude is not None)
    best_s = np.empty((len(q), 0), dtype=np.float32)
    best_i = np.empty((len(q), 0), dtype=np.int64)
    for first, block in blocks:
        scores = cosines(q, block)  # (q, n)
        ids = np.broadcast_to(np.arange(first, first + len(block), dtype=np.int64), scores.shape)
        best_s, best_i = _best(np.concatenate([best_s, scores], axis=1), np.concatenate([best_i, ids], axis=1), keep)
    out = []
    for row, (s, i) in enumerate(zip(best_s, best_i, strict=True)):
        if exclude is not None:
            mine = i != exclude[row]
            s, i = s[mine], i[mine]
        out.append((s[:k], i[:k]))
    return out


def pairs_above(blocks: Blocks, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every pair ``i < j`` of vectors whose cosine similarity is at least ``threshold``, as arrays
    ``(i, j, score)`` per pair of blocks: the upper triangle of the similarity matrix, one block of it at a
    time (memory: two blocks and their ``[n, m]`` scores; time: all pairs). ``blocks(start)`` gives the blocks
    that begin at or after id ``start``, always cut at the same ids."""
    for first_a, a in blocks(0):
        na = normalize(a)
        for first_b, b in blocks(first_a):
            scores = na @ (na if first_b == first_a else normalize(b)).T  # (n, m)
            rows, cols = np.nonzero(scores >= threshold)
            i, j = rows + first_a, cols + first_b
            upper = i < j
            if upper.any():
                yield i[upper], j[upper], scores[rows[upper], cols[upper]]


class UnionFind:
    """Groups of ids joined by pairs (path halving, union by size), over ids ``0 .. n-1`` in two arrays."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]

    def groups(self) -> list[list[int]]:
        """Every group of two or more ids, each sorted, ordered by its smallest id."""
        roots = np.fromiter((self.find(i) for i in range(len(self.parent))), dtype=np.int64, count=len(self.parent))
        order = np.argsort(roots, kind="stable")
        bounds = np.flatnonzero(np.diff(roots[order])) + 1
        out = [part.tolist() for part in np.split(order, bounds) if len(part) > 1]
        return sorted(out, key=lambda g: g[0])


def group_pairs(n: int, pairs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[tuple[list[int], float]]:
    """Near-duplicate groups: ids joined (transitively) by ``pairs`` ``(i, j, score)`` arrays; each group with
    the lowest score among its pairs (its weakest link), groups ordered by their first id."""
    uf = UnionFind(n)
    weakest: dict[int, float] = {}  # an id -> lowest score of the pairs it is the first of
    for i, j, s in pairs:
        for a, b, score in zip(i.tolist(), j.tolist(), s.tolist(), strict=True):
            uf.union(a, b)
            weakest[a] = min(weakest.get(a, 1.0), score)
    out = []
    for group in uf.groups():
        low = min((weakest[i] for i in group if i in weakest), default=1.0)
        out.append((group, float(low)))
    return out
