"""Ray Data engine, the driver's side: the actor pool pipeline, the Ray session, and the job as
``phi3embed encode --engine ray`` runs it.

:func:`build_pipeline` maps a dataset of input rows (:mod:`phi3embed.jobs.ray_rows`) over a fixed pool of
:class:`~phi3embed.jobs.ray_actor.RayEncoder` actors; :func:`ray_session` connects to a cluster or starts a
private local instance. :class:`RayEngine` is the :class:`phi3embed.jobs.core.Engine` that
``phi3embed encode --engine ray`` runs through :func:`phi3embed.jobs.core.run_job`; :func:`plan` sizes it
(device, actors, the checkpoint's fingerprint hashed on the driver) from the job's
:class:`~phi3embed.jobs.runtime.EngineOptions`, under the one runtime policy.

The actor (:class:`EncoderSpec`, :class:`RayEncoder`) and the row format (:func:`decode_rows`, the column
names...) live in their own modules and are importable from here too, as README's example does.

Nothing here imports ``ray`` at module import time: :func:`build_pipeline` / :func:`ray_session` import it
when called.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from phi3embed.core.batching import HostResult
from phi3embed.core.checkpoint import resolve
from phi3embed.core.config import parse_configs, usable_cpus
from phi3embed.core.embedder import ImageOptions
from phi3embed.core.model import Phi3VisionModel
from phi3embed.core.vectors import parse_vectors
from phi3embed.errors import Phi3EmbedError
from phi3embed.inputs.listing import Source
from phi3embed.jobs.core import EngineInfo, JobSummary, Result
from phi3embed.jobs.ray_actor import EncoderSpec, RayEncoder
from phi3embed.jobs.ray_rows import (
    BYTES,
    LABEL,
    MEMBER,
    PATH,
    RESULT_COLUMNS,
    UNKNOWN,
    EncodedImage,
    decode_rows,
    embedding_bytes,
    embedding_from_bytes,
    source_row_blocks,
)
from phi3embed.jobs.runtime import EngineOptions, decide, engine_info
from phi3embed.outputs.formats import dtype_name
from phi3embed.outputs.records import NO_STAGE

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

__all__ = [  # the actor and the row format are used from here (README), beside the driver's own names
    "BYTES",
    "LABEL",
    "MEMBER",
    "PATH",
    "RESULT_COLUMNS",
    "UNKNOWN",
    "EncodedImage",
    "EncoderSpec",
    "RayEncoder",
    "RayEngine",
    "build_pipeline",
    "checkpoint_facts",
    "decode_rows",
    "embedding_bytes",
    "embedding_from_bytes",
    "plan",
    "ray_session",
    "spec_info",
]


def checkpoint_facts(spec: EncoderSpec) -> tuple[str, int]:
    """``(fingerprint, num_crops)`` the actors will have, computed on the driver without building the model
    (the vision tensors are read and hashed one at a time, then dropped: no GPU, little memory)."""
    ckpt = resolve(spec.model, revision=spec.revision)
    vcfg, pcfg = parse_configs(ckpt.config, ckpt.preprocessor_config, where=str(ckpt.root / "config.json"))
    _, fingerprint = Phi3VisionModel.from_checkpoint(ckpt, vcfg, device="meta")
    return fingerprint, spec.num_crops or pcfg.num_crops


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


#: Input blocks of a job: about as many as Ray Data's own ``from_items`` makes (its ``read_op_min_num_blocks``
#: default), each at least one actor call and at most MAX_BLOCK_ROWS rows.
INPUT_BLOCKS = 200
MAX_BLOCK_ROWS = 10_000


def rows_per_block(todo: int, images_per_batch: int) -> int:
    """Rows per input block for ``todo`` images: a short job gets a block per actor call (each call can go to
    another actor, as ``from_items`` spreads a short list one row per block), a long one blocks of at most
    :data:`MAX_BLOCK_ROWS` (the driver builds one at a time)."""
    return max(images_per_batch, min(MAX_BLOCK_ROWS, -(-todo // INPUT_BLOCKS)))


def input_dataset(sources: Iterable[Source], *, rows_per_block: int) -> ray.data.Dataset:
    """The dataset of the input rows of ``sources`` (:func:`phi3embed.jobs.ray_rows.source_row`), built a block at
    a time as ``sources`` is read: each block is converted as ``ray.data.from_items`` converts its rows, put in
    the object store and dropped. The driver keeps an object reference per block, never a row per image (a
    ``from_items`` list would hold a dict and an absolute path per image for the whole job)."""
    import pyarrow
    import ray
    import ray.data
    from ray.data._internal.delegating_block_builder import DelegatingBlockBuilder
    from ray.data.block import BlockAccessor

    refs: list[Any] = []
    for rows in source_row_blocks(sources, rows_per_block):
        builder = DelegatingBlockBuilder()
        for row in rows:
            builder.add(row)
        block = builder.build()
        if not isinstance(block, pyarrow.Table):  # a Ray that fell back to pandas for some cell
            block = BlockAccessor.for_block(block).to_arrow()
        refs.append(ray.put(block))
        del rows, builder, block
    return ray.data.from_arrow_refs(refs)


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
        vectors=parse_vectors(options.vectors) if options.vectors else (),
        store_tokens=options.store_tokens,
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
        stage=spec.stage if spec.store_tokens or not spec.vectors else NO_STAGE,
        vectors=parse_vectors(spec.vectors) if spec.vectors else (),
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
        per_batch = self.images_per_batch or default_images_per_batch(len(todo), self.actors)
        actors = min(self.actors, -(-len(todo) // per_batch))  # no actor without a batch to encode
        dataset = build_pipeline(
            input_dataset(todo, rows_per_block=rows_per_block(len(todo), per_batch)),
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
                embeddings = HostResult(row.embedding) if row.embedding is not None else None
                vectors = {k: HostResult(v) for k, v in row.vectors.items()} if row.vectors else None
                if row.ok and (embeddings is not None or vectors is not None):
                    yield Result(source, row.image_facts(), embeddings=embeddings, vectors=vectors)
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
