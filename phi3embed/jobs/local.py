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
import functools
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar, cast

import torch

from phi3embed.core.batching import HostCopier, is_out_of_memory
from phi3embed.core.config import usable_cpus
from phi3embed.core.embedder import Phi3VisionEmbedder
from phi3embed.core.preprocess import Preprocessed
from phi3embed.core.vectors import parse_vectors
from phi3embed.inputs.listing import Source
from phi3embed.jobs.core import EngineInfo, JobSummary, Result
from phi3embed.jobs.dedup import Duplicates, Held
from phi3embed.jobs.prepare import Prepared, Preparer
from phi3embed.outputs.records import NO_STAGE, ImageFacts

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
    """``fn`` over ``tasks`` in worker processes; results in task order, at most ``window`` taken ahead.

    Each worker runs one task at a time, so the pool knows which task a worker holds and since when:

    * a worker still on its task ``timeout`` seconds after receiving it is killed and replaced; the task gets
      ``on_timeout(task)`` (a stuck read or a decoder in an endless loop: killing the process is the only
      way to stop either);
    * a worker that dies (a crashing decoder, the OOM killer) is replaced and its task run once more; a task
      that takes a second worker down gets ``on_crash(task)``. Tasks in other workers are not disturbed.

    ``workers=0`` runs ``fn`` inline (no timeout there: see :class:`LocalEngine` for how the CLI keeps its
    promise). Workers run ``niceness`` nicer than this process. :meth:`start` forks the workers and hands out
    the first tasks: call it before starting other threads.
    """

    def __init__(
        self,
        fn: Callable[[T], R],
        *,
        workers: int,
        window: int,
        on_crash: Callable[[T], R],
        niceness: int = 0,
        timeout: float | None = None,
        on_timeout: Callable[[T], R] | None = None,
    ) -> None:
        self.fn, self.workers, self.window, self.on_crash = fn, workers, max(1, window, workers), on_crash
        self.niceness, self.timeout = niceness, timeout if timeout and timeout > 0 else None
        self.on_timeout = on_timeout or on_crash
        self._ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self._idle: list[_Worker[T, R]] = []
        self._busy: list[_Worker[T, R]] = []
        self._todo: Iterator[T] = iter(())
        self._retry: deque[tuple[int, T]] = deque()  # tasks whose worker died, run once more first
        self._taken = 0  # tasks taken from ``tasks`` so far (the next one's index)
        self._yielded = 0  # results yielded so far (the next one's index)
        self._done: dict[int, R] = {}  # results waiting for the ones before them
        self.restarts = 0
        self.timeouts = 0

    def start(self, tasks: Iterable[T]) -> None:
        self._todo = iter(tasks)
        if self.workers > 0:
            # fork on Linux: workers start at once and share the parent's imports. Elsewhere spawn (macOS lists
            # fork but its system libraries are not fork-safe); the worker then imports phi3embed itself.
            sys.stdout.flush()  # a forked child must not inherit (and later flush) buffered output
            sys.stderr.flush()
            self._idle = [_Worker(self._ctx, self.fn, self.niceness) for _ in range(self.workers)]
            self._hand_out()

    def __iter__(self) -> Iterator[R]:
        if self.workers <= 0:
            yield from map(self.fn, self._todo)
            return
        while True:
            if self._yielded in self._done:
                result = self._done.pop(self._yielded)
                self._yielded += 1
                self._hand_out()
                yield result
                continue
            if not self._busy:
                return  # nothing running, nothing waiting: every task was yielded
            self._wait()

    def _hand_out(self) -> None:
        """Give idle workers the next tasks: retries first, then new ones while fewer than ``window`` are
        taken and not yet yielded."""
        while self._idle:
            attempt = 1 if self._retry else 0
            if self._retry:
                index, task = self._retry.popleft()
            elif self._taken - self._yielded < self.window:
                task = next(self._todo, _END)
                if task is _END:
                    return
                index, self._taken = self._taken, self._taken + 1
            else:
                return
            worker = self._idle.pop()
            worker.give(index, task, attempt=attempt)
            self._busy.append(worker)

    def _wait(self) -> None:
        """Block until a worker finishes, dies, or passes its deadline; deal with each."""
        now = time.monotonic()
        deadline = min((w.started + self.timeout for w in self._busy), default=None) if self.timeout else None
        ready = set(wait_any(self._busy, None if deadline is None else max(0.0, deadline - now)))
        for worker in list(self._busy):
            if worker in ready:
                outcome = worker.receive()
                if outcome is not None:
                    self._done[worker.index] = outcome[0]
                    self._busy.remove(worker)
                    self._idle.append(worker)
                    continue
                self._replace(worker)  # died with its task
                if worker.attempt == 0:
                    self._retry.appendleft((worker.index, worker.task))
                else:
                    self._done[worker.index] = self.on_crash(worker.task)
            elif self.timeout is not None and time.monotonic() - worker.started >= self.timeout:
                self._replace(worker)
                self.timeouts += 1
                self._done[worker.index] = self.on_timeout(worker.task)
        self._hand_out()

    def _replace(self, worker: _Worker[T, R]) -> None:
        worker.stop()
        self._busy.remove(worker)
        self._idle.append(_Worker(self._ctx, self.fn, self.niceness))
        self.restarts += 1

    def close(self) -> None:
        for worker in self._idle + self._busy:
            worker.stop(gently=worker in self._idle)
        self._idle, self._busy = [], []
        self._retry.clear()
        self._done.clear()


