"""``search`` and ``neighbors`` over an output folder's vectors: queries, exact or indexed search, groups.

A query is a name in DIR (its stored vector) or an image file, encoded here with DIR's weights and settings as
its manifest records state them (:func:`encoding_settings`): the weights must have the recorded fingerprint,
or the query's vector would not be comparable with the stored ones. Search is exact (phi3embed.core.similarity,
a pass over the memory-mapped shards) unless the kind has a fresh index (phi3embed.outputs.vector_index):
then the index proposes candidates and they are scored exactly, so every reported score is an exact cosine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from phi3embed.core.similarity import cosines, group_pairs, normalize, pairs_above, top_k
from phi3embed.errors import ConfigError, ImageError, Phi3EmbedError
from phi3embed.outputs.vector_index import OpenIndex
from phi3embed.outputs.vector_set import VectorSet

if TYPE_CHECKING:
    from phi3embed.core.embedder import Phi3VisionEmbedder
    from phi3embed.core.preprocess import Preprocessed

MIN_CANDIDATES = 32  # the index proposes at least this many vectors per query, all scored exactly


@dataclass(frozen=True)
class EncodingSettings:
    """What it takes to encode a query image as DIR's images were encoded."""

    model: str
    fingerprint: str
    num_crops: int
    compute_dtype: str
    alpha: str
    exif_transpose: bool


def encoding_settings(vset: VectorSet) -> EncodingSettings:
    """The settings of the records behind ``vset``'s vectors; a Phi3EmbedError when they differ between
    images or a record lacks one (then no single encoding reproduces them)."""
    seen: dict[tuple[object, ...], str] = {}
    for name, rec in vset.records.items():
        key = (rec.fingerprint, rec.num_crops, rec.compute_dtype, rec.alpha, rec.exif_transpose)
        seen.setdefault(key, name)
        if len(seen) > 1:
            break
    if len(seen) > 1:
        (a, first), (b, other) = list(seen.items())[:2]
        fields = ("fingerprint", "num_crops", "compute_dtype", "alpha", "exif_transpose")
        diff = next(f for f, x, y in zip(fields, a, b, strict=True) if x != y)
        raise Phi3EmbedError(
            f"the {vset.kind} vectors were made with different settings ({diff} of {first!r} and {other!r} differ): "
            "an image query cannot be encoded like all of them; query by name, or encode again with one setting",
            path=vset.root,
        )
    rec = next(iter(vset.records.values()))
    missing = [f for f in ("model", "fingerprint", "num_crops", "compute_dtype") if getattr(rec, f) in (None, "")]
    if missing:
        raise Phi3EmbedError(f"the manifest does not record {', '.join(missing)}: image queries cannot be encoded")
    return EncodingSettings(
        model=str(rec.model),
        fingerprint=str(rec.fingerprint),
        num_crops=int(rec.num_crops or 0),
        compute_dtype=str(rec.compute_dtype),
        alpha=str(rec.alpha or "drop"),
        exif_transpose=bool(rec.exif_transpose),
    )


def load_query_embedder(
    settings: EncodingSettings, *, model: str | None = None, device: str = "auto"
) -> Phi3VisionEmbedder:
    """An embedder that encodes as ``settings`` say: the recorded model (or ``model``), checked against the
    recorded fingerprint."""
    from phi3embed.core.embedder import Phi3VisionEmbedder

    source = model or settings.model
    try:
        embedder = Phi3VisionEmbedder.from_pretrained(
            source,
            device=device,
            dtype=settings.compute_dtype,
            num_crops=settings.num_crops,
            alpha=settings.alpha,  # type: ignore[arg-type]
            exif_transpose=settings.exif_transpose,
        )
    except (ConfigError, Phi3EmbedError) as exc:
        if model is not None:
            raise
        raise Phi3EmbedError(
            f"the model the vectors were made with ({settings.model}) cannot be loaded here ({exc.reason}); "
            "give it with --model"
        ) from None
    if embedder.fingerprint != settings.fingerprint:
        raise Phi3EmbedError(
            f"{source} has other weights (fingerprint {embedder.fingerprint[:12]}) than the vectors were made with "
            f"({settings.fingerprint[:12]}): its vectors would not be comparable"
        )
    return embedder


@dataclass
class Query:
    """One QUERY argument: what was typed, its vector (or why it has none), and its own id when it names an
    image of DIR (left out of its own results)."""

    text: str
    vector: np.ndarray | None = None
    own_id: int = -1
    error: str | None = None


