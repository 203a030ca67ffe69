"""The local engine of ``phi3embed encode``: workers read and tile, the main thread encodes, a thread writes.

::

    sources --(worker processes: read, sha256, decode, HD tiling)--> Prepared, in input order, bounded
            --(main thread: Phi3VisionEmbedder.embed_stream, crops of many images per forward)--> [T, D]
            --(side stream on CUDA: device -> page-locked host memory, overlapping the next batches)
            --(writer thread, bounded queue: OutputStore.write / write_error)--> DIR

Memory stays flat however many images there are: at most ``prefetch`` prepared images wait for the
encoder and ``writer_queue`` finished ones wait for the writer. Bad images never stop the job: every
failure becomes an error record. A worker process that dies (a crashing decoder) is replaced, and the
images it may have been reading are retried one at a time so that only the culprit is recorded as failed.

SIGINT and SIGTERM stop the job cleanly: images already encoded are written, a partial pack shard is
written, the manifest is synced; ``JobSummary.interrupted`` names the signal. A second signal exits at once
(outputs stay consistent: every file is renamed into place whole).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar, cast

import torch
from PIL import Image

from phi3embed.core.batching import HostCopier, StageTimes, is_out_of_memory
from phi3embed.core.config import PreprocessConfig, usable_cpus
from phi3embed.core.embedder import Phi3VisionEmbedder
from phi3embed.core.preprocess import AlphaMode, Preprocessed, preprocess_image
from phi3embed.errors import ImageError, Phi3EmbedError, UnsupportedImageError
from phi3embed.inputs.listing import Source
from phi3embed.outputs.store import ImageFacts, OutputError, OutputStore

T = TypeVar("T")
R = TypeVar("R")


class JobError(Phi3EmbedError):
    """The job cannot go on (out of memory, output directory failing). Finished outputs are kept."""


# --------------------------------------------------------------------------- stage 1: read and tile


@dataclass
class Prepared:
    """One source after reading: ``item`` for the encoder, or ``error`` (one line)."""

    source: Source
    facts: ImageFacts
    item: Preprocessed | None = None
    error: str | None = None
    seconds: float = 0.0  # CPU time spent reading and tiling


def read_source(path: str | os.PathLike[str], *, label: str | None = None) -> tuple[bytes, int]:
    """The file's bytes and modification time; failures are the one-line ImageErrors ``open_image`` gives,
    naming the file ``label`` (default: ``path``). Both engines read their sources through it."""
    path = os.fspath(path)
    label = label or path
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            return fh.read(), st.st_mtime_ns
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file", path=label) from None
    except FileNotFoundError:
        raise ImageError("broken symbolic link" if os.path.islink(path) else "file not found", path=label) from None
    except PermissionError:
        raise ImageError("permission denied", path=label) from None
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}", path=label) from None


@dataclass(frozen=True)
class Preparer:
    """Callable run in the worker processes: Source -> Prepared. Never raises for a bad image."""

    config: PreprocessConfig
    alpha: AlphaMode = "drop"
    exif_transpose: bool = False

    def __call__(self, source: Source) -> Prepared:
        start = time.thread_time()  # CPU time: wall time would count waiting for a busy core
        data, facts = b"", ImageFacts()
        try:
            data, mtime_ns = read_source(source.path)
            facts = ImageFacts(sha256=hashlib.sha256(data).hexdigest(), size=len(data), mtime_ns=mtime_ns)
            item = preprocess_image(
                data, self.config, alpha=self.alpha, exif_transpose=self.exif_transpose, name=source.path
            )
        except ImageError as exc:
            if isinstance(exc, UnsupportedImageError):  # decoded fine: its size explains the failure
                width, height = header_size(data)
                facts = replace(facts, width=width, height=height)
            return Prepared(source, facts, error=str(exc), seconds=time.thread_time() - start)
        except Exception as exc:  # a decoder bug must not stop the job either
            error = " ".join(f"{source.path}: unexpected {type(exc).__name__} while reading: {exc}".split())
            return Prepared(source, facts, error=error, seconds=time.thread_time() - start)
        grid = item.grid
        facts = replace(
            facts,
            width=grid.width,
            height=grid.height,
            image_sizes=grid.image_sizes,
            crops=(grid.rows, grid.cols),
            num_tokens=item.num_tokens,
        )
        return Prepared(source, facts, item=item, seconds=time.thread_time() - start)


def header_size(data: bytes) -> tuple[int | None, int | None]:
    """Width and height from the image header (None, None when there is none), for an image that decodes
    but cannot be tiled: its size explains the failure."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width, img.height
    except Exception:
        return None, None


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


