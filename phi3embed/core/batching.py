"""Batching across images: pack the real crops of many images into fixed-size forward passes.

``encode_stream`` takes preprocessed images in order and yields each image's embeddings as soon as all its
crops have been through the encoder. Crops of one image may span two batches; features wait on the
device until the image is complete, then the HD transform and the projection run once for every image
completed by that batch. Nothing in the loop synchronises with the device.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from phi3embed.core.model import Phi3VisionModel
from phi3embed.core.preprocess import Preprocessed, normalization_table, normalize_tiles, pad_crops
from phi3embed.core.stages import Stage
from phi3embed.core.vectors import VectorHead, VectorKind, image_vectors
from phi3embed.errors import DeviceOutOfMemoryError

K = TypeVar("K")
_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)


def is_out_of_memory(exc: BaseException) -> bool:
    """A device allocation failure: torch's OutOfMemoryError (CUDA) or the CPU allocator's RuntimeError."""
    return isinstance(exc, _OOM_TYPES) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)  # DefaultCPUAllocator
    )


def _out_of_memory(
    device: torch.device, dtype: torch.dtype, crops: int, *, padded: bool = False
) -> DeviceOutOfMemoryError:
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the failed pass's blocks back before the caller retries
    what = f"one image ({crops} crops, padded as the plain path does)" if padded else f"a batch of {crops} crops"
    hint = (
        "the plain path encodes num_crops + 1 crops per image: use the fast path or fewer num_crops"
        if padded
        else f"use a smaller batch size (crops per forward pass), e.g. --batch-size {max(1, crops // 2)}"
    )
    return DeviceOutOfMemoryError(
        f"out of memory on {device} encoding {what} in {str(dtype).removeprefix('torch.')}: {hint}"
    )


@dataclass
class StageTimes:
    """Wall seconds the encoding thread spends in each stage of :func:`encode_stream` (host side).

    On CUDA the forward pass only queues kernels, so ``forward_s`` is launch work, plus waiting whenever the
    device is so far behind that the launch queue is full: a large ``forward_s`` means the device is the
    limit, large other stages mean the host is.
    """

    assemble_s: float = 0.0  # crops -> one batch on the device (host copies, transfer, lookup)
    forward_s: float = 0.0  # the CLIP encoder
    embed_s: float = 0.0  # HD transform + projection of finished images
    batches: int = 0


@dataclass
class _Pending(Generic[K]):
    key: K
    item: Preprocessed
    features: list[torch.Tensor] = field(default_factory=list)
    done: int = 0  # crops encoded so far
    global_hidden: torch.Tensor | None = None  # (1 + g*g, C): the global view with CLS, when vectors are wanted


def _to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if device.type == "cuda":
        if not x.is_pinned():
            x = x.pin_memory()
        return x.to(device, non_blocking=True).to(dtype)
    return x.to(device=device, dtype=dtype)


def _concat(pieces: list[torch.Tensor], *, pinned: bool) -> torch.Tensor:
    """Crops of several images -> one batch; for CUDA straight into page-locked memory (one host copy)."""
    if len(pieces) == 1 and (not pinned or pieces[0].is_pinned()):
        return pieces[0]
    if not pinned:
        return torch.cat(pieces)
    total = sum(p.shape[0] for p in pieces)
    out = torch.empty((total, *pieces[0].shape[1:]), dtype=pieces[0].dtype, pin_memory=True)
    return torch.cat(pieces, out=out)


class _Assembler:
    """Crop ranges of several images -> one ``[B, 3, S, S]`` batch on the device, in the compute dtype.

    Global views (float32) and tiles (uint8) travel to the device separately, one copy each per batch
    (through page-locked memory on CUDA); the tiles are normalised there by table lookup, which gives the
    reference's float values on any device (preprocess.normalization_table).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.pinned = device.type == "cuda"
        self._tables: dict[tuple[tuple[float, ...], tuple[float, ...]], torch.Tensor] = {}

    def table(self, key: tuple[tuple[float, ...], tuple[float, ...]]) -> torch.Tensor:
        if key not in self._tables:
            self._tables[key] = normalization_table(*key).to(self.device, self.dtype)
        return self._tables[key]

    def __call__(self, pieces: list[tuple[Preprocessed, int, int]]) -> torch.Tensor:
        """``pieces``: ``(item, first crop, count)``, crop 0 being the global view, in batch order."""
        views, tiles = [], []
        layout: list[tuple[Preprocessed | None, int]] = []  # (None, 1): next global view; (item, n): n tiles
        for item, start, count in pieces:
            if start == 0:
                views.append(item.global_view)
                layout.append((None, 1))
                start, count = 1, count - 1
            if count:
                tiles.append(item.tiles[start - 1 : start - 1 + count])
                layout.append((item, count))
        views_dev = _to_device(_concat(views, pinned=self.pinned), self.device, self.dtype) if views else None
        normalised = {}  # (mean, std) -> all tiles of the batch normalised that way (in practice one entry)
        if tiles:
            raw = _to_device(_concat(tiles, pinned=self.pinned), self.device, torch.uint8)  # (n, 3, S, S)
            for key in dict.fromkeys((o.mean, o.std) for o, _ in layout if o is not None):
                normalised[key] = normalize_tiles(raw, self.table(key))
        parts, v, t = [], 0, 0
        for owner, count in layout:
            if owner is None:
                assert views_dev is not None
                parts.append(views_dev[v : v + 1])
                v += 1
            else:
                parts.append(normalised[owner.mean, owner.std][t : t + count])
                t += count
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@torch.inference_mode()
def encode_stream(
    model: Phi3VisionModel,
    items: Iterable[tuple[K, Preprocessed]],
    *,
    batch_size: int = 8,
    times: StageTimes | None = None,
    stage: Stage = "projected",
) -> Iterator[tuple[K, Preprocessed, torch.Tensor]]:
    """Yield ``(key, item, embeddings [T, D])`` in input order, batching ``batch_size`` crops per pass.

    ``stage`` stops each image's data flow earlier (:mod:`phi3embed.core.stages`: ``hd`` gives ``[T, 4C]``,
    ``clip`` the crops' features ``[1 + rows*cols, g*g, C]``). ``times``, when given, accumulates the
    host-side time of each stage of the loop (:class:`StageTimes`).
    """
    for key, item, emb, _ in _stream(model, items, batch_size=batch_size, times=times, stage=stage):
        assert emb is not None
        yield key, item, emb


