"""The output side alone: per-image files through the job's writer, one file at a time vs several at once.

A GPU encodes ~70 images/s; at ~2,000 tokens x 3072 in bf16 that is ~12 MB per image, ~850 MB/s of
safetensors files, each fsynced before it is renamed into place. This measures, in ONE process and on the
disk under ``--dir``, how many such files per second the job's writer (phi3embed.jobs.core.Writer over
OutputStore) keeps up with for each ``--file-threads`` setting (1 = one file after another, the plain way).
Nothing is encoded: the tensors are random, already on the host.

    python benchmarks/bench_writer.py                      # 120 files of 1921 x 3072 bf16 (11.8 MB) per setting
    python benchmarks/bench_writer.py --dir /scratch/emb --files 300 --file-threads 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from report import save_json  # noqa: E402

from phi3embed.core.batching import HostResult  # noqa: E402
from phi3embed.inputs.listing import Source  # noqa: E402
from phi3embed.jobs.core import JobSummary, Result, Writer  # noqa: E402
from phi3embed.outputs.records import ImageFacts, OutputSettings  # noqa: E402
from phi3embed.outputs.store import OutputStore  # noqa: E402


def one_setting(root: Path, tensors: list[torch.Tensor], *, threads: int, fmt: str) -> dict[str, Any]:
    settings = OutputSettings(
        model="bench", fingerprint="0" * 64, num_crops=16, dtype=tensors[0].dtype, compute_dtype=tensors[0].dtype,
        format=fmt,  # type: ignore[arg-type]
    )  # fmt: skip
    out = root / f"out-{threads}"
    summary = JobSummary()
    with OutputStore(out, settings, overwrite=True) as store:
        writer = Writer(store, summary.count, 16, threads)
        writer.start()
        start = time.perf_counter()
        for i, t in enumerate(tensors):
            facts = ImageFacts(num_tokens=t.shape[0])
            source = Source(f"img{i:05d}.jpg", f"/nowhere/img{i:05d}.jpg", "")
            writer.put(Result(source, facts, embeddings=HostResult(t)))
        writer.finish()
        seconds = time.perf_counter() - start
        written = store.publisher.bytes_written
    if writer.error is not None:
        raise writer.error
    assert summary.ok == len(tensors) and summary.failed == 0
    shutil.rmtree(out)
    return {
        "file_threads": threads,
        "files": len(tensors),
        "seconds": round(seconds, 3),
        "files_per_s": round(len(tensors) / seconds, 1),
        "mb_per_s": round(written / seconds / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp folder under /tmp)")
    ap.add_argument("--files", type=int, default=120)
    ap.add_argument("--tokens", type=int, default=1921, help="rows per output (1921: a 13-crop photo)")
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--format", default="safetensors", choices=["safetensors", "npy"])
    ap.add_argument("--file-threads", default="1,4,1,4", help="settings to time, in this order")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.format == "npy" and dtype == torch.bfloat16:
        ap.error("npy cannot store bfloat16")
    gen = torch.Generator().manual_seed(0)
    distinct = [torch.randn(args.tokens, args.width, generator=gen).to(dtype) for _ in range(8)]
    tensors = [distinct[i % len(distinct)] for i in range(args.files)]
    parent = args.dir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="phi3embed-bench-writer-", dir=parent))
    runs = []
    try:
        for threads in (int(x) for x in args.file_threads.split(",")):
            run = one_setting(root, tensors, threads=threads, fmt=args.format)
            runs.append(run)
            print(f"[bench_writer] {json.dumps(run)}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mb = args.tokens * args.width * distinct[0].element_size() / 1e6
    best = {t: max(r["files_per_s"] for r in runs if r["file_threads"] == t) for t in {r["file_threads"] for r in runs}}
    report: dict[str, Any] = {
        "dir": str(parent),
        "file_mb": round(mb, 2),
        "format": args.format,
        "dtype": args.dtype,
        "cpus": os.cpu_count(),
        "runs": runs,
        "best_files_per_s": best,
    }
    if 1 in best:
        report["speedup_vs_one_at_a_time"] = {t: round(v / best[1], 2) for t, v in best.items() if t != 1}
    print(
        f"# bench_writer: {args.files} files of {args.tokens} x {args.width} {args.dtype} ({mb:.1f} MB), {args.format}, in {parent}"
    )
    print("| file threads | files/s | MB/s | seconds |")
    print("|---|---|---|---|")
    for r in runs:
        print(f"| {r['file_threads']} | {r['files_per_s']} | {r['mb_per_s']} | {r['seconds']} |")
    if "speedup_vs_one_at_a_time" in report:
        print(f"# best of each setting vs one file at a time: {json.dumps(report['speedup_vs_one_at_a_time'])}")
    save_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
