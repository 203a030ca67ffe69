"""Done means readable (issue 17 item 4): resume and combine take an output as done only when its size matches
its record (a per-image file) or the member's byte range lies inside its pack file, so a truncated or replaced
output is encoded again; combine judges completeness over the images listed now."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import output_settings as settings

from phi3embed.inputs.listing import Source
from phi3embed.outputs.combine import check_outputs
from phi3embed.outputs.manifest import MANIFEST, iter_manifest
from phi3embed.outputs.records import ImageFacts, OutputSettings, Record
from phi3embed.outputs.resume import OutputCheck, npy_size
from phi3embed.outputs.store import OutputStore


@pytest.fixture
def images(tmp_path: Path) -> list[Source]:
    folder = tmp_path / "imgs"
    folder.mkdir()
    sources = []
    for name in ["a.jpg", "b.png", "c.jpg"]:
        (folder / name).write_bytes(name.encode())
        sources.append(Source(name, str(folder / name), str(folder)))
    return sources


def facts(source: Source) -> ImageFacts:
    st = os.stat(source.path)
    return ImageFacts(source.name.ljust(64, "0"), st.st_size, st.st_mtime_ns, 10, 20, (336, 336), (1, 1), 6)


def write_all(out: Path, images: list[Source], s: OutputSettings) -> None:
    with OutputStore(out, s) as store:
        for i, src in enumerate(images):
            store.write(src, facts(src), torch.full((6 + i, 4), float(i)))


def done(out: Path, images: list[Source], s: OutputSettings) -> list[str]:
    with OutputStore(out, s) as store:
        return [src.name for src in images if store.is_done(src)]


@pytest.mark.parametrize(
    ("shape", "dtype"), [((6, 4), "float32"), ((1, 3, 5), "float16"), ((2000, 3072), "float32"), ((7,), "float16")]
)
def test_npy_size_is_what_numpy_writes(shape: tuple[int, ...], dtype: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype), allow_pickle=False)
    assert npy_size(shape, dtype) == len(buffer.getvalue())


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_a_truncated_or_replaced_file_is_not_done(tmp_path: Path, images: list[Source], fmt: str) -> None:
    out, s = tmp_path / "out", settings(format=fmt)
    write_all(out, images, s)
    assert done(out, images, s) == ["a.jpg", "b.png", "c.jpg"]
    a, b = out / f"a.jpg.{fmt}", out / f"b.png.{fmt}"
    os.truncate(a, a.stat().st_size // 2)  # a copy cut short
    b.write_bytes(b.read_bytes() + b"\0")  # replaced by something else
    assert done(out, images, s) == ["c.jpg"]
    with OutputStore(out, s) as store:  # the rerun writes them whole again
        for i, src in enumerate(images[:2]):
            store.write(src, facts(src), torch.full((6 + i, 4), float(i)))
    assert done(out, images, s) == ["a.jpg", "b.png", "c.jpg"]


def test_records_without_an_output_size_are_checked_from_shape_and_dtype(tmp_path: Path, images: list[Source]) -> None:
    """Manifests written before records held ``output_size``: npy exactly, safetensors at least its tensor."""
    out = tmp_path / "out"
    write_all(out, images, settings())
    record = next(iter(iter_manifest(out / MANIFEST)))
    old = Record.from_json({k: v for k, v in record.to_json().items() if k != "output_size"})
    assert old is not None and old.output_size is None
    check = OutputCheck(out)
    assert check.whole(old)
    os.truncate(out / "a.jpg.npy", (out / "a.jpg.npy").stat().st_size - 4)
    assert not check.whole(old)
    st_out = tmp_path / "st"
    write_all(st_out, images, settings(format="safetensors"))
    record = next(iter(iter_manifest(st_out / MANIFEST)))
    old = Record.from_json({k: v for k, v in record.to_json().items() if k != "output_size"})
    assert old is not None and OutputCheck(st_out).whole(old)
    os.truncate(st_out / "a.jpg.safetensors", 100)
    assert not OutputCheck(st_out).whole(old)


def test_a_truncated_pack_keeps_the_members_that_lie_inside_it(tmp_path: Path, images: list[Source]) -> None:
    out, s = tmp_path / "out", settings(format="pack", pack_bytes=10**6)
    write_all(out, images, s)
    pack = out / "emb-00000.safetensors"
    size = pack.stat().st_size
    last = (8 + 8 * 4) * 4  # the last tensor (8 x 4 float32) is the file's last bytes
    os.truncate(pack, size - last // 2)
    assert done(out, images, s) == ["a.jpg", "b.png"]
    pack.write_bytes(b"not a pack")
    assert done(out, images, s) == []


def test_combine_judges_the_images_listed_now_and_notes_stale_records(tmp_path: Path, images: list[Source]) -> None:
    out, s = tmp_path / "out", settings()
    write_all(out, images, s)
    gone = Source("gone.jpg", str(tmp_path / "gone.jpg"), "")
    with OutputStore(out, s) as store:
        store.write_error(gone, "gone.jpg: cannot identify image file")
    with (out / MANIFEST).open("a") as fh:
        fh.write("this is not a record\n")
    everything = check_outputs([out])
    assert not everything.complete and everything.failed == ["gone.jpg"]
    now = check_outputs([out], images)
    assert now.complete and now.stale == ["gone.jpg"] and now.failed == []
    assert now.unreadable == 1
    os.truncate(out / "b.png.npy", 10)
    damaged = check_outputs([out], images)
    assert damaged.lost == ["b.png"] and not damaged.complete


def test_a_manifest_line_that_cannot_be_read_is_counted_at_open(tmp_path: Path, images: list[Source]) -> None:
    out, s = tmp_path / "out", settings()
    write_all(out, images, s)
    with (out / MANIFEST).open("a") as fh:
        fh.write('{"no name": 1}\n\n[1, 2]\ngarbage\n')
    with OutputStore(out, s) as store:
        assert store.unreadable_lines == 3  # blank lines are not counted
        assert all(store.is_done(src) for src in images)
    lines = (out / MANIFEST).read_text().splitlines()
    assert json.loads(lines[0])["name"] == "a.jpg"
