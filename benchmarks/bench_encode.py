"""Plain path vs fast path on a full-size random Phi-3-vision checkpoint, in ONE process.

For each path: seconds per image, images/s, tokens/s, achieved GFLOP/s, the ratio fast/plain, the ratio
to the compute limit, peak RSS (CPU) or peak GPU memory, checkpoint load time.

* plain path: ``Phi3VisionEmbedder(plain=True)``: zero crops padded to ``num_crops + 1`` and encoded, all
  24 layers with every hidden state kept, eager attention, one image per forward pass (the reference's
  compute; the yardstick).
* fast path (default): real crops only, encoder truncated at ``layer_idx``, SDPA attention, crops of
  several images packed into forward passes of ``--batch-sizes`` crops (each one measured; the best is
  reported as "fast"). On CPU, phi3embed keeps large freed blocks for reuse (phi3embed/allocator.py);
  the plain path runs with the C library's defaults, as the reference would.
* ``fast-untuned`` (CPU, optional, must come before ``fast`` in ``--paths``): the fast path with the C
  library's default allocator, to show what the allocator setting alone is worth in the same run.

Compute limit: the FLOPs of the real crops through the layers the fast path runs (plus patch embedding
and projection; ``flops.py``) divided by the GEMM rate measured in this run with a large matmul
(float32 on CPU, the compute dtype on CUDA). On CPU the host's speed drifts (other processes share the
cores), so GEMM samples of ``--gemm-seconds`` are taken before, between the images of, and after every
timed run, and the run's limit uses the mean of its own samples (the sampling time is not counted as
encode time). On CUDA the samples are taken before and after each run. Encode times exclude decoding and
tiling (images are preprocessed once, up front, and timed separately).

    python benchmarks/bench_encode.py                 # CPU float32, the photo set (2 photos), ~10-15 min
    python benchmarks/bench_encode.py --quick         # CPU, one 1024x768 photo, ~5 min
    python benchmarks/bench_encode.py --paths plain,fast-untuned,fast --batch-sizes 4
    python benchmarks/bench_encode.py --images all --batch-sizes 2,4,8,16
    python benchmarks/bench_encode.py --device cuda --dtype bfloat16 --images all --batch-sizes 16,32,64
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from flops import crop_flops, image_flops  # noqa: E402
from images import IMAGES, ensure_images  # noqa: E402
from report import save_json  # noqa: E402

from phi3embed import Phi3VisionEmbedder, Preprocessed  # noqa: E402
from phi3embed.core.allocator import state as allocator_state  # noqa: E402
from phi3embed.core.batching import encode_plain, encode_stream  # noqa: E402
from phi3embed.core.config import default_workers  # noqa: E402

PHOTO_SET = [s.name for s in IMAGES if s.photo]


# --------------------------------------------------------------------------- measuring


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler(threading.Thread):
    """Samples this process's RSS every few ms; ``peak()`` is the highest value since ``reset()``."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self._peak = _rss_bytes()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def reset(self) -> None:
        self._peak = _rss_bytes()

    def peak(self) -> int:
        return max(self._peak, _rss_bytes())

    def stop(self) -> None:
        self._halt.set()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Gemm:
    """A large matmul timed for ``seconds``: the machine's GEMM rate right now (GFLOP/s)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, *, n: int, seconds: float) -> None:
        self.device, self.dtype, self.n, self.seconds = device, dtype, n, seconds
        g = torch.Generator(device="cpu").manual_seed(0)
        self.a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        self.b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        self.out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(self.a, self.b, out=self.out)  # warm-up
        sync(device)
        self.samples: list[float] = []
        self.cpu_samples: list[float] = []  # GFLOP per CPU-second of this process (CPU only)
        self.spent = 0.0  # seconds spent sampling (subtracted from runs that sample inside)
        self.spent_cpu = 0.0

    def sample(self) -> float:
        t0 = time.perf_counter()
        c0 = time.process_time()
        count = 0
        while True:
            torch.mm(self.a, self.b, out=self.out)
            count += 1
            if self.device.type == "cuda" and count % 8:
                continue
            sync(self.device)
            elapsed = time.perf_counter() - t0
            if elapsed >= self.seconds:
                break
        rate = 2 * self.n**3 * count / elapsed / 1e9
        self.samples.append(rate)
        cpu = time.process_time() - c0
        self.cpu_samples.append(2 * self.n**3 * count / max(cpu, 1e-9) / 1e9)
        self.spent += time.perf_counter() - t0
        self.spent_cpu += cpu
        return rate


@dataclass
class Run:
    """One timed pass of one path over the image set."""

    path: str  # "plain" or "fast"
    batch_size: int | None
    images: int
    real_crops: int
    executed_crops: int
    layers: int
    tokens: int
    seconds: float
    useful_gflop: float  # real crops, layers the fast path needs, projection
    executed_gflop: float  # what this path actually computed
    gemm_gflops: list[float] = field(default_factory=list)  # the samples belonging to this run
    cpu_seconds: float = 0.0  # CPU time of this process during the run (CPU device), GEMM samples excluded
    gemm_cpu_gflops: list[float] = field(default_factory=list)  # GFLOP per CPU-second of the same samples
    peak_rss_mib: float = 0.0
    peak_gpu_mib: float | None = None

    @property
    def gemm_rate(self) -> float:
        return sum(self.gemm_gflops) / len(self.gemm_gflops)

    @property
    def limit_seconds(self) -> float:
        return self.useful_gflop / self.gemm_rate

    def figures(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "batch_size": self.batch_size,
            "images": self.images,
            "real_crops": self.real_crops,
            "executed_crops": self.executed_crops,
            "layers": self.layers,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "s_per_image": round(self.seconds / self.images, 4),
            "images_per_s": round(self.images / self.seconds, 4),
            "tokens_per_s": round(self.tokens / self.seconds, 1),
            "useful_gflop": round(self.useful_gflop, 1),
            "executed_gflop": round(self.executed_gflop, 1),
            "achieved_gflops": round(self.executed_gflop / self.seconds, 1),
            "useful_gflops": round(self.useful_gflop / self.seconds, 1),
            "gemm_gflops": round(self.gemm_rate, 1),
            "gemm_samples": [round(x, 1) for x in self.gemm_gflops],
            "limit_s": round(self.limit_seconds, 3),
            "ratio_to_limit": round(self.seconds / self.limit_seconds, 3),
            # The same ratio in CPU time of this process: less sensitive to other processes taking the
            # cores (descheduled time is not counted on either side).
            "ratio_to_limit_cpu_time": (
                round(
                    self.cpu_seconds / (self.useful_gflop / (sum(self.gemm_cpu_gflops) / len(self.gemm_cpu_gflops))), 3
                )
                if self.gemm_cpu_gflops and self.cpu_seconds
                else None
            ),
            "peak_rss_mib": round(self.peak_rss_mib),
            "peak_gpu_mib": None if self.peak_gpu_mib is None else round(self.peak_gpu_mib),
        }


# --------------------------------------------------------------------------- the runs


def _sampled(items: list[Preprocessed], gemm: Gemm | None, repeat: int) -> Iterator[tuple[int, Preprocessed]]:
    """The images, ``repeat`` times; on CPU a GEMM sample is taken before each image after the first."""
    for r in range(repeat):
        for i, item in enumerate(items):
            if gemm is not None and (r or i):
                gemm.sample()
            yield i, item


def timed_run(
    emb: Phi3VisionEmbedder,
    items: list[Preprocessed],
    *,
    path: str,
    batch_size: int | None,
    gemm: Gemm,
    rss: RssSampler,
    repeat: int = 1,
    keep: bool = False,
) -> tuple[Run, list[torch.Tensor]]:
    device = emb.device
    inside = device.type == "cpu"  # interleave GEMM samples between images (CPU drifts)
    first = len(gemm.samples)
    gemm.sample()
    gc.collect()
    rss.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    spent0, spent_cpu0 = gemm.spent, gemm.spent_cpu
    outputs: list[torch.Tensor] = []
    stream: Iterable[tuple[int, Preprocessed]] = _sampled(items, gemm if inside else None, repeat)
    sync(device)
    t0 = time.perf_counter()
    c0 = time.process_time()
    if path == "plain":
        results = encode_plain(emb.model, stream, num_crops=emb.num_crops)
    else:
        assert batch_size is not None
        results = encode_stream(emb.model, stream, batch_size=batch_size)
    for _, _, out in results:
        if keep and len(outputs) < len(items):  # the first pass only: repeats would fill the device
            outputs.append(out)
    sync(device)
    seconds = time.perf_counter() - t0 - (gemm.spent - spent0)
    cpu_seconds = time.process_time() - c0 - (gemm.spent_cpu - spent_cpu0)
    peak_rss = rss.peak()
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    gemm.sample()
    cfg = emb.vision_config
    needed, total = cfg.layers_needed, cfg.clip.num_hidden_layers
    real = sum(it.num_real_crops for it in items) * repeat
    tokens = sum(it.num_tokens for it in items) * repeat
    useful = sum(image_flops(cfg, crops=it.num_real_crops, tokens=it.num_tokens, layers=needed) for it in items)
    if path == "plain":
        executed_crops = (emb.num_crops + 1) * len(items) * repeat
        pad = (emb.num_crops + 1) * len(items) - sum(it.num_real_crops for it in items)
        executed = sum(image_flops(cfg, crops=it.num_real_crops, tokens=it.num_tokens, layers=total) for it in items)
        executed += pad * crop_flops(cfg, layers=total)
        layers = total
    else:
        executed_crops, executed, layers = real, useful, needed
    run = Run(
        path=path,
        batch_size=batch_size,
        images=len(items) * repeat,
        real_crops=real,
        executed_crops=executed_crops,
        layers=layers,
        tokens=tokens,
        seconds=seconds,
        useful_gflop=useful * repeat / 1e9,
        executed_gflop=executed * repeat / 1e9,
        gemm_gflops=gemm.samples[first:],
        cpu_seconds=cpu_seconds if device.type == "cpu" else 0.0,
        gemm_cpu_gflops=gemm.cpu_samples[first:] if device.type == "cpu" else [],
        peak_rss_mib=peak_rss / 2**20,
        peak_gpu_mib=peak_gpu,
    )
    return run, [o.float().cpu() for o in outputs]


def load(
    args: argparse.Namespace, ckpt: Path, *, plain: bool, untuned: bool = False
) -> tuple[Phi3VisionEmbedder, float]:
    sync(torch.device(args.device))
    t0 = time.perf_counter()
    extra: dict[str, Any] = {"compile": True} if args.compile and not plain else {}
    if untuned:
        extra["tune_allocator"] = False
    emb = Phi3VisionEmbedder.from_pretrained(
        ckpt, device=args.device, dtype=args.dtype, num_crops=args.num_crops, plain=plain, **extra
    )
    sync(emb.device)
    return emb, time.perf_counter() - t0


def warm_up(emb: Phi3VisionEmbedder, items: list[Preprocessed], batch_size: int, *, compiled: bool = False) -> None:
    """Kernel selection, allocator and page-cache warm-up, untimed: one crop on CPU, one batch on CUDA.

    A compiled model also sees a second batch shape, so that its dynamic-shape graph (which then serves
    every batch size, the last partial batch included) is compiled before the timing starts.
    """
    sizes = [1] if emb.device.type == "cpu" else [batch_size]
    if compiled:
        sizes = sorted({1, 2, batch_size})
    pv = torch.cat([it.pixel_values for it in items])
    with torch.inference_mode():
        for n in sizes:
            emb.model.crop_features(pv[:n].to(emb.device, emb.dtype))
    sync(emb.device)


def auto_repeat(seconds: float, images: int, min_seconds: float) -> int:
    return max(1, math.ceil(min_seconds / max(seconds, 1e-6))) if images else 1


def max_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- end to end (optional)


class DiscardStore:
    """Stands in for OutputStore in an ``--e2e`` run with ``sink=discard``: takes each result, already on
    the host, and drops it. The same pipeline without the disk, to tell the writer's share from the rest."""

    concurrent_files = False  # the writer calls write() for each result

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def is_done(self, source: Any) -> bool:
        return False

    def write(self, source: Any, facts: Any, embeddings: torch.Tensor) -> Any:
        from phi3embed.outputs.records import new_record  # type: ignore[import-not-found,unused-ignore]

        embeddings.to(self.settings.dtype).cpu()
        return new_record(self.settings, source, facts, status="ok")

    def write_error(self, source: Any, error: str, facts: Any = None) -> Any:
        from phi3embed.outputs.records import error_record  # type: ignore[import-not-found,unused-ignore]

        return error_record(self.settings, source, error, facts)

    def close(self) -> None:
        pass


