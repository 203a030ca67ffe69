"""The public entry point: ``Phi3VisionEmbedder.from_pretrained(...).encode(images)``."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from phi3embed.core.allocator import keep_freed_memory
from phi3embed.core.batching import (
    StageTimes,
    encode_plain,
    encode_plain_vectors,
    encode_stream,
    encode_stream_vectors,
)
from phi3embed.core.checkpoint import Checkpoint, resolve
from phi3embed.core.config import (
    PreprocessConfig,
    VisionConfig,
    default_batch_size,
    parse_configs,
)
from phi3embed.core.cpu import pack_linears, packing_wanted
from phi3embed.core.model import Phi3VisionModel
from phi3embed.core.preprocess import AlphaMode, ImageInput, Preprocessed, image_geometry, preprocess_image
from phi3embed.core.stages import DEFAULT_STAGE, Stage, parse_stage, stage_shape
from phi3embed.core.vectors import VECTOR_KINDS, VectorHead, VectorKind, parse_vectors, vector_width
from phi3embed.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ConfigError(f"dtype {value} is not one of float32, float16, bfloat16")
        return value
    key = value.lower().removeprefix("torch.")
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    key = aliases.get(key, key)
    if key not in DTYPES:
        raise ConfigError(f"dtype {value!r} is not one of float32, float16, bfloat16")
    return DTYPES[key]


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when available. Asking for an absent CUDA device is a ConfigError."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return dev


@dataclass(frozen=True)
class CompileOutcome:
    """What :meth:`Phi3VisionEmbedder.compile_now` did: seconds spent, and the error that made it fall back."""

    seconds: float
    error: str | None = None  # None: compiled; else why the encoder runs eagerly instead

    def line(self) -> str:
        """One line for a summary."""
        if self.error is None:
            return f"torch.compile of the encoder layers: {self.seconds:.1f} s at start, once per process"
        return f"torch.compile failed after {self.seconds:.1f} s ({self.error}); the encoder ran eagerly"


@dataclass(frozen=True)
class ImageOptions:
    """How images are read: the reference's defaults unless asked otherwise."""

    alpha: AlphaMode = "drop"
    exif_transpose: bool = False


