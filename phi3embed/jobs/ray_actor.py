"""The Ray actor: the encoder as a stateful callable class for ``ray.data.Dataset.map_batches``.

Each actor loads the checkpoint once (:class:`RayEncoder`, from an :class:`EncoderSpec`), then turns batches of
paths (or image bytes, or archive members) into result rows (:mod:`phi3embed.jobs.ray_rows`), preparing each
image with the same :class:`phi3embed.jobs.prepare.Preparer` as the local engine and, with ``vectors``, asking
the embedder for the same vectors as the local engine does (``store_tokens`` off: the vectors alone). Bad images
become ``status="error"`` rows; they never raise.

The Preparer brings the file rules with it (only regular files of sane size are opened, a non-image costs a
header read). ``--image-timeout`` is not enforced here: an actor reads in threads (``decode_threads``), and a
thread stuck in a read or a decoder can be neither interrupted nor killed; forking a reader process inside a
Ray worker is not safe. A stalled image holds its actor's batch; a decoder that crashes takes the actor down,
which fails the job (``max_restarts=0``, see :func:`phi3embed.jobs.ray_engine.build_pipeline`): rerun to resume.

Plain Python that Ray ships to workers: nothing here imports ``ray``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from phi3embed.core.embedder import Phi3VisionEmbedder, parse_dtype, resolve_device
from phi3embed.core.preprocess import AlphaMode, Preprocessed
from phi3embed.core.stages import DEFAULT_STAGE, Stage, stage_shape
from phi3embed.core.vectors import parse_vectors
from phi3embed.errors import CheckpointError
from phi3embed.inputs.archives import Member
from phi3embed.jobs.prepare import Preparer
from phi3embed.jobs.ray_rows import ResultRow, read_inputs, result_batch
from phi3embed.jobs.runtime import Runtime, load_embedder
from phi3embed.outputs.formats import dtype_name


@dataclass(frozen=True)
class EncoderSpec:
    """Everything an actor needs to build its embedder. Plain data: pickled once per actor."""

    model: str
    device: str = "auto"  # resolved inside the actor (Ray sets CUDA_VISIBLE_DEVICES per GPU actor)
    dtype: str = "float32"  # compute dtype
    out_dtype: str | None = None  # stored dtype; None = the compute dtype
    num_crops: int | None = None
    revision: str | None = None
    alpha: AlphaMode = "drop"
    exif_transpose: bool = False
    stage: Stage = DEFAULT_STAGE  # what the actors return (phi3embed.core.stages)
    batch_size: int = 8  # crops per forward pass
    decode_threads: int = 0  # threads decoding the next images while the encoder runs (0 = inline)
    expect_fingerprint: str | None = None  # refuse to run on weights other than the driver's
    vectors: tuple[str, ...] = ()  # vector kinds each row carries too (phi3embed.core.vectors)
    store_tokens: bool = True  # False (--stage none): the vectors alone, no token matrices

    def runtime(self, device: str | None = None) -> Runtime:
        """The actors' :class:`~phi3embed.jobs.runtime.Runtime` (on ``device``: default this spec's)."""
        compute = parse_dtype(self.dtype)
        stored = parse_dtype(self.out_dtype) if self.out_dtype else compute
        return Runtime(
            device=device or self.device,
            compute_dtype=compute,
            stored_dtype=stored,
            batch_size=self.batch_size,
            workers=self.decode_threads,
        )

    def load(self) -> Phi3VisionEmbedder:
        """The actor's encoder; the actor owns its process, as the command does (jobs.runtime.load_embedder)."""
        same_names = ("revision", "num_crops", "alpha", "exif_transpose", "stage")
        runtime = self.runtime(str(resolve_device(self.device)))
        return load_embedder(self.model, runtime, **{name: getattr(self, name) for name in same_names})


class RayEncoder:
    """Callable class for ``Dataset.map_batches``: batch of ``path`` (+ optional ``bytes``) -> result rows.

    ``batch_format="numpy"``: the batch is a dict of equal-length numpy arrays; the result keeps every
    input column except ``bytes`` (so a driver-side key column comes back) and adds RESULT_COLUMNS.
    """

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        self.embedder = spec.load()
        if spec.expect_fingerprint is not None and self.embedder.fingerprint != spec.expect_fingerprint:
            raise CheckpointError(
                f"vision weights here have fingerprint {self.embedder.fingerprint}, the driver's have "
                f"{spec.expect_fingerprint}: every node must see the same checkpoint",
                path=spec.model,
            )
        self.out_dtype = spec.runtime().stored_dtype
        self.out_dtype_name = dtype_name(self.out_dtype)
        options = self.embedder.image_options
        self.preparer = Preparer(
            self.embedder.preprocess_config, alpha=options.alpha, exif_transpose=options.exif_transpose
        )
        self._pool = ThreadPoolExecutor(spec.decode_threads) if spec.decode_threads > 0 else None
        self.vectors = parse_vectors(spec.vectors) if spec.vectors else ()
        if not spec.store_tokens and not self.vectors:
            raise ValueError("an encoder that stores no token matrices must compute vectors")

    def _prepare(
        self, path: str, label: str, data: bytes | None, member: Member | None
    ) -> tuple[ResultRow, Preprocessed | None]:
        if member is not None:  # read here, on the worker, as the local engine's decode workers do
            prepared = self.preparer.prepare_member(path, member, archive_label=label)
        else:
            prepared = self.preparer.prepare(path, label=label, data=data)
        return ResultRow.of(prepared), prepared.item

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tasks = read_inputs(batch)
        prepared = (
            self._pool.map(lambda a: self._prepare(*a), tasks) if self._pool else (self._prepare(*a) for a in tasks)
        )
        rows: list[ResultRow] = []

        def ready() -> Iterator[tuple[int, Preprocessed]]:
            for i, (row, item) in enumerate(prepared):
                rows.append(row)
                if item is not None:
                    yield i, item

        for i, emb, vectors in self._encoded(ready()):
            row = rows[cast(int, i)]
            stored = None
            if emb is not None:
                stored = emb.to(self.out_dtype)
                cfg = self.embedder.vision_config
                expected = stage_shape(self.embedder.stage, rows=row.rows, cols=row.cols, cfg=cfg)
                assert tuple(stored.shape) == expected, (stored.shape, expected)
            row.encoded(stored, dtype=self.out_dtype_name, vectors=vectors)
        assert len(rows) == len(tasks)
        return result_batch(batch, rows)

    def _encoded(
        self, items: Iterator[tuple[int, Preprocessed]]
    ) -> Iterator[tuple[object, torch.Tensor | None, Mapping[str, torch.Tensor]]]:
        """``(key, embeddings, vectors)`` per image, as the local engine asks the embedder for them: its
        stream, with the vectors when the spec asks for them (and no embeddings with ``store_tokens`` off)."""
        if not self.vectors:
            for key, _, tokens in self.embedder.embed_stream(items):
                yield key, tokens, {}
            return
        stage = "default" if self.spec.store_tokens else None
        for key, _, embeddings, vectors in self.embedder.embed_vectors_stream(items, kinds=self.vectors, stage=stage):
            yield key, embeddings, cast(Mapping[str, torch.Tensor], vectors)