@torch.inference_mode()
def encode_stream_vectors(
    model: Phi3VisionModel,
    items: Iterable[tuple[K, Preprocessed]],
    *,
    kinds: Sequence[VectorKind],
    head: VectorHead | None,
    batch_size: int = 8,
    times: StageTimes | None = None,
    stage: Stage | None = "projected",
) -> Iterator[tuple[K, Preprocessed, torch.Tensor | None, dict[VectorKind, torch.Tensor]]]:
    """:func:`encode_stream` that also gives each image's ``kinds`` vectors (:mod:`phi3embed.core.vectors`:
    float32 ``[d]`` each, on the device); ``stage`` None computes the vectors only (the embeddings are None).
    ``head``: the :class:`VectorHead`, needed for ``cls``."""
    yield from _stream(model, items, batch_size=batch_size, times=times, stage=stage, kinds=kinds, head=head)


def _stream(
    model: Phi3VisionModel,
    items: Iterable[tuple[K, Preprocessed]],
    *,
    batch_size: int,
    times: StageTimes | None,
    stage: Stage | None,
    kinds: Sequence[VectorKind] = (),
    head: VectorHead | None = None,
) -> Iterator[tuple[K, Preprocessed, torch.Tensor | None, dict[VectorKind, torch.Tensor]]]:
    """The loop of :func:`encode_stream` and :func:`encode_stream_vectors`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, dtype = model.device, model.dtype
    pending: deque[_Pending[K]] = deque()  # images with crops not yet fully encoded, in order
    queue: deque[tuple[_Pending[K], int, int]] = deque()  # (image, first crop, crop count) still to encode
    queued = 0
    assemble = _Assembler(device, dtype)
    clock = times if times is not None else StageTimes()

    def run_batch(limit: int) -> list[_Pending[K]]:
        nonlocal queued
        pieces: list[tuple[Preprocessed, int, int]] = []
        owners = []
        taken = 0
        while queue and taken < limit:
            p, start, count = queue.popleft()
            n = min(count, limit - taken)
            pieces.append((p.item, start, n))
            owners.append((p, n))
            if n < count:
                queue.appendleft((p, start + n, count - n))
            taken += n
        queued -= taken
        try:
            t0 = time.perf_counter()
            batch = assemble(pieces)  # (B, 3, S, S)
            t1 = time.perf_counter()
            if kinds:  # the global views' CLS rows are kept for the vectors
                hidden = model.crop_hidden(batch)  # (B, 1 + g*g, C)
                feats = hidden[:, 1:]  # (B, g*g, C)
            else:
                feats = model.crop_features(batch)  # (B, g*g, C)
            clock.assemble_s += t1 - t0
            clock.forward_s += time.perf_counter() - t1
            clock.batches += 1
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            failed = True  # raised below, outside this handler, so the failed pass's tensors are freed
        else:
            failed = False
        if failed:
            raise _out_of_memory(device, dtype, taken)
        offset = 0
        for p, n in owners:
            if kinds and p.done == 0:  # this piece starts with the image's global view
                p.global_hidden = hidden[offset]  # (1 + g*g, C)
            p.features.append(feats[offset : offset + n])
            p.done += n
            offset += n
        finished = []
        while pending and pending[0].done == pending[0].item.num_real_crops:
            finished.append(pending.popleft())
        return finished

    def emit(
        finished: list[_Pending[K]],
    ) -> Iterator[tuple[K, Preprocessed, torch.Tensor | None, dict[VectorKind, torch.Tensor]]]:
        if not finished:
            return
        t0 = time.perf_counter()
        feats = torch.cat([f for p in finished for f in p.features])
        grids = [(p.item.grid.rows, p.item.grid.cols) for p in finished]
        hidden = [p.global_hidden for p in finished] if kinds else []
        embeddings, vectors = _outputs(model, feats, grids, stage=stage, kinds=kinds, head=head, global_hidden=hidden)
        clock.embed_s += time.perf_counter() - t0
        for i, p in enumerate(finished):
            p.features.clear()
            p.global_hidden = None
            yield (
                p.key,
                p.item,
                embeddings[i] if embeddings is not None else None,
                {k: v[i] for k, v in vectors.items()},
            )

    for key, item in items:
        p = _Pending(key, item)
        pending.append(p)
        queue.append((p, 0, item.num_real_crops))
        queued += item.num_real_crops
        while queued >= batch_size:
            yield from emit(run_batch(batch_size))
    while queued:
        yield from emit(run_batch(batch_size))


def _outputs(
    model: Phi3VisionModel,
    feats: torch.Tensor,
    grids: list[tuple[int, int]],
    *,
    stage: Stage | None,
    kinds: Sequence[VectorKind],
    head: VectorHead | None,
    global_hidden: Sequence[torch.Tensor | None],
) -> tuple[list[torch.Tensor] | None, dict[VectorKind, torch.Tensor]]:
    """Finished images' features -> their outputs at ``stage`` (None: none) and their ``kinds`` vectors."""
    embeddings = model.embed_features(feats, grids, stage=stage) if stage is not None else None
    if not kinds:
        return embeddings, {}
    projected = None
    if "tokens" in kinds:  # the projected tokens: the output itself, or projected from the hd stage's
        if stage == "projected":
            projected = embeddings
        elif stage == "hd":
            assert embeddings is not None
            flat = model.project(torch.cat(embeddings))  # (sum T_i, D)
            projected = list(torch.split(flat, [t.shape[0] for t in embeddings]))
        else:
            projected = model.embed_features(feats, grids, stage="projected")
    stacked = torch.stack([h for h in global_hidden if h is not None])  # (N, 1 + g*g, C)
    assert stacked.shape[0] == len(grids)
    vectors = image_vectors(kinds, global_hidden=stacked, projected=projected, grids=grids, cfg=model.cfg, head=head)
    return embeddings, vectors


