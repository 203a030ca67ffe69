"""The one job: sources -> records, whatever engine encodes (docs/pipeline.md, "one job, many engines").

:func:`run_job` skips what ``store`` already has (resume), hands the rest to an :class:`Engine`, writes every
:class:`Result` through one :class:`Writer` (a thread; several per-image files at once, records in input
order), counts them into one :class:`JobSummary`, and ends the same way for every engine:

* bad images are error records and never stop the job;
* SIGINT / SIGTERM (:class:`StopSignals`) stop it cleanly: what was encoded is written, the last pack too,
  ``summary.interrupted`` names the signal; a second signal exits at once (outputs stay whole);
* an output failure, or an exception the engine explains in one line (:meth:`Engine.failure`: out of
  memory, a failed Ray job), ends it with ``summary.fatal``. Finished outputs are always kept.

Engines decide where the work runs (:mod:`phi3embed.jobs.local`, :mod:`phi3embed.jobs.ray_engine`), never what
a job does.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, overload, runtime_checkable

import numpy as np
import torch

from phi3embed.core.batching import HostResult, StageTimes
from phi3embed.core.stages import DEFAULT_STAGE
from phi3embed.inputs.listing import Source
from phi3embed.jobs.dedup import Duplicate, Duplicates
from phi3embed.outputs.publish import OutputError
from phi3embed.outputs.records import Format, ImageFacts, OutputSettings, Record, StoredStage
from phi3embed.outputs.store import OutputStore

T = TypeVar("T")
_END: object = object()


# --------------------------------------------------------------------------- what engines give and take


@dataclass(frozen=True)
class EngineInfo:
    """The settings every engine states once, instead of a model the job would have to look into: what
    the output settings record and the summary shows."""

    fingerprint: str  # of the vision weights the engine encodes with
    num_crops: int
    compute_dtype: torch.dtype
    stored_dtype: torch.dtype
    device: str  # where one encoder runs, e.g. "cpu", "cuda:0"
    batch_size: int  # crops per forward pass
    workers: int  # decode workers (local) or actors (Ray), for the summary
    alpha: str = "drop"
    exif_transpose: bool = False
    stage: StoredStage = DEFAULT_STAGE  # the intermediate the results hold (phi3embed.core.stages); "none"
    vectors: tuple[str, ...] = ()  # the vector kinds the results carry (phi3embed.core.vectors)
    compile_note: str | None = None  # --compile: what compiling cost, or why it fell back (not a setting)

    def output_settings(self, *, model: str, format: Format, pack_bytes: int | None) -> OutputSettings:
        """The settings the outputs record for this engine's results (``model``: what the user named)."""
        same_names = ("fingerprint", "num_crops", "alpha", "exif_transpose", "device", "stage", "vectors")
        return OutputSettings(
            model=model,
            dtype=self.stored_dtype,
            compute_dtype=self.compute_dtype,
            format=format,
            pack_bytes=pack_bytes,
            **{name: getattr(self, name) for name in same_names},
        )


@dataclass
class Result:
    """One source after the engine: its embeddings (host, stored dtype, once ``wait()`` returns), an error,
    or (``duplicate``) a duplicate: the bytes of another image, not encoded (:mod:`phi3embed.jobs.dedup`)."""

    source: Source
    facts: ImageFacts
    embeddings: HostResult | None = None
    error: str | None = None
    duplicate: Duplicate | None = None
    vectors: dict[str, HostResult] | None = (
        None  # with --vectors: float32 [d] per kind (``embeddings`` None: --stage none)
    )

    @property
    def encoded(self) -> bool:
        """It holds what the engine encoded (not an error or a duplicate)."""
        return self.embeddings is not None or self.vectors is not None


class Engine(Protocol):
    """A strategy that turns sources into results, in input order (errors may come before encoded images
    that precede them). :func:`run_job` calls ``open``, iterates ``results``, and always calls ``close``."""

    info: EngineInfo

    def open(self, todo: Sequence[Source], summary: JobSummary) -> None:
        """Start (before the job starts any thread: the local engine forks its workers here); the engine
        adds its own timings to ``summary``."""

    def results(self, early: Callable[[Result], None]) -> Iterator[Result]:
        """The results, in input order. ``early`` hands one to the writer at once, for an engine that learns
        of it where it cannot yield (the local engine's decode errors surface inside the encoder's input
        stream): an error record is then written when it is known, not when the next image is encoded."""

    def failure(self, exc: Exception) -> str | None:
        """One line for an exception that ends the job (``summary.fatal``); None: a bug, raised."""

    def close(self) -> None:
        """Stop workers, give back what ``open`` took. Safe to call more than once."""


