"""Checkpoint.read: the values of every path (read in place, cast through the shared scratch) and size checks."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import TINY_35, TINY_128K
from safetensors.torch import load_file

from phi3embed.core.checkpoint import resolve
from phi3embed.errors import CheckpointError


def _reference(root: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for weight_file in sorted(root.glob("*.safetensors")):
        out.update({k: v for k, v in load_file(weight_file).items() if k in keys})
    return out


@pytest.mark.parametrize("name", [TINY_128K, TINY_35])
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_read_values_equal_safetensors(golden: Path, name: str, dtype: torch.dtype | None) -> None:
    root = golden / "checkpoints" / name
    ckpt = resolve(root)
    keys = ckpt.vision_keys()
    got = ckpt.read(keys, dtype=dtype)
    want = _reference(root, keys)
    assert set(got) == set(want) == set(keys)
    for key in keys:
        expected = want[key] if dtype is None else want[key].to(dtype)
        assert got[key].dtype == expected.dtype, key
        assert torch.equal(got[key], expected), key
        assert got[key].is_contiguous()
    assert ckpt.bytes_read == sum(ckpt.tensors[k].nbytes for k in keys)


def test_tensors_do_not_share_storage(golden: Path) -> None:
    """Cast tensors come from one reused scratch buffer: each result must own its memory."""
    ckpt = resolve(golden / "checkpoints" / TINY_35)  # bf16 stored: float32 goes through the scratch
    got = ckpt.read(ckpt.vision_keys(), dtype=torch.float32)
    ptrs = [t.untyped_storage().data_ptr() for t in got.values() if t.numel()]
    assert len(set(ptrs)) == len(ptrs)


def test_size_mismatch_between_header_shape_and_offsets_is_named(tmp_path: Path) -> None:
    key = "model.vision_embed_tokens.glb_GN"
    header = {key: {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}  # 6 floats need 24 bytes
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(20))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"glb_GN has 20 bytes, its shape \[2, 3\] and dtype F32 need 24"):
        resolve(tmp_path)  # found when the header is indexed, before any tensor is read
