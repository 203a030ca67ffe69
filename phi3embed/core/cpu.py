"""The CPU's bfloat16 matrix units, and the bfloat16 CPU path built for them.

Many current CPUs multiply bfloat16 matrices several times faster than float32 ones: Intel's AMX tiles
(``amx_bf16``, Sapphire Rapids and later), AVX512-BF16 dot products (``avx512_bf16``: Cooper Lake, AMD Zen 4
and later) and Arm's BF16 extension (``bf16``: Neoverse V1/N2, Graviton 3 and later). PyTorch reaches them
through oneDNN. :func:`matrix_units` says which ones this CPU has; :func:`measure_speed` times one encoder
layer of a checkpoint's real shape in both dtypes on this CPU, which is what ``info``, ``plan`` and the encode
summary quote when they tell the user what ``--dtype bfloat16`` would give.

The float32 path is not touched here: its numbers are the reference numbers. In bfloat16 on the CPU, every
linear layer of the encoder and the projection is swapped for a :class:`PackedLinear`, whose weight oneDNN
reorders once into the blocked layout its kernels read (instead of on every call); the bfloat16 weight it was
made from is dropped, so the weights stay one bfloat16 copy. The packed product gives the same bits as
``torch.nn.functional.linear`` on the same bfloat16 tensors (checked when packing, and by the tests), so
packing changes speed only. Attention is PyTorch's fused CPU kernel in bfloat16 (``sdpa``) and layer norms run
in bfloat16 with float32 accumulation, as PyTorch's CPU kernels do for bfloat16.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CPUINFO = Path("/proc/cpuinfo")

#: Per-token cosine against float32 that ``--dtype bfloat16`` is held to (tests/test_cpu_bf16.py on the golden
#: checkpoints; benchmarks/bench_cpu_dtype.py on the real-size model).
BF16_MIN_COSINE = 0.999


# ----------------------------------------------------------------------------------------------- what the CPU has


@dataclass(frozen=True)
class MatrixUnits:
    """The bfloat16 matrix instructions of this CPU, as the kernel reports them."""

    model: str  # "model name" of /proc/cpuinfo, or platform.processor()
    amx_bf16: bool  # Intel AMX tiles with bfloat16 (the 7x class)
    avx512_bf16: bool  # AVX512-BF16 dot products (x86)
    arm_bf16: bool  # Arm's BF16 extension (BFMMLA / BFDOT)

    @property
    def any(self) -> bool:
        return self.amx_bf16 or self.avx512_bf16 or self.arm_bf16

    @property
    def label(self) -> str:
        """``"AMX-BF16 + AVX512-BF16"``, ``"AVX512-BF16"``, ``"Arm BF16"`` or ``"none"``."""
        names = [n for n, ok in (("AMX-BF16", self.amx_bf16), ("AVX512-BF16", self.avx512_bf16),
                                 ("Arm BF16", self.arm_bf16)) if ok]  # fmt: skip
        return " + ".join(names) or "none"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


def parse_cpuinfo(text: str) -> MatrixUnits:
    """:class:`MatrixUnits` from the text of ``/proc/cpuinfo`` (x86 ``flags`` or Arm ``Features`` lines)."""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("flags", "features"):
            flags |= set(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return MatrixUnits(
        model=model,
        amx_bf16="amx_bf16" in flags,
        avx512_bf16="avx512_bf16" in flags,
        arm_bf16="bf16" in flags and platform.machine().lower() in ("aarch64", "arm64"),
    )


def matrix_units(cpuinfo: Path = CPUINFO) -> MatrixUnits:
    """This CPU's bfloat16 matrix units: from ``/proc/cpuinfo`` on Linux, else from what PyTorch detects."""
    try:
        return parse_cpuinfo(cpuinfo.read_text(errors="replace"))
    except OSError:
        pass
    cpu = getattr(torch, "cpu", None)

    def probe(name: str) -> bool:
        fn = getattr(cpu, name, None)
        try:
            return bool(fn()) if fn is not None else False
        except RuntimeError:
            return False

    return MatrixUnits(
        model=platform.processor() or platform.machine(),
        amx_bf16=probe("_is_amx_tile_supported"),
        avx512_bf16=probe("_is_avx512_bf16_supported"),
        arm_bf16=False,
    )


