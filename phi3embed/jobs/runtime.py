"""How an encode job runs, decided once for both engines.

:class:`EngineOptions` is what was asked for (``"auto"`` / None: left to the policy); :func:`decide` is the one
runtime policy that turns it into a :class:`Runtime` for a device: compute and stored dtypes, crops per forward
pass, decode workers. :func:`load_embedder` loads an encoder under it, in a process that is ours to tune (the
command's, or a Ray actor's: on CPU the allocator keeps freed memory, phi3embed/core/allocator.py), and
:func:`engine_info` is the one way an engine states its :class:`~phi3embed.jobs.core.EngineInfo`.
:func:`build_engine` assembles the engine the options name: :func:`phi3embed.jobs.local.plan` or
:func:`phi3embed.jobs.ray_engine.plan`, each of which picks its device and asks :func:`decide` for the rest.

Nothing heavy is imported at module import: the command's ``--help`` reads :data:`DEFAULT_IMAGE_TIMEOUT` here.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any, Literal, get_args

from phi3embed.core.config import default_batch_size, default_workers
from phi3embed.core.stages import DEFAULT_STAGE, Stage

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from phi3embed.core.embedder import ImageOptions, Phi3VisionEmbedder
    from phi3embed.core.preprocess import AlphaMode
    from phi3embed.jobs.core import Engine, EngineInfo
    from phi3embed.outputs.records import Format, StoredStage

#: Seconds reading and decoding one image may take by default: far above any real image (a 100 MP PNG decodes in
#: a few seconds), short enough that a stuck network mount costs minutes, not the night.
DEFAULT_IMAGE_TIMEOUT = 120.0

EngineName = Literal["local", "ray"]  # the engines build_engine assembles
ENGINES: tuple[EngineName, ...] = get_args(EngineName)

#: Decode threads per Ray actor on a GPU when ``workers`` is not given (on CPU the actor decodes inline).
RAY_DECODE_THREADS = 4


@dataclass(frozen=True)
class EngineOptions:
    """What an encode job asks of its engine (``"auto"`` / None: decided by :func:`decide`)."""

    model: str  # local directory, hub id or preset name
    revision: str | None = None  # of a hub id
    device: str = "auto"  # auto, cpu, cuda or cuda:N (Ray: auto, cpu or cuda; it gives each actor its GPU)
    dtype: str = "auto"  # compute dtype
    out_dtype: str = "auto"  # stored dtype
    output_format: Format = "npy"  # whether bfloat16 can be stored
    num_crops: int | None = None
    alpha: AlphaMode = "drop"
    exif_transpose: bool = False
    stage: Stage = DEFAULT_STAGE
    batch_size: int | None = None  # crops per forward pass
    workers: int | None = None  # local: decode processes; Ray: decode threads per actor
    image_timeout: float | None = None  # seconds per image (None: DEFAULT_IMAGE_TIMEOUT, 0: none); local only
    engine: EngineName = "local"
    address: str | None = None  # Ray: a running cluster; None: a private local instance, started when needed
    actors: int | None = None  # Ray: default one per GPU of the cluster; without GPUs one per CPU
    vectors: tuple[str, ...] = ()  # vector kinds written beside the outputs (phi3embed.core.vectors)
    store_tokens: bool = True  # False: --stage none, only the vectors
    compile: bool = False  # torch.compile the encoder layers at start (local engine)


@dataclass(frozen=True)
class Runtime:
    """The policy's decision for one encoder: nothing left to ``"auto"``."""

    device: str  # where the encoder runs: "cpu", "cuda", "cuda:N"
    compute_dtype: torch.dtype
    stored_dtype: torch.dtype
    batch_size: int  # crops per forward pass
    workers: int  # local: decode processes; Ray: decode threads per actor (0: inline)


def stored_dtypes(
    device_type: str, *, dtype: str, out_dtype: str, output_format: str
) -> tuple[torch.dtype, torch.dtype]:
    """(compute, stored) dtypes from option values (``"auto"`` or a name): auto computes in float32 on CPU,
    bfloat16 on CUDA; stores float32 on CPU, the compute dtype on CUDA (float32 when npy cannot hold it)."""
    import torch

    from phi3embed.core.embedder import parse_dtype

    compute = parse_dtype(dtype) if dtype != "auto" else (torch.bfloat16 if device_type == "cuda" else torch.float32)
    if out_dtype != "auto":
        stored = parse_dtype(out_dtype)
    elif device_type == "cuda" and not (output_format == "npy" and compute == torch.bfloat16):
        stored = compute
    else:
        stored = torch.float32
    return compute, stored


