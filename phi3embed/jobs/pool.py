"""An ordered pool of worker processes: a function over tasks, results in task order, a bounded window ahead.

Each worker runs one task at a time, so the pool knows which task a worker holds: a worker past its deadline
is killed and replaced, a worker that dies is replaced and its task retried once (:class:`OrderedPool`). The
local engine (:mod:`phi3embed.jobs.local`) reads and tiles images with it; it knows nothing about images.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar, cast

import torch

T = TypeVar("T")
R = TypeVar("R")


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

    ``workers=0`` runs ``fn`` inline (no timeout there: see :class:`phi3embed.jobs.local.LocalEngine` for how
    the CLI keeps its promise). Workers run ``niceness`` nicer than this process. :meth:`start` forks the workers and hands out
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