@runtime_checkable
class SkipsDuplicates(Protocol):
    """An engine that can leave duplicates out of its encoder's input (the local engine: it knows each image's
    sha256 before encoding it). Its results still come in input order, duplicates as ``Result.duplicate``.
    Other engines encode duplicates too; the job then shares the first's output all the same."""

    def skip_duplicates(self, duplicates: Duplicates) -> None: ...


class Reporter(Protocol):
    """What the job tells people about (implemented by phi3embed.cli.progress)."""

    def start(self, *, total: int, skipped: int) -> None: ...

    def advance(self, record: Record) -> None: ...  # from the writer thread

    def stop(self) -> None: ...


# --------------------------------------------------------------------------- the summary


@dataclass
class JobSummary:
    listed: int = 0
    skipped: int = 0  # already done (resume)
    ok: int = 0  # reused outputs included
    failed: int = 0
    reused_in_job: int = 0  # duplicates of an image of this job: its output shared, not encoded
    reused_earlier: int = 0  # duplicates of an earlier run's output
    tokens: int = 0
    wall_s: float = 0.0  # from the first image to the last write
    wait_input_s: float = 0.0  # encoder waiting for prepared images
    wait_writer_s: float = 0.0  # encoder waiting for the writer
    preprocess_s: float = 0.0  # CPU time reading and tiling, summed over workers / actors
    write_s: float = 0.0
    stages: StageTimes = field(default_factory=StageTimes)  # the local encoding thread's own work, by stage
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
            yield item  # type: ignore[misc]

    def stopped(self, exc: BaseException) -> None:
        """Record how one of :data:`STOPS` ended the job early: a signal (``interrupted``: ``SIGINT`` for
        Ctrl-C) or a failing output directory (``fatal``)."""
        if isinstance(exc, OutputError):
            self.fatal = str(exc)
        else:
            self.interrupted = exc.signame if isinstance(exc, JobStop) else "SIGINT"

    def count(self, record: Record, *, reporter: Reporter | None = None, keep_errors: int = 5) -> None:
        """Add one written record to the totals (keeping the first ``keep_errors`` error lines) and tell
        ``reporter``; once per record, in the order the records were written."""
        if record.ok:
            self.ok += 1
            self.tokens += record.num_tokens or 0
        else:
            self.failed += 1
            if len(self.errors) < keep_errors:
                self.errors.append(record.error or "")
        if reporter is not None:
            reporter.advance(record)


# --------------------------------------------------------------------------- stopping


class JobStop(BaseException):
    """Raised in the job's thread by SIGINT / SIGTERM while :class:`StopSignals` is installed."""

    def __init__(self, signame: str) -> None:
        self.signame = signame


#: What ends a job early but cleanly (:meth:`JobSummary.stopped` records which).
STOPS = (JobStop, KeyboardInterrupt, OutputError)


class StopSignals:
    """SIGINT and SIGTERM during a job: installed (main thread only), they raise :class:`JobStop`;
    :meth:`exit_at_once` (when the job cleans up) makes a second signal exit the process at once, which
    leaves the outputs whole (every file is renamed into place whole); :meth:`restore` puts back the
    previous handlers."""

    def __init__(self) -> None:
        in_main = threading.current_thread() is threading.main_thread()
        sigs = (signal.SIGINT, signal.SIGTERM)
        self.late: str | None = None  # a first signal that arrived while the job was cleaning up
        self.previous = {sig: signal.signal(sig, self._stop) for sig in sigs} if in_main else {}

    @staticmethod
    def _stop(signum: int, frame: object) -> None:
        raise JobStop(signal.Signals(signum).name)

    def exit_at_once(self, *, stopping: bool) -> None:
        """While the job cleans up (the writer still writing what has arrived): a second signal exits at once.
        ``stopping``: a signal already stopped the job, so the next one is the second; else the first one to
        arrive is noted in :attr:`late` and the cleanup goes on (the job still reports it)."""

        def handler(signum: int, frame: object) -> None:
            if stopping or self.late is not None:
                os._exit(128 + signum)
            self.late = signal.Signals(signum).name

        for sig in self.previous:
            signal.signal(sig, handler)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- writing


