"""Exact duplicates encoded once (issue 12, item 8): a set with 30 % byte-identical copies, dedup on vs --no-dedup.

The real command (``phi3embed encode``, local engine, one decode worker) on the tiny golden checkpoint with
``--num-crops 16`` (a square image fills 4x4 crops + the global view). Duplicates are still read, hashed,
decoded and tiled (the worker hashes the bytes it decodes); only the encoder is skipped. With the real models
an image is ~6 TFLOP and decoding ~0.3 % of the work; with the tiny model a 640x480 JPEG takes 0.07 s to
prepare against ~0.11 s to encode, so the one decode worker, not the encoder, would bound a dedup run. Small
images (default 224x224, a common thumbnail size: 0.03 s) keep the encoder dominant. The set: ``--distinct``
photo-like JPEGs and, on top, copies of some of them under other names so that ``--copies`` (default 30 %)
of all images are byte-identical copies, interleaved in name order. Runs alternate (dedup, no-dedup, ...)
so that drift of a shared host hits both alike; each run writes into a fresh folder. Every output file of
the two modes is compared byte for byte, and the manifests' duplicate_of fields are checked.

    python benchmarks/bench_dedup.py                   # 28 distinct + 12 copies (30 %) of 224x224, 3 runs of each mode
    python benchmarks/bench_dedup.py --distinct 70 --runs 5 --json benchmarks/results/dedup.json
    python benchmarks/bench_dedup.py --threads 1     # one encoder thread: CPU seconds measure the work even on a
                                                     # busy shared host (spinning OpenMP threads inflate them)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from images import BenchImage, render  # noqa: E402
from report import save_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "golden" / "checkpoints" / "tiny-phi3v-128k-f32"
CLI = [str(Path(sys.executable).with_name("phi3embed"))]


def make_set(folder: Path, *, distinct: int, copies: float, size: tuple[int, int]) -> tuple[int, int]:
    """``distinct`` JPEGs of ``size`` plus copies (``copies`` of the total); returns (distinct, copies)."""
    folder.mkdir(parents=True)
    n_copies = round(distinct * copies / (1 - copies))
    originals = []
    for i in range(distinct):
        path = folder / f"img{i:04d}.jpg"
        render(BenchImage("b", *size, "JPEG", photo=True), seed=i).save(path, "JPEG", quality=85)
        originals.append(path)
    for j in range(n_copies):  # copy k of image k*step lands later in name order: its first precedes it
        original = originals[(j * distinct) // n_copies]
        shutil.copyfile(original, folder / f"{original.stem}-copy{j:04d}.jpg")
    return distinct, n_copies


def run(imgs: Path, out: Path, *, dedup: bool, extra: list[str], threads: int | None) -> tuple[float, float, float]:
    """(process seconds, the job's own seconds from its summary: first image to last write, CPU seconds of the
    process and its decode workers: the work done, which a busy shared host does not stretch as it does time)."""
    args = [*CLI, "encode", str(imgs), "-o", str(out), "--model", str(TINY), "--num-crops", "16", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch threads of the encoder
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([*args, *([] if dedup else ["--no-dedup"])], check=True, env=env, capture_output=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    job = re.search(r"finished in ([0-9.]+) s", done.stderr.decode())
    assert job is not None, done.stderr.decode()
    return seconds, float(job.group(1)), cpu_s


def compare(a: Path, b: Path) -> int:
    """Every output file of ``a`` equals ``b``'s, byte for byte; returns how many."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.npy"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.npy")), "different output files"
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs"
    return len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distinct", type=int, default=28, help="distinct images (default 28)")
    parser.add_argument("--copies", type=float, default=0.30, help="share of copies in the set (default 0.30)")
    parser.add_argument(
        "--size", default="224x224", help="image size WxH (default 224x224: a square fills 4x4 crops at --num-crops 16)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each mode, alternating (default 3)")
    parser.add_argument("--workers", type=int, default=1, help="decode workers (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: as set)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-dedup-", dir=args.dir))
    try:
        size = tuple(int(v) for v in args.size.split("x"))
        assert len(size) == 2, "--size WxH"
        distinct, n_copies = make_set(root / "imgs", distinct=args.distinct, copies=args.copies, size=size)  # type: ignore[arg-type]
        total = distinct + n_copies
        print(f"{total} images: {distinct} distinct + {n_copies} copies ({n_copies / total:.0%}), {args.size} JPEG")
        extra = ["--workers", str(args.workers)]
        times: dict[str, list[float]] = {"dedup": [], "no-dedup": []}  # whole process
        jobs: dict[str, list[float]] = {"dedup": [], "no-dedup": []}  # the job alone (start-up left out)
        cpus: dict[str, list[float]] = {"dedup": [], "no-dedup": []}  # CPU seconds, workers included
        report: dict[str, Any] = {"images": total, "distinct": distinct, "copies": n_copies, "process_s": times}
        report["job_s"], report["cpu_s"] = jobs, cpus
        for i in range(args.runs):
            for mode in ("dedup", "no-dedup") if i % 2 == 0 else ("no-dedup", "dedup"):
                out = root / f"out-{mode}-{i}"
                seconds, job, cpu = run(root / "imgs", out, dedup=mode == "dedup", extra=extra, threads=args.threads)
                times[mode].append(seconds)
                jobs[mode].append(job)
                cpus[mode].append(cpu)
                print(f"run {i} {mode:9s} process {seconds:7.2f} s, job {job:7.2f} s, CPU {cpu:7.2f} s", flush=True)
                save_json(args.json, report)
        same = compare(root / "out-dedup-0", root / "out-no-dedup-0")
        records = [json.loads(line) for line in (root / "out-dedup-0" / "manifest.jsonl").read_text().splitlines()]
        assert sum(1 for r in records if r["duplicate_of"]) == n_copies and all(r["status"] == "ok" for r in records)
        report["identical_files"] = same
        print(f"{same} output files identical byte for byte; ideal ratio {total / distinct:.2f}x")
        for what, figures in (("process", times), ("job", jobs), ("CPU", cpus)):
            ratios = [n / d for d, n in zip(figures["dedup"], figures["no-dedup"], strict=True)]
            medians = {m: statistics.median(t) for m, t in figures.items()}
            ratio = medians["no-dedup"] / medians["dedup"]
            report[what] = {"median_s": medians, "ratio_of_medians": ratio, "ratios_per_pair": ratios}
            print(
                f"{what:7s}: median dedup {medians['dedup']:.2f} s, no-dedup {medians['no-dedup']:.2f} s: "
                f"{ratio:.2f}x faster (pairs: {', '.join(f'{r:.2f}x' for r in ratios)})"
            )
        save_json(args.json, report)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
