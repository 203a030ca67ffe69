"""Build (once, cached) a full-size random checkpoint with the real shapes of Phi-3-vision-128k-instruct.

Layout, as docs/pipeline.md §13 describes the real one:

* ``config.json`` / ``preprocessor_config.json`` from the ``phi-3-vision-128k-instruct`` preset,
* ``model-00001-of-00002.safetensors``: all 397 vision tensors (real names and shapes, bfloat16),
  ``model.embed_tokens.weight`` [32064, 3072] and the first ``--shard1-layers`` decoder layers,
* ``model-00002-of-00002.safetensors``: the remaining decoder layers, ``model.norm.weight`` and
  ``lm_head.weight`` (a multi-GB language-model shard that a vision-only loader must never read),
* ``model.safetensors.index.json`` mapping every key to its shard.

Shards are written by streaming: the safetensors header is built from the shapes, then each tensor's
bytes are generated and written in chunks of at most ``CHUNK`` elements, so memory stays small whatever
the shard size. Weights are random but sane (linear weights std 0.02, layer-norm weights 1 + 0.02 noise,
small biases), so a real-size forward pass gives finite, well-scaled activations.

The real model has 32 decoder layers (an 8.3 GB checkpoint); by default this writes 18 of them, which
keeps the language-model shard at about 3.6 GB. ``--lm-layers 0`` gives a vision-only checkpoint (plus a
tiny second shard) in a few seconds, for machines where only encoder timing matters.

    python benchmarks/make_checkpoint.py                 # builds .bench-cache/phi3v-128k-random (once)
    python benchmarks/make_checkpoint.py --lm-layers 0 --out /tmp/phi3v-vision-only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".bench-cache" / "phi3v-128k-random"
PRESET = "phi-3-vision-128k-instruct"
CHUNK = 1 << 23  # elements generated and written at a time (16 MiB of bf16)
RECIPE_VERSION = 1  # bump when the recipe changes: cached checkpoints with another version are rebuilt
COMPLETE = "BENCH_CHECKPOINT.json"  # written last: its presence (with the same recipe) means "built"

# Phi-3-mini language model (the text half of Phi-3-vision): shapes of one decoder layer.
LM_HIDDEN = 3072
LM_INTERMEDIATE = 8192
LM_VOCAB = 32064
LM_LAYERS_REAL = 32


@dataclass(frozen=True)
class Spec:
    """One tensor to write: name, shape, and how to fill it (normal(mean, std))."""

    name: str
    shape: tuple[int, ...]
    std: float
    mean: float = 0.0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def vision_specs() -> list[Spec]:
    """All vision tensors of the real model: names and shapes from our own model built on the meta device."""
    from phi3embed.core.config import presets, vision_config_from_dict
    from phi3embed.core.model import Phi3VisionModel

    cfg = vision_config_from_dict(presets()[PRESET].config, where=PRESET)
    with torch.device("meta"):
        model = Phi3VisionModel(cfg, full_depth=True, attn="eager")
    shapes = model.expected_checkpoint_shapes()
    specs = []
    for key in sorted(shapes):
        shape = shapes[key]
        leaf = key.rsplit(".", 1)[-1]
        is_norm = "layer_norm" in key or "layrnorm" in key or "layernorm" in key
        if is_norm and leaf == "weight":
            specs.append(Spec(key, shape, std=0.02, mean=1.0))
        elif leaf == "bias":
            specs.append(Spec(key, shape, std=0.01))
        else:  # linear / conv weights, embeddings, separators
            specs.append(Spec(key, shape, std=0.02))
    return specs


def lm_layer_specs(i: int) -> list[Spec]:
    p = f"model.layers.{i}."
    h, m = LM_HIDDEN, LM_INTERMEDIATE
    return [
        Spec(p + "input_layernorm.weight", (h,), std=0.02, mean=1.0),
        Spec(p + "mlp.down_proj.weight", (h, m), std=0.02),
        Spec(p + "mlp.gate_up_proj.weight", (2 * m, h), std=0.02),
        Spec(p + "post_attention_layernorm.weight", (h,), std=0.02, mean=1.0),
        Spec(p + "self_attn.o_proj.weight", (h, h), std=0.02),
        Spec(p + "self_attn.qkv_proj.weight", (3 * h, h), std=0.02),
    ]


def shard_plan(lm_layers: int, shard1_layers: int) -> tuple[list[Spec], list[Spec]]:
    """(shard 1 specs, shard 2 specs): vision + embed_tokens + first layers | the rest of the LM."""
    s1 = vision_specs()
    assert len(s1) == 397, f"expected 397 vision tensors (docs/pipeline.md §13), got {len(s1)}"
    s1.append(Spec("model.embed_tokens.weight", (LM_VOCAB, LM_HIDDEN), std=0.02))
    first = min(shard1_layers, lm_layers)
    for i in range(first):
        s1 += lm_layer_specs(i)
    s2: list[Spec] = []
    for i in range(first, lm_layers):
        s2 += lm_layer_specs(i)
    s2.append(Spec("model.norm.weight", (LM_HIDDEN,), std=0.02, mean=1.0))
    if lm_layers > 0:
        s2.append(Spec("lm_head.weight", (LM_VOCAB, LM_HIDDEN), std=0.02))
    return s1, s2


def _header(specs: list[Spec]) -> bytes:
    """safetensors header: 8-byte little-endian length + JSON padded with spaces to a multiple of 8."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt", "phi3embed_bench": "random weights"}}
    offset = 0
    for s in specs:
        nbytes = 2 * s.numel  # bf16
        meta[s.name] = {"dtype": "BF16", "shape": list(s.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _chunks(spec: Spec, gen: torch.Generator) -> Iterator[bytes]:
    left = spec.numel
    while left:
        n = min(left, CHUNK)
        x = torch.randn(n, generator=gen, dtype=torch.float32)
        x.mul_(spec.std).add_(spec.mean)
        yield x.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
        left -= n


def write_shard(path: Path, specs: list[Spec], *, seed: int) -> int:
    """Stream ``specs`` into a safetensors file; returns the file size. Memory stays at one chunk."""
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as fh:
        fh.write(_header(specs))
        for s in specs:
            for block in _chunks(s, gen):
                fh.write(block)
    return path.stat().st_size


def recipe(lm_layers: int, shard1_layers: int, seed: int) -> dict[str, object]:
    return {
        "recipe_version": RECIPE_VERSION,
        "preset": PRESET,
        "lm_layers": lm_layers,
        "shard1_layers": shard1_layers,
        "seed": seed,
    }


def is_built(out: Path, want: dict[str, object]) -> bool:
    marker = out / COMPLETE
    if not marker.is_file():
        return False
    try:
        got = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(got.get(k) == v for k, v in want.items())


def build(out: Path, *, lm_layers: int = 18, shard1_layers: int = 3, seed: int = 0, force: bool = False) -> Path:
    """Build the checkpoint at ``out`` unless an identical one is already there. Returns ``out``."""
    from phi3embed.core.config import presets

    want = recipe(lm_layers, shard1_layers, seed)
    if not force and is_built(out, want):
        return out
    s1, s2 = shard_plan(lm_layers, shard1_layers)
    total = 2 * sum(s.numel for s in s1 + s2)
    free = shutil.disk_usage(out.parent if out.parent.exists() else REPO).free
    if free < total + (1 << 30):
        raise SystemExit(f"make_checkpoint: need {total / 1e9:.1f} GB + 1 GB spare, only {free / 1e9:.1f} GB free")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    preset = presets()[PRESET]
    (tmp / "config.json").write_text(json.dumps(preset.config, indent=2) + "\n")
    (tmp / "preprocessor_config.json").write_text(json.dumps(preset.preprocessor_config, indent=2) + "\n")
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map: dict[str, str] = {}
    sizes = []
    for i, (name, specs) in enumerate(zip(names, (s1, s2), strict=True)):
        print(f"make_checkpoint: writing {name} ({2 * sum(s.numel for s in specs) / 1e9:.2f} GB)", file=sys.stderr)
        sizes.append(write_shard(tmp / name, specs, seed=seed * 1000 + i))
        weight_map.update({s.name: name for s in specs})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    info = {
        **want,
        "total_tensor_bytes": total,
        "file_bytes": sum(sizes),
        "vision_tensors": sum(1 for s in s1 if s.name.startswith("model.vision_embed_tokens.")),
        "vision_bytes": 2 * sum(s.numel for s in s1 if s.name.startswith("model.vision_embed_tokens.")),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    (tmp / COMPLETE).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"make_checkpoint: built {out} ({sum(sizes) / 1e9:.2f} GB) in {info['build_seconds']} s", file=sys.stderr)
    return out


def checkpoint_size(path: Path) -> int:
    """Bytes of all weight files in a checkpoint directory."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory (default: %(default)s)")
    ap.add_argument("--lm-layers", type=int, default=18, help="decoder layers to write (real model: 32)")
    ap.add_argument("--shard1-layers", type=int, default=3, help="decoder layers stored in shard 1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if a matching checkpoint exists")
    args = ap.parse_args()
    if not 0 <= args.lm_layers <= LM_LAYERS_REAL:
        ap.error(f"--lm-layers must be in 0..{LM_LAYERS_REAL}")
    out = build(args.out, lm_layers=args.lm_layers, shard1_layers=args.shard1_layers, seed=args.seed, force=args.force)
    print(out)


if __name__ == "__main__":
    main()
