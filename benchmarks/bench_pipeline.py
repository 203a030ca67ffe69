"""Host-side cost of feeding the encoder: what the encoder's process spends per image, in ONE run.

The encoder's process (the CLI's main thread plus the thread that receives results from the decode
workers) must hand the device a batch faster than the device encodes it; on a GPU that is a few
milliseconds per image. This measures that host work alone, without the encoder, for two ways of moving
crops from the workers:

* ``float32`` (the earlier design, the yardstick): workers send the normalised float32 crops; the encoder's
  process concatenates them into a batch (through page-locked memory on CUDA) and copies it to the device.
* ``uint8`` (phi3embed now): workers send uint8 tiles plus the float32 global view; the encoder's process
  assembles a batch (pipeline._Assembler: one copy of each kind, lookup-table normalisation on the device).

Both run the same images through the same worker pool (``phi3embed.jobs.pool.OrderedPool`` + ``phi3embed.jobs.prepare.Preparer``).
Reported per image: bytes handed over by the workers, CPU seconds of the encoder's process (all its
threads; the workers' own decode time is not counted, except with ``--workers 0``, where decoding is inline),
and wall time. On CUDA the batches are copied to the
device and the device is synchronised at the end.

    python benchmarks/bench_pipeline.py                        # CPU, 1 worker, the photo set x 6
    python benchmarks/bench_pipeline.py --workers 0            # decoding inline, the CPU default
    python benchmarks/bench_pipeline.py --device cuda --workers 15 --images all --copies 40 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from images import IMAGES, ensure_images  # noqa: E402
from report import save_json  # noqa: E402

from phi3embed.core.batching import _Assembler, _concat, _to_device  # noqa: E402
from phi3embed.core.config import PreprocessConfig  # noqa: E402
from phi3embed.inputs.listing import Source, expand_inputs  # noqa: E402
from phi3embed.jobs.local import crashed  # noqa: E402
from phi3embed.jobs.pool import OrderedPool  # noqa: E402
from phi3embed.jobs.prepare import Prepared, Preparer  # noqa: E402


class FloatPreparer:
    """The yardstick's worker: the same decode and tiling, then the float32 crops are what it sends."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.inner = Preparer(cfg)

    def __call__(self, source: Source) -> torch.Tensor | None:
        p = self.inner(source)
        return p.item.pixel_values if p.item is not None else None


def run(mode: str, sources: list[Source], args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = PreprocessConfig(num_crops=args.num_crops)
    fn: Any = Preparer(cfg) if mode == "uint8" else FloatPreparer(cfg)
    pool: OrderedPool[Source, Any] = OrderedPool(
        fn, workers=args.workers, window=2 * max(args.workers, 1) + 2, on_crash=crashed
    )
    assemble = _Assembler(device, dtype)
    pinned = device.type == "cuda"
    images = crops = handed = 0
    pieces: list[Any] = []
    batches = 0

    def flush() -> None:
        nonlocal pieces, batches
        if not pieces:
            return
        batch = assemble(pieces) if mode == "uint8" else _to_device(_concat(pieces, pinned=pinned), device, dtype)
        batches += 1
        del batch  # the encoder would run here
        pieces = []

    queued = 0
    pool.start(sources)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        for result in pool:
            if mode == "uint8":
                assert isinstance(result, Prepared) and result.item is not None, result
                item = result.item
                n = item.num_real_crops
                handed += item.tiles.nbytes + item.global_view.nbytes
                pieces.append((item, 0, n))  # whole images per batch in both modes: the same batches
            else:
                pixel_values = result
                assert isinstance(pixel_values, torch.Tensor), result
                n = pixel_values.shape[0]
                handed += pixel_values.nbytes
                pieces.append(pixel_values)
            images += 1
            crops += n
            queued += n
            if queued >= args.batch_size:
                flush()
                queued = 0
        flush()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        pool.close()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "mode": mode,
        "images": images,
        "crops": crops,
        "batches": batches,
        "mb_per_image": round(handed / images / 1e6, 2),
        "host_cpu_ms_per_image": round(1000 * cpu / images, 2),
        "wall_ms_per_image": round(1000 * wall / images, 1),
        "images_per_s": round(images / wall, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--images", default="photos", help=f"comma-separated subset of {[s.name for s in IMAGES]}")
    ap.add_argument("--copies", type=int, default=6, help="each image this many times")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--num-crops", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.images == "photos":
        names = [s.name for s in IMAGES if s.photo]
    elif args.images == "all":
        names = [s.name for s in IMAGES]
    else:
        names = args.images.split(",")
    paths = [p for _, p in ensure_images(names)]
    folder = Path(tempfile.mkdtemp(prefix="phi3embed-bench-pipeline-"))
    for c in range(args.copies):  # distinct names (the source list drops repeated paths), the same bytes
        for p in paths:
            os.link(p, folder / f"{c:04d}-{p.name}")
    sources = expand_inputs([str(folder)])
    report: dict[str, Any] = {"device": args.device, "workers": args.workers, "batch_size": args.batch_size}
    report["runs"] = [run(mode, sources, args) for mode in ("float32", "uint8", "float32", "uint8")]
    best = {
        m: min((r for r in report["runs"] if r["mode"] == m), key=lambda r: r["host_cpu_ms_per_image"])
        for m in ("float32", "uint8")
    }
    report["bytes_ratio"] = round(best["float32"]["mb_per_image"] / best["uint8"]["mb_per_image"], 2)
    report["host_cpu_ratio"] = round(
        best["float32"]["host_cpu_ms_per_image"] / best["uint8"]["host_cpu_ms_per_image"], 2
    )
    print(
        f"# bench_pipeline: {args.device}, {args.workers} workers, {len(sources)} images, {args.batch_size} crops/batch"
    )
    print("| transfer | MB/image | host CPU ms/image | wall ms/image | images/s |")
    print("|---|---|---|---|---|")
    for r in report["runs"]:
        print(
            f"| {r['mode']} | {r['mb_per_image']} | {r['host_cpu_ms_per_image']} | {r['wall_ms_per_image']} | "
            f"{r['images_per_s']} |"
        )
    print(
        f"# uint8 vs float32 (best of 2 each): {report['bytes_ratio']}x fewer bytes per image; host CPU per image "
        f"{best['uint8']['host_cpu_ms_per_image']} ms vs {best['float32']['host_cpu_ms_per_image']} ms "
        f"(float32/uint8 = {report['host_cpu_ratio']})"
    )
    shutil.rmtree(folder, ignore_errors=True)
    save_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
