"""The local engine: worker processes read and tile, this process encodes (docs/pipeline.md).

::

    sources --(worker processes: Preparer: read, sha256, decode, HD tiling)--> Prepared, in input order, bounded
            --(job's thread: Phi3VisionEmbedder.embed_stream, crops of many images per forward)--> [T, D]
            --(side stream on CUDA: device -> page-locked host memory, overlapping the next batches)--> Result

:class:`LocalEngine` is one :class:`phi3embed.jobs.core.Engine`; :func:`phi3embed.jobs.core.run_job` writes its
results. Memory stays flat however many images there are: at most ``prefetch`` prepared images wait for the
encoder. A worker process that dies (a crashing decoder) is replaced, and the images it may have been reading
are retried one at a time so that only the culprit is recorded as failed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import torch

from phi3embed.core.batching import HostCopier, is_out_of_memory
from phi3embed.core.checkpoint import resolve
from phi3embed.core.config import usable_cpus
from phi3embed.core.embedder import Phi3VisionEmbedder, resolve_device
from phi3embed.core.preprocess import Preprocessed
from phi3embed.core.vectors import parse_vectors
from phi3embed.inputs.listing import Source
from phi3embed.jobs.core import JobSummary, Result
from phi3embed.jobs.dedup import Duplicates, Held
from phi3embed.jobs.pool import OrderedPool
from phi3embed.jobs.prepare import Prepared, Preparer
from phi3embed.jobs.runtime import DEFAULT_IMAGE_TIMEOUT, EngineOptions, Runtime, decide, engine_info, load_embedder
from phi3embed.outputs.records import NO_STAGE, ImageFacts

#: How much nicer than the encoding process the decode workers run. When a worker and the encoder want the same
#: core, the encoder gets it: on CPU an OpenMP thread that loses its core stalls all the others at the next
#: barrier; on CUDA the encoding thread keeps the GPU fed. Workers still use every core nobody else wants.
WORKER_NICENESS = 10


def crashed(source: Source) -> Prepared:
    """What a source whose reading took its worker process down twice becomes."""
    return Prepared(ImageFacts(), error=f"{source.label}: the worker process reading this file crashed (twice)")


def timed_out(source: Source, *, seconds: float) -> Prepared:
    """What a source becomes when reading and decoding it took longer than ``seconds`` (its worker was killed)."""
    return Prepared(
        ImageFacts(),
        error=f"{source.label}: reading and decoding took longer than the image timeout ({seconds:g} s); stopped",
    )


class LocalEngine:
    """The embedder in this process, fed by ``workers`` decode processes (0: inline).

    ``image_timeout`` (seconds; None or 0: no limit) bounds reading and decoding one image: a worker past it is
    killed and replaced, the image gets an error record. Only a process can be stopped that way (a thread
    stuck in a read or in a decoder's C code can be neither interrupted nor killed, and a segfault in it
    would end the job), so with ``workers=0`` and a timeout the images are read in ONE helper process: what
    runs inline is then only the hand-over, and the encoder keeps every thread (RESULTS.md measures the cost).
    """

    def __init__(
        self,
        embedder: Phi3VisionEmbedder,
        *,
        stored_dtype: torch.dtype | None = None,
        workers: int = 1,
        prefetch: int | None = None,
        image_timeout: float | None = None,
        vectors: Sequence[str] = (),
        store_tokens: bool = True,
        compile_note: str | None = None,
    ) -> None:
        self.embedder, self.workers = embedder, workers
        self.vectors = parse_vectors(vectors) if vectors else ()  # and store_tokens False: --stage none
        processes = workers if workers > 0 or not image_timeout else 1
        options = embedder.image_options
        runtime = Runtime(
            device=str(embedder.device),
            compute_dtype=embedder.dtype,
            stored_dtype=stored_dtype or embedder.dtype,
            batch_size=embedder.batch_size,
            workers=workers,
        )
        self.info = engine_info(
            runtime,
            fingerprint=embedder.fingerprint,
            num_crops=embedder.num_crops,
            image=options,
            stage=embedder.stage if store_tokens or not self.vectors else NO_STAGE,
            vectors=self.vectors,
            workers=workers,
            compile_note=compile_note,
        )
        preparer = Preparer(embedder.preprocess_config, alpha=options.alpha, exif_transpose=options.exif_transpose)
        self.pool: OrderedPool[Source, Prepared] = OrderedPool(
            preparer,
            workers=processes,
            window=prefetch or 2 * max(workers, 1) + 2,
            on_crash=crashed,
            niceness=WORKER_NICENESS,
            timeout=image_timeout,
            on_timeout=functools.partial(timed_out, seconds=image_timeout or 0),
        )
        self._todo: Sequence[Source] = ()
        self._summary = JobSummary()
        self._threads_before: int | None = None
        self._usage_start = (0.0, 0)
        self.duplicates: Duplicates | None = None

    def skip_duplicates(self, duplicates: Duplicates) -> None:
        """Images whose bytes ``duplicates`` already knows are not encoded (core.SkipsDuplicates)."""
        self.duplicates = duplicates

    def open(self, todo: Sequence[Source], summary: JobSummary) -> None:
        self._todo, self._summary = todo, summary
        self._threads_before = torch.get_num_threads()
        cpus = usable_cpus()
        torch.set_num_threads(encoder_threads(self.embedder.device.type, self._threads_before, self.workers, cpus))
        self._usage_start = thread_usage()
        self.pool.start(todo)  # forks the workers

    def results(self, early: Callable[[Result], None]) -> Iterator[Result]:
        summary = self._summary
        copier = HostCopier(self.embedder.device)  # results leave the device off the compute stream
        duplicates, held = self.duplicates, Held[Result]()  # duplicates skip the encoder, and keep their place in order

        def feed() -> Iterator[tuple[tuple[Source, ImageFacts], Preprocessed]]:
            for source, p in zip(self._todo, summary.waited_for(self.pool), strict=False):
                summary.preprocess_s += p.seconds
                if p.item is None:  # written now: the encoder may hold earlier images for a while
                    early(Result(source, p.facts, error=p.error))
                    continue
                duplicate = duplicates.find(source.name, p.facts.sha256) if duplicates is not None else None
                if duplicate is not None:
                    held.hold(Result(source, p.facts, duplicate=duplicate))
                    continue
                held.fed()
                yield (source, p.facts), p.item

        for key, embeddings, vectors in self._encoded(feed()):
            source, facts = cast(tuple[Source, ImageFacts], key)
            t0 = time.perf_counter()
            host = copier.start(embeddings, self.info.stored_dtype) if embeddings is not None else None
            on_host = {k: copier.start(v, torch.float32) for k, v in vectors.items()} if self.vectors else None
            summary.to_host_s += time.perf_counter() - t0
            yield Result(source, facts, embeddings=host, vectors=on_host)
            yield from held.release()
        yield from held.release(end=True)

    def _encoded(
        self, items: Iterator[tuple[tuple[Source, ImageFacts], Preprocessed]]
    ) -> Iterator[tuple[object, torch.Tensor | None, Mapping[str, torch.Tensor]]]:
        """``(key, embeddings, vectors)`` per image: the embedder's stream, with vectors when asked for."""
        times = self._summary.stages
        if not self.vectors:
            for key, _, tokens in self.embedder.embed_stream(items, times=times):
                yield key, tokens, {}
            return
        stage = None if self.info.stage == NO_STAGE else "default"
        for key, _, embeddings, vectors in self.embedder.embed_vectors_stream(
            items, kinds=self.vectors, stage=stage, times=times
        ):
            yield key, embeddings, cast(Mapping[str, torch.Tensor], vectors)

    def failure(self, exc: Exception) -> str | None:
        if not out_of_memory(exc):
            return None
        batch = self.embedder.batch_size
        return (
            f"out of memory on {self.embedder.device} with --batch-size {batch}: "
            f"try a smaller --batch-size (e.g. {max(1, batch // 2)})"
        )

    def close(self) -> None:
        self.pool.close()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
            cpu_end, switches_end = thread_usage()
            cpu_start, switches_start = self._usage_start
            self._summary.encoder_cpu_s = cpu_end - cpu_start
            self._summary.encoder_preempted = switches_end - switches_start
            self._summary.worker_restarts = self.pool.restarts