def _crashed(source: Source) -> Prepared:
    return Prepared(source, ImageFacts(), error=f"{source.path}: the worker process reading this file crashed")


# --------------------------------------------------------------------------- stage 3: write


class Reporter(Protocol):
    """What the job tells people about (implemented by phi3embed.cli.progress)."""

    def start(self, *, total: int, skipped: int) -> None: ...

    def advance(self, record: dict[str, Any]) -> None: ...  # from the writer thread

    def stop(self) -> None: ...


class Writer(threading.Thread):
    """Drains a bounded queue into the store, in order, and calls ``on_record`` after each record.

    Per-image files are written by ``file_threads`` threads at once (:meth:`OutputStore.write_file`: every
    file is fsynced, and a disk takes several at a time faster than one after another); this thread commits
    their records to the manifest in input order. A failure (OutputError: disk full...) stops writing; the
    main thread re-raises it at its next put. Files already being written are finished before the thread ends.
    """

    def __init__(
        self, store: OutputStore, on_record: Callable[[dict[str, Any]], None], maxsize: int, file_threads: int = 4
    ) -> None:
        super().__init__(name="phi3embed-writer", daemon=True)
        self.store, self.on_record = store, on_record
        self.queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize)
        self.error: BaseException | None = None
        self.busy = 0.0
        self.put_wait = 0.0
        concurrent = file_threads > 1 and store.concurrent_files
        self.files = ThreadPoolExecutor(file_threads, thread_name_prefix="phi3embed-file") if concurrent else None
        self.in_flight_limit = 2 * file_threads
        self._in_flight: deque[Future[dict[str, Any]] | tuple[Any, ...]] = deque()  # input order

    def put(self, item: tuple[Any, ...]) -> None:
        start = time.perf_counter()
        self.queue.put(item)
        self.put_wait += time.perf_counter() - start
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining so that the producer never blocks
            start = time.perf_counter()
            try:
                self._take(item)
                self._commit(keep=self.in_flight_limit)
            except BaseException as exc:
                self.error = exc
            self.busy += time.perf_counter() - start
        try:
            if self.error is None:
                self._commit(keep=0)
        except BaseException as exc:
            self.error = exc
        finally:
            if self.files is not None:
                self.files.shutdown(wait=True)  # the store closes after this: no file is left half-written

    def _take(self, item: tuple[Any, ...]) -> None:
        kind, source, facts, payload = item
        if kind != "ok":
            self._in_flight.append(item)  # committed in turn by _commit
        elif self.files is not None:
            self._in_flight.append(self.files.submit(lambda: self.store.write_file(source, facts, payload.wait())))
        else:  # one file at a time, or packed shards (their records are appended with the shard)
            self.on_record(self.store.write(source, facts, payload.wait()))  # HostResult: copy finished

    def _commit(self, *, keep: int) -> None:
        """Commit finished records in input order; wait for the oldest while more than ``keep`` are pending."""
        while self._in_flight:
            head = self._in_flight[0]
            if isinstance(head, Future) and not head.done() and len(self._in_flight) <= keep:
                return
            self._in_flight.popleft()
            if isinstance(head, Future):
                record = self.store.commit(head.result())
            else:
                _, source, facts, error = head
                record = self.store.write_error(source, error, facts)
            self.on_record(record)

    def finish(self) -> None:
        self.queue.put(None)
        self.join()

    def account(self, summary: JobSummary) -> None:
        """After the job (and :meth:`finish`): the writer's times into ``summary``, and its failure as
        ``summary.fatal`` when it is an output failure the job did not already end on; any other failure is
        a bug and is raised."""
        summary.write_s, summary.wait_writer_s = self.busy, self.put_wait
        if self.error is not None and summary.fatal is None:
            if not isinstance(self.error, OutputError):
                raise self.error
            summary.fatal = str(self.error)


