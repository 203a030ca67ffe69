"""Ray Data engine: the encoder as a stateful callable class for ``ray.data.Dataset.map_batches``.

Each actor loads the checkpoint once (:class:`RayEncoder`), then turns batches of paths (or image bytes)
into rows of embeddings plus the facts a manifest record needs, preparing each image with the same
:class:`phi3embed.jobs.prepare.Preparer` as the local engine. Bad images become ``status="error"``
rows; they never raise. Embeddings travel as raw bytes + dtype + shape, because numpy (and so Arrow)
has no bfloat16: :func:`decode_rows` on the driver rebuilds the exact tensor the actor computed, so the
files the driver writes are byte-identical to the local engine's.

The Preparer brings the file rules with it (only regular files of sane size are opened, a non-image costs a
header read). ``--image-timeout`` is not enforced here: an actor reads in threads (``decode_threads``), and a
thread stuck in a read or a decoder can be neither interrupted nor killed; forking a reader process inside a
Ray worker is not safe. A stalled image holds its actor's batch; a decoder that crashes takes the actor down,
which fails the job (``max_restarts=0``, see :func:`build_pipeline`): rerun to resume.

:class:`RayEngine` is the :class:`phi3embed.jobs.core.Engine` that ``phi3embed encode --engine ray`` runs through
:func:`phi3embed.jobs.core.run_job`; :func:`plan` sizes it (device, actors, the checkpoint's fingerprint hashed
on the driver) from the command's options.

Nothing here imports ``ray`` at module import time: the actor class is plain Python that Ray ships to
workers, and :func:`build_pipeline` / :func:`ray_session` import it when called.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from phi3embed.core.batching import HostResult
from phi3embed.core.checkpoint import resolve
from phi3embed.core.config import preprocess_config_from_dict, usable_cpus, vision_config_from_dict
from phi3embed.core.embedder import ImageOptions, Phi3VisionEmbedder, parse_dtype, resolve_device
from phi3embed.core.model import Phi3VisionModel
from phi3embed.core.preprocess import AlphaMode, Preprocessed
from phi3embed.core.stages import DEFAULT_STAGE, Stage, stage_shape
from phi3embed.errors import CheckpointError, Phi3EmbedError
from phi3embed.inputs.archives import Member
from phi3embed.inputs.listing import Source
from phi3embed.jobs.core import EngineInfo, JobSummary, Result
from phi3embed.jobs.prepare import Prepared, Preparer
from phi3embed.jobs.runtime import EngineOptions, Runtime, decide, engine_info, load_embedder
from phi3embed.outputs.formats import dtype_name
from phi3embed.outputs.records import ImageFacts

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

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
    "dtype",  # stored dtype name of the embedding ("" for error rows)
    "shape",  # the stored tensor's shape as "d0,d1[,d2]" (its --stage: [T, D], [T, 4C] or [crops, g*g, C])
    "embedding",  # raw bytes of the contiguous tensor (b"" for error rows)
    "seconds",  # CPU time spent reading, decoding and tiling this image
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
    stage: Stage = DEFAULT_STAGE  # what the actors return (phi3embed.core.stages)
    batch_size: int = 8  # crops per forward pass
    decode_threads: int = 0  # threads decoding the next images while the encoder runs (0 = inline)
    expect_fingerprint: str | None = None  # refuse to run on weights other than the driver's

    def runtime(self, device: str | None = None) -> Runtime:
        """The actors' :class:`~phi3embed.jobs.runtime.Runtime` (on ``device``: default this spec's)."""
        compute = parse_dtype(self.dtype)
        stored = parse_dtype(self.out_dtype) if self.out_dtype else compute
        return Runtime(
            device=device or self.device,
            compute_dtype=compute,
            stored_dtype=stored,
            batch_size=self.batch_size,
            workers=self.decode_threads,
        )

    def load(self) -> Phi3VisionEmbedder:
        """The actor's encoder; the actor owns its process, as the command does (jobs.runtime.load_embedder)."""
        same_names = ("revision", "num_crops", "alpha", "exif_transpose", "stage")
        runtime = self.runtime(str(resolve_device(self.device)))
        return load_embedder(self.model, runtime, **{name: getattr(self, name) for name in same_names})


