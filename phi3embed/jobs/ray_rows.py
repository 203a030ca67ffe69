"""The rows Ray Data carries between the driver and the actors: image facts and embeddings as plain columns.

The driver sends one row per image (:func:`source_row`: ``path``, the name errors use, where the image lies
inside an archive); an actor (:class:`phi3embed.jobs.ray_actor.RayEncoder`) reads the cells back
(:func:`read_inputs`) and returns one :class:`ResultRow` per image as RESULT_COLUMNS (:func:`result_batch`);
the driver rebuilds them (:func:`decode_rows`). Embeddings travel as raw bytes + dtype + shape, because numpy (and
so Arrow) has no bfloat16: the driver rebuilds the exact tensor the actor computed, so the files it writes are
byte-identical to the local engine's. With ``--vectors`` each row also carries the image's float32 vectors, one
bytes cell for all kinds and a cell naming each kind's width (:func:`vectors_cells`, :func:`vectors_from_cells`);
with ``--stage none`` an ok row has vectors and no embedding.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from phi3embed.core.embedder import parse_dtype
from phi3embed.inputs.archives import Member, ParquetRow, TarMember
from phi3embed.inputs.listing import Source
from phi3embed.jobs.prepare import Prepared
from phi3embed.outputs.records import ImageFacts

PATH = "path"  # input column: the file to read, or the name of the bytes in BYTES
BYTES = "bytes"  # optional input column: the file's content (then PATH is only its name); None = read PATH
LABEL = "label"  # optional input column: the file's name in error messages (default: PATH)
MEMBER = "member"  # optional input column: where the image lies inside the archive PATH, as JSON ("" for a file)
UNKNOWN = -1  # integer columns of facts an error row does not have

#: Output columns added to every row, in this order (input columns other than BYTES pass through).
RESULT_COLUMNS = (
    "status",  # "ok" or "error"
    "error",  # one line "file: reason" ("" when ok)
    "width",  # source image size in pixels (UNKNOWN when it could not be decoded)
    "height",
    "image_h",  # image_sizes [H', W'] of the HD image
    "image_w",
    "rows",  # crop grid [rows, cols]
    "cols",
    "num_tokens",
    "sha256",  # of the source file's bytes ("" when they could not be read)
    "size",  # bytes of the source file (UNKNOWN when it could not be read)
    "mtime_ns",  # its modification time (UNKNOWN for bytes input or an unreadable file)
    "dtype",  # stored dtype name of the embedding ("" for error rows and --stage none)
    "shape",  # the stored tensor's shape as "d0,d1[,d2]" (its --stage: [T, D], [T, 4C] or [crops, g*g, C])
    "embedding",  # raw bytes of the contiguous tensor (b"" for error rows and --stage none)
    "vector_kinds",  # with --vectors: "kind:width,..." in the order of the next column ("" without)
    "vectors",  # the float32 vectors of those kinds, one after the other, as raw bytes (b"" without)
    "seconds",  # CPU time spent reading, decoding and tiling this image
)


def embedding_bytes(emb: torch.Tensor) -> bytes:
    """A CPU tensor's exact bytes (any dtype, bfloat16 included), row-major."""
    return emb.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def embedding_from_bytes(data: bytes, *, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`embedding_bytes`: a CPU tensor of ``dtype`` and ``shape``."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(parse_dtype(dtype)).reshape(tuple(shape))


def vectors_cells(vectors: Mapping[str, torch.Tensor]) -> tuple[str, bytes]:
    """One image's vectors (``{kind: [d]}``, as the embedder gives them) -> the ``vector_kinds`` and ``vectors`` cells:
    ``"kind:width,..."`` and their float32 bytes, in the mapping's order. Float32 is what the local engine
    hands its writer, so the writer stores the same values whichever engine computed them."""
    kinds = ",".join(f"{kind}:{v.numel()}" for kind, v in vectors.items())
    return kinds, b"".join(embedding_bytes(v.reshape(-1).float()) for v in vectors.values())


def vectors_from_cells(kinds: str, data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of :func:`vectors_cells`: ``{kind: float32 [d]}`` CPU tensors ({} for empty cells)."""
    widths = [(kind, int(width)) for kind, width in (item.rsplit(":", 1) for item in kinds.split(",") if item)]
    if 4 * sum(width for _, width in widths) != len(data):
        raise ValueError(
            f"vector cells disagree: {kinds!r} names {sum(w for _, w in widths)} floats, the row holds {len(data)} bytes"
        )
    out: dict[str, torch.Tensor] = {}
    start = 0
    for kind, width in widths:
        out[kind] = embedding_from_bytes(data[start : start + 4 * width], dtype="float32", shape=[width])
        start += 4 * width
    return out


@dataclass
class ResultRow:
    """One image's result as an actor returns it: its facts (UNKNOWN / "" where unknown) and embedding bytes."""

    status: str = "error"
    error: str = ""
    width: int = UNKNOWN
    height: int = UNKNOWN
    image_h: int = UNKNOWN
    image_w: int = UNKNOWN
    rows: int = UNKNOWN
    cols: int = UNKNOWN
    num_tokens: int = UNKNOWN
    sha256: str = ""
    size: int = UNKNOWN
    mtime_ns: int = UNKNOWN
    dtype: str = ""
    shape: str = ""
    embedding: bytes = b""
    vector_kinds: str = ""
    vectors: bytes = b""
    seconds: float = 0.0

    @classmethod
    def of(cls, prepared: Prepared) -> ResultRow:
        """The row's facts (UNKNOWN / "" where a fact is None)."""
        f = prepared.facts

        def known(v: int | None) -> int:
            return UNKNOWN if v is None else v

        image_h, image_w = f.image_sizes or (None, None)
        rows, cols = f.crops or (None, None)
        return cls(
            error=prepared.error or "",
            width=known(f.width),
            height=known(f.height),
            image_h=known(image_h),
            image_w=known(image_w),
            rows=known(rows),
            cols=known(cols),
            num_tokens=known(f.num_tokens),
            sha256=f.sha256 or "",
            size=known(f.size),
            mtime_ns=known(f.mtime_ns),
            seconds=prepared.seconds,
        )

    def encoded(
        self, stored: torch.Tensor | None, *, dtype: str, vectors: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """The row of an image encoded into ``stored`` (its stored dtype named ``dtype``; None: --stage none)
        and, with --vectors, its ``vectors`` (``{kind: float32 [d]}``)."""
        self.status = "ok"
        if stored is not None:
            self.dtype = dtype
            self.shape = ",".join(str(n) for n in stored.shape)
            self.embedding = embedding_bytes(stored)
        if vectors:
            self.vector_kinds, self.vectors = vectors_cells(vectors)


_INT_COLUMNS = frozenset(k for k, v in ResultRow.__dataclass_fields__.items() if v.type == "int")


def _blob(value: Any) -> bytes | None:
    """One BYTES cell as Ray hands it over. Ray turns a block whose cells are all null into a float NaN
    array, so anything that is not bytes-like means "no bytes: read the path"."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value.tobytes()
    return None


_MEMBER_TYPES = {kind.__name__: kind for kind in (Member, TarMember, ParquetRow)}


def member_cell(member: Member | None) -> str:
    """A member as one string cell (Arrow stores no dataclasses): JSON of its type and fields, "" for a loose
    file."""
    return "" if member is None else json.dumps([type(member).__name__, dataclasses.asdict(member)])


def member_from_cell(cell: Any) -> Member | None:
    if not isinstance(cell, str) or not cell:
        return None
    kind, values = json.loads(cell)
    return _MEMBER_TYPES[kind](**values)


Task = tuple[str, str, bytes | None, Member | None]  # path, label, bytes (None: read the path), member


def read_inputs(batch: Mapping[str, np.ndarray]) -> list[Task]:
    """The images of an input batch: ``(path, label, data, member)`` each (optional columns filled in)."""
    paths = [str(p) for p in batch[PATH]]
    labels = [str(p) for p in batch[LABEL]] if LABEL in batch else paths
    blobs = [_blob(b) for b in batch[BYTES]] if BYTES in batch else [None] * len(paths)
    members = [member_from_cell(m) for m in batch[MEMBER]] if MEMBER in batch else [None] * len(paths)
    return list(zip(paths, labels, blobs, members, strict=True))


def result_batch(batch: Mapping[str, np.ndarray], rows: Sequence[ResultRow]) -> dict[str, np.ndarray]:
    """The output batch: every input column except BYTES (so a driver-side key column comes back), then
    RESULT_COLUMNS from ``rows``."""
    out: dict[str, np.ndarray] = {k: v for k, v in batch.items() if k != BYTES}
    for name in RESULT_COLUMNS:
        values = [getattr(r, name) for r in rows]
        if name in _INT_COLUMNS:
            out[name] = np.asarray(values, dtype=np.int64)
        elif name == "seconds":
            out[name] = np.asarray(values, dtype=np.float64)
        else:  # strings and bytes: object arrays (Ray stores them as Arrow string / binary)
            col = np.empty(len(values), dtype=object)
            col[:] = values
            out[name] = col
    return out


def source_row(source: Source, index: int) -> dict[str, Any]:
    """The driver's input row for one source: its absolute path (the actors may run elsewhere), the listed
    path as the label, the member, and ``index`` (the source's place, which comes back with the result)."""
    return {PATH: os.path.abspath(source.path), LABEL: source.path, MEMBER: member_cell(source.member), "index": index}


def source_rows(sources: Iterable[Source]) -> list[dict[str, Any]]:
    """The input rows of ``sources``, indexed from 0 (:func:`source_row`)."""
    return [source_row(s, i) for i, s in enumerate(sources)]


def source_row_blocks(sources: Iterable[Source], rows_per_block: int) -> Iterator[list[dict[str, Any]]]:
    """The input rows of ``sources`` (:func:`source_row`, indexed from 0) in lists of ``rows_per_block`` (the
    last one shorter), made as ``sources`` is read: the driver holds one block of rows at a time."""
    if rows_per_block < 1:
        raise ValueError(f"rows_per_block must be >= 1, got {rows_per_block}")
    block: list[dict[str, Any]] = []
    for i, source in enumerate(sources):
        block.append(source_row(source, i))
        if len(block) == rows_per_block:
            yield block
            block = []
    if block:
        yield block


@dataclass
class EncodedImage:
    """One result row, rebuilt on the driver: manifest facts + the exact embedding (None on error)."""

    path: str
    status: str
    error: str | None
    width: int | None
    height: int | None
    image_sizes: tuple[int, int] | None
    crops: tuple[int, int] | None
    num_tokens: int | None
    sha256: str | None
    size: int | None
    mtime_ns: int | None
    embedding: torch.Tensor | None
    vectors: dict[str, torch.Tensor] | None = None  # with --vectors: float32 [d] per kind (None without, or on error)
    extra: dict[str, Any] = field(default_factory=dict)  # pass-through input columns (e.g. a job index)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def image_facts(self) -> ImageFacts:
        """The row's facts as a manifest record takes them."""
        return ImageFacts(**{f.name: getattr(self, f.name) for f in fields(ImageFacts)})

    def facts(self) -> dict[str, Any]:
        """The manifest fields this row determines (not the embedding, not the extras)."""
        d = asdict(self)
        for k in ("embedding", "vectors", "extra", "path"):
            d.pop(k)
        return d


def _known(v: Any) -> int | None:
    v = int(v)
    return None if v == UNKNOWN else v


def decode_rows(batch: Mapping[str, Any]) -> Iterator[EncodedImage]:
    """A numpy batch of RayEncoder output (e.g. from ``iter_batches(batch_format="numpy")``) -> results."""
    n = len(batch["status"])
    extras = [k for k in batch if k not in RESULT_COLUMNS and k not in (PATH, BYTES, LABEL, MEMBER)]
    for i in range(n):
        ok = batch["status"][i] == "ok"
        emb, vectors = None, None
        if ok and str(batch["shape"][i]):  # --stage none: vectors alone
            emb = embedding_from_bytes(
                batch["embedding"][i],
                dtype=str(batch["dtype"][i]),
                shape=[int(n) for n in str(batch["shape"][i]).split(",")],
            )
        if ok and "vector_kinds" in batch and str(batch["vector_kinds"][i]):
            vectors = vectors_from_cells(str(batch["vector_kinds"][i]), _blob(batch["vectors"][i]) or b"")
        h, w, r, c = (_known(batch[k][i]) for k in ("image_h", "image_w", "rows", "cols"))
        yield EncodedImage(
            path=str(batch[PATH][i]),
            status="ok" if ok else "error",
            error=None if ok else str(batch["error"][i]),
            width=_known(batch["width"][i]),
            height=_known(batch["height"][i]),
            image_sizes=None if h is None or w is None else (h, w),
            crops=None if r is None or c is None else (r, c),
            num_tokens=_known(batch["num_tokens"][i]),
            sha256=str(batch["sha256"][i]) or None,
            size=_known(batch["size"][i]),
            mtime_ns=_known(batch["mtime_ns"][i]),
            embedding=emb,
            vectors=vectors,
            extra={k: _plain(batch[k][i]) for k in extras},
        )


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v
