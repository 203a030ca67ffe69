"""``phi3embed.open``: random access over every layout encode writes, the training Dataset and its collate."""

from __future__ import annotations

import json
import multiprocessing
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

import phi3embed
from phi3embed.errors import Phi3EmbedError
from phi3embed.inputs.listing import Source
from phi3embed.outputs.combine import check_outputs, write_combined
from phi3embed.outputs.dataset import EmbeddingDataset, pad_collate
from phi3embed.outputs.mapping import EmbeddingStore
from phi3embed.outputs.records import ImageFacts, OutputSettings
from phi3embed.outputs.store import OutputStore

NAMES = ["a.jpg", "b.png", "sub/c.jpg", "sub/d.jpg", "zé ü.webp", "sub/deeper/e.jpg"]


def tensor_of(i: int, dtype: torch.dtype, *, width: int = 8, crops: bool = False) -> torch.Tensor:
    """A tensor whose length differs per image; ``crops``: 3-D like ``--stage clip``."""
    g = torch.Generator().manual_seed(i)
    shape = (1 + i % 3, 4, width) if crops else (5 + 3 * i, width)
    return torch.randn(shape, generator=g).to(dtype)


def write_outputs(
    out: Path, fmt: str, dtype: torch.dtype, names: list[str] = NAMES, *, crops: bool = False, **kw: Any
) -> dict[str, torch.Tensor]:
    """Write ``names`` through the real store (per-image files or packs of about 3 images); returns what was
    written per name."""
    pack = 3 * tensor_of(0, dtype, crops=crops).numel() * dtype.itemsize if fmt == "pack" else None
    settings = OutputSettings(
        model="tiny", fingerprint="f" * 32, num_crops=4, dtype=dtype, compute_dtype=dtype, format=fmt, pack_bytes=pack
    )  # type: ignore[arg-type]
    written = {}
    with OutputStore(out, settings, **kw) as store:
        for name in names:
            t = tensor_of(NAMES.index(name), dtype, crops=crops)
            store.write(Source(name, f"/imgs/{name}", "/imgs"), ImageFacts(num_tokens=t.shape[0]), t)
            written[name] = t
    return written


LAYOUTS = [
    ("npy", torch.float32, False),
    ("npy", torch.float16, True),
    ("safetensors", torch.bfloat16, False),
    ("safetensors", torch.float32, True),
    ("pack", torch.bfloat16, False),
    ("pack", torch.float16, True),
]


@pytest.mark.parametrize(("fmt", "dtype", "crops"), LAYOUTS)
def test_open_equals_the_files(tmp_path: Path, fmt: str, dtype: torch.dtype, crops: bool) -> None:
    written = write_outputs(tmp_path / "emb", fmt, dtype, crops=crops)
    store = phi3embed.open(tmp_path / "emb")
    assert isinstance(store, EmbeddingStore) and len(store) == len(NAMES)
    assert list(store) == sorted(NAMES) and "a.jpg" in store and "nope.jpg" not in store
    for name in reversed(NAMES):  # random order, twice: the second read uses the noted location
        for _ in range(2):
            got = store[name]
            assert got.dtype == dtype and torch.equal(got, written[name])
    for record, tensor in phi3embed.read(tmp_path / "emb"):  # the streaming reader agrees
        assert torch.equal(store[record.name], tensor)
        assert store.record(record.name) == record
    r = store.record("sub/c.jpg")
    path = tmp_path / "emb" / str(r.output)
    if fmt == "npy":
        direct = torch.from_numpy(np.load(path))
    else:
        with safe_open(str(path), framework="pt") as fh:
            direct = fh.get_tensor(str(r.key))
    assert torch.equal(store["sub/c.jpg"], direct)
    assert store["sub/c.jpg"].is_contiguous()


def test_written_tensors_are_private_copies(tmp_path: Path) -> None:
    written = write_outputs(tmp_path / "emb", "pack", torch.float32)
    store = phi3embed.open(tmp_path / "emb")
    t = store["a.jpg"]
    t.zero_()  # the caller owns it: the files and later reads are untouched
    assert torch.equal(store["a.jpg"], written["a.jpg"])


def test_unknown_and_failed_names_raise_key_error(tmp_path: Path) -> None:
    write_outputs(tmp_path / "emb", "npy", torch.float32)
    settings = OutputSettings(
        model="tiny", fingerprint="f" * 32, num_crops=4, dtype=torch.float32, compute_dtype=torch.float32
    )
    with OutputStore(tmp_path / "emb", settings) as s:
        s.write_error(Source("b.png", "/imgs/b.png", "/imgs"), "/imgs/b.png: broken")  # ok, then failed
        s.write_error(Source("never.png", "/imgs/never.png", "/imgs"), "/imgs/never.png: broken")
    store = phi3embed.open(tmp_path / "emb")
    assert "b.png" not in store and len(store) == len(NAMES) - 1
    with pytest.raises(KeyError, match="latest record is an error"):
        store["b.png"]
    with pytest.raises(KeyError, match="not in the manifest"):
        store["missing.jpg"]
    with pytest.raises(KeyError):
        store.record("missing.jpg")
    assert store.failed == ["b.png", "never.png"]
    assert store.record("b.png").status == "error" and store.record("b.png").error == "/imgs/b.png: broken"
    assert store.get("b.png") is None and sorted(store.keys()) == list(store)