@torch.inference_mode()
def encode_plain(
    model: Phi3VisionModel, items: Iterable[tuple[K, Preprocessed]], *, num_crops: int, stage: Stage = "projected"
) -> Iterator[tuple[K, Preprocessed, torch.Tensor]]:
    """The reference's way, kept as the yardstick: one image at a time, zero crops padded to
    ``num_crops + 1`` and encoded too, then discarded. ``stage`` as in :func:`encode_stream`."""
    for key, item, emb, _ in _plain(model, items, num_crops=num_crops, stage=stage):
        assert emb is not None
        yield key, item, emb


@torch.inference_mode()
def encode_plain_vectors(
    model: Phi3VisionModel,
    items: Iterable[tuple[K, Preprocessed]],
    *,
    num_crops: int,
    kinds: Sequence[VectorKind],
    head: VectorHead | None,
    stage: Stage | None = "projected",
) -> Iterator[tuple[K, Preprocessed, torch.Tensor | None, dict[VectorKind, torch.Tensor]]]:
    """:func:`encode_plain` with vectors, as :func:`encode_stream_vectors`."""
    yield from _plain(model, items, num_crops=num_crops, stage=stage, kinds=kinds, head=head)


def _plain(
    model: Phi3VisionModel,
    items: Iterable[tuple[K, Preprocessed]],
    *,
    num_crops: int,
    stage: Stage | None,
    kinds: Sequence[VectorKind] = (),
    head: VectorHead | None = None,
) -> Iterator[tuple[K, Preprocessed, torch.Tensor | None, dict[VectorKind, torch.Tensor]]]:
    """The loop of :func:`encode_plain` and :func:`encode_plain_vectors`."""
    device, dtype = model.device, model.dtype
    for key, item in items:
        padded = pad_crops(item.pixel_values, num_crops=num_crops)  # (num_crops+1, 3, S, S)
        hidden = None
        try:
            if kinds:
                hidden = model.crop_hidden(_to_device(padded, device, dtype))[: item.num_real_crops]
                feats = hidden[:, 1:]  # (n, g*g, C)
            else:
                feats = model.crop_features(_to_device(padded, device, dtype))[: item.num_real_crops]
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            failed = True
        else:
            failed = False
        if failed:
            raise _out_of_memory(device, dtype, padded.shape[0], padded=True)
        grid = [(item.grid.rows, item.grid.cols)]
        globals_ = [hidden[0]] if hidden is not None else []
        embeddings, vectors = _outputs(model, feats, grid, stage=stage, kinds=kinds, head=head, global_hidden=globals_)
        yield key, item, embeddings[0] if embeddings is not None else None, {k: v[0] for k, v in vectors.items()}