def end_to_end(
    emb: Phi3VisionEmbedder,
    paths: list[Path],
    *,
    copies: int,
    workers: int,
    tmp: Path,
    sink: str = "disk",
    image_timeout: float = 120.0,
) -> dict[str, Any]:
    """images/s of the CLI's worker pipeline (phi3embed.jobs.core.run_job + LocalEngine) over ``copies`` copies of the images.

    ``sink``: ``disk`` writes safetensors files under ``tmp`` as the CLI does; ``discard`` drops each result
    once it is on the host (:class:`DiscardStore`). ``image_timeout``: the CLI's ``--image-timeout`` (with
    ``workers=0``, 0 reads inline; any other value reads in one helper process, the CLI's default).
    """
    try:
        from phi3embed.inputs.listing import expand_inputs  # type: ignore[import-not-found,unused-ignore]
        from phi3embed.jobs.core import run_job  # type: ignore[import-not-found,unused-ignore]
        from phi3embed.jobs.local import LocalEngine  # type: ignore[import-not-found,unused-ignore]
        from phi3embed.outputs.records import OutputSettings  # type: ignore[import-not-found,unused-ignore]
        from phi3embed.outputs.store import OutputStore  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        return {"skipped": f"phi3embed.jobs not available ({exc})"}
    src = tmp / "e2e-images"
    src.mkdir(parents=True, exist_ok=True)
    for c in range(copies):
        for p in paths:
            dst = src / f"{c:04d}-{p.name}"
            if not dst.exists():
                try:
                    os.link(p, dst)
                except OSError:
                    dst.write_bytes(p.read_bytes())
    try:
        sources = expand_inputs([str(src)])
        settings = OutputSettings(
            model="bench",
            fingerprint=emb.fingerprint,
            num_crops=emb.num_crops,
            dtype=emb.dtype,
            compute_dtype=emb.dtype,
            format="safetensors",
            device=str(emb.device),
        )
        store = (
            DiscardStore(settings)
            if sink == "discard"
            else OutputStore(tmp / "e2e-out", settings, overwrite=True).open()
        )
        sync(emb.device)
        t0 = time.perf_counter()
        try:
            engine = LocalEngine(emb, workers=workers, image_timeout=image_timeout or None)
            summary = run_job(sources, store, engine)  # type: ignore[arg-type]
        finally:
            store.close()
        sync(emb.device)
        wall = time.perf_counter() - t0
    except Exception as exc:  # the CLI's API moved: report, do not sink the whole benchmark
        return {"skipped": f"end-to-end run failed: {type(exc).__name__}: {exc}"}
    ok = getattr(summary, "ok", len(sources))
    return {
        "sink": sink,
        "images": ok,
        "workers": workers,
        "image_timeout": image_timeout,
        "torch_threads": torch.get_num_threads(),
        "batch_size": emb.batch_size,
        "seconds": round(wall, 3),
        "images_per_s": round(ok / wall, 3),
        "failed": getattr(summary, "failed", None),
        "fatal": getattr(summary, "fatal", None),
        # where the encoding thread's time went (phi3embed.core.batching.StageTimes; waits from the job summary)
        "encoder_thread_s": {
            "wait_input": round(summary.wait_input_s, 2),
            "assemble": round(summary.stages.assemble_s, 2),
            "forward": round(summary.stages.forward_s, 2),
            "hd_projection": round(summary.stages.embed_s, 2),
            "to_host": round(summary.to_host_s, 2),
            "wait_writer": round(summary.wait_writer_s, 2),
            "writer_busy": round(summary.write_s, 2),
            "cpu": round(getattr(summary, "encoder_cpu_s", float("nan")), 2),
        },
        # involuntary context switches of the encoding thread: many = decode workers took its core
        "encoder_thread_preempted": getattr(summary, "encoder_preempted", None),
    }


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(runs: list[dict[str, Any]], plain_s_per_image: float | None) -> str:
    cols = [
        ("path", "path"),
        ("batch", "batch_size"),
        ("images", "images"),
        ("crops run", "executed_crops"),
        ("layers", "layers"),
        ("s/image", "s_per_image"),
        ("images/s", "images_per_s"),
        ("tokens/s", "tokens_per_s"),
        ("GFLOP/s run", "achieved_gflops"),
        ("GFLOP/s useful", "useful_gflops"),
        ("GEMM GFLOP/s", "gemm_gflops"),
        ("x limit", "ratio_to_limit"),
        ("x limit (CPU time)", "ratio_to_limit_cpu_time"),
        ("peak RSS MiB", "peak_rss_mib"),
        ("peak GPU MiB", "peak_gpu_mib"),
    ]
    head = [c for c, _ in cols] + ["speed-up vs plain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = ["" if r[k] is None else str(r[k]) for _, k in cols]
        cells.append(f"{plain_s_per_image / r['s_per_image']:.2f}x" if plain_s_per_image else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--num-crops", type=int, default=16)
    ap.add_argument(
        "--batch-sizes", default=None, help="crops per forward pass to try, e.g. 2,4,8 (default: 4 CPU, 32 CUDA)"
    )
    ap.add_argument(
        "--images",
        default=None,
        help=f"comma-separated subset of {[s.name for s in IMAGES]}, 'photos' or 'all' (default: photos)",
    )
    ap.add_argument("--quick", action="store_true", help="one 1024x768 photo (unless --images is given)")
    ap.add_argument(
        "--paths", default="plain,fast", help="plain, fast-untuned (CPU, before fast), fast (default: %(default)s)"
    )
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the cached random checkpoint")
    ap.add_argument("--gemm-seconds", type=float, default=None, help="length of one GEMM sample (3 CPU, 1 CUDA)")
    ap.add_argument("--gemm-n", type=int, default=None, help="matmul size (2048 CPU, 8192 CUDA)")
    ap.add_argument("--min-seconds", type=float, default=None, help="repeat the image set up to this long (CUDA: 5)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="fast path with from_pretrained(compile=True)")
    ap.add_argument("--e2e", action="store_true", help="also time the CLI's worker pipeline (phi3embed.jobs.local)")
    ap.add_argument("--e2e-workers", type=int, default=None, help="decode workers for --e2e (default: the CLI's)")
    ap.add_argument(
        "--e2e-sinks",
        default="disk,discard",
        help="--e2e outputs: disk (safetensors files, as the CLI writes), discard (dropped once on the host)",
    )
    ap.add_argument(
        "--e2e-image-timeouts",
        default="120",
        help="--e2e: --image-timeout values to run, e.g. 0,120 (on CPU: inline reading vs the helper process)",
    )
    ap.add_argument("--e2e-seconds", type=float, default=20.0, help="size the --e2e image set to about this long")
    ap.add_argument("--json", type=Path, default=None, help="also write all figures to this JSON file")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.batch_sizes = [int(x) for x in (args.batch_sizes or ("32" if cuda else "4")).split(",")]
    args.gemm_seconds = args.gemm_seconds or (1.0 if cuda else 3.0)
    args.gemm_n = args.gemm_n or (8192 if cuda else 2048)
    args.min_seconds = args.min_seconds if args.min_seconds is not None else (5.0 if cuda else 0.0)
    if args.images in (None, "photos"):
        args.images = ["photo"] if args.quick and args.images is None else PHOTO_SET
    elif args.images == "all":
        args.images = [s.name for s in IMAGES]
    else:
        args.images = args.images.split(",")
    args.paths = args.paths.split(",")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 runs are float32
        torch.backends.cudnn.allow_tf32 = False
    tmp = Path(tempfile.mkdtemp(prefix="phi3embed-bench-"))
    if args.checkpoint is None:
        import make_checkpoint

        args.checkpoint = make_checkpoint.build(make_checkpoint.DEFAULT_OUT)
    info = machine()
    log(f"machine {info}")
    images = ensure_images(args.images)
    rss = RssSampler()
    rss.start()

    report: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    dtype = getattr(torch, args.dtype)
    gemm = Gemm(device, dtype, n=args.gemm_n, seconds=args.gemm_seconds)
    log(f"GEMM {args.gemm_n}^3 {args.dtype}: {gemm.sample():.1f} GFLOP/s")

    outputs: dict[str, list[torch.Tensor]] = {}
    plain_s: float | None = None
    items: list[Preprocessed] = []
    for path in args.paths:
        if path == "fast-untuned" and allocator_state() != "default":
            raise SystemExit("bench_encode: --paths must list fast-untuned before fast (the tuning stays once set)")
        emb, load_s = load(args, args.checkpoint, plain=path == "plain", untuned=path == "fast-untuned")
        report[f"load_s_{path}"] = round(load_s, 2)
        log(f"{path}: loaded in {load_s:.1f} s ({sum(p.numel() for p in emb.model.parameters()) / 1e6:.0f}M params)")
        if not items:
            t0 = time.perf_counter()
            items = [emb.preprocess(p, name=p.name) for _, p in images]
            report["preprocess_s_per_image"] = round((time.perf_counter() - t0) / len(items), 3)
            desc = ", ".join(
                f"{s.name} {s.width}x{s.height}: {it.num_real_crops} crops"
                for (s, _), it in zip(images, items, strict=True)
            )
            log(f"images: {desc}")
        sizes = [None] if path == "plain" else args.batch_sizes
        for bs in sizes:
            warm_up(emb, items, bs or 1, compiled=args.compile and path == "fast")
            repeat = 1
            if args.min_seconds > 0:  # CUDA: one untimed-for-report pass sizes the repeat count
                probe, _ = timed_run(emb, items, path=path, batch_size=bs, gemm=gemm, rss=rss)
                repeat = auto_repeat(probe.seconds, len(items), args.min_seconds)
            run, outs = timed_run(emb, items, path=path, batch_size=bs, gemm=gemm, rss=rss, repeat=repeat, keep=True)
            outputs[f"{path}/{bs}"] = outs[: len(items)]
            fig = run.figures()
            fig["load_s"] = round(load_s, 2)
            fig["allocator"] = allocator_state() if device.type == "cpu" else None
            report["runs"].append(fig)
            if path == "plain":
                plain_s = fig["s_per_image"]
            save_json(args.json, report)
            log(
                f"{path} bs={bs}: {fig['s_per_image']} s/image, {fig['ratio_to_limit']}x limit "
                f"(GEMM {fig['gemm_gflops']} GFLOP/s), peak RSS {fig['peak_rss_mib']} MiB"
            )
        if args.e2e and path == "fast":
            best = min((r for r in report["runs"] if r["path"] == "fast"), key=lambda r: r["s_per_image"])
            emb.batch_size = best["batch_size"]
            copies = max(1, math.ceil(args.e2e_seconds * best["images_per_s"] / len(items)))
            workers = args.e2e_workers if args.e2e_workers is not None else default_workers(device.type)
            timeouts = [float(t) for t in args.e2e_image_timeouts.split(",")]
            for sink in args.e2e_sinks.split(","):
                for timeout in timeouts:
                    key = "e2e" if sink == "disk" else f"e2e_{sink}"
                    key += f"_timeout{timeout:g}" if len(timeouts) > 1 else ""
                    report[key] = end_to_end(
                        emb,
                        [p for _, p in images],
                        copies=copies,
                        workers=workers,
                        tmp=tmp,
                        sink=sink,
                        image_timeout=timeout,
                    )
                    if "images_per_s" in report[key]:
                        report[key]["encoder_only_images_per_s"] = best["images_per_s"]
                        ratio = round(report[key]["images_per_s"] / best["images_per_s"], 3)
                        report[key]["ratio_to_encoder_only"] = ratio
                    log(f"end to end ({sink}, image timeout {timeout:g}): {report[key]}")
                    save_json(args.json, report)
        del emb
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # Same numbers: every fast run against the plain run (and each other).
    base = outputs.get("plain/None")
    diffs = {}
    for key, outs in outputs.items():
        if key != "plain/None" and base is not None:
            diffs[key] = max_abs(outs, base)
    report["max_abs_diff_vs_plain"] = diffs
    fast_runs = [r for r in report["runs"] if r["path"] == "fast"]
    if fast_runs:
        best = min(fast_runs, key=lambda r: r["s_per_image"])
        report["best_batch_size"] = best["batch_size"]
        report["best_fast"] = best
        if plain_s:
            report["speedup_fast_vs_plain"] = round(plain_s / best["s_per_image"], 3)
        untuned = [r for r in report["runs"] if r["path"] == "fast-untuned" and r["batch_size"] == best["batch_size"]]
        if untuned:
            report["speedup_allocator_tuning"] = round(untuned[0]["s_per_image"] / best["s_per_image"], 3)
    report["peak_rss_mib_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    report["machine"]["loadavg_end"] = os.getloadavg()
    rss.stop()

    print(f"# phi3embed bench_encode: {args.device} {args.dtype}, num_crops {args.num_crops}, images {args.images}")
    print(f"# machine: {json.dumps(report['machine'])}")
    print(
        f"# load s: plain {report.get('load_s_plain')}, fast {report.get('load_s_fast')}; preprocess s/image {report.get('preprocess_s_per_image')}"
    )
    print(table(report["runs"], plain_s))
    if "speedup_fast_vs_plain" in report:
        print(f"# fast (best batch {report['best_batch_size']}) vs plain: {report['speedup_fast_vs_plain']}x faster")
    if fast_runs:
        print(f"# best fast run: {report['best_fast']['ratio_to_limit']}x the compute limit")
    if "speedup_allocator_tuning" in report:
        print(f"# allocator setting alone (fast vs fast-untuned, same batch): {report['speedup_allocator_tuning']}x")
    if diffs:
        print(f"# max|diff| vs plain: {json.dumps({k: f'{v:.2e}' for k, v in diffs.items()})}")
    for key in ("e2e", "e2e_discard"):
        if key in report:
            print(f"# end to end ({report[key].get('sink', key)}): {json.dumps(report[key])}")
    save_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