class Phi3VisionEmbedder:
    """Images -> the exact image-token embeddings Phi-3-vision / Phi-3.5-vision feed their language model."""

    def __init__(
        self,
        model: Phi3VisionModel,
        *,
        vision_config: VisionConfig,
        preprocess_config: PreprocessConfig,
        checkpoint: Checkpoint | None = None,
        fingerprint: str = "",
        image_options: ImageOptions = ImageOptions(),
        batch_size: int = 8,
        plain: bool = False,
        stage: Stage = DEFAULT_STAGE,
        pack: bool = False,
    ) -> None:
        self.model = model
        self.vision_config = vision_config
        self.preprocess_config = preprocess_config
        self.checkpoint = checkpoint
        self.fingerprint = fingerprint
        self.image_options = image_options
        self.batch_size = batch_size
        self.plain = plain
        self.stage = parse_stage(stage)
        self.pack = pack  # prepack bf16 CPU linears, encoder's and vector head's (core/cpu.py; no-op elsewhere)
        self._vector_head: VectorHead | None = None

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        num_crops: int | None = None,
        revision: str | None = None,
        alpha: AlphaMode = "drop",
        exif_transpose: bool = False,
        batch_size: int | None = None,
        plain: bool = False,
        attn: str | None = None,
        compile: bool = False,
        tune_allocator: bool = False,
        stage: Stage = DEFAULT_STAGE,
    ) -> Phi3VisionEmbedder:
        """Load only the vision weights of a checkpoint (local directory, hub id or preset name).

        ``num_crops=None`` uses the checkpoint's preprocessor_config.json. ``plain=True`` builds the
        reference-shaped path (all layers, eager attention, zero crops encoded): same numbers, slower.
        ``batch_size`` is the number of crops per forward pass (``None``: ``DEFAULT_BATCH_SIZE`` for the device).
        ``compile=True`` runs the encoder layers through ``torch.compile`` (the first batches of each shape
        pay the compilation; numbers agree to float rounding, see benchmarks/RESULTS.md for when it pays).
        In bfloat16 on the CPU (not ``plain``, not ``compile``), the linear weights are prepacked for oneDNN
        (:mod:`phi3embed.core.cpu`: same bits, faster; ``PHI3EMBED_BF16_PACKING=0`` turns it off).
        ``tune_allocator=True`` (CPU devices only) makes glibc keep large freed blocks for reuse, so the
        encoder's activations stop faulting in fresh pages (about 13% faster per layer on CPU). It is off by
        default because it changes the whole host process and cannot be undone (phi3embed/core/allocator.py);
        the ``phi3embed`` command turns it on for itself. ``PHI3EMBED_MALLOC_TUNING=0`` vetoes it.
        ``stage`` is what :meth:`encode` returns by default (:mod:`phi3embed.core.stages`): ``projected``
        ``[T, D]`` (the language model's input), ``hd`` ``[T, 4C]`` (before the projection) or ``clip``
        ``[1 + rows*cols, g*g, C]`` (CLIP's features of the real crops, the global view first).
        """
        dev = resolve_device(device)
        torch_dtype = parse_dtype(dtype)
        if tune_allocator and dev.type == "cpu":
            keep_freed_memory()  # activations reuse pages instead of faulting them in again (allocator.py)
        ckpt = resolve(source, revision=revision)
        vcfg, pcfg = parse_configs(ckpt.config, ckpt.preprocessor_config, where=str(ckpt.root / "config.json"))
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if num_crops is not None:
            if num_crops < 1:
                raise ConfigError(f"num_crops must be >= 1, got {num_crops}")
            pcfg = replace(pcfg, num_crops=num_crops)
        model, fingerprint = Phi3VisionModel.from_checkpoint(
            ckpt,
            vcfg,
            dtype=torch_dtype,
            device=dev,
            full_depth=plain,
            attn=attn or ("eager" if plain else "sdpa"),
        )
        pack = not plain and not compile and packing_wanted()
        if compile:
            model.compile_encoder()
        embedder = cls(
            model,
            vision_config=vcfg,
            preprocess_config=pcfg,
            checkpoint=ckpt,
            fingerprint=fingerprint,
            image_options=ImageOptions(alpha=alpha, exif_transpose=exif_transpose),
            batch_size=batch_size if batch_size is not None else default_batch_size(dev.type),
            plain=plain,
            stage=parse_stage(stage),
            pack=pack,
        )
        if pack:
            embedder._pack_linears(model)
        return embedder

    def compile_now(self) -> CompileOutcome:
        """Compile the encoder layers now, for every batch shape a job gives them, instead of during its first
        batches: a batch of ``batch_size`` blank crops (the batch dimension dynamic) and one of a single crop
        (which torch.compile specialises) go through the encoder, timed. Where compiling fails (no C++
        compiler, an operation inductor cannot lower), the layers are made eager again (bfloat16 CPU linears
        then packed, as without compile) and the outcome says why: a job never fails for it."""
        if self.pack or self.plain:
            raise ConfigError("compile_now needs an embedder loaded with compile=True (fast path)")
        start = time.perf_counter()
        self.model.compile_encoder(dynamic=True)
        size = self.vision_config.clip.image_size
        try:
            with torch.inference_mode():
                for crops in sorted({self.batch_size, 1}, reverse=True):
                    blank = torch.zeros(crops, 3, size, size, dtype=self.dtype, device=self.device)
                    self.model.crop_features(blank)
        except Exception as exc:  # inductor and dynamo raise many kinds; none of them may stop the job
            self.model.uncompile_encoder()
            self.pack = packing_wanted()
            if self.pack:
                self._pack_linears(self.model)
            root: BaseException = exc
            while True:  # dynamo wraps what the backend raised (as inner_exception, or as the cause)
                inner = getattr(root, "inner_exception", None) or root.__cause__
                if not isinstance(inner, BaseException) or inner is root:
                    break
                root = inner
            reason = (str(root).strip().splitlines() or [""])[0][:200]
            return CompileOutcome(time.perf_counter() - start, f"{type(root).__name__}: {reason}")
        return CompileOutcome(time.perf_counter() - start)

    def _pack_linears(self, module: torch.nn.Module) -> None:
        """Prepack ``module``'s bfloat16 CPU linears for oneDNN (:func:`phi3embed.core.cpu.pack_linears`: same
        bits, less time per call; linears of other dtypes or devices are left alone), sized for a batch."""
        pack_linears(module, rows_hint=self.batch_size * self.vision_config.clip.tokens)

    # ------------------------------------------------------------------ small facts

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def num_crops(self) -> int:
        return self.preprocess_config.num_crops

    @property
    def hidden_size(self) -> int:
        return self.vision_config.lm_hidden_size

    def num_tokens(self, width: int, height: int) -> int:
        """Image tokens for a ``width x height`` image at this embedder's ``num_crops``."""
        return image_geometry(width=width, height=height, cfg=self.preprocess_config)[1]

    def output_shape(self, width: int, height: int, *, stage: Stage | None = None) -> tuple[int, ...]:
        """The shape :meth:`encode` gives a ``width x height`` image at ``stage`` (default: this embedder's)."""
        grid, _ = image_geometry(width=width, height=height, cfg=self.preprocess_config)
        return stage_shape(
            self.stage if stage is None else stage, rows=grid.rows, cols=grid.cols, cfg=self.vision_config
        )

    # ------------------------------------------------------------------ work

    def preprocess(self, image: ImageInput, *, name: str | None = None) -> Preprocessed:
        """Decode + HD transform one image (CPU, float32). Raises ImageError naming the file."""
        return preprocess_image(
            image,
            self.preprocess_config,
            alpha=self.image_options.alpha,
            exif_transpose=self.image_options.exif_transpose,
            name=name,
        )

    def embed_stream(
        self,
        items: Iterable[tuple[object, Preprocessed]],
        *,
        times: StageTimes | None = None,
        stage: Stage | None = None,
    ) -> Iterator[tuple[object, Preprocessed, torch.Tensor]]:
        """Preprocessed images in, ``(key, item, embeddings)`` out in the same order, crops batched.

        ``stage``: what each image gives (None: this embedder's :attr:`stage`). ``times`` collects the fast
        path's host-side stage times (batching.StageTimes).
        """
        chosen = self.stage if stage is None else parse_stage(stage)
        if self.plain:
            return encode_plain(self.model, items, num_crops=self.num_crops, stage=chosen)
        return encode_stream(self.model, items, batch_size=self.batch_size, times=times, stage=chosen)

    def embed(self, items: Sequence[Preprocessed], *, stage: Stage | None = None) -> list[torch.Tensor]:
        """Embeddings (or ``stage`` outputs) of already preprocessed images, in order."""
        return [emb for _, _, emb in self.embed_stream(enumerate(items), stage=stage)]

    def encode(self, images: Iterable[ImageInput] | ImageInput, *, stage: Stage | None = None) -> list[torch.Tensor]:
        """Paths, bytes or PIL images -> one ``[num_tokens, hidden]`` tensor per image, in order.

        ``stage`` (None: this embedder's) gives an earlier intermediate instead: ``hd`` ``[T, 4C]`` or ``clip``
        ``[1 + rows*cols, g*g, C]`` (:mod:`phi3embed.core.stages`). A single image (not in a list) is accepted
        too and gives a one-element list. The first unreadable image raises ImageError; the CLI's job runner
        is the tool that keeps going past bad files.
        """
        if isinstance(images, (str, bytes, os.PathLike)) or hasattr(images, "getbands"):
            images = [images]  # type: ignore[list-item]
        items = ((i, self.preprocess(img)) for i, img in enumerate(images))
        return [emb for _, _, emb in self.embed_stream(items, stage=stage)]

    # ------------------------------------------------------------------ one vector per image

    def vector_head(self) -> VectorHead:
        """The CLIP layers after ``layer_idx`` and the final layer norm (for ``cls`` vectors), read from the
        checkpoint on first use."""
        if self._vector_head is None:
            if self.checkpoint is None:
                raise ConfigError("cls vectors need the checkpoint: build the embedder with from_pretrained")
            self._vector_head = VectorHead.from_checkpoint(
                self.checkpoint,
                self.vision_config,
                dtype=self.dtype,
                device=self.device,
                attn="eager" if self.plain else "sdpa",
            )
            if self.pack:
                self._pack_linears(self._vector_head)
        return self._vector_head

    def embed_vectors_stream(
        self,
        items: Iterable[tuple[object, Preprocessed]],
        *,
        kinds: Iterable[str] = VECTOR_KINDS,
        stage: Stage | None | str = "default",
        times: StageTimes | None = None,
    ) -> Iterator[tuple[object, Preprocessed, torch.Tensor | None, dict[VectorKind, torch.Tensor]]]:
        """:meth:`embed_stream` that also gives each image's vectors (:mod:`phi3embed.core.vectors`): yields
        ``(key, item, embeddings, {kind: float32 [d]})``. ``stage``: ``"default"`` this embedder's, a stage
        name, or None for the vectors alone (``embeddings`` is then None)."""
        chosen = parse_vectors(kinds)
        out_stage = self.stage if stage == "default" else (None if stage is None else parse_stage(stage))
        head = self.vector_head() if "cls" in chosen else None
        if self.plain:
            return encode_plain_vectors(
                self.model, items, num_crops=self.num_crops, kinds=chosen, head=head, stage=out_stage
            )
        return encode_stream_vectors(
            self.model, items, kinds=chosen, head=head, batch_size=self.batch_size, times=times, stage=out_stage
        )

    def vectors(
        self, images: Iterable[ImageInput] | ImageInput, *, kinds: Iterable[str] = VECTOR_KINDS
    ) -> dict[VectorKind, torch.Tensor]:
        """Paths, bytes or PIL images -> ``{kind: float32 [n, d]}``, one row per image in order, for each of
        ``kinds`` (``cls``, ``mean``, ``tokens``; :mod:`phi3embed.core.vectors`), on the embedder's device.
        Only what the vectors need is computed: the token matrices are not kept."""
        if isinstance(images, (str, bytes, os.PathLike)) or hasattr(images, "getbands"):
            images = [images]  # type: ignore[list-item]
        chosen = parse_vectors(kinds)
        items = ((i, self.preprocess(img)) for i, img in enumerate(images))
        stage: Stage | None = "projected" if "tokens" in chosen else None
        rows: dict[VectorKind, list[torch.Tensor]] = {kind: [] for kind in chosen}
        for _, _, _, vecs in self.embed_vectors_stream(items, kinds=chosen, stage=stage):
            for kind in chosen:
                rows[kind].append(vecs[kind])
        return {
            kind: torch.stack(r) if r else torch.empty(0, vector_width(kind, self.vision_config), device=self.device)
            for kind, r in rows.items()
        }