def test_combined_manifest_of_a_sharded_job(tmp_path: Path) -> None:
    parts = [NAMES[:3], NAMES[3:]]
    written: dict[str, torch.Tensor] = {}
    for k, names in enumerate(parts):
        fmt = "pack" if k == 0 else "npy"
        written |= write_outputs(tmp_path / f"part-{k}", fmt, torch.float32, names, shard=(k, 2))
    combined = tmp_path / "all" / "manifest.jsonl"
    write_combined(check_outputs([tmp_path / "part-0", tmp_path / "part-1"]), combined)
    for where in (combined, combined.parent):  # the manifest file itself, or its folder
        store = phi3embed.open(where)
        assert list(store) == sorted(NAMES)
        for name in NAMES:
            assert torch.equal(store[name], written[name])
        assert store.path_at(store.index("sub/d.jpg")).resolve() == (tmp_path / "part-1" / "sub" / "d.jpg.npy")


def test_a_missing_output_is_an_error_naming_it(tmp_path: Path) -> None:
    write_outputs(tmp_path / "emb", "npy", torch.float32)
    (tmp_path / "emb" / "a.jpg.npy").unlink()
    store = phi3embed.open(tmp_path / "emb")
    with pytest.raises(Phi3EmbedError, match="a.jpg.npy"):
        store["a.jpg"]
    with pytest.raises(Phi3EmbedError, match="not a phi3embed output"):
        phi3embed.open(tmp_path / "nothing")


def test_store_pickles_without_its_descriptors(tmp_path: Path) -> None:
    written = write_outputs(tmp_path / "emb", "pack", torch.bfloat16)
    store = phi3embed.open(tmp_path / "emb")
    store["a.jpg"]  # opens a pack here
    copy = pickle.loads(pickle.dumps(store))
    assert not copy._fds and list(copy) == list(store)
    assert torch.equal(copy["sub/d.jpg"], written["sub/d.jpg"])


def test_collate_pads_and_masks() -> None:
    a, b = torch.ones(2, 3), torch.full((4, 3), 2.0)
    batch = pad_collate([("a", a), ("b", b)])
    assert batch.keys == ["a", "b"] and batch.embeds.shape == (2, 4, 3) and batch.mask.dtype == torch.bool
    assert batch.mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert torch.equal(batch.embeds[0, :2], a) and not batch.embeds[0, 2:].any() and torch.equal(batch.embeds[1], b)
    crops = pad_collate([(0, torch.ones(1, 4, 2)), (1, torch.ones(3, 4, 2))])  # --stage clip: [crops, P, C]
    assert crops.embeds.shape == (2, 3, 4, 2) and crops.mask.sum().item() == 4
    with pytest.raises(ValueError, match="trailing shape"):
        pad_collate([("a", a), ("c", torch.ones(2, 5))])


def test_dataset_over_names_and_indices(tmp_path: Path) -> None:
    written = write_outputs(tmp_path / "emb", "npy", torch.float32)
    ds = EmbeddingDataset(tmp_path / "emb", ["sub/d.jpg", "a.jpg"])
    assert len(ds) == 2 and ds[0][0] == "sub/d.jpg" and torch.equal(ds[1][1], written["a.jpg"])
    by_index = EmbeddingDataset(phi3embed.open(tmp_path / "emb"), with_names=False)
    assert [by_index[i][0] for i in range(len(by_index))] == list(range(len(NAMES)))
    with pytest.raises(KeyError):
        EmbeddingDataset(tmp_path / "emb", ["nope.jpg"])


def test_dataloader_with_two_forked_workers_over_packs(tmp_path: Path) -> None:
    written = write_outputs(tmp_path / "emb", "pack", torch.bfloat16)
    store = phi3embed.open(tmp_path / "emb")
    store["a.jpg"]  # the parent has a descriptor open before the fork: each worker must use its own
    loader = DataLoader(
        EmbeddingDataset(store),
        batch_size=2,
        num_workers=2,
        collate_fn=pad_collate,
        multiprocessing_context=multiprocessing.get_context("fork"),
    )
    seen = {}
    for batch in loader:
        assert batch.embeds.dtype == torch.bfloat16
        for row, name in enumerate(batch.keys):
            seen[name] = batch.embeds[row, : int(batch.mask[row].sum())]
    assert sorted(seen) == sorted(NAMES)
    assert all(torch.equal(seen[n], written[n]) for n in NAMES)


@pytest.mark.e2e
def test_dataloader_with_spawned_workers(tmp_path: Path) -> None:
    written = write_outputs(tmp_path / "emb", "safetensors", torch.float32)
    loader = DataLoader(
        EmbeddingDataset(tmp_path / "emb"),
        batch_size=3,
        num_workers=2,
        collate_fn=pad_collate,
        multiprocessing_context=multiprocessing.get_context("spawn"),
    )
    names = [n for batch in loader for n in batch.keys]
    assert names == sorted(NAMES) and written


def test_records_are_kept_in_a_few_columns(tmp_path: Path) -> None:
    """Per image the store keeps a few dozen bytes (no Python object): 20k records, columns measured."""
    out = tmp_path / "emb"
    out.mkdir()
    base = {"status": "ok", "key": None, "shape": [757, 3072], "dtype": "float16"}
    with open(out / "manifest.jsonl", "w") as fh:
        for i in range(20_000):
            fh.write(
                json.dumps(
                    {**base, "name": f"shard{i % 7}/img{i:07d}.jpg", "output": f"shard{i % 7}/img{i:07d}.jpg.npy"}
                )
                + "\n"
            )
    store = phi3embed.open(out)
    assert len(store) == 20_000 and store.name_at(0) == "shard0/img0000000.jpg"
    per_image = (
        sum(
            a.nbytes
            for a in (
                store._line_off,
                store._out_id,
                store._key_id,
                store._loc_off,
                store._loc_dtype,
                store._loc_shape,
                store._loc_ndim,
            )
        )
        / len(store)
        + len(store._names.blob) / len(store)
        + store._names.offsets.nbytes / len(store)
    )
    assert per_image < 120 and [f[:2] for f in store._files] == [("", ".npy")]  # one template for every path