def checkpoint_facts(spec: EncoderSpec) -> tuple[str, int]:
    """``(fingerprint, num_crops)`` the actors will have, computed on the driver without building the model
    (the vision tensors are read and hashed one at a time, then dropped: no GPU, little memory)."""
    ckpt = resolve(spec.model, revision=spec.revision)
    vcfg = vision_config_from_dict(ckpt.config, where=str(ckpt.root / "config.json"))
    pcfg = preprocess_config_from_dict(ckpt.preprocessor_config, clip=vcfg.clip)
    _, fingerprint = Phi3VisionModel.from_checkpoint(ckpt, vcfg, device="meta")
    return fingerprint, spec.num_crops or pcfg.num_crops


def embedding_bytes(emb: torch.Tensor) -> bytes:
    """A CPU tensor's exact bytes (any dtype, bfloat16 included), row-major."""
    return emb.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def embedding_from_bytes(data: bytes, *, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`embedding_bytes`: a CPU tensor of ``dtype`` and ``shape``."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(parse_dtype(dtype)).reshape(tuple(shape))


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
    shape: str = ""
    embedding: bytes = b""
    seconds: float = 0.0

    @classmethod
    def of(cls, prepared: Prepared) -> _Row:
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


_INT_COLUMNS = frozenset(k for k, v in _Row.__dataclass_fields__.items() if v.type == "int")


def _blob(value: Any) -> bytes | None:
    """One BYTES cell as Ray hands it over. Ray turns a block whose cells are all null into a float NaN
    array, so anything that is not bytes-like means "no bytes: read the path"."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value.tobytes()
    return None


def member_cell(member: Member | None) -> str:
    """A member as one string cell (Arrow stores no dataclasses): JSON of its fields, "" for a loose file."""
    return "" if member is None else json.dumps(dataclasses.astuple(member))


def member_from_cell(cell: Any) -> Member | None:
    return Member(*json.loads(cell)) if isinstance(cell, str) and cell else None


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
        self.out_dtype = spec.runtime().stored_dtype
        self.out_dtype_name = dtype_name(self.out_dtype)
        options = self.embedder.image_options
        self.preparer = Preparer(
            self.embedder.preprocess_config, alpha=options.alpha, exif_transpose=options.exif_transpose
        )
        self._pool = ThreadPoolExecutor(spec.decode_threads) if spec.decode_threads > 0 else None

    def _prepare(
        self, path: str, label: str, data: bytes | None, member: Member | None
    ) -> tuple[_Row, Preprocessed | None]:
        if member is not None:  # read here, on the worker, as the local engine's decode workers do
            prepared = self.preparer.prepare_member(path, member, archive_label=label)
        else:
            prepared = self.preparer.prepare(path, label=label, data=data)
        return _Row.of(prepared), prepared.item

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch[PATH]]
        labels = [str(p) for p in batch[LABEL]] if LABEL in batch else paths
        blobs = [_blob(b) for b in batch[BYTES]] if BYTES in batch else [None] * len(paths)
        members = [member_from_cell(m) for m in batch[MEMBER]] if MEMBER in batch else [None] * len(paths)
        jobs = list(zip(paths, labels, blobs, members, strict=True))
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
            row.shape = ",".join(str(n) for n in stored.shape)
            expected = stage_shape(self.embedder.stage, rows=row.rows, cols=row.cols, cfg=self.embedder.vision_config)
            assert tuple(stored.shape) == expected, (stored.shape, expected)
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

    def image_facts(self) -> ImageFacts:
        """The row's facts as a manifest record takes them."""
        return ImageFacts(**{f.name: getattr(self, f.name) for f in fields(ImageFacts)})

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
    extras = [k for k in batch if k not in RESULT_COLUMNS and k not in (PATH, BYTES, LABEL, MEMBER)]
    for i in range(n):
        ok = batch["status"][i] == "ok"
        emb = None
        if ok:
            emb = embedding_from_bytes(
                batch["embedding"][i],
                dtype=str(batch["dtype"][i]),
                shape=[int(n) for n in str(batch["shape"][i]).split(",")],
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


def plan(options: EngineOptions, *, announce: Callable[[str], None] = lambda line: None) -> RayEngine:
    """Size the job from the options and the cluster: device, dtypes, actors; the vision weights are hashed
    here on the driver (every actor must find the same). Connects to ``options.address`` now (its resources
    decide the device); a local instance is started only when there is work (:meth:`RayEngine.open`).
    Raises Phi3EmbedError for options that cannot work."""
    if options.device not in ("auto", "cpu", "cuda"):
        raise Phi3EmbedError(
            f"--engine ray places one actor per GPU itself: use --device auto, cuda or cpu, not {options.device!r}"
        )
    # Every node resolves the checkpoint itself: a local directory by its absolute path (it must be on a
    # filesystem all nodes share), a hub id or preset by name (each node's hub cache).
    model = os.path.abspath(options.model) if os.path.isdir(options.model) else options.model
    spec = EncoderSpec(
        model=model,
        revision=options.revision,
        num_crops=options.num_crops,
        alpha=options.alpha,
        exif_transpose=options.exif_transpose,
    )
    fingerprint, num_crops = checkpoint_facts(spec)
    session = ExitStack()
    try:
        if options.address:
            _enter_ray(session, options.address)
            cpus, gpus = cluster_resources()
        else:
            cpus, gpus = float(usable_cpus()), float(torch.cuda.device_count())
        device = "cuda" if options.device == "cuda" or (options.device == "auto" and gpus > 0) else "cpu"
        if device == "cuda" and gpus == 0:
            where = "the Ray cluster" if options.address else "this machine"
            raise Phi3EmbedError(f"--device cuda: {where} has no GPU")
        runtime = decide(device, options)
    except BaseException:
        session.close()
        raise
    actors = options.actors or max(1, int(gpus if device == "cuda" else cpus))
    spec = EncoderSpec(
        model=model,
        revision=options.revision,
        device=device,
        dtype=dtype_name(runtime.compute_dtype),
        out_dtype=dtype_name(runtime.stored_dtype),
        num_crops=options.num_crops,
        alpha=options.alpha,
        exif_transpose=options.exif_transpose,
        stage=options.stage,
        batch_size=runtime.batch_size,
        decode_threads=runtime.workers,
        expect_fingerprint=fingerprint,
    )
    info = spec_info(spec, actors=actors, facts=(fingerprint, num_crops))
    line = f"{actors} Ray actor{'s' if actors != 1 else ''} on {device}, {{where}} ({int(cpus)} CPUs, {int(gpus)} GPUs)"
    if options.address:
        announce(line.format(where=f"Ray cluster {options.address}"))

    @contextmanager
    def start_local() -> Iterator[None]:
        with ExitStack() as inner:
            _enter_ray(inner, None)
            announce(line.format(where="local Ray instance"))
            yield

    return RayEngine(
        spec,
        info,
        actors=actors,
        restart_actors=bool(options.address),
        connect=None if options.address else start_local,
        session=session,
    )


def _enter_ray(stack: ExitStack, address: str | None) -> None:
    try:
        stack.enter_context(ray_session(address, num_cpus=usable_cpus()))
    except Exception as exc:  # Ray cannot start, or the cluster cannot be reached
        what = f"connect to Ray at {address}" if address else "start a local Ray instance"
        raise Phi3EmbedError(f"cannot {what}: {' '.join(str(exc).split())}") from None


def spec_info(spec: EncoderSpec, *, actors: int, facts: tuple[str, int] | None = None) -> EngineInfo:
    """The :class:`EngineInfo` of ``actors`` actors built from ``spec`` (device, dtypes and batch as given), with
    the checkpoint's ``(fingerprint, num_crops)`` (``facts``, else read on the driver by :func:`checkpoint_facts`)."""
    fingerprint, num_crops = facts or checkpoint_facts(spec)
    device = "cuda:0" if spec.device == "cuda" else spec.device  # what each actor sees (Ray gives it one GPU)
    return engine_info(
        spec.runtime(device),
        fingerprint=fingerprint,
        num_crops=num_crops,
        image=ImageOptions(alpha=spec.alpha, exif_transpose=spec.exif_transpose),
        stage=spec.stage,
        workers=actors,
    )


class RayEngine:
    """Ray Data as a :class:`phi3embed.jobs.core.Engine`: the sources to do become a dataset of absolute
    paths, a pool of ``actors`` :class:`RayEncoder` actors encodes them, and the rows come back to this
    process in input order as results (the output directory is only ever written by the driver, so it
    needs no locking across nodes and keeps the local engine's crash safety).

    Ray must be initialised, or ``connect()`` gives a context in which it is: it is entered only when there
    is work, so a rerun with nothing left to do starts no Ray. ``session`` (a connection :func:`plan`
    made) is closed with the engine.
    """

    def __init__(
        self,
        spec: EncoderSpec,
        info: EngineInfo,
        *,
        actors: int,
        images_per_batch: int | None = None,
        cpus_per_actor: float = 1.0,
        restart_actors: bool = True,
        connect: Callable[[], AbstractContextManager[Any]] | None = None,
        session: ExitStack | None = None,
    ) -> None:
        self.spec, self.info, self.actors = spec, info, actors
        self.images_per_batch, self.cpus_per_actor, self.restart_actors = (
            images_per_batch,
            cpus_per_actor,
            restart_actors,
        )
        self.connect = connect
        self._session = session or ExitStack()
        self._todo: Sequence[Source] = ()
        self._summary = JobSummary()

    def open(self, todo: Sequence[Source], summary: JobSummary) -> None:
        self._todo, self._summary = todo, summary
        if todo and self.connect is not None:
            self._session.enter_context(self.connect())

    def results(self, early: Callable[[Result], None]) -> Iterator[Result]:
        """Rows in input order, errors among them: ``early`` is not needed."""
        import ray.data

        todo, summary = self._todo, self._summary
        if not todo:
            return
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # input order: packs as the local engine's
        rows = [
            {PATH: os.path.abspath(s.path), LABEL: s.path, MEMBER: member_cell(s.member), "index": i}
            for i, s in enumerate(todo)
        ]
        per_batch = self.images_per_batch or default_images_per_batch(len(todo), self.actors)
        actors = min(self.actors, -(-len(todo) // per_batch))  # no actor without a batch to encode
        dataset = build_pipeline(
            ray.data.from_items(rows),
            self.spec,
            actors=actors,
            images_per_batch=per_batch,
            cpus_per_actor=self.cpus_per_actor,
            restart_actors=self.restart_actors,
        )
        for batch in summary.waited_for(dataset.iter_batches(batch_format="numpy", batch_size=None)):
            summary.preprocess_s += float(np.sum(batch["seconds"]))
            for row in decode_rows(batch):
                source = todo[row.extra["index"]]
                if row.ok and row.embedding is not None:
                    yield Result(source, row.image_facts(), embeddings=HostResult(row.embedding))
                else:
                    yield Result(source, row.image_facts(), error=row.error)

    def failure(self, exc: Exception) -> str | None:
        """The cluster or an actor failed (not a bad image: those are error records)."""
        return f"the Ray job failed: {_one_line(exc)}"

    def close(self) -> None:
        self._session.close()


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