def plan(options: EngineOptions, *, loading: Callable[[], AbstractContextManager[Any]] | None = None) -> LocalEngine:
    """``encode`` in this process: the device ``options`` name (auto: CUDA when there is one), the rest by the
    runtime policy (:func:`phi3embed.jobs.runtime.decide`), the weights loaded here (inside ``loading``, once
    the checkpoint is found: a wrong model is reported before transformers is even imported), the image
    timeout :data:`~phi3embed.jobs.runtime.DEFAULT_IMAGE_TIMEOUT` unless given (0: none)."""
    checkpoint_dir = str(resolve(options.model, revision=options.revision).root)
    runtime = decide(str(resolve_device(options.device)), options)
    with loading() if loading is not None else nullcontext():
        embedder = load_embedder(
            checkpoint_dir,
            runtime,
            num_crops=options.num_crops,
            alpha=options.alpha,
            exif_transpose=options.exif_transpose,
            stage=options.stage,
            compile=options.compile,
        )
        compiled = embedder.compile_now() if options.compile else None
    timeout = DEFAULT_IMAGE_TIMEOUT if options.image_timeout is None else options.image_timeout
    return LocalEngine(
        embedder,
        stored_dtype=runtime.stored_dtype,
        workers=runtime.workers,
        image_timeout=timeout or None,
        vectors=options.vectors,
        store_tokens=options.store_tokens,
        compile_note=compiled.line() if compiled is not None else None,
    )


def encoder_threads(device_type: str, threads: int, workers: int, cpus: int) -> int:
    """torch threads for the encoding process of a job with ``workers`` decode workers on ``cpus`` cores.

    CUDA: workers are busy all the time feeding the GPU, and this process's threads only do host copies, so
    threads + workers never outnumber the cores (a pool of spinning OpenMP threads beside them would take
    cores the decoders need). CPU: all of them. A real-size image takes ~50 s to encode here and ~0.17 s to
    decode, so workers are idle almost all the time, and they run nicer (:data:`WORKER_NICENESS`); giving up
    a thread per worker made each image 1.6-1.9x slower on the 2-core host with 1 worker (RESULTS.md).
    """
    if device_type == "cpu" or workers <= 0:
        return threads
    return max(1, min(threads, cpus - workers))


def thread_usage() -> tuple[float, int]:
    """CPU seconds and involuntary context switches of the calling thread so far.

    Many switches mean other threads or processes (decode workers) took the core it was ready to run on.
    Where the platform has no per-thread figures: the process's CPU time and 0.
    """
    try:
        import resource  # not on Windows
    except ImportError:  # pragma: no cover
        return time.process_time(), 0
    if not hasattr(resource, "RUSAGE_THREAD"):  # pragma: no cover - macOS
        return time.process_time(), 0
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return ru.ru_utime + ru.ru_stime, ru.ru_nivcsw


def out_of_memory(exc: BaseException) -> bool:
    """What ends a job as out of memory: a device allocation failure (pipeline.is_out_of_memory), any
    MemoryError (DeviceOutOfMemoryError is one), or a RuntimeError saying "out of memory"."""
    return (
        is_out_of_memory(exc)
        or isinstance(exc, MemoryError)
        or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())
    )