class Writer(threading.Thread):
    """Drains a bounded queue of results into the store, in order, and hands each record to ``count``.

    Per-image files are written by ``file_threads`` threads at once (:meth:`OutputStore.write_file`: every
    file is fsynced, and a disk takes several at a time faster than one after another); this thread commits
    their records to the manifest in input order. A failure (OutputError: disk full...) stops writing; the
    job's thread re-raises it at its next put. Files already being written are finished before the thread ends.
    """

    def __init__(self, store: OutputStore, count: Callable[[Record], None], maxsize: int, file_threads: int) -> None:
        super().__init__(name="phi3embed-writer", daemon=True)
        self.store, self._count = store, count
        self.queue: queue.Queue[Result | None] = queue.Queue(maxsize)  # None: no more results
        self.error: BaseException | None = None
        self.busy = 0.0
        self.put_wait = 0.0
        concurrent = file_threads > 1 and store.concurrent_files
        self.files = ThreadPoolExecutor(file_threads, thread_name_prefix="phi3embed-file") if concurrent else None
        self.in_flight_limit = 2 * file_threads
        self._in_flight: deque[Future[Record] | Result] = deque()  # input order
        self.reused = {False: 0, True: 0}  # duplicates given the first's output, by Duplicate.earlier

    def put(self, result: Result) -> None:
        start = time.perf_counter()
        self.queue.put(result)
        self.put_wait += time.perf_counter() - start
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        while (result := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining so that the producer never blocks
            start = time.perf_counter()
            try:
                self._take(result)
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

    def _take(self, result: Result) -> None:
        host = result.embeddings
        src, facts = result.source, result.facts
        if not result.encoded:
            self._in_flight.append(result)  # an error or a duplicate: committed in turn by _commit
        elif host is None:  # --stage none: vectors only
            self._count(self.store.write(src, facts, None, vectors=host_vectors(result)))
        elif self.files is not None:
            with_vectors = {"vectors": host_vectors(result)} if result.vectors is not None else {}
            self._in_flight.append(
                self.files.submit(lambda: self.store.write_file(src, facts, host.wait(), **with_vectors))
            )
        else:  # one file at a time, or packs (their records are appended with the pack)
            with_vectors = {"vectors": host_vectors(result)} if result.vectors is not None else {}
            self._count(self.store.write(src, facts, host.wait(), **with_vectors))

    def _commit(self, *, keep: int) -> None:
        """Commit finished records in input order; wait for the oldest while more than ``keep`` are pending."""
        while self._in_flight:
            head = self._in_flight[0]
            if isinstance(head, Future) and not head.done() and len(self._in_flight) <= keep:
                return
            self._in_flight.popleft()
            if isinstance(head, Future):
                record = self.store.commit(head.result())
            elif head.duplicate is not None:  # its first was committed before it (or waits in the pack)
                record = self.store.write_duplicate(head.source, head.facts, head.duplicate.first)
                self.reused[head.duplicate.earlier] += record.ok
            else:
                record = self.store.write_error(
                    head.source, head.error or f"{head.source.path}: unknown error", head.facts
                )
            self._count(record)

    def finish(self) -> None:
        self.queue.put(None)
        self.join()

    def account(self, summary: JobSummary) -> None:
        """After :meth:`finish`: the writer's times into ``summary``, and its failure as ``summary.fatal``
        when it is an output failure the job did not already end on; any other failure is a bug: raised."""
        summary.write_s, summary.wait_writer_s = self.busy, self.put_wait
        summary.reused_in_job, summary.reused_earlier = self.reused[False], self.reused[True]
        if self.error is not None and summary.fatal is None:
            if not isinstance(self.error, OutputError):
                raise self.error
            summary.fatal = str(self.error)


def host_vectors(result: Result) -> dict[str, np.ndarray] | None:
    """A result's vectors on the host, as numpy (None without --vectors)."""
    if result.vectors is None:
        return None
    return {kind: host.wait().numpy() for kind, host in result.vectors.items()}


# --------------------------------------------------------------------------- the job


def mark_duplicate(result: Result, duplicates: Duplicates) -> Result:
    """``result`` as a duplicate when an engine encoded an image whose bytes an earlier one has (an engine that
    hashes and encodes in one step, as Ray's actors do): the first's output is shared all the same."""
    if not result.encoded or result.duplicate is not None:
        return result
    duplicate = duplicates.find(result.source.name, result.facts.sha256)
    return result if duplicate is None else Result(result.source, result.facts, duplicate=duplicate)


class Picked(Sequence[Source]):
    """Some of a lazy listing's sources, by position: 8 bytes per image instead of a :class:`Source` object
    (with its path string) per image to encode; each is made again when read."""

    def __init__(self, sources: Sequence[Source], positions: array[int]) -> None:
        self.sources, self.positions = sources, positions

    def __len__(self) -> int:
        return len(self.positions)

    @overload
    def __getitem__(self, i: int) -> Source: ...
    @overload
    def __getitem__(self, i: slice) -> list[Source]: ...
    def __getitem__(self, i: int | slice) -> Source | list[Source]:
        if isinstance(i, slice):
            return [self.sources[p] for p in self.positions[i]]
        return self.sources[self.positions[i]]

    def __iter__(self) -> Iterator[Source]:
        sources = self.sources
        return (sources[p] for p in self.positions)


def _not_done(sources: Sequence[Source], store: OutputStore) -> Sequence[Source]:
    """The sources ``store`` has not done, in order: a list for a list, positions into a lazy listing."""
    if isinstance(sources, list | tuple):
        return [s for s in sources if not store.is_done(s)]
    positions = array("q", (i for i, s in enumerate(sources) if not store.is_done(s)))
    return Picked(sources, positions)


def run_job(
    sources: Sequence[Source],
    store: OutputStore,
    engine: Engine,
    *,
    reporter: Reporter | None = None,
    writer_queue: int = 16,
    file_threads: int = 4,
    max_errors_kept: int = 5,
    dedup: bool = True,
    already_done: int = 0,
) -> JobSummary:
    """Encode every source not already done in ``store`` (opened by the caller) with ``engine``.

    ``already_done``: images the listing counted as done without listing them (the images of finished
    archives, :attr:`phi3embed.inputs.listing.Listing.finished_images`): listed and skipped in the summary.

    ``file_threads`` per-image output files are written at once (records still go to the manifest in order).
    ``dedup``: images with the bytes of an earlier image of the job, or of an ok output of an earlier run
    with the same settings, share that output instead of being encoded (:mod:`phi3embed.jobs.dedup`).
    See the module docstring for how a job ends.
    """
    summary = JobSummary(listed=len(sources) + already_done)
    todo = _not_done(sources, store)  # one pass: a lazy listing makes one Source at a time
    summary.skipped = summary.listed - len(todo)
    duplicates = Duplicates(store.index, todo) if dedup else None
    if duplicates is not None and isinstance(engine, SkipsDuplicates):
        engine.skip_duplicates(duplicates)

    def count(record: Record) -> None:  # writer thread
        summary.count(record, reporter=reporter, keep_errors=max_errors_kept)

    writer = Writer(store, count, writer_queue, file_threads)
    signals = StopSignals()
    start = time.perf_counter()
    try:
        engine.open(todo, summary)  # before any thread of ours exists: the local engine forks here
        writer.start()
        if reporter is not None:
            reporter.start(total=len(todo), skipped=summary.skipped)
        for result in engine.results(writer.put):
            writer.put(result if duplicates is None else mark_duplicate(result, duplicates))
    except STOPS as exc:
        summary.stopped(exc)
    except Exception as exc:
        message = engine.failure(exc)
        if message is None:
            raise
        summary.fatal = message
    finally:
        signals.exit_at_once(stopping=summary.interrupted is not None)  # a second signal exits at once
        engine.close()
        if writer.is_alive():
            writer.finish()  # what has arrived is written
        signals.restore()
        if signals.late is not None and summary.interrupted is None:
            summary.interrupted = signals.late  # it came while the last results were being written
        summary.wall_s = time.perf_counter() - start
        if reporter is not None:
            reporter.stop()
    writer.account(summary)
    return summary
