"""Page faults of one real-size CLIP-L encoder layer, with glibc's defaults and with the allocator tuning.

What ``phi3embed.core.allocator.keep_freed_memory`` is for: with glibc's defaults every ~38 MB activation
(``[4, 577, 4096]`` float32) is mapped afresh and faulted in page by page on every pass; tuned, most land
on pages the previous pass freed. This measures the machine (kernel, C library), not phi3embed's code, so it
is a benchmark and not a test. Runs in a fresh process, as the tuning is process-wide and cannot be undone.

    python benchmarks/page_faults.py            # prints: state, faults default, faults tuned, ratio
    python benchmarks/page_faults.py --json out.json

Measured on the 2-core CPU host: 69k-108k faults in 3 passes with the defaults, 13.8k tuned.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import save_json  # noqa: E402


def child(passes: int) -> None:
    """Runs in the fresh process: faults of ``passes`` layer passes before and after the tuning."""
    import torch
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    from phi3embed.core.allocator import keep_freed_memory
    from phi3embed.core.model import QuickGELU

    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, hidden_act="quick_gelu")
    cfg._attn_implementation = "sdpa"
    layer = CLIPEncoderLayer(cfg).eval()  # one real-size CLIP-L layer, as the fast path builds it
    layer.mlp.activation_fn = QuickGELU()
    x = torch.randn(4, 577, 1024)  # (4 crops, 1 + 24*24 tokens, C): the CPU default batch

    def faults() -> int:
        layer(x, None)  # warm-up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(passes):
            layer(x, None)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with torch.inference_mode():
        default = faults()
        state = keep_freed_memory()
        print(state.replace(" ", "_"), default, faults())


def measure(passes: int = 3) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter and return its figures."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--passes", str(passes)], capture_output=True, text=True, check=True
    )
    state, default, tuned = out.stdout.split()
    return {
        "allocator_state": state.replace("_", " "),
        "passes": passes,
        "faults_default": int(default),
        "faults_tuned": int(tuned),
        "ratio": round(int(default) / max(1, int(tuned)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.passes)
        return
    report = measure(args.passes)
    save_json(args.json, report)
    for key, value in report.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
