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

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Generic, TypeVar, cast

import torch

from phi3embed.core.batching import HostCopier, is_out_of_memory
from phi3embed.core.config import usable_cpus
from phi3embed.core.embedder import Phi3VisionEmbedder
from phi3embed.core.preprocess import Preprocessed
from phi3embed.inputs.listing import Source
from phi3embed.jobs.core import EngineInfo, JobSummary, Result
from phi3embed.jobs.prepare import Prepared, Preparer
from phi3embed.outputs.records import ImageFacts

T = TypeVar("T")
R = TypeVar("R")


#: How much nicer than the encoding process the decode workers run. When a worker and the encoder want the same
#: core, the encoder gets it: on CPU an OpenMP thread that loses its core stalls all the others at the next
#: barrier; on CUDA the encoding thread keeps the GPU fed. Workers still use every core nobody else wants.
WORKER_NICENESS = 10


def _worker_init(parent: int, niceness: int = 0) -> None:
    """In each worker: leave signals to the parent, one torch thread, ``niceness`` more than the parent,
    exit when the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    if niceness and hasattr(os, "nice"):
        with contextlib.suppress(OSError):
            os.nice(niceness)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="phi3embed-parent-watch").start()


class OrderedPool(Generic[T, R]):
    """``fn`` over ``tasks`` in worker processes; results in task order, at most ``window`` in flight.

    ``workers=0`` runs ``fn`` inline. When a worker process dies, the pool is rebuilt and the tasks that
    were in flight are rerun one at a time; the one that kills a worker again gets ``on_crash(task)``.
    Workers run ``niceness`` nicer than this process. :meth:`start` forks the workers and submits the first
    tasks: call it before starting other threads.
    """

    def __init__(
        self,
        fn: Callable[[T], R],
        *,
        workers: int,
        window: int,
        on_crash: Callable[[T], R],
        niceness: int = 0,
    ) -> None:
        self.fn, self.workers, self.window, self.on_crash = fn, workers, max(1, window), on_crash
        self.niceness = niceness
        self._executor: ProcessPoolExecutor | None = None
        self._pending: deque[tuple[T, Future[R]]] = deque()
        self._todo: Iterator[T] = iter(())
        self.restarts = 0

    def _new_executor(self) -> ProcessPoolExecutor:
        # fork on Linux: workers start at once and share the parent's imports. Elsewhere spawn (macOS lists
        # fork but its system libraries are not fork-safe); the worker then imports phi3embed itself.
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        sys.stdout.flush()  # a forked child must not inherit (and later flush) buffered output
        sys.stderr.flush()
        return ProcessPoolExecutor(
            self.workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(), self.niceness)
        )

    def _restart(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()
        self.restarts += 1

    def _fill(self) -> None:
        assert self._executor is not None
        while len(self._pending) < self.window:
            task = next(self._todo, _END)
            if task is _END:
                return
            self._pending.append((task, self._executor.submit(self.fn, task)))

    def start(self, tasks: Iterable[T]) -> None:
        self._todo = iter(tasks)
        if self.workers > 0:
            self._executor = self._new_executor()
            self._fill()

    def __iter__(self) -> Iterator[R]:
        if self.workers <= 0:
            yield from map(self.fn, self._todo)
            return
        while self._pending:
            task, future = self._pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                suspects = [task] + [t for t, _ in self._pending]
                self._pending.clear()
                self._restart()
                for suspect in suspects:
                    yield self._isolated(suspect)
                self._fill()
                continue
            yield result
            self._fill()

    def _isolated(self, task: T) -> R:
        assert self._executor is not None
        try:
            return self._executor.submit(self.fn, task).result()
        except BrokenProcessPool:
            self._restart()
            return self.on_crash(task)

    def close(self) -> None:
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


_END: Any = object()


def crashed(source: Source) -> Prepared:
    """What a source whose reading took its worker process down twice becomes."""
    return Prepared(ImageFacts(), error=f"{source.path}: the worker process reading this file crashed")


class LocalEngine:
    """The embedder in this process, fed by ``workers`` decode processes (0: inline)."""

    def __init__(
        self,
        embedder: Phi3VisionEmbedder,
        *,
        stored_dtype: torch.dtype | None = None,
        workers: int = 1,
        prefetch: int | None = None,
    ) -> None:
        self.embedder, self.workers = embedder, workers
        options = embedder.image_options
        self.info = EngineInfo(
            fingerprint=embedder.fingerprint,
            num_crops=embedder.num_crops,
            compute_dtype=embedder.dtype,
            stored_dtype=stored_dtype or embedder.dtype,
            device=str(embedder.device),
            batch_size=embedder.batch_size,
            workers=workers,
            alpha=options.alpha,
            exif_transpose=options.exif_transpose,
            stage=embedder.stage,
        )
        preparer = Preparer(embedder.preprocess_config, alpha=options.alpha, exif_transpose=options.exif_transpose)
        self.pool: OrderedPool[Source, Prepared] = OrderedPool(
            preparer,
            workers=workers,
            window=prefetch or 2 * max(workers, 1) + 2,
            on_crash=crashed,
            niceness=WORKER_NICENESS,
        )
        self._todo: Sequence[Source] = ()
        self._summary = JobSummary()
        self._threads_before: int | None = None
        self._usage_start = (0.0, 0)

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

        def feed() -> Iterator[tuple[tuple[Source, ImageFacts], Preprocessed]]:
            for source, p in zip(self._todo, summary.waited_for(self.pool), strict=False):
                summary.preprocess_s += p.seconds
                if p.item is None:  # written now: the encoder may hold earlier images for a while
                    early(Result(source, p.facts, error=p.error))
                    continue
                yield (source, p.facts), p.item

        for key, _item, embeddings in self.embedder.embed_stream(feed(), times=summary.stages):
            source, facts = cast(tuple[Source, ImageFacts], key)
            t0 = time.perf_counter()
            host = copier.start(embeddings, self.info.stored_dtype)
            summary.to_host_s += time.perf_counter() - t0
            yield Result(source, facts, embeddings=host)

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
