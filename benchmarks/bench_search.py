"""Search over image vectors: exact numpy against approximate indexes (usearch, faiss HNSW), at given sizes.

For each width and size: random unit vectors (``random``: Gaussian, the hardest case for any index: no
structure, every vector nearly as far as every other) or ``clustered`` ones (n/100 centres plus noise, closer
to real image vectors, which sit on a low-dimensional structure). 100 queries, each a stored vector plus a
little noise. Printed per case:

* exact: ``phi3embed.core.similarity.top_k`` over blocks of the array (what ``search`` does without an
  index), seconds per query for one query at a time and for a batch of all queries;
* per library: build time, search time per query (one query at a time, one thread), recall@10 against exact
  of the library's own top 10, and of the top 10 after scoring its 32 candidates exactly (what ``search`` with an
  index reports);
* ``phi3embed`` = the ``phi3embed.core.ann.AnnIndex`` adapter (faiss ``IndexHNSWSQ``, float16 codes), against
  the same HNSW parameters (M 16, efConstruction 128, ef 128) in faiss with float32 vectors (``IndexHNSWFlat``)
  and in usearch with float32 and float16 storage.

Run: ``python benchmarks/bench_search.py --dims 1024,3072 --sizes 20000 --data random,clustered``
(needs faiss-cpu, and usearch for its rows). Figures: benchmarks/RESULTS.md ("Search").
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable, Iterator

import numpy as np

from phi3embed.core import ann
from phi3embed.core.similarity import normalize, top_k

K = 10
CANDIDATES = 32


def make_data(n: int, d: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "clustered":
        centres = rng.standard_normal((max(n // 100, 1), d), dtype=np.float32)
        x = centres[rng.integers(0, len(centres), n)]
        x += 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    else:
        x = rng.standard_normal((n, d), dtype=np.float32)
    return normalize(x)


def blocks_of(x: np.ndarray, rows: int) -> Callable[[], Iterator[tuple[int, np.ndarray]]]:
    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        for first in range(0, len(x), rows):
            yield first, x[first : first + rows]

    return blocks


def recall(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    return float(np.mean([len(set(f[:K].tolist()) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))


def rerank(x: np.ndarray, q: np.ndarray, candidates: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for vec, ids in zip(q, candidates, strict=True):
        ids = np.unique(ids[ids >= 0])
        scores = x[ids] @ vec
        out.append(ids[np.lexsort((ids, -scores))[:K]])
    return out


class Faiss:
    def __init__(self, d: int) -> None:
        import faiss

        self.faiss = faiss
        self.index = faiss.IndexHNSWFlat(d, ann.CONNECTIVITY, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ann.EXPANSION_ADD

    def add(self, keys: np.ndarray, x: np.ndarray) -> None:
        self.index.add(x)

    def search(self, q: np.ndarray, count: int) -> list[np.ndarray]:
        self.index.hnsw.efSearch = max(ann.EXPANSION_SEARCH, count)
        _, ids = self.index.search(q, count)
        return list(ids)

    def threads(self, n: int) -> None:
        self.faiss.omp_set_num_threads(n)


class Usearch:
    def __init__(self, d: int, scalar: str) -> None:
        from usearch.index import Index

        self.index = Index(
            ndim=d,
            metric="ip",
            dtype=scalar,
            connectivity=ann.CONNECTIVITY,
            expansion_add=ann.EXPANSION_ADD,
            expansion_search=ann.EXPANSION_SEARCH,
        )
        self.n = 0

    def add(self, keys: np.ndarray, x: np.ndarray) -> None:
        self.index.add(keys, x, threads=self.n)

    def search(self, q: np.ndarray, count: int) -> list[np.ndarray]:
        self.index.expansion_search = max(ann.EXPANSION_SEARCH, count)
        m = self.index.search(q, count, threads=self.n)
        if len(q) == 1:
            return [np.asarray(m.keys, dtype=np.int64)]
        return [m.keys[i, : m.counts[i]].astype(np.int64) for i in range(len(q))]

    def threads(self, n: int) -> None:
        self.n = n


class Adapter:
    """phi3embed.core.ann.AnnIndex (faiss IndexHNSWSQ, float16 codes, in an IndexIDMap2)."""

    def __init__(self, d: int) -> None:
        import faiss

        self.faiss = faiss
        self.index = ann.AnnIndex.new(d)

    def add(self, keys: np.ndarray, x: np.ndarray) -> None:
        self.index.add(keys, x)

    def search(self, q: np.ndarray, count: int) -> list[np.ndarray]:
        return self.index.search(q, count)

    def threads(self, n: int) -> None:
        self.faiss.omp_set_num_threads(n)


LIBS: dict[str, Callable[[int], object]] = {
    "phi3embed": Adapter,
    "faiss-hnsw-flat": Faiss,
    "usearch-f32": lambda d: Usearch(d, "f32"),
    "usearch-f16": lambda d: Usearch(d, "f16"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="1024,3072")
    parser.add_argument("--sizes", default="20000")
    parser.add_argument("--data", default="random,clustered")
    parser.add_argument("--libs", default=",".join(LIBS))
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads while building")
    parser.add_argument("--exact-only", action="store_true", help="measure exact search only (large sizes)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        "| data | d | n | method | build s | s/query (1 at a time) | s/query (batch) | recall@10 | recall@10 reranked |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for d in (int(v) for v in args.dims.split(",")):
        for n in (int(v) for v in args.sizes.split(",")):
            for data in args.data.split(","):
                x = make_data(n, d, data, rng)
                picks = rng.choice(n, args.queries, replace=False)
                q = normalize(x[picks] + 0.3 * rng.standard_normal((args.queries, d), dtype=np.float32) / np.sqrt(d))
                rows = max(1, (64 << 20) // (4 * d))
                t = time.perf_counter()
                truth = [ids for _, ids in top_k(q, blocks_of(x, rows)(), K)]
                batch = (time.perf_counter() - t) / len(q)
                t = time.perf_counter()
                for i in range(min(5, len(q))):
                    top_k(q[i : i + 1], blocks_of(x, rows)(), K)
                single = (time.perf_counter() - t) / min(5, len(q))
                print(
                    f"| {data} | {d} | {n:,} | exact (numpy) | - | {single:.4f} | {batch:.4f} | 1.000 | 1.000 |",
                    flush=True,
                )
                if args.exact_only:
                    continue
                for lib in args.libs.split(","):
                    index = LIBS[lib](d)
                    index.threads(args.threads)  # type: ignore[attr-defined]
                    t = time.perf_counter()
                    for first in range(0, n, 4096):
                        index.add(np.arange(first, min(first + 4096, n)), x[first : first + 4096])  # type: ignore[attr-defined]
                    build = time.perf_counter() - t
                    index.threads(1)  # type: ignore[attr-defined]
                    t = time.perf_counter()
                    own = [index.search(q[i : i + 1], K)[0] for i in range(len(q))]  # type: ignore[attr-defined]
                    per_query = (time.perf_counter() - t) / len(q)
                    cands = index.search(q, CANDIDATES)  # type: ignore[attr-defined]
                    print(
                        f"| {data} | {d} | {n:,} | {lib} | {build:.1f} | {per_query:.4f} | - | "
                        f"{recall(own, truth):.3f} | {recall(rerank(x, q, cands), truth):.3f} |",
                        flush=True,
                    )
                    del index
                    gc.collect()
                del x


if __name__ == "__main__":
    main()
