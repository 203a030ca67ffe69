"""Load the full-size random checkpoint vision-only and encode one image, in a fresh process: time and memory.

Prints (stdout, one ``key: value`` per line) the checkpoint load time, the encode time, peak RSS of the
child process (``ru_maxrss``: loading + encoding, the import of torch/transformers included), the bytes of
tensor payload read (``Checkpoint.bytes_read``) against the checkpoint's size, and what the official route
(loading the whole model) would need, computed from the real checkpoint's size.

    python benchmarks/bench_load.py                    # float32, CPU, the 1024x768 photo, num_crops 16
    python benchmarks/bench_load.py --image panorama --num-crops 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Phi-3-vision-128k-instruct, model.safetensors.index.json: total_size (docs/pipeline.md §13). bf16 = 2 bytes/parameter.
REAL_TOTAL_BYTES = 8_293_242_880


def _rss_kib() -> int:
    """Current resident set size in KiB (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def child(args: argparse.Namespace) -> dict[str, object]:
    """Runs in the fresh process: import, load, encode; report."""
    t0 = time.perf_counter()
    import torch

    from phi3embed import Phi3VisionEmbedder

    if args.threads:
        torch.set_num_threads(args.threads)
    rss_imported = _rss_kib()
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    emb = Phi3VisionEmbedder.from_pretrained(
        args.checkpoint,
        device="cpu",
        dtype=args.dtype,
        num_crops=args.num_crops,
        batch_size=args.batch_size or None,
    )
    t_load = time.perf_counter() - t1
    rss_loaded = _rss_kib()
    peak_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t2 = time.perf_counter()
    (out,) = emb.encode([args.image])
    t_encode = time.perf_counter() - t2
    assert emb.checkpoint is not None
    ckpt = emb.checkpoint
    vision_bytes = sum(ckpt.tensors[k].nbytes for k in ckpt.vision_keys())
    return {
        "import_s": round(t_import, 2),
        "load_s": round(t_load, 2),
        "encode_s": round(t_encode, 2),
        "tokens": out.shape[0],
        "batch_size_used": emb.batch_size,
        "finite": bool(torch.isfinite(out).all()),
        "emb_std": float(out.float().std()),
        "rss_after_import_mib": round(rss_imported / 1024),
        "rss_after_load_mib": round(rss_loaded / 1024),
        "peak_rss_after_load_mib": round(peak_after_load / 1024),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "bytes_read": ckpt.bytes_read,
        "vision_bytes": vision_bytes,
        "params_loaded": sum(p.numel() for p in emb.model.parameters()),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: build/use the cached random one")
    ap.add_argument("--image", default="photo", help="benchmark image name or a path (default: %(default)s)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-crops", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=0, help="crops per forward pass (0: the library's default)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print(json.dumps(child(args)))
        return

    import make_checkpoint
    from images import ensure_images

    ckpt_dir = args.checkpoint or make_checkpoint.build(make_checkpoint.DEFAULT_OUT)
    image = Path(args.image) if Path(args.image).is_file() else ensure_images([args.image])[0][1]
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--checkpoint",
        str(ckpt_dir),
        "--image",
        str(image),
        "--dtype",
        args.dtype,
        "--num-crops",
        str(args.num_crops),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    wall = time.perf_counter() - t0
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    total = make_checkpoint.checkpoint_size(ckpt_dir)
    report = {
        "checkpoint": str(ckpt_dir),
        "checkpoint_bytes": total,
        "image": image.name,
        "dtype": args.dtype,
        "num_crops": args.num_crops,
        "batch_size": args.batch_size,
        **res,
        "bytes_read_fraction_of_checkpoint": round(res["bytes_read"] / total, 4),
        "child_wall_s": round(wall, 2),
        "official_route_bf16_bytes": REAL_TOTAL_BYTES,
        "official_route_float32_bytes": 2 * REAL_TOTAL_BYTES,
    }
    for key, value in report.items():
        print(f"{key}: {value}")
    peak_gb = res["peak_rss_mib"] / 1024
    print(
        f"# peak RSS {peak_gb:.2f} GiB ({'under' if peak_gb < 2 else 'OVER'} the 2 GiB target); read "
        f"{res['bytes_read'] / 1e9:.2f} GB of a {total / 1e9:.2f} GB checkpoint; the official route loads all "
        f"{REAL_TOTAL_BYTES / 1e9:.1f} GB of weights (bf16; {2 * REAL_TOTAL_BYTES / 1e9:.1f} GB as float32)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
