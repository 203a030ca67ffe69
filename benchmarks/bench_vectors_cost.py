"""What ``encode --vectors cls,mean,tokens`` costs over a plain encode, on a real-size model.

Two measures, in one process on one embedder (full-size random checkpoint, benchmarks/make_checkpoint.py):

* whole images, alternating: ``embed_stream`` (the plain encode) and ``embed_vectors_stream`` with the three
  kinds, the same preprocessed images, ``--pairs`` times each in turn; the median of each and their ratio. On
  a shared host the run-to-run noise can exceed the effect: the second measure is the one to trust there;
* the extra work alone: the :class:`~phi3embed.core.vectors.VectorHead` (the CLIP layers after ``layer_idx``
  and the final layer norm) on the images' global views and the means, timed alternately with the encoder on
  one crop, so both see the same load: extra / (crops x one crop's time).

Run: ``python benchmarks/make_checkpoint.py --lm-layers 0 --out /tmp/phi3v-vision-only`` then
``python benchmarks/bench_vectors_cost.py --checkpoint /tmp/phi3v-vision-only --num-crops 16``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from phi3embed import Phi3VisionEmbedder
from phi3embed.core.vectors import VECTOR_KINDS, image_vectors

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--num-crops", type=int, default=16)
    ap.add_argument("--images", default="photo", help="names from benchmarks/images.py, comma list")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--head-repeats", type=int, default=5)
    args = ap.parse_args()

    import sys

    sys.path.insert(0, str(HERE))
    from images import ensure_images  # type: ignore[import-not-found]

    paths = [p for _, p in ensure_images(args.images.split(","))]
    emb = Phi3VisionEmbedder.from_pretrained(args.checkpoint, num_crops=args.num_crops, tune_allocator=True)
    items = [(i, emb.preprocess(p)) for i, p in enumerate(paths)]
    crops = sum(1 + int(it.tiles.shape[0]) for _, it in items)
    head = emb.vector_head()
    print(f"{len(paths)} images, {crops} crops (global views included), num_crops {args.num_crops}", flush=True)

    def plain() -> float:
        t = time.perf_counter()
        for _ in emb.embed_stream(items):
            pass
        return time.perf_counter() - t

    def with_vectors() -> float:
        t = time.perf_counter()
        for _ in emb.embed_vectors_stream(items, kinds=VECTOR_KINDS):
            pass
        return time.perf_counter() - t

    with torch.inference_mode():
        emb.model.crop_features(items[0][1].global_view)  # warm-up
    a, b = [], []
    for i in range(args.pairs):
        first, second = (plain, with_vectors) if i % 2 == 0 else (with_vectors, plain)
        x, y = first(), second()
        (a if first is plain else b).append(x)
        (b if first is plain else a).append(y)
        print(f"pair {i + 1}: plain {a[-1]:.2f} s, with vectors {b[-1]:.2f} s", flush=True)
    ratio = statistics.median(b) / statistics.median(a)
    print(f"whole images: plain median {statistics.median(a):.2f} s, with vectors {statistics.median(b):.2f} s, "
          f"ratio {ratio:.4f} ({(ratio - 1) * 100:+.2f} %)")  # fmt: skip

    # the extra work alone, alternating with the encoder on one crop at a time (the same load on both)
    with torch.inference_mode():
        views = torch.cat([it.global_view for _, it in items])  # (n, 3, S, S)
        hidden = emb.model.crop_hidden(views)  # (n, 1 + g*g, C)
        projected = [t for _, _, t in emb.embed_stream(items)]
        grids = [(it.grid.rows, it.grid.cols) for _, it in items]
        extra, crop = [], []
        for _ in range(args.head_repeats):
            t = time.perf_counter()
            image_vectors(
                VECTOR_KINDS, global_hidden=hidden, projected=projected, grids=grids, cfg=emb.vision_config, head=head
            )
            extra.append(time.perf_counter() - t)
            t = time.perf_counter()
            emb.model.crop_features(views[:1])  # one crop, encoder stopped at layer_idx
            crop.append(time.perf_counter() - t)
    x, c = statistics.median(extra), statistics.median(crop)
    print(f"extra work alone (head on {len(items)} global views + means): {x:.3f} s, one crop's encoder pass "
          f"{c:.3f} s (medians of {args.head_repeats}, alternating): {x / (c * crops) * 100:.2f} % of the "
          f"{crops} crops' encoder passes; {x / statistics.median(a) * 100:.2f} % of the plain encode's median")  # fmt: skip


if __name__ == "__main__":
    main()
