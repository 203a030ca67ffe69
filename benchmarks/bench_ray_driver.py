"""What the Ray engine's driver holds per image for its input dataset: Python heap (tracemalloc) at the peak of
building it and while the job runs (what stays referenced), for the driver's way of building it now
(:func:`phi3embed.jobs.ray_engine.input_dataset`, a block at a time) and the earlier one (a list of row dicts,
``source_rows``, given to ``ray.data.from_items`` and kept alive for the whole job).

Starts a local Ray instance (1 CPU). The object store (shared memory, spilled to disk when full) holds the
rows' Arrow blocks either way and is not in these figures:

    PYTHONPATH=$PWD python benchmarks/bench_ray_driver.py --sizes 20000 100000
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc
from collections.abc import Callable
from typing import Any

from phi3embed.inputs.listing import Source
from phi3embed.jobs.ray_engine import input_dataset, ray_session, rows_per_block
from phi3embed.jobs.ray_rows import source_rows


def sources(n: int) -> list[Source]:
    return [
        Source(f"shard{i // 10_000:03d}/img{i:08d}.png", f"data/shard{i // 10_000:03d}/img{i:08d}.png", "")
        for i in range(n)
    ]


def measure(build: Callable[[list[Source]], Any], todo: list[Source]) -> tuple[int, int]:
    """``(peak, held)`` bytes of Python heap allocated by ``build(todo)`` and still referenced by what it returns."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    kept = build(todo)
    held = tracemalloc.get_traced_memory()[0] - base
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del kept
    return peak, held


def from_items(todo: list[Source]) -> Any:
    import ray.data

    rows = source_rows(todo)
    return rows, ray.data.from_items(rows)  # the rows stayed referenced while the job ran


def blocks(todo: list[Source]) -> Any:
    return input_dataset(todo, rows_per_block=rows_per_block(len(todo), 16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[20_000, 100_000])
    args = parser.parse_args()
    with ray_session(num_cpus=1, object_store_memory=512 * 1024**2):
        figures: dict[str, list[tuple[int, int]]] = {"from_items": [], "blocks": []}
        for n in args.sizes:
            todo = sources(n)
            for name, build in (("from_items", from_items), ("blocks", blocks)):
                peak, held = measure(build, todo)
                figures[name].append((peak, held))
                print(f"{name:>10} {n:>9,} images: peak {peak / 2**20:7.1f} MiB, held {held / 2**20:7.1f} MiB")
        n0, n1 = args.sizes
        for name, ((p0, h0), (p1, h1)) in figures.items():
            print(f"{name:>10} per image: peak {(p1 - p0) / (n1 - n0):6.0f} B, held {(h1 - h0) / (n1 - n0):6.0f} B")


if __name__ == "__main__":
    main()
