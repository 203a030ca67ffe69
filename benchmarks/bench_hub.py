"""Bytes a first run from the hub moves: range reads of the vision tensors vs downloading their weight file.

Serves a repository in the real Phi-3-vision-128k-instruct layout (docs/pipeline.md §13: the 397 vision tensors
with their real names and shapes in bf16, in ``model-00001-of-00002.safetensors`` beside ``model.embed_tokens``
and decoder layers 0-18, the rest of the decoder in the second file) from the test suite's hub-like server on
127.0.0.1 (tests/hubserver.py). Every tensor is a sparse hole, so the 8.3 GB repository costs no disk and no
generation time; the bytes on the wire are what is measured. Then resolves it as ``phi3embed encode`` does and
prints the bytes served per file against the vision bytes, and the whole-file download it replaces.

    .venv/bin/python benchmarks/bench_hub.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

import make_checkpoint  # noqa: E402
from hubserver import FakeHub, huggingface_hub_settings  # noqa: E402
from report import save_json  # noqa: E402

REPO_ID = "bench/phi3v-128k-layout"
COMMIT = "c0ffee" + "0" * 34
SHARD1_LAYERS = 19  # layers 0-18 in the first weight file (§13: 18 in part; whole here)


def write_layout(dest: Path) -> dict[str, int]:
    """The real layout as sparse files; returns {file name: size}."""
    from phi3embed.core.config import presets

    preset = presets()[make_checkpoint.PRESET]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(preset.config))
    (dest / "preprocessor_config.json").write_text(json.dumps(preset.preprocessor_config))
    first, second = make_checkpoint.shard_plan(make_checkpoint.LM_LAYERS_REAL, SHARD1_LAYERS)
    weight_map, sizes = {}, {}
    for name, specs in (("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)):
        specs = sorted(specs, key=lambda s: s.name)  # safetensors stores bf16 tensors in name order
        header = make_checkpoint._header(specs)
        with open(dest / name, "wb") as fh:
            fh.write(header)
            fh.truncate(len(header) + sum(2 * s.numel for s in specs))
        sizes[name] = (dest / name).stat().st_size
        weight_map.update({s.name: name for s in specs})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp:
        root = Path(tmp)
        sizes = write_layout(root / "repo")
        os.environ["PHI3EMBED_CACHE"] = str(root / "cache")
        from phi3embed.core.checkpoint import read_safetensors_header, resolve
        from phi3embed.core.info import model_info

        header = read_safetensors_header(root / "repo" / "model-00001-of-00002.safetensors")
        vision = sum(i.nbytes for k, i in header.items() if k.startswith("model.vision_embed_tokens."))
        with FakeHub({REPO_ID: {COMMIT: root / "repo"}}, {REPO_ID: {"main": COMMIT}}) as hub:
            for module, name, value in huggingface_hub_settings(hub.url, hf_cache=str(root / "hf")):
                setattr(module, name, value)
            info = model_info(REPO_ID)
            hub.reset_counts()
            start = time.perf_counter()
            ckpt = resolve(REPO_ID)
            seconds = time.perf_counter() - start
            served = dict(hub.served)
            requests = [r for r in hub.requests if r[2] is not None]
        weight = sum(n for f, n in served.items() if f.endswith(".safetensors"))
        configs = sum(n for f, n in served.items() if not f.endswith(".safetensors"))
        whole = sizes["model-00001-of-00002.safetensors"]
        report = {
            "vision_tensors": len(ckpt.vision_keys()),
            "vision_bytes": vision,
            "weight_bytes_served": weight,
            "config_and_index_bytes_served": configs,
            "ratio_to_vision_bytes": round(weight / vision, 5),
            "info_predicted_bytes": info.bytes_to_fetch,
            "ranged_requests": len(requests),
            "whole_weight_file_bytes": whole,
            "repository_bytes": sum(sizes.values()),
            "saving_vs_whole_file": round(whole / (weight + configs), 2),
            "seconds_on_localhost": round(seconds, 2),
        }
    for key, value in report.items():
        print(f"{key:32s} {value:,}" if isinstance(value, int) else f"{key:32s} {value}")
    save_json(args.json, report)


if __name__ == "__main__":
    main()