# --------------------------------------------------------------------------- the job


@dataclass
class JobSummary:
    listed: int = 0
    skipped: int = 0  # already done (resume)
    ok: int = 0
    failed: int = 0
    tokens: int = 0
    wall_s: float = 0.0  # from the first image to the last write
    wait_input_s: float = 0.0  # encoder waiting for workers
    wait_writer_s: float = 0.0  # encoder waiting for the writer
    preprocess_s: float = 0.0  # CPU time, summed over workers
    write_s: float = 0.0
    stages: StageTimes = field(default_factory=StageTimes)  # the encoding thread's own work, by stage
    to_host_s: float = 0.0  # encoding thread: starting each result's copy to the host
    encoder_cpu_s: float = 0.0  # CPU time of the encoding thread (Linux; the process's elsewhere)
    encoder_preempted: int = 0  # involuntary context switches of the encoding thread: it wanted a core
    worker_restarts: int = 0
    interrupted: str | None = None  # "SIGINT" / "SIGTERM"
    fatal: str | None = None
    errors: list[str] = field(default_factory=list)  # the first few error lines

    @property
    def todo(self) -> int:
        return self.listed - self.skipped

    def waited_for(self, inputs: Iterable[T]) -> Iterator[T]:
        """``inputs`` one by one, adding the time spent waiting for each to ``wait_input_s``."""
        it = iter(inputs)
        while True:
            start = time.perf_counter()
            item = next(it, _END)
            self.wait_input_s += time.perf_counter() - start
            if item is _END:
                return
            yield item

    def stopped(self, exc: BaseException) -> None:
        """Record how one of :data:`STOPS` ended the job early: a signal (``interrupted``: ``SIGINT`` for
        Ctrl-C) or a failing output directory (``fatal``)."""
        if isinstance(exc, OutputError):
            self.fatal = str(exc)
        else:
            self.interrupted = exc.signame if isinstance(exc, JobStop) else "SIGINT"

    def count(self, record: dict[str, Any], *, reporter: Reporter | None = None, keep_errors: int = 5) -> None:
        """Add one written manifest record to the totals (keeping the first ``keep_errors`` error lines) and
        tell ``reporter``. Both engines call it once per record, in the order the records were written."""
        if record["status"] == "ok":
            self.ok += 1
            self.tokens += record["num_tokens"] or 0
        else:
            self.failed += 1
            if len(self.errors) < keep_errors:
                self.errors.append(record["error"])
        if reporter is not None:
            reporter.advance(record)


class JobStop(BaseException):
    """Raised in the job's thread by SIGINT / SIGTERM while :class:`StopSignals` is installed."""

    def __init__(self, signame: str) -> None:
        self.signame = signame


#: What ends a job early but cleanly, in both engines (:meth:`JobSummary.stopped` records which).
STOPS = (JobStop, KeyboardInterrupt, OutputError)


class StopSignals:
    """How both engines take SIGINT and SIGTERM: installed (main thread only), they raise :class:`JobStop`;
    :meth:`exit_at_once` (when the job cleans up) makes a second signal exit the process at once, which
    leaves the outputs whole (every file is renamed into place whole); :meth:`restore` puts back the
    previous handlers."""

    def __init__(self) -> None:
        in_main = threading.current_thread() is threading.main_thread()
        sigs = (signal.SIGINT, signal.SIGTERM)
        self.previous = {sig: signal.signal(sig, self._stop) for sig in sigs} if in_main else {}

    @staticmethod
    def _stop(signum: int, frame: object) -> None:
        raise JobStop(signal.Signals(signum).name)

    def exit_at_once(self) -> None:
        for sig in self.previous:
            signal.signal(sig, lambda signum, frame: os._exit(128 + signum))

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


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


