"""Random-access reads through ``phi3embed.open`` vs plain positioned reads of the same bytes, per layout.

For each layout (one npy file per image, one safetensors file per image, ``--pack`` files) the script writes
``--entries`` synthetic images through the real writer (OutputStore; random tensors, no model), then reads
them all in one random order twice, each time with the page cache of the output files dropped first
(``posix_fadvise(DONTNEED)`` per file; dropping caches system-wide needs root and is not done):

* ``raw``: ``os.pread`` of exactly each tensor's byte range (offsets found beforehand with numpy / the
  safetensors header, outside the timing; per-image files opened and closed per read, pack files kept open);
* ``open``: ``store[name]`` on ``phi3embed.open(DIR)`` (opening the manifest is timed separately).

and reports MB/s of tensor payload, the ratio open/raw (target >= 0.8), and this process's RSS at the start of
the ``open`` pass, after 1k and after all entries (target: flat).

    python benchmarks/bench_read.py                          # 10k entries of [313..757, 64] float16 per layout
    python benchmarks/bench_read.py --entries 2000 --dim 3072 --dir /scratch/bench --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from report import save_json  # noqa: E402

import phi3embed  # noqa: E402
from phi3embed.inputs.listing import Source  # noqa: E402
from phi3embed.outputs.records import ImageFacts, OutputSettings  # noqa: E402
from phi3embed.outputs.store import OutputStore  # noqa: E402

TOKENS = (313, 469, 757)  # token counts of 1x1, 2x1 and 2x2 grids (4 crops)


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_layout(out: Path, layout: str, *, entries: int, dim: int, dtype: torch.dtype) -> list[str]:
    """``entries`` images through OutputStore in ``layout``; their names."""
    pack = 256 * 2**20 if layout == "pack" else None
    settings = OutputSettings(
        model="bench", fingerprint="0" * 32, num_crops=4, dtype=dtype, compute_dtype=dtype,
        format=layout, pack_bytes=pack,  # type: ignore[arg-type]
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    names = [f"part-{i % 50:02d}/img{i:06d}.jpg" for i in range(entries)]
    with OutputStore(out, settings, fsync_interval=60.0) as store:
        for i, name in enumerate(names):
            t = torch.randn(TOKENS[i % len(TOKENS)], dim, generator=gen).to(dtype)
            store.write(Source(name, f"/imgs/{name}", "/imgs"), ImageFacts(num_tokens=t.shape[0]), t)
    return names


def byte_ranges(out: Path, names: list[str]) -> dict[str, tuple[str, int, int]]:
    """name -> (file, offset, nbytes) of its tensor, found with numpy and the safetensors header (not phi3embed)."""
    records = {r.name: r for r in phi3embed.latest_records(out).values()}
    headers: dict[str, tuple[dict[str, Any], int]] = {}
    ranges = {}
    for name in names:
        r = records[name]
        path = str(out / str(r.output))
        if path.endswith(".npy"):
            arr = np.load(path, mmap_mode="r")
            ranges[name] = (path, int(arr.offset), int(arr.nbytes))
            continue
        if path not in headers:
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                headers[path] = (json.loads(fh.read(n)), 8 + n)
        header, base = headers[path]
        start, end = header[str(r.key)]["data_offsets"]
        ranges[name] = (path, base + start, end - start)
    return ranges


def drop_cache(paths: set[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_pass(order: list[str], ranges: dict[str, tuple[str, int, int]], *, keep_open: bool) -> tuple[float, int]:
    fds: dict[str, int] = {}
    total = 0
    start = time.perf_counter()
    for name in order:
        path, offset, nbytes = ranges[name]
        fd = fds.get(path) if keep_open else None
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if keep_open:
                fds[path] = fd
        total += len(os.pread(fd, nbytes, offset))
        if not keep_open:
            os.close(fd)
    seconds = time.perf_counter() - start
    for fd in fds.values():
        os.close(fd)
    return seconds, total


def open_pass(out: Path, order: list[str]) -> dict[str, Any]:
    rss = {"start": rss_mib()}
    t0 = time.perf_counter()
    store = phi3embed.open(out)
    open_s = time.perf_counter() - t0
    total = 0
    start = time.perf_counter()
    for k, name in enumerate(order, 1):
        tensor = store[name]
        total += tensor.numel() * tensor.element_size()
        if k == 1000:
            rss["after_1k"] = rss_mib()
    seconds = time.perf_counter() - start
    rss["after_all"] = rss_mib()
    store.close()
    return {"open_manifest_s": open_s, "seconds": seconds, "bytes": total, "rss_mib": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--layouts", default="npy,safetensors,pack")
    ap.add_argument("--rounds", type=int, default=2, help="raw/open pairs per layout (the order alternates)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the written outputs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    base = Path(tempfile.mkdtemp(prefix="bench-read-", dir=args.dir))
    report: dict[str, Any] = {"entries": args.entries, "dim": args.dim, "dtype": args.dtype, "layouts": {}}
    try:
        for layout in args.layouts.split(","):
            if layout == "npy" and dtype == torch.bfloat16:
                continue
            out = base / layout
            t0 = time.perf_counter()
            names = write_layout(out, layout, entries=args.entries, dim=args.dim, dtype=dtype)
            write_s = time.perf_counter() - t0
            ranges = byte_ranges(out, names)
            files = {p for p, _, _ in ranges.values()} | {str(out / "manifest.jsonl")}
            order = names[:]
            random.Random(1).shuffle(order)
            rows = []
            for round_ in range(args.rounds):
                result: dict[str, Any] = {}
                for kind in ("raw", "open") if round_ % 2 == 0 else ("open", "raw"):
                    drop_cache(files)
                    if kind == "raw":
                        seconds, nbytes = raw_pass(order, ranges, keep_open=layout == "pack")
                        result["raw"] = {"seconds": seconds, "bytes": nbytes}
                    else:
                        result["open"] = open_pass(out, order)
                assert result["raw"]["bytes"] == result["open"]["bytes"]
                result["ratio"] = result["raw"]["seconds"] / result["open"]["seconds"]
                rows.append(result)
                mb = result["raw"]["bytes"] / 1e6
                print(
                    f"{layout:12s} round {round_}: raw {mb / result['raw']['seconds']:8.1f} MB/s, "
                    f"open {mb / result['open']['seconds']:8.1f} MB/s, ratio {result['ratio']:.2f}, "
                    f"manifest {result['open']['open_manifest_s'] * 1e3:.0f} ms, RSS MiB {result['open']['rss_mib']}",
                    flush=True,
                )
            report["layouts"][layout] = {"write_s": write_s, "files": len(files) - 1, "rounds": rows}
            save_json(args.json, report)
            if not args.keep:
                shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
