"""Carry out a :class:`~.plan.FetchPlan`: the needed tensors' ranges, four GETs in flight, written straight to
their place in a new cache entry (one safetensors file in source order, the configs, an origin record)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from phi3embed.core.hub import cache, remote
from phi3embed.core.hub.plan import FetchPlan, RemoteFile
from phi3embed.core.layout import CONFIG_FILES, SINGLE_FILE
from phi3embed.core.safetensors_io import encode_header

IN_FLIGHT = 4


class ByteCounter:
    """Bytes received, added from the fetching threads."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


def fetch_part(
    repo_id: str, plan: FetchPlan, part: str, config_dir: Path, revision: str | None, counter: ByteCounter
) -> Path:
    """The cache entry of ``part``, written by ranged GETs unless another run already wrote it."""
    return cache.write_entry(
        repo_id,
        plan.commit,
        part,
        lambda folder: _fill_entry(folder, repo_id, plan, part, config_dir, revision, counter),
    )


def _fill_entry(
    tmp: Path, repo_id: str, plan: FetchPlan, part: str, config_dir: Path, revision: str | None, counter: ByteCounter
) -> None:
    keys = set(plan.keys[part])
    files = [f for f in plan.files if keys & set(f.tensors)]
    all_tensors = {k: f.tensors[k] for f in files for k in f.tensors if k in keys}
    ordered = plan.keys[part]  # by file, then offset: the entry keeps the source order
    header, starts = encode_header(
        [(k, all_tensors[k].dtype, all_tensors[k].shape) for k in ordered], metadata={"format": "pt"}
    )
    dst = dict(zip(ordered, starts, strict=True))
    total = len(header) + sum(all_tensors[k].nbytes for k in ordered)
    before = counter.value
    out = tmp / SINGLE_FILE
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, header, 0)
        os.ftruncate(fd, total)
        jobs = []
        for f in files:
            segments = sorted((f.tensors[k].start, f.tensors[k].end, dst[k]) for k in keys & set(f.tensors))
            for start, end in plan.ranges[part][f.name]:
                inside = [seg for seg in segments if seg[0] < end and seg[1] > start]
                jobs.append((f, start, end, inside))

        def run(job: tuple[RemoteFile, int, int, list[tuple[int, int, int]]]) -> None:
            f, start, end, inside = job

            def sink(offset: int, data: bytes) -> None:
                stop = offset + len(data)
                for s, e, d in inside:
                    a, b = max(s, offset), min(e, stop)
                    if a < b:
                        os.pwrite(fd, data[a - offset : b - offset], d + (a - s))

            counter.add(remote.get_range(repo_id, f.name, f.url, f.headers, f.size, start, end, sink))

        with ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="phi3embed-fetch") as pool:
            for result in [pool.submit(run, job) for job in jobs]:
                result.result()
        os.fsync(fd)
    finally:
        os.close(fd)
    for name in CONFIG_FILES:
        if (config_dir / name).is_file():
            shutil.copyfile(config_dir / name, tmp / name)
            cache.fsync_path(tmp / name)
    origin = {
        "repo_id": repo_id,
        "revision": revision or "main",
        "commit": plan.commit,
        "part": part,
        "tensors": len(ordered),
        "tensor_bytes": sum(all_tensors[k].nbytes for k in ordered),
        "bytes_fetched": counter.value - before,
        "weight_files": [
            {
                "name": f.name,
                "etag": f.etag,
                "size": f.size,
                "tensors": len(keys & set(f.tensors)),
            }
            for f in files
        ],
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / cache.ORIGIN_FILE).write_text(json.dumps(origin, indent=2) + "\n")
    cache.fsync_path(tmp / cache.ORIGIN_FILE)
