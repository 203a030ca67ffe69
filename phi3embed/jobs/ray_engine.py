"""Ray Data engine: the encoder as a stateful callable class for ``ray.data.Dataset.map_batches``.

Each actor loads the checkpoint once (:class:`RayEncoder`), then turns batches of paths (or image bytes)
into rows of embeddings plus the facts a manifest record needs. Bad images become ``status="error"``
rows; they never raise. Embeddings travel as raw bytes + dtype + shape, because numpy (and so Arrow)
has no bfloat16: :func:`decode_rows` on the driver rebuilds the exact tensor the actor computed, so the
files the driver writes are byte-identical to the local engine's.

Nothing here imports ``ray`` at module import time: the actor class is plain Python that Ray ships to
workers, and :func:`build_pipeline` / :func:`ray_session` import it when called.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from phi3embed.core.batching import HostResult
from phi3embed.core.checkpoint import resolve
from phi3embed.core.config import preprocess_config_from_dict, vision_config_from_dict
from phi3embed.core.embedder import Phi3VisionEmbedder, parse_dtype
from phi3embed.core.model import Phi3VisionModel
from phi3embed.core.preprocess import AlphaMode, Preprocessed
from phi3embed.errors import CheckpointError, ImageError, Phi3EmbedError, UnsupportedImageError
from phi3embed.inputs.listing import Source
from phi3embed.jobs.local import STOPS, JobSummary, Reporter, StopSignals, Writer, header_size, read_source
from phi3embed.outputs.store import ImageFacts, OutputStore

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

PATH = "path"  # input column: the file to read, or the name of the bytes in BYTES
BYTES = "bytes"  # optional input column: the file's content (then PATH is only its name); None = read PATH
LABEL = "label"  # optional input column: the file's name in error messages (default: PATH)
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
    "dtype",  # stored dtype name of the embedding ("" for error rows)
    "dim",  # hidden size D of the embedding
    "embedding",  # raw bytes of the contiguous [num_tokens, D] tensor (b"" for error rows)
    "seconds",  # spent reading, decoding and tiling this image
)


@dataclass(frozen=True)
class EncoderSpec:
    """Everything an actor needs to build its embedder. Plain data: pickled once per actor."""

    model: str
    device: str = "auto"  # resolved inside the actor (Ray sets CUDA_VISIBLE_DEVICES per GPU actor)
    dtype: str = "float32"  # compute dtype
    out_dtype: str | None = None  # stored dtype; None = the compute dtype
    num_crops: int | None = None
    revision: str | None = None
    alpha: AlphaMode = "drop"
    exif_transpose: bool = False
    batch_size: int = 8  # crops per forward pass
    decode_threads: int = 0  # threads decoding the next images while the encoder runs (0 = inline)
    expect_fingerprint: str | None = None  # refuse to run on weights other than the driver's

    def load(self) -> Phi3VisionEmbedder:
        return Phi3VisionEmbedder.from_pretrained(
            self.model,
            device=self.device,
            dtype=self.dtype,
            num_crops=self.num_crops,
            revision=self.revision,
            alpha=self.alpha,
            exif_transpose=self.exif_transpose,
            batch_size=self.batch_size,
        )


def checkpoint_facts(spec: EncoderSpec) -> tuple[str, int]:
    """``(fingerprint, num_crops)`` the actors will have, computed on the driver without building the model
    (the vision tensors are read and hashed one at a time, then dropped: no GPU, little memory)."""
    ckpt = resolve(spec.model, revision=spec.revision)
    vcfg = vision_config_from_dict(ckpt.config, where=str(ckpt.root / "config.json"))
    pcfg = preprocess_config_from_dict(ckpt.preprocessor_config, crop_size=vcfg.clip.image_size)
    _, fingerprint = Phi3VisionModel.from_checkpoint(ckpt, vcfg, device="meta")
    return fingerprint, spec.num_crops or pcfg.num_crops


def embedding_bytes(emb: torch.Tensor) -> bytes:
    """A CPU tensor's exact bytes (any dtype, bfloat16 included), row-major."""
    return emb.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def embedding_from_bytes(data: bytes, *, dtype: str, num_tokens: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`embedding_bytes`: a ``[num_tokens, dim]`` CPU tensor of ``dtype``."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(parse_dtype(dtype)).reshape(num_tokens, dim)


@dataclass
class _Row:
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
    dim: int = UNKNOWN
    embedding: bytes = b""
    seconds: float = 0.0


_INT_COLUMNS = frozenset(k for k, v in _Row.__dataclass_fields__.items() if v.type == "int")


def _blob(value: Any) -> bytes | None:
    """One BYTES cell as Ray hands it over. Ray turns a block whose cells are all null into a float NaN
    array, so anything that is not bytes-like means "no bytes: read the path"."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value.tobytes()
    return None


class RayEncoder:
    """Callable class for ``Dataset.map_batches``: batch of ``path`` (+ optional ``bytes``) -> result rows.

    ``batch_format="numpy"``: the batch is a dict of equal-length numpy arrays; the result keeps every
    input column except ``bytes`` (so a driver-side key column comes back) and adds RESULT_COLUMNS.
    """

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        self.embedder = spec.load()
        if spec.expect_fingerprint is not None and self.embedder.fingerprint != spec.expect_fingerprint:
            raise CheckpointError(
                f"vision weights here have fingerprint {self.embedder.fingerprint}, the driver's have "
                f"{spec.expect_fingerprint}: every node must see the same checkpoint",
                path=spec.model,
            )
        self.out_dtype = parse_dtype(spec.out_dtype) if spec.out_dtype else self.embedder.dtype
        self.out_dtype_name = str(self.out_dtype).removeprefix("torch.")
        self._pool = ThreadPoolExecutor(spec.decode_threads) if spec.decode_threads > 0 else None

    def _prepare(self, path: str, label: str, data: bytes | None) -> tuple[_Row, Preprocessed | None]:
        """Read, hash, decode and tile one image. Never raises for a bad image."""
        row = _Row()
        start = time.perf_counter()
        try:
            if data is None:
                data, row.mtime_ns = read_source(path, label=label)
            row.sha256 = hashlib.sha256(data).hexdigest()
            row.size = len(data)
            item = self.embedder.preprocess(data, name=label)
        except ImageError as exc:
            row.error = str(exc)
            if isinstance(exc, UnsupportedImageError) and data:  # decoded fine: its size explains why
                width, height = header_size(data)
                row.width = UNKNOWN if width is None else width
                row.height = UNKNOWN if height is None else height
            row.seconds = time.perf_counter() - start
            return row, None
        except Exception as exc:  # a decoder bug must not stop the job either
            row.error = " ".join(f"{label}: unexpected {type(exc).__name__} while reading: {exc}".split())
            row.seconds = time.perf_counter() - start
            return row, None
        row.seconds = time.perf_counter() - start
        grid = item.grid
        row.width, row.height = grid.width, grid.height
        row.image_h, row.image_w = grid.image_sizes
        row.rows, row.cols = grid.rows, grid.cols
        row.num_tokens = item.num_tokens
        return row, item

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch[PATH]]
        labels = [str(p) for p in batch[LABEL]] if LABEL in batch else paths
        blobs = [_blob(b) for b in batch[BYTES]] if BYTES in batch else [None] * len(paths)
        jobs = list(zip(paths, labels, blobs, strict=True))
        prepared = (
            self._pool.map(lambda a: self._prepare(*a), jobs) if self._pool else (self._prepare(*a) for a in jobs)
        )
        rows: list[_Row] = []

        def ready() -> Iterator[tuple[int, Preprocessed]]:
            for i, (row, item) in enumerate(prepared):
                rows.append(row)
                if item is not None:
                    yield i, item

        for i, _item, emb in self.embedder.embed_stream(ready()):
            row = rows[cast(int, i)]
            stored = emb.to(self.out_dtype)
            row.status = "ok"
            row.dtype = self.out_dtype_name
            row.dim = int(stored.shape[1])
            assert stored.shape[0] == row.num_tokens, (stored.shape, row.num_tokens)
            row.embedding = embedding_bytes(stored)
        assert len(rows) == len(paths)
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


# --------------------------------------------------------------------------- driver side


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
    extra: dict[str, Any] = field(default_factory=dict)  # pass-through input columns (e.g. a job index)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def facts(self) -> dict[str, Any]:
        """The manifest fields this row determines (not the embedding, not the extras)."""
        d = asdict(self)
        for k in ("embedding", "extra", "path"):
            d.pop(k)
        return d


def _known(v: Any) -> int | None:
    v = int(v)
    return None if v == UNKNOWN else v


def decode_rows(batch: Mapping[str, Any]) -> Iterator[EncodedImage]:
    """A numpy batch of RayEncoder output (e.g. from ``iter_batches(batch_format="numpy")``) -> results."""
    n = len(batch["status"])
    extras = [k for k in batch if k not in RESULT_COLUMNS and k not in (PATH, BYTES, LABEL)]
    for i in range(n):
        ok = batch["status"][i] == "ok"
        emb = None
        if ok:
            emb = embedding_from_bytes(
                batch["embedding"][i],
                dtype=str(batch["dtype"][i]),
                num_tokens=int(batch["num_tokens"][i]),
                dim=int(batch["dim"][i]),
            )
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
            extra={k: _plain(batch[k][i]) for k in extras},
        )


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def actor_resources(device: str, *, cpus_per_actor: float = 1.0) -> tuple[float, float]:
    """``(num_cpus, num_gpus)`` of one actor: a whole GPU for a CUDA device (or ``auto`` on a cluster with
    GPUs), plus ``cpus_per_actor`` CPUs for decoding."""
    gpu = device.startswith("cuda") or (device == "auto" and _cluster_has_gpus())
    return cpus_per_actor, 1.0 if gpu else 0.0


def cluster_resources() -> tuple[float, float]:
    """``(CPUs, GPUs)`` of the Ray cluster this process is connected to."""
    import ray

    total = ray.cluster_resources()
    return float(total.get("CPU", 0)), float(total.get("GPU", 0))


def _cluster_has_gpus() -> bool:
    import ray

    return bool(ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0)


def build_pipeline(
    ds: ray.data.Dataset,
    spec: EncoderSpec,
    *,
    actors: int,
    images_per_batch: int = 8,
    cpus_per_actor: float = 1.0,
    restart_actors: bool = True,
) -> ray.data.Dataset:
    """``ds`` (a PATH column, optional BYTES and key columns) -> the dataset of result rows.

    A fixed pool of ``actors`` RayEncoder actors, each with one GPU (CUDA device, or ``auto`` on a
    cluster that has GPUs) or ``cpus_per_actor`` CPUs. An exception in the encoder (not a bad image:
    those are error rows) fails the job. ``restart_actors`` keeps Ray Data's actor fault tolerance (a
    dead actor, e.g. on a lost node, is restarted and its batch retried: what a cluster needs); without
    it a crashed actor fails the job as a crash of the local engine would (rerun to resume).
    """
    import ray.data

    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    num_cpus, num_gpus = actor_resources(spec.device, cpus_per_actor=cpus_per_actor)
    extra: dict[str, Any] = {}
    if not restart_actors and _accepts_remote_args(ds.map_batches):
        extra["max_restarts"] = 0
    with warnings.catch_warnings():  # Ray 2.60 deprecates remote args in **kwargs (no named max_restarts yet)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ds.map_batches(
            RayEncoder,
            fn_constructor_kwargs={"spec": spec},
            batch_size=images_per_batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=num_cpus,
            num_gpus=num_gpus or None,
            **extra,
        )


def _accepts_remote_args(fn: Any) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


@contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    quiet: bool = True,
) -> Iterator[bool]:
    """Connect to ``address`` (an existing cluster: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``) or start
    a private local instance with ``num_cpus`` CPUs. Yields whether a local instance was started here.

    Ray's own progress bars and INFO logs are turned off (the caller shows progress); Ray's logs stay in
    its session folder. A Ray already initialised by the caller is used as is and left running.
    """
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if quiet:
        for handler in logging.getLogger("ray.data").handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS") or None  # what ray.init itself would do
    local = address is None
    if quiet:  # Ray warns on every start that token auth (its default, which we keep) is on
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(
        address=address,
        num_cpus=num_cpus if local else None,
        object_store_memory=object_store_memory if local else None,
        include_dashboard=False if local else None,
        logging_level=logging.ERROR if quiet else logging.INFO,
        log_to_driver=not quiet,
    )
    try:
        yield local
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- the job, as `phi3embed encode --engine ray` runs it


def default_images_per_batch(todo: int, actors: int) -> int:
    """Images per actor call: enough for the encoder to pack full crop batches, small enough that every
    actor gets work on a short job (about four calls per actor), at most 16."""
    return max(1, min(16, -(-todo // (4 * actors))))


def run_ray(
    spec: EncoderSpec,
    sources: list[Source],
    store: OutputStore,
    *,
    actors: int,
    images_per_batch: int | None = None,
    cpus_per_actor: float = 1.0,
    restart_actors: bool = True,
    reporter: Reporter | None = None,
    max_errors_kept: int = 5,
    connect: Callable[[], AbstractContextManager[Any]] | None = None,
    writer_queue: int = 16,
    file_threads: int = 4,
) -> JobSummary:
    """The Ray counterpart of :func:`phi3embed.jobs.local.run_local`: same skipping, same store, same summary.

    Ray must be initialised (:func:`ray_session`), or ``connect()`` gives a context in which it is: it is
    entered only when there is work, so a rerun with nothing left to do starts no Ray. The sources not
    already done in ``store`` become a
    dataset of absolute paths; the actor pool encodes them; the results come back to this process in input
    order and are written here, through ``store``, by the local engine's writer (a thread; ``file_threads``
    per-image files at once, records in input order) while the next results arrive: the output directory is
    only ever written by the driver, so it needs no locking across nodes and keeps the local engine's crash
    safety.
    """
    import ray.data

    summary = JobSummary(listed=len(sources))
    todo = [s for s in sources if not store.is_done(s)]
    summary.skipped = len(sources) - len(todo)

    def on_record(record: dict[str, Any]) -> None:  # writer thread
        summary.count(record, reporter=reporter, keep_errors=max_errors_kept)

    writer = Writer(store, on_record, writer_queue, file_threads)
    signals = StopSignals()
    start = time.perf_counter()
    stack = ExitStack()
    try:
        writer.start()
        if reporter is not None:
            reporter.start(total=len(todo), skipped=summary.skipped)
        if todo:
            if connect is not None:
                stack.enter_context(connect())
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True  # input order: packed shards as the local engine's
            rows = [{PATH: os.path.abspath(s.path), LABEL: s.path, "index": i} for i, s in enumerate(todo)]
            per_batch = images_per_batch or default_images_per_batch(len(todo), actors)
            actors = min(actors, -(-len(todo) // per_batch))  # no actor without a batch to encode
            results = build_pipeline(
                ray.data.from_items(rows),
                spec,
                actors=actors,
                images_per_batch=per_batch,
                cpus_per_actor=cpus_per_actor,
                restart_actors=restart_actors,
            )
            for batch in summary.waited_for(results.iter_batches(batch_format="numpy", batch_size=None)):
                summary.preprocess_s += float(np.sum(batch["seconds"]))
                for result in decode_rows(batch):
                    source = todo[result.extra["index"]]
                    facts = ImageFacts(
                        sha256=result.sha256,
                        size=result.size,
                        mtime_ns=result.mtime_ns,
                        width=result.width,
                        height=result.height,
                        image_sizes=result.image_sizes,
                        crops=result.crops,
                        num_tokens=result.num_tokens,
                    )
                    if result.ok and result.embedding is not None:
                        writer.put(("ok", source, facts, HostResult(result.embedding)))
                    else:
                        writer.put(("error", source, facts, result.error or f"{source.path}: unknown error"))
    except STOPS as exc:
        summary.stopped(exc)
    except Exception as exc:  # the cluster or an actor failed (not a bad image: those are error records)
        summary.fatal = f"the Ray job failed: {_one_line(exc)}"
    finally:
        signals.exit_at_once()  # while cleaning up, a second signal exits at once (outputs stay whole)
        if writer.is_alive():
            writer.finish()  # what has arrived is written
        summary.wall_s = time.perf_counter() - start
        if reporter is not None:
            reporter.stop()
        stack.close()
        signals.restore()
    writer.account(summary)
    return summary


def _one_line(exc: BaseException) -> str:
    """The most telling one line of a (Ray-wrapped) exception: our own error when there is one, even when
    Ray only kept it as text (an actor that failed to start), else the innermost informative message."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        if isinstance(e, Phi3EmbedError):
            return str(e)
    for e in chain:
        for line in str(e).splitlines():
            match = _OUR_ERROR.match(line)
            if match:
                return match.group(1).strip()
    for e in reversed(chain):
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if lines and lines[-1] != type(e).__name__:
            return f"{type(e).__name__}: {lines[-1]}"
    return type(exc).__name__


_OUR_ERROR = re.compile(r"\s*phi3embed\.errors\.\w+: (.+)")