# ----------------------------------------------------------------------------------------------- packed linears


def packing_wanted() -> bool:
    """False when ``PHI3EMBED_BF16_PACKING`` says no (0, false, no, off): for measuring, or a PyTorch whose
    packed kernels misbehave."""
    return os.environ.get("PHI3EMBED_BF16_PACKING", "1").strip().lower() not in ("0", "false", "no", "off")


def packing_available() -> bool:
    """Whether this PyTorch can prepack bfloat16 linear weights for oneDNN on this CPU."""
    try:
        return bool(
            torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """A bfloat16 ``nn.Linear`` on the CPU whose weight oneDNN has reordered once into its kernels' layout.

    Same bits as the linear it replaces on contiguous input, which is what the encoder gives it (on a strided
    3-D view ``F.linear`` rounds the product to bfloat16 before adding the bias, where the packed product adds it
    in float32 first, whatever the layout); saves the per-call reorder of the weight. Inference only: the packed
    weight is an opaque oneDNN tensor, not a parameter (``state_dict`` does not hold it).
    """

    def __init__(self, linear: nn.Linear, *, rows_hint: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bfloat16, packed"


def _same_as_linear(packed: PackedLinear, linear: nn.Linear) -> bool:
    """The packed product equals ``F.linear`` on a few random rows (the check made once per layer)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, linear.in_features, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        return torch.equal(packed(x), nn.functional.linear(x, linear.weight, linear.bias))


def pack_linears(module: nn.Module, *, rows_hint: int) -> int:
    """Swap every bfloat16 CPU ``nn.Linear`` inside ``module`` for a :class:`PackedLinear`; the count swapped.

    ``rows_hint``: the rows a typical call multiplies (crops per batch x tokens per crop), which oneDNN uses
    to choose the layout. A linear whose packed product does not give the same bits as ``F.linear`` on this
    CPU (none seen) is left as it is. Nothing is done where oneDNN cannot pack bfloat16.
    """
    if not packing_available():
        return 0
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            w = child.weight
            if w.dtype != torch.bfloat16 or w.device.type != "cpu" or w.is_meta:
                continue
            try:
                packed = PackedLinear(child, rows_hint=rows_hint)
            except RuntimeError:
                continue
            if _same_as_linear(packed, child):
                setattr(parent, name, packed)
                swapped += 1
    return swapped


# ----------------------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class DtypeSpeed:
    """One encoder layer of a checkpoint's shape, timed on this CPU in float32 and in bfloat16."""

    float32_ms: float  # per crop, best of the repeats
    bfloat16_ms: float
    seconds: float  # what the measurement took, building included

    @property
    def factor(self) -> float:
        """How many times faster bfloat16 ran."""
        return self.float32_ms / self.bfloat16_ms if self.bfloat16_ms > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "factor": round(self.factor, 3)}


def measure_speed(vision: Any, *, crops: int = 1, repeat: int = 3) -> DtypeSpeed:
    """Time one CLIP encoder layer of ``vision`` (a :class:`~phi3embed.core.config.VisionConfig`; random
    weights) on ``crops`` crops, in float32 and in bfloat16 as encode runs them (bfloat16 linears packed).

    The encoder's layers are nearly all of encode's work on the CPU, so the ratio is what ``--dtype bfloat16``
    gives on this host. About 0.8 s for the real ViT-L/14-336 shape on a 2-core CPU (more under load).
    """
    from phi3embed.core.model import build_clip, clip_encoder_layers

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    clip = vision.clip
    tokens = clip.tokens
    x32 = torch.randn(crops, tokens, clip.hidden_size, generator=gen)
    runs: dict[torch.dtype, Callable[[], Any]] = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            model = build_clip(vision, num_layers=1, attn="sdpa", lean=True).eval().to(dtype)
            if dtype == torch.bfloat16 and packing_wanted():
                pack_linears(model, rows_hint=crops * tokens)
            layer: nn.Module = clip_encoder_layers(model)[0]
            args: tuple[Any, ...] = (x32.to(dtype), None, None)
            try:
                layer(*args)  # warm-up: kernel choice, allocations
            except TypeError:  # transformers 5 takes the attention mask alone
                args = args[:2]
                layer(*args)
            runs[dtype] = functools.partial(layer, *args)
        # Alternate the two, best of each: a host whose load drifts during the measurement favours neither.
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(repeat):
            for dtype, run in runs.items():
                begin = time.perf_counter()
                run()
                best[dtype] = min(best[dtype], time.perf_counter() - begin)
    return DtypeSpeed(
        best[torch.float32] * 1e3 / crops, best[torch.bfloat16] * 1e3 / crops, time.perf_counter() - start
    )


# ----------------------------------------------------------------------------------------------- telling the user

#: A measured factor under this is reported as "not faster": one layer timed twice on a shared host drifts by
#: several per cent, and a gain that small is not worth numbers that differ from the reference.
FASTER = 1.1


@dataclass(frozen=True)
class Bf16Advice:
    """What ``--dtype bfloat16`` would give encode on this CPU, as ``info``, ``plan`` and the encode summary say it.

    The default stays float32 everywhere (``--dtype auto`` never picks bfloat16 on a CPU): its numbers are the
    reference numbers and the same on every host of a job; this only tells the user what the choice is worth.
    """

    units: MatrixUnits
    speed: DtypeSpeed | None = None  # None: not measured
    not_measured: str | None = None  # why not (or why the timing failed), when ``speed`` is None
    on_cpu: bool = True  # encode's --device auto runs here on the CPU (False: on CUDA; the advice is for --device cpu)

    def line(self, *, measure_hint: str = "") -> str:
        """One sentence, e.g. ``--dtype bfloat16: 1.9x faster per encoder layer on this CPU (measured now, 0.8 s),
        outputs within per-token cosine 0.999 of float32 (tested); the default stays float32``.

        ``measure_hint`` says how to get the factor when it was not measured (e.g. ``phi3embed info measures it``).
        """
        where = "" if self.on_cpu else "with --device cpu, "
        tested = f"outputs within per-token cosine {BF16_MIN_COSINE} of float32 (tested)"
        hint = f"; {measure_hint}" if measure_hint else ""
        if self.speed is not None:
            factor, took = self.speed.factor, f"measured now, {self.speed.seconds:.2g} s"
            if factor >= FASTER:
                said = f"{factor:.1f}x faster per encoder layer on this CPU ({took}), {tested}"
            else:
                said = (
                    f"{factor:.1f}x the float32 speed per encoder layer on this CPU ({took}): not faster for this shape"
                )
        elif self.units.any:
            said = f"not measured ({self.not_measured}{hint}); usually faster on these units, {tested}"
        else:
            said = f"not expected to be faster without bf16 matrix units (not measured{hint})"
        return f"{where}--dtype bfloat16: {said}; the default stays float32"

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.units.to_dict(),
            "encode_device": "cpu" if self.on_cpu else "cuda",
            "bfloat16": None if self.speed is None else self.speed.to_dict(),
            "not_measured": self.not_measured,
            "bfloat16_min_cosine": BF16_MIN_COSINE,
            "advice": self.line(),
        }


def bf16_advice(
    vision: Any,
    *,
    measure: bool | None = None,
    on_cpu: bool = True,
    units: MatrixUnits | None = None,
    not_asked: str = "not asked",
) -> Bf16Advice:
    """The advice for a checkpoint of ``vision``'s shape on this CPU.

    ``measure``: True times one layer (:func:`measure_speed`, 1-2 s for the real shape), False does not
    (``not_asked`` says why), None times it only where it can matter: the CPU has bf16 matrix units and encode
    would run on it (``on_cpu``). A timing that fails (a PyTorch without bfloat16 CPU kernels) is reported,
    never raised: the advice must not stop the command that gives it.
    """
    units = units if units is not None else matrix_units()
    why = not_asked
    if measure is None:
        measure = units.any and on_cpu
        why = "no bf16 matrix units" if not units.any else "encode runs on CUDA here"
    if not measure:
        return Bf16Advice(units, None, why, on_cpu)
    try:
        return Bf16Advice(units, measure_speed(vision), None, on_cpu)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Bf16Advice(units, None, f"timing failed: {first}", on_cpu)
