"""The ordered worker pool alone: task order, a crashing task isolated, a stuck task stopped at its deadline."""

from __future__ import annotations

import os
import time

from phi3embed.jobs.pool import OrderedPool


def _maybe_crash(x: int) -> int:
    if x == 13:
        os._exit(7)  # a decoder taking its process down with it
    return x * x


def drain(pool: OrderedPool[int, int], tasks: range) -> list[int]:
    """Every result of ``pool`` over ``tasks``; the pool is closed after."""
    pool.start(tasks)
    try:
        return list(pool)
    finally:
        pool.close()


def test_ordered_pool_keeps_order_and_isolates_a_crashing_task() -> None:
    pool: OrderedPool[int, int] = OrderedPool(_maybe_crash, workers=2, window=5, on_crash=lambda x: -x)
    results = drain(pool, range(30))
    assert results == [-13 if x == 13 else x * x for x in range(30)]
    assert pool.restarts >= 2  # the crash, then the crash again when retried alone


def _maybe_stall(x: int) -> int:
    if x == 3:
        time.sleep(3600)  # a read or a decoder that never returns
    return x * x


def test_ordered_pool_stops_a_stuck_task_at_its_deadline_and_the_others_go_on() -> None:
    pool: OrderedPool[int, int] = OrderedPool(
        _maybe_stall, workers=2, window=4, on_crash=lambda x: -x, timeout=0.5, on_timeout=lambda x: -100
    )
    start = time.monotonic()
    results = drain(pool, range(10))
    assert results == [-100 if x == 3 else x * x for x in range(10)]
    assert time.monotonic() - start < 5 and pool.timeouts == 1 and pool.restarts == 1  # not retried


def test_inline_pool() -> None:
    pool: OrderedPool[int, int] = OrderedPool(lambda x: x + 1, workers=0, window=1, on_crash=lambda x: 0)
    pool.start(range(5))
    assert list(pool) == [1, 2, 3, 4, 5]