def decide(device: str, options: EngineOptions) -> Runtime:
    """The runtime policy: ``options`` on ``device`` (already chosen by the engine) with every default filled in.

    Batch size: :func:`phi3embed.core.config.default_batch_size`, as the embedder's own. Decode workers: the local
    engine's processes by :func:`phi3embed.core.config.default_workers` (none on CPU, where decoding is ~0.3% of
    an image's time; on CUDA enough to keep the GPU fed); a Ray actor's threads :data:`RAY_DECODE_THREADS` on a
    GPU, inline on CPU.
    """
    device_type = device.split(":", 1)[0]
    compute, stored = stored_dtypes(
        device_type, dtype=options.dtype, out_dtype=options.out_dtype, output_format=options.output_format
    )
    if options.workers is not None:
        workers = options.workers
    elif options.engine == "ray":
        workers = RAY_DECODE_THREADS if device_type == "cuda" else 0
    else:
        workers = default_workers(device_type)
    batch = options.batch_size or default_batch_size(device_type)
    return Runtime(device=device, compute_dtype=compute, stored_dtype=stored, batch_size=batch, workers=workers)


def load_embedder(
    model: str,
    runtime: Runtime,
    *,
    revision: str | None = None,
    num_crops: int | None = None,
    alpha: AlphaMode = "drop",
    exif_transpose: bool = False,
    stage: Stage = DEFAULT_STAGE,
    compile: bool = False,
) -> Phi3VisionEmbedder:
    """The encoder an engine runs, loaded under ``runtime`` in a process the engine owns: on CPU glibc keeps
    freed memory for reuse (``tune_allocator``; a library user decides for their own process). ``compile``:
    loaded for torch.compile (the engine then calls ``compile_now``)."""
    from phi3embed.core.embedder import Phi3VisionEmbedder

    return Phi3VisionEmbedder.from_pretrained(
        model,
        device=runtime.device,
        dtype=runtime.compute_dtype,
        batch_size=runtime.batch_size,
        tune_allocator=True,
        revision=revision,
        num_crops=num_crops,
        alpha=alpha,
        exif_transpose=exif_transpose,
        stage=stage,
        compile=compile,
    )


def engine_info(
    runtime: Runtime,
    *,
    fingerprint: str,
    num_crops: int,
    image: ImageOptions,
    stage: StoredStage,
    workers: int,
    vectors: tuple[str, ...] = (),
    compile_note: str | None = None,
) -> EngineInfo:
    """What an engine running encoders under ``runtime`` states: its weights' ``fingerprint`` and
    ``num_crops``, how it reads images, and ``workers`` (decode workers of the local engine, Ray's actors)."""
    from phi3embed.jobs.core import EngineInfo

    return EngineInfo(
        fingerprint=fingerprint,
        num_crops=num_crops,
        compute_dtype=runtime.compute_dtype,
        stored_dtype=runtime.stored_dtype,
        device=runtime.device,
        batch_size=runtime.batch_size,
        workers=workers,
        alpha=image.alpha,
        exif_transpose=image.exif_transpose,
        stage=stage,
        vectors=vectors,
        compile_note=compile_note,
    )


def build_engine(
    options: EngineOptions,
    *,
    announce: Callable[[str], None] = lambda line: None,
    loading: Callable[[], AbstractContextManager[Any]] | None = None,
) -> Engine:
    """The engine ``options.engine`` names, assembled under the runtime policy. ``announce`` hears where a Ray
    job runs; ``loading`` (a context) is entered while the local engine loads its weights. Raises
    Phi3EmbedError for options that cannot work (Ray not installed included)."""
    if options.engine == "ray":
        if find_spec("ray") is None:  # found before the weights are hashed, not when the first actor starts
            from phi3embed.errors import Phi3EmbedError

            raise Phi3EmbedError("--engine ray needs Ray: pip install 'phi3embed[ray]'")
        from phi3embed.jobs.ray_engine import plan as ray_plan

        return ray_plan(options, announce=announce)
    from phi3embed.jobs.local import plan as local_plan

    return local_plan(options, loading=loading)