_END: Any = object()


class _Worker(Generic[T, R]):
    """One worker process, fed one task at a time through a pipe."""

    def __init__(self, ctx: Any, fn: Callable[[T], R], niceness: int) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(fn, child, os.getpid(), niceness), daemon=True, name="phi3embed-reader"
        )
        self.process.start()
        child.close()  # the child holds the only other end: its death is an EOF here
        self.index, self.task, self.attempt, self.started = -1, cast(T, None), 0, 0.0

    def give(self, index: int, task: T, *, attempt: int) -> None:
        self.index, self.task, self.attempt, self.started = index, task, attempt, time.monotonic()
        self.conn.send(task)

    def receive(self) -> tuple[R] | None:
        """The task's result (re-raising what ``fn`` raised), or None when the process died."""
        try:
            ok, value = self.conn.recv()
        except (EOFError, OSError):
            return None
        if not ok:
            raise value
        return (value,)

    def stop(self, *, gently: bool = False) -> None:
        """End the process: asked to exit when idle, else killed (a stuck worker cannot be asked). A process
        that even SIGKILL does not end at once (a read stuck in the kernel) is left behind, not waited for."""
        with contextlib.suppress(OSError):
            if gently:
                self.conn.send(None)
        if not gently:
            self.process.kill()
        self.process.join(5 if gently else 1)
        if self.process.is_alive():
            self.process.kill()
        self.conn.close()


def _worker_main(fn: Callable[[T], R], conn: Any, parent: int, niceness: int) -> None:
    _worker_init(parent, niceness)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            reply: tuple[bool, Any] = (True, fn(task))
        except Exception as exc:
            reply = (False, exc)
        conn.send(reply)


def wait_any(workers: Sequence[_Worker[Any, Any]], timeout: float | None) -> list[_Worker[Any, Any]]:
    """The workers with a reply to read or that died, waiting at most ``timeout`` seconds (None: no limit)."""
    by_handle: dict[Any, _Worker[Any, Any]] = {}
    for w in workers:
        by_handle[w.conn] = w
        by_handle[w.process.sentinel] = w
    ready = multiprocessing.connection.wait(list(by_handle), timeout)
    return list(dict.fromkeys(by_handle[h] for h in ready))


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
    ) -> None:
        self.embedder, self.workers = embedder, workers
        self.vectors = parse_vectors(vectors) if vectors else ()  # and store_tokens False: --stage none
        processes = workers if workers > 0 or not image_timeout else 1
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
            stage=embedder.stage if store_tokens or not self.vectors else NO_STAGE,
            vectors=self.vectors,
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
