"""float32 vs bfloat16 on the CPU through the real command (issue 21): steady seconds per image, compute limit,
peak memory, per-token cosine, and where the time goes by op.

Each variant is ``phi3embed encode`` on the real-size random checkpoint (``make_checkpoint.py --lm-layers 0``)
with ``--device cpu --dtype D``, in a fresh process, once on 1 copy of the image and once on ``--n`` copies
(``--no-dedup``: every copy is encoded). The steady time per image is ``(T_n - T_1) / (n - 1)``, so start-up,
model loading and the first batch's warm-up cancel out. Variants run alternately, ``--rounds`` times, and the
least steady time of each is kept (other tenants only ever add time). Wall time and CPU time (user + system,
from the child's own rusage) are both reported; peak RSS is the child's ``ru_maxrss``.

Variants: ``float32``, ``bfloat16`` (the packed bf16 path), ``bfloat16-unpacked`` (``PHI3EMBED_BF16_PACKING=0``:
what bf16 was before issue 21), ``float32-compiled`` / ``bfloat16-compiled`` (``--compile``; one untimed run first
fills inductor's cache, so both timed runs find it warm and the compile time cancels like the rest of start-up),
and with ``--before DIR`` (a checkout of an older commit) ``float32-before``:
the float32 command of that tree, to show float32 did not get slower or change its bytes.

Also measured in the same run: the GEMM rate of both dtypes (2048^3, best of 3, before every round), from which
each variant's compute limit (the image's FLOP at the GEMM rate of its dtype) and ``x limit`` follow; the per-token
cosine of every bf16 variant's outputs against float32's; bit-equality of ``bfloat16`` and ``bfloat16-unpacked``
and of ``float32`` and ``float32-before``. ``--profile`` adds torch.profiler tables of one image in each dtype
(in this process, allocator tuned as the command does), grouped into linear layers, attention and the rest.

    python benchmarks/bench_cpu_dtype.py [--image photo] [--n 3] [--rounds 2] [--before /tmp/old-tree] \\
        [--profile] [--json benchmarks/results/cpu_dtype.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from images import ensure_images  # noqa: E402
from report import save_json  # noqa: E402

CLI = str(Path(sys.executable).with_name("phi3embed"))


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: str
    env: dict[str, str]
    args: tuple[str, ...] = ()


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def gemm_rates(n: int = 2048, repeat: int = 3) -> dict[str, float]:
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        rates[str(dtype).removeprefix("torch.")] = 2 * n**3 / best / 1e9
    return rates


def run_cli(variant: Variant, src: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    cmd = [CLI, "encode", str(src), "-o", str(out), "--model", str(args.checkpoint), "--device", "cpu",
           "--dtype", variant.dtype, "--num-crops", str(args.num_crops), "--no-dedup", "-q", *variant.args]  # fmt: skip
    env = dict(os.environ, **variant.env)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{variant.name}: {' '.join(cmd)} failed:\n{err}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_bytes": usage.ru_maxrss * 1024}


def outputs(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted(out.rglob("*.npy"))}


def min_token_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))
    return float(cos.min())


def profile(checkpoint: Path, image: Path, num_crops: int) -> dict[str, Any]:
    """Self CPU time by op of one image in each dtype (and bf16 unpacked), grouped."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from phi3embed import Phi3VisionEmbedder

    groups = {
        "linear": ("aten::addmm", "aten::mm", "mkldnn::_linear_pointwise", "aten::bmm", "aten::mkldnn_linear"),
        "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax"),
        "elementwise": ("aten::mul", "aten::mul_", "aten::sigmoid_", "aten::sigmoid", "aten::add", "aten::add_",
                        "aten::native_layer_norm", "aten::copy_", "aten::gelu"),
    }  # fmt: skip
    report: dict[str, Any] = {}
    for name, dtype, pack in (("float32", "float32", "1"), ("bfloat16", "bfloat16", "1"),
                              ("bfloat16-unpacked", "bfloat16", "0")):  # fmt: skip
        os.environ["PHI3EMBED_BF16_PACKING"] = pack
        emb = Phi3VisionEmbedder.from_pretrained(checkpoint, dtype=dtype, num_crops=num_crops, tune_allocator=True)
        item = emb.preprocess(image)
        with torch.inference_mode():
            emb.embed([item])  # warm-up
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                emb.embed([item])
                wall = time.perf_counter() - start
        ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
        total = sum(ops.values())
        by_group = {g: sum(s for k, s in ops.items() if k in keys) for g, keys in groups.items()}
        by_group["other"] = total - sum(by_group.values())
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:10]
        report[name] = {"wall_s": wall, "self_cpu_s": total, "groups_s": by_group, "top_ops_s": dict(top)}
        log(
            f"profile {name}: {wall:.2f} s; "
            + ", ".join(f"{g} {s:.2f} s ({s / total:.0%})" for g, s in by_group.items())
        )
        del emb
    os.environ.pop("PHI3EMBED_BF16_PACKING", None)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REPO / ".bench-cache" / "phi3v-vision-only")
    parser.add_argument("--image", default="photo", help="a benchmarks/images.py name (photo: 13 crops at 16)")
    parser.add_argument("--num-crops", type=int, default=16)
    parser.add_argument("--n", type=int, default=3, help="copies in the long run (the short run has 1)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="float32,bfloat16,bfloat16-unpacked")
    parser.add_argument("--before", type=Path, help="an older checkout: adds float32-before (its PYTHONPATH)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import make_checkpoint  # type: ignore[import-not-found]

    from phi3embed.core.cost import image_flops
    from phi3embed.core.cpu import matrix_units
    from phi3embed.core.embedder import Phi3VisionEmbedder

    args.checkpoint = make_checkpoint.build(args.checkpoint, lm_layers=0)
    ((_, image),) = ensure_images([args.image])
    probe = Phi3VisionEmbedder.from_pretrained(args.checkpoint, num_crops=args.num_crops)
    item = probe.preprocess(image)
    flops = image_flops(probe.vision_config, rows=item.grid.rows, cols=item.grid.cols)
    crops = 1 + item.grid.rows * item.grid.cols
    del probe, item

    known = {
        "float32": Variant("float32", "float32", {}),
        "bfloat16": Variant("bfloat16", "bfloat16", {}),
        "bfloat16-unpacked": Variant("bfloat16-unpacked", "bfloat16", {"PHI3EMBED_BF16_PACKING": "0"}),
        "float32-compiled": Variant("float32-compiled", "float32", {}, ("--compile",)),
        "bfloat16-compiled": Variant("bfloat16-compiled", "bfloat16", {}, ("--compile",)),
    }
    variants = [known[v] for v in args.variants.split(",")]
    if args.before:
        variants.append(Variant("float32-before", "float32", {"PYTHONPATH": str(args.before.resolve())}))
    units = matrix_units()
    report: dict[str, Any] = {
        "host": {
            "cpu": units.model,
            "units": units.label,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "image": {"name": args.image, "crops": crops, "gflop": flops / 1e9, "num_crops": args.num_crops},
        "n": args.n,
        "rounds": [],
    }
    log(f"{units.model} ({units.label}), {crops} crops per image, {flops / 1e9:.0f} GFLOP, n = {args.n}")
    work = Path(tempfile.mkdtemp(prefix="bench_cpu_dtype."))
    try:
        srcs = {}
        for count in (1, args.n):
            srcs[count] = work / f"src{count}"
            srcs[count].mkdir()
            for i in range(count):
                shutil.copy(image, srcs[count] / f"img{i:03d}{image.suffix}")
        kept: dict[str, dict[str, np.ndarray]] = {}
        for r in range(args.rounds):
            rates = gemm_rates()
            log(f"round {r + 1}: GEMM float32 {rates['float32']:.0f}, bfloat16 {rates['bfloat16']:.0f} GFLOP/s")
            round_report: dict[str, Any] = {"gemm_gflops": rates, "variants": {}}
            for v in variants:
                runs = {}
                if v.args and r == 0:  # --compile: prime inductor's cache, so that both timed runs find it warm
                    run_cli(v, srcs[1], work / f"prime-{v.name}", args)
                for count in (1, args.n):
                    out = work / f"out-{v.name}-{count}"
                    shutil.rmtree(out, ignore_errors=True)
                    runs[count] = run_cli(v, srcs[count], out, args)
                steady = {k: (runs[args.n][k] - runs[1][k]) / (args.n - 1) for k in ("wall_s", "cpu_s")}
                limit = flops / (rates[v.dtype] * 1e9)
                entry = {"runs": runs, "steady_s_per_image": steady, "limit_s": limit,
                         "x_limit": steady["wall_s"] / limit, "peak_rss_bytes": runs[args.n]["rss_bytes"]}  # fmt: skip
                round_report["variants"][v.name] = entry
                log(f"  {v.name}: {steady['wall_s']:.2f} s/image (CPU {steady['cpu_s']:.2f} s), "
                    f"{entry['x_limit']:.2f}x its limit, peak RSS {runs[args.n]['rss_bytes'] / 2**20:.0f} MiB")  # fmt: skip
                if r == 0:
                    kept[v.name] = outputs(work / f"out-{v.name}-{args.n}")
            report["rounds"].append(round_report)
            save_json(args.json, report)

        summary: dict[str, Any] = {}
        for v in variants:
            best = min(rr["variants"][v.name]["steady_s_per_image"]["wall_s"] for rr in report["rounds"])
            best_cpu = min(rr["variants"][v.name]["steady_s_per_image"]["cpu_s"] for rr in report["rounds"])
            rss = max(rr["variants"][v.name]["peak_rss_bytes"] for rr in report["rounds"])
            summary[v.name] = {"steady_wall_s": best, "steady_cpu_s": best_cpu, "peak_rss_bytes": rss}
        base = summary.get("float32")
        for name, s in summary.items():
            if base:
                s["speed_vs_float32"] = base["steady_wall_s"] / s["steady_wall_s"]
                s["cpu_speed_vs_float32"] = base["steady_cpu_s"] / s["steady_cpu_s"]
            if name.startswith("bfloat16") and "float32" in kept:
                s["min_token_cosine_vs_float32"] = min(
                    min_token_cosine(kept[name][k], kept["float32"][k]) for k in kept["float32"]
                )
        if "bfloat16" in kept and "bfloat16-unpacked" in kept:
            summary["bfloat16"]["same_bytes_as_unpacked"] = all(
                np.array_equal(kept["bfloat16"][k], kept["bfloat16-unpacked"][k]) for k in kept["bfloat16"]
            )
        if "float32" in kept and "float32-before" in kept:
            summary["float32"]["same_bytes_as_before"] = all(
                np.array_equal(kept["float32"][k], kept["float32-before"][k]) for k in kept["float32"]
            )
        report["summary"] = summary
        for name, s in summary.items():
            extra = "".join(f", {k} {v}" for k, v in s.items() if k.startswith(("min_token", "same_bytes")))
            log(f"{name}: best steady {s['steady_wall_s']:.2f} s/image (CPU {s['steady_cpu_s']:.2f}), "
                f"{s.get('speed_vs_float32', float('nan')):.2f}x float32, peak RSS "
                f"{s['peak_rss_bytes'] / 2**20:.0f} MiB{extra}")  # fmt: skip
        save_json(args.json, report)
        if args.profile:
            report["profile"] = profile(args.checkpoint, image, args.num_crops)
            save_json(args.json, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
