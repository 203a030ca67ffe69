"""CPU bfloat16 vs float32 (issue 21 groundwork): what this host's matrix units give, and how much of it one
real-size CLIP ViT-L/14-336 encoder layer turns into speed.

Prints, in one process: the CPU's bf16-related flags (``amx_bf16``, ``avx512_bf16``), the GEMM rate of both
dtypes (``--gemm`` cubed, best of ``--repeat``), and the time of one encoder layer of the real shape (hidden
1024, MLP 4096, 16 heads, 577 tokens, quick-GELU; random weights) on ``--crops`` crops, with eager and SDPA
attention (and SDPA with the bf16 linears prepacked, as encode runs bf16 on the CPU), in both dtypes, as GFLOP/s
and as the bf16 / float32 speed ratio. The layer is where the model
spends its time (24 of them per crop), so its ratio bounds what ``encode --dtype bfloat16`` can gain here.

    python benchmarks/bench_cpu_bf16.py [--crops 4] [--gemm 2048] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


def best_seconds(fn: Any, repeat: int) -> float:
    fn()  # warm-up: kernel selection, allocations
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_rate(dtype: torch.dtype, n: int, repeat: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeat) / 1e9


def layer_flops(crops: int, tokens: int = 577, hidden: int = 1024, mlp: int = 4096) -> int:
    """Multiply-adds x 2 of one layer: q/k/v/o projections, the MLP, and the two attention products."""
    return crops * 2 * (4 * tokens * hidden * hidden + 2 * tokens * hidden * mlp + 2 * tokens * tokens * hidden)


def layer_seconds(attn: str, dtype: torch.dtype, crops: int, repeat: int, *, packed: bool = False) -> float:
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    cfg = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=24,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
    )
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    layer = CLIPEncoderLayer(cfg).eval().to(dtype)
    if (
        packed and dtype == torch.bfloat16
    ):  # encode's bfloat16 CPU path: linear weights prepacked for oneDNN (phi3embed/core/cpu.py)
        from phi3embed.core.cpu import pack_linears

        if not pack_linears(layer, rows_hint=crops * 577):
            raise SystemExit("this PyTorch cannot pack bfloat16 linears for oneDNN")
    x = torch.randn(crops, 577, 1024, dtype=dtype)

    def run() -> None:
        with torch.inference_mode():
            try:
                layer(x, None, None)
            except TypeError:  # transformers 5 takes the attention mask alone
                layer(x, None)

    return best_seconds(run, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=4)
    parser.add_argument("--gemm", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "flags": cpu_flags()}
    print(f"torch {report['torch']}, {report['threads']} threads, CPU flags: {' '.join(report['flags']) or 'none'}")
    rates = {str(d): gemm_rate(d, args.gemm, args.repeat) for d in (torch.float32, torch.bfloat16)}
    report["gemm_gflops"] = rates
    ratio = rates["torch.bfloat16"] / rates["torch.float32"]
    print(f"GEMM {args.gemm}^3: float32 {rates['torch.float32']:.0f}, bfloat16 {rates['torch.bfloat16']:.0f} GFLOP/s "
          f"({ratio:.2f}x)")  # fmt: skip
    flops = layer_flops(args.crops)
    report["layer"] = {}
    for attn in ("eager", "sdpa", "sdpa+packed"):
        secs = {
            str(d): layer_seconds(attn.split("+")[0], d, args.crops, args.repeat, packed="packed" in attn)
            for d in (torch.float32, torch.bfloat16)
        }
        report["layer"][attn] = secs
        f32, bf16 = secs["torch.float32"], secs["torch.bfloat16"]
        print(
            f"one CLIP-L layer, {args.crops} crops, {attn}: float32 {f32 * 1e3:.0f} ms ({flops / f32 / 1e9:.0f} GFLOP/s), "
            f"bfloat16 {bf16 * 1e3:.0f} ms ({flops / bf16 / 1e9:.0f} GFLOP/s): {f32 / bf16:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
