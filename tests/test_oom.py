"""Out of device memory in a forward pass -> DeviceOutOfMemoryError with a clear hint, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_128K

from phi3embed import DeviceOutOfMemoryError, MergeError, Phi3EmbedError, Phi3VisionEmbedder
from phi3embed.core.batching import encode_plain, encode_stream, is_out_of_memory

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@pytest.fixture(scope="module")
def embedder(golden: Path) -> Phi3VisionEmbedder:
    return Phi3VisionEmbedder.from_pretrained(golden / "checkpoints" / TINY_128K, num_crops=4, batch_size=6)


def _failing(exc: BaseException):
    def crop_features(pixel_values: torch.Tensor) -> torch.Tensor:
        raise exc

    return crop_features


@pytest.mark.parametrize(
    "exc",
    [
        OOM("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes."),
    ],
)
def test_out_of_memory_becomes_a_typed_error_naming_the_batch_size(
    embedder: Phi3VisionEmbedder, golden: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    item = embedder.preprocess(golden / "images" / "rgb_336x336.png")
    monkeypatch.setattr(embedder.model, "crop_features", _failing(exc))
    with pytest.raises(DeviceOutOfMemoryError) as info:
        list(encode_stream(embedder.model, [(0, item), (1, item)], batch_size=6))
    err = info.value
    assert isinstance(err, Phi3EmbedError) and isinstance(err, MemoryError)
    assert "out of memory on cpu encoding a batch of 6 crops in float32" in str(err)
    assert "--batch-size 3" in str(err)
    assert err.__context__ is None and err.__cause__ is None  # the failed pass's frames are not kept alive
    with pytest.raises(DeviceOutOfMemoryError, match="padded as the plain path does"):
        list(encode_plain(embedder.model, [(0, item)], num_crops=4))
    with pytest.raises(DeviceOutOfMemoryError, match="batch of 5 crops"):  # through the public API
        embedder.encode(golden / "images" / "rgb_336x336.png")


def test_other_errors_pass_through(embedder: Phi3VisionEmbedder, golden: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    item = embedder.preprocess(golden / "images" / "rgb_336x336.png")
    monkeypatch.setattr(embedder.model, "crop_features", _failing(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(encode_stream(embedder.model, [(0, item)], batch_size=2))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(MergeError("x"))