def _out_of_memory(exc: BaseException) -> bool:
    """What ends a job as out of memory: a device allocation failure (pipeline.is_out_of_memory), any
    MemoryError (DeviceOutOfMemoryError is one), or a RuntimeError saying "out of memory"."""
    return (
        is_out_of_memory(exc)
        or isinstance(exc, MemoryError)
        or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())
    )


def run_local(
    embedder: Phi3VisionEmbedder,
    sources: list[Source],
    store: OutputStore,
    *,
    workers: int = 1,
    prefetch: int | None = None,
    writer_queue: int = 16,
    file_threads: int = 4,
    reporter: Reporter | None = None,
    max_errors_kept: int = 5,
) -> JobSummary:
    """Encode every source not already done in ``store`` (opened by the caller). Returns the summary.

    ``file_threads`` per-image output files are written at once (records still go to the manifest in order).

    Bad images become error records; out of memory and output failures end the job with ``summary.fatal``;
    SIGINT / SIGTERM end it with ``summary.interrupted``. Finished outputs are always kept.
    """
    summary = JobSummary(listed=len(sources))
    todo = [s for s in sources if not store.is_done(s)]
    summary.skipped = len(sources) - len(todo)
    options = embedder.image_options
    preparer = Preparer(embedder.preprocess_config, alpha=options.alpha, exif_transpose=options.exif_transpose)
    pool: OrderedPool[Source, Prepared] = OrderedPool(
        preparer,
        workers=workers,
        window=prefetch or 2 * max(workers, 1) + 2,
        on_crash=_crashed,
        niceness=WORKER_NICENESS,
    )

    def on_record(record: dict[str, Any]) -> None:  # writer thread
        summary.count(record, reporter=reporter, keep_errors=max_errors_kept)

    writer = Writer(store, on_record, writer_queue, file_threads)
    copier = HostCopier(embedder.device)  # results leave the device off the compute stream

    def feed() -> Iterator[tuple[tuple[Source, ImageFacts], Preprocessed]]:
        for p in summary.waited_for(pool):
            summary.preprocess_s += p.seconds
            if p.item is None:
                writer.put(("error", p.source, p.facts, p.error or f"{p.source.path}: unknown error"))
                continue
            yield (p.source, p.facts), p.item

    threads_before = torch.get_num_threads()
    torch.set_num_threads(encoder_threads(embedder.device.type, threads_before, workers, usable_cpus()))
    signals = StopSignals()
    start, (cpu_start, switches_start) = time.perf_counter(), thread_usage()
    try:
        pool.start(todo)  # forks the workers: before the writer and progress threads exist
        writer.start()
        if reporter is not None:
            reporter.start(total=len(todo), skipped=summary.skipped)
        for key, _item, embeddings in embedder.embed_stream(feed(), times=summary.stages):
            source, facts = cast(tuple[Source, ImageFacts], key)
            t0 = time.perf_counter()
            result = copier.start(embeddings, store.settings.dtype)
            summary.to_host_s += time.perf_counter() - t0
            writer.put(("ok", source, facts, result))
    except STOPS as exc:
        summary.stopped(exc)
    except Exception as exc:
        if not _out_of_memory(exc):
            raise
        summary.fatal = (
            f"out of memory on {embedder.device} with --batch-size {embedder.batch_size}: "
            f"try a smaller --batch-size (e.g. {max(1, embedder.batch_size // 2)})"
        )
    finally:
        signals.exit_at_once()  # while cleaning up, a second signal exits at once (outputs stay whole)
        pool.close()
        if writer.is_alive():
            writer.finish()
        signals.restore()
        torch.set_num_threads(threads_before)
        summary.wall_s = time.perf_counter() - start
        cpu_end, switches_end = thread_usage()
        summary.encoder_cpu_s, summary.encoder_preempted = cpu_end - cpu_start, switches_end - switches_start
        summary.worker_restarts = pool.restarts
        if reporter is not None:
            reporter.stop()
    writer.account(summary)
    return summary