class HostResult:
    """An embedding on its way to host memory; :meth:`wait` gives the host tensor once it has arrived."""

    __slots__ = ("_event", "_tensor")

    def __init__(self, tensor: torch.Tensor, event: torch.cuda.Event | None = None) -> None:
        self._tensor, self._event = tensor, event

    def wait(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._tensor


class HostCopier:
    """Device results -> host tensors without stalling the encoder.

    On CUDA the copy goes into page-locked memory on a side stream: it overlaps the next batches' compute
    instead of waiting in the compute stream behind them (a pageable ``.cpu()`` from the writer thread
    would do that, and block the stream while it copies). Elsewhere results are converted in place.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, tensor: torch.Tensor, dtype: torch.dtype) -> HostResult:
        """Begin moving ``tensor`` (converted to ``dtype`` on its device) to the host."""
        with torch.inference_mode():
            converted = tensor.to(dtype)
            if self.stream is None or converted.device.type != "cuda":
                return HostResult(converted.cpu())
            self.stream.wait_stream(torch.cuda.current_stream(converted.device))  # the result is computed
            with torch.cuda.stream(self.stream):
                host = torch.empty(converted.shape, dtype=dtype, pin_memory=True)
                host.copy_(converted, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            converted.record_stream(self.stream)  # its memory is not reused before the copy has read it
            return HostResult(host, event)