def resolve_queries(
    vset: VectorSet, texts: Sequence[str], *, embedder: Callable[[], Phi3VisionEmbedder]
) -> list[Query]:
    """Each QUERY as a name in DIR (first) or an image file (encoded with ``embedder()``, built only when a
    file is asked for). A query that is neither, or an image that cannot be read, gets an ``error``."""
    queries = [Query(text) for text in texts]
    files = []
    for q in queries:
        own = vset.id_of(q.text)
        if own is not None:
            q.vector, q.own_id = vset.take(np.array([own]))[0], own
        elif os.path.lexists(q.text):
            files.append(q)
        else:
            q.error = f"{q.text}: not a name in {vset.root} and no such file"
    if files:
        _encode_queries(files, embedder(), vset.kind)
    return queries


def _encode_queries(queries: list[Query], embedder: Phi3VisionEmbedder, kind: str) -> None:
    items: list[tuple[object, Preprocessed]] = []
    for q in queries:
        try:
            items.append((q, embedder.preprocess(q.text)))
        except ImageError as exc:
            q.error = str(exc)
    stage = "projected" if kind == "tokens" else None
    for done, _, _, vecs in embedder.embed_vectors_stream(items, kinds=(kind,), stage=stage):
        assert isinstance(done, Query)
        done.vector = vecs[kind].float().cpu().numpy()  # type: ignore[index]


@dataclass(frozen=True)
class Hit:
    name: str
    cosine: float


def search(
    vset: VectorSet, queries: Sequence[Query], k: int, *, index: OpenIndex | None = None
) -> list[list[Hit] | None]:
    """The ``k`` most similar images of each query (None for a query without a vector), by exact cosine:
    over every vector, or over the index's candidates."""
    ready = [i for i, q in enumerate(queries) if q.vector is not None]
    out: list[list[Hit] | None] = [None] * len(queries)
    if not ready:
        return out
    vectors = np.stack([queries[i].vector for i in ready])  # type: ignore[misc]  # (q, d)
    exclude = np.array([queries[i].own_id for i in ready], dtype=np.int64)
    if vectors.shape[1] != vset.dim:
        raise Phi3EmbedError(f"query vectors have width {vectors.shape[1]}, the {vset.kind} vectors {vset.dim}")
    if index is None:
        found = top_k(vectors, vset.blocks(), k, exclude=exclude)
    else:
        found = _rerank(
            vset, normalize(vectors), index.candidates(normalize(vectors), max(2 * k + 1, MIN_CANDIDATES)), k, exclude
        )
    for i, (scores, ids) in zip(ready, found, strict=True):
        out[i] = [Hit(vset.names[j], float(s)) for s, j in zip(scores.tolist(), ids.tolist(), strict=True)]
    return out


def _rerank(
    vset: VectorSet, queries: np.ndarray, candidates: list[np.ndarray], k: int, exclude: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact scores of each query's candidates; the best ``k`` (ties by the lower id)."""
    out = []
    for q, ids, own in zip(queries, candidates, exclude.tolist(), strict=True):
        ids = np.unique(ids[ids != own])
        scores = cosines(q[None], vset.take(ids))[0]  # (m,)
        order = np.lexsort((ids, -scores))[:k]
        out.append((scores[order], ids[order]))
    return out


# --------------------------------------------------------------------------- neighbors


@dataclass(frozen=True)
class Group:
    names: list[str]
    weakest: float  # the lowest cosine among the group's pairs above the threshold


def neighbors(
    vset: VectorSet, threshold: float, *, index: OpenIndex | None = None, candidates: int = MIN_CANDIDATES
) -> list[Group]:
    """Groups of images joined by pairs whose cosine is at least ``threshold`` (transitively). Exact: every
    pair, a block against a block; with ``index``: each image's ``candidates`` nearest, scored exactly."""
    exact = index is None
    pairs = pairs_above(vset.blocks, threshold) if exact else _index_pairs(vset, threshold, index, candidates)  # type: ignore[arg-type]
    return [Group([vset.names[i] for i in ids], weakest) for ids, weakest in group_pairs(len(vset), pairs)]


def _index_pairs(
    vset: VectorSet, threshold: float, index: OpenIndex, candidates: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Pairs ``(i, j, cosine)`` above ``threshold`` among each image's candidates (a pair may come twice, once
    from each side: grouping does not mind)."""
    for first, block in vset.blocks():
        q = normalize(block)
        for row, ids in enumerate(index.candidates(q, candidates + 1)):
            own = first + row
            ids = np.unique(ids[ids != own])
            if not len(ids):
                continue
            scores = cosines(q[row : row + 1], vset.take(ids))[0]  # (m,)
            keep = scores >= threshold
            if keep.any():
                ids = ids[keep]
                yield np.minimum(ids, own), np.maximum(ids, own), scores[keep]
