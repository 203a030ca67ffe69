"""Write the in-repo subset of the golden set: ``python tests/data/trim_golden.py FULL_GOLDEN tests/data/golden``.

Same layout and MANIFEST.json as the full set. Checkpoints, images, merge and bf16-native files are copied as they
are. Embedding files ship the full ``embeddings`` array only for FULL (the cases that cover every branch and the
ones tests load by name); every other embedding case becomes a compact npz at the same path (sample + per-row
statistics; its sha256 is in MANIFEST.json). Processor npz / HD PNG files are kept only where a test reads them:
MANIFEST.json holds the sha256 of every HD image and pixel_values tensor. The output is byte-for-byte deterministic.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np

SEED = 20240521
SAMPLE_SIZE = 2048
A, B = "expected/tiny-phi3v-128k-f32", "expected/tiny-phi35v-bf16"
FULL = {  # file -> keep clip_features (one small case only)
    f"{A}/16/panorama_4000x120.npz": False,  # 16 crops, the extreme panorama
    f"{A}/4/portrait_600x1400.npz": True,  # portrait (transposed), with CLIP features (3 crops: the smallest)
    f"{A}/4/tiny_7x9.npz": False,  # 7x9 upsampled; test_checkpoint
    f"{A}/4/rgba_500x400.npz": False,  # RGBA, alpha dropped
    f"{A}/4/rgb_337x335.npz": False,  # test_checkpoint
    f"{B}/4/rgb_337x335.npz": False,  # bf16 checkpoint; test_checkpoint
    f"{B}/4/photo_1000x750.npz": False,  # test_compat
    f"{B}/4/portrait_600x1400.npz": False,  # bf16 checkpoint, portrait; test_compat
    f"{A}/4/rgba_500x400.tf5_alpha_over_white.npz": False,  # variant, 4 crops (the 16-crop one is compact)
}
PROCESSOR_KEEP = {  # read by tests/test_inspect.py
    "expected/processor/4/rgb_336x336.npz",
    "expected/processor/4/rgb_336x336.hd.png",
    "expected/processor/4/portrait_600x1400.hd.png",
}
COPY_DIRS = ("checkpoints", "images", f"{A}/merge")


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed with fixed zip timestamps, so that reruns give identical bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(value), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue(), 8)


def compact(emb: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    index = np.sort(rng.choice(emb.size, size=min(SAMPLE_SIZE, emb.size), replace=False)).astype(np.int64)
    e64 = emb.astype(np.float64)
    return {
        "embeddings_shape": np.array(emb.shape, dtype=np.int64),
        "embeddings_sample_index": index,
        "embeddings_sample": emb.reshape(-1)[index].astype(np.float32),
        "embeddings_row_sum": e64.sum(axis=1),
        "embeddings_row_absmax": np.abs(e64).max(axis=1),
    }


def trim(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.iterdir():  # everything but the hand-written README.md is regenerated
        if old.is_dir():
            shutil.rmtree(old)
        elif old.name != "README.md":
            old.unlink()
    manifest = json.loads((src / "MANIFEST.json").read_text())
    for d in COPY_DIRS:
        shutil.copytree(src / d, dst / d)
    for rel in sorted(PROCESSOR_KEEP) + [c["file"] for c in manifest.get("bf16_native_cases", [])]:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)
    rng = np.random.default_rng(SEED)
    for case in manifest["embedding_cases"] + manifest["variant_cases"]:
        rel = case["file"]
        with np.load(src / rel) as z:
            data = {k: z[k] for k in z.files}
        if rel in FULL:
            drop = set() if FULL[rel] else {"clip_features"}
            save_npz(dst / rel, {k: v for k, v in data.items() if k not in drop})
        else:
            emb = data["embeddings"]
            keep = {"image_sizes": data["image_sizes"], "num_img_tokens": data["num_img_tokens"]}
            save_npz(dst / rel, keep | compact(emb, rng))
    manifest["subset"] = {
        "of": "the full golden set (MANIFEST.json there has the same cases)",
        "written_by": "tests/data/trim_golden.py",
        "full_embeddings": sorted(FULL),
        "compact_embeddings_sample_size": SAMPLE_SIZE,
        "seed": SEED,
        "processor_files_kept": sorted(PROCESSOR_KEEP),
    }
    (dst / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    trim(Path(sys.argv[1]), Path(sys.argv[2]))
