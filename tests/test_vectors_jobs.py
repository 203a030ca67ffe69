"""encode --vectors as a job: the parquet_npy layout, its values, resume after kills, --stage none, combine."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import GOLDEN, TINY_128K

import phi3embed
from phi3embed import Phi3VisionEmbedder
from phi3embed.core.vectors import VECTOR_KINDS, token_mask
from phi3embed.inputs.listing import Source, expand_inputs, select_shard
from phi3embed.jobs.core import run_job
from phi3embed.jobs.local import LocalEngine
from phi3embed.outputs.combine import check_outputs, write_combined
from phi3embed.outputs.manifest import latest_records
from phi3embed.outputs.store import OutputStore

IMAGES = sorted((GOLDEN / "images").glob("*.png"))


@pytest.fixture(scope="module")
def embedder() -> Iterator[Phi3VisionEmbedder]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Phi3VisionEmbedder.from_pretrained(GOLDEN / "checkpoints" / TINY_128K, num_crops=4, batch_size=3)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(embedder: Phi3VisionEmbedder) -> dict[str, dict[str, np.ndarray]]:
    """kind -> image file name -> its vector, from the library call."""
    vecs = embedder.vectors(IMAGES)
    return {k: {p.name: v[i].numpy() for i, p in enumerate(IMAGES)} for k, v in vecs.items()}


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for p in IMAGES:
        shutil.copy(p, folder / p.name)
    shutil.copy(IMAGES[0], folder / "zz_copy_of_first.png")  # a duplicate: its row repeats the first's
    return folder


def run(
    embedder: Phi3VisionEmbedder,
    sources: list[Source],
    out: Path,
    *,
    tokens: bool = True,
    rows: int = 3,
    shard: tuple[int, int] | None = None,
    overwrite: bool = False,
) -> Any:
    engine = LocalEngine(embedder, workers=0, vectors=VECTOR_KINDS, store_tokens=tokens)
    settings = engine.info.output_settings(model=TINY_128K, format="npy", pack_bytes=None)
    store = OutputStore(out, settings, vector_rows=rows, shard=shard, overwrite=overwrite).open()
    try:
        return run_job(sources, store, engine)
    finally:
        store.close()


def read_like_embedding_reader(folder: Path) -> tuple[list[str], np.ndarray]:
    """embedding-reader's parquet_npy logic: sorted img_emb/*.npy zipped with sorted metadata/*.parquet."""
    npys, metas = sorted((folder / "img_emb").glob("*.npy")), sorted((folder / "metadata").glob("*.parquet"))
    assert [p.stem for p in npys] == [p.stem for p in metas]
    names, rows = [], []
    for npy, meta in zip(npys, metas, strict=True):
        array = np.load(npy)
        table = pq.read_table(meta)
        assert array.shape[0] == table.num_rows and array.dtype == np.float32
        names += table.column("name").to_pylist()
        rows.append(array)
    return names, np.concatenate(rows)


def check_layout(out: Path, names: list[str], reference: dict[str, dict[str, np.ndarray]]) -> None:
    """Every name exactly once per kind, right values, a duplicate's row the first's, open().vectors aligned."""
    for kind in VECTOR_KINDS:
        got_names, array = read_like_embedding_reader(out / "vectors" / kind)
        assert sorted(got_names) == sorted(names), kind  # no row lost, none twice
        for name, row in zip(got_names, array, strict=True):
            original = IMAGES[0].name if name == "zz_copy_of_first.png" else name
            np.testing.assert_allclose(row, reference[kind][original], atol=1e-5, rtol=0)
        mapped_names, mapped = phi3embed.open(out).vectors(kind)
        assert mapped_names == sorted(names)
        by_name = dict(zip(got_names, array, strict=True))
        assert np.array_equal(mapped, np.stack([by_name[n] for n in mapped_names]))
        first, copy = mapped_names.index(IMAGES[0].name), mapped_names.index("zz_copy_of_first.png")
        assert np.array_equal(mapped[first], mapped[copy])


def test_vectors_layout_values_and_tokens(
    embedder: Phi3VisionEmbedder, images: Path, tmp_path: Path, reference: Any
) -> None:
    out = tmp_path / "out"
    sources = expand_inputs([str(images)])
    summary = run(embedder, sources, out)
    assert summary.ok == len(sources) and summary.failed == 0
    check_layout(out, [s.name for s in sources], reference)
    assert len(list((out / "vectors" / "cls" / "img_emb").glob("*.npy"))) == -(-len(sources) // 3)  # 3 rows each
    table = pq.read_table(out / "vectors" / "cls" / "metadata" / "00000.parquet").to_pylist()
    assert set(table[0]) >= {"name", "source", "width", "height", "sha256"}
    # tokens: the mean of the stored tokens, separators excluded
    store = phi3embed.open(out)
    names, tokens = store.vectors("tokens")
    for name, vec in zip(names, tokens, strict=True):
        rec = store.record(name)
        rows, cols = rec.crops
        mask = token_mask(rows=rows, cols=cols, tokens_per_side=12)
        np.testing.assert_allclose(vec, store[name][mask].double().mean(dim=0).numpy(), atol=1e-5, rtol=0)
    # a rerun does nothing and leaves the rows as they are
    before = {p: p.read_bytes() for p in (out / "vectors").rglob("*.*")}
    again = run(embedder, sources, out)
    assert again.skipped == len(sources)
    assert {p: p.read_bytes() for p in (out / "vectors").rglob("*.*")} == before


class Killed(BaseException):
    """Stands for kill -9 at one point of the writer: nothing after it runs, the store is never closed."""


def killed_run(embedder: Phi3VisionEmbedder, sources: list[Source], out: Path, kill_at: Any) -> None:
    engine = LocalEngine(embedder, workers=0, vectors=VECTOR_KINDS)
    settings = engine.info.output_settings(model=TINY_128K, format="npy", pack_bytes=None)
    store = OutputStore(out, settings, vector_rows=3).open()
    kill_at(store)
    with pytest.raises(Killed):
        run_job(sources, store, engine)
    store.manifest.close()  # what the OS does for a killed process: descriptors closed, lock released
    store.publisher._lock_fd and os.close(store.publisher._lock_fd)
    store.publisher._lock_fd = None


def test_killed_twice_then_resumed(
    embedder: Phi3VisionEmbedder, images: Path, tmp_path: Path, reference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    sources = expand_inputs([str(images)])

    def after_publish_before_records(store: OutputStore) -> None:  # the second shard is out, its records are not
        shards = store.vectors
        assert shards is not None
        calls = {"n": 0}

        def append(records: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 2:
                raise Killed
            store._commit_pack(records)

        shards.append = append

    def between_files(store: OutputStore) -> None:  # inside a shard: the npy files written, no parquet yet
        publish = store.publisher.atomic_write

        def atomic_write(final: Path, write: Any) -> None:
            if final.suffix == ".parquet":
                raise Killed
            publish(final, write)

        monkeypatch.setattr(store.publisher, "atomic_write", atomic_write)

    killed_run(embedder, sources, out, after_publish_before_records)
    killed_run(embedder, sources, out, between_files)
    monkeypatch.undo()
    summary = run(embedder, sources, out)
    assert summary.failed == 0
    check_layout(out, [s.name for s in sources], reference)
    for name, rec in latest_records(out).items():  # every record names its own row
        table = pq.read_table(out / "vectors" / "mean" / "metadata" / f"{rec.vectors}.parquet")
        assert table.column("name").to_pylist()[rec.vector_row] == name


def test_changed_image_and_overwrite_keep_one_row(
    embedder: Phi3VisionEmbedder, images: Path, tmp_path: Path, reference: Any
) -> None:
    out = tmp_path / "out"
    sources = expand_inputs([str(images)])
    run(embedder, sources, out)
    changed = images / IMAGES[1].name
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    summary = run(embedder, expand_inputs([str(images)]), out)
    assert summary.ok == 1 and summary.skipped == len(sources) - 1
    check_layout(out, [s.name for s in sources], reference)
    run(embedder, sources, out, overwrite=True)
    check_layout(out, [s.name for s in sources], reference)


def test_stage_none_writes_vectors_only_and_resumes(
    embedder: Phi3VisionEmbedder, images: Path, tmp_path: Path, reference: Any
) -> None:
    out = tmp_path / "out"
    sources = expand_inputs([str(images)])
    summary = run(embedder, sources, out, tokens=False)
    assert summary.ok == len(sources)
    assert not list(out.glob("*.npy"))  # no token matrices
    check_layout(out, [s.name for s in sources], reference)
    assert all(r.stage == "none" and r.output is None for r in latest_records(out).values())
    assert run(embedder, sources, out, tokens=False).skipped == len(sources)


def test_shard_parts_combined(embedder: Phi3VisionEmbedder, images: Path, tmp_path: Path, reference: Any) -> None:
    sources = expand_inputs([str(images)])
    parts = [tmp_path / "p0", tmp_path / "p1"]
    for i, part in enumerate(parts):
        run(embedder, select_shard(sources, i, 2), part, shard=(i, 2))
        stems = {p.stem for p in (part / "vectors" / "cls" / "img_emb").glob("*.npy")}
        assert stems and all(s.startswith(f"{i}of2-") for s in stems)
    report = check_outputs(parts, sources)
    assert report.complete
    combined = tmp_path / "all"
    write_combined(report, combined / "manifest.jsonl")
    check_layout(combined, [s.name for s in sources], reference)
    # parts written into one directory: their shards side by side are the whole job already
    shared = tmp_path / "shared"
    for i in range(2):
        run(embedder, select_shard(sources, i, 2), shared, shard=(i, 2))
    check_layout(shared, [s.name for s in sources], reference)


@pytest.mark.parametrize("fmt", ["npy", "pack"])
def test_names_that_are_not_utf8_and_duplicates_in_packs(
    embedder: Phi3VisionEmbedder, tmp_path: Path, reference: Any, fmt: str
) -> None:
    """A name that is not UTF-8 (and one with a newline) gets UTF-8 text in ``name`` and its exact bytes in
    ``name_bytes``; open().vectors() gives the names the manifest has. In a pack run the first of a duplicate is
    still waiting in its pack when the duplicate comes: the duplicate's row repeats its vectors all the same."""
    folder = tmp_path / "in"
    folder.mkdir()
    odd = os.fsdecode(b"caf\xe9\nx.png")
    shutil.copy(IMAGES[0], os.path.join(folder, odd))
    shutil.copy(IMAGES[1], folder / "b.png")
    shutil.copy(IMAGES[1], folder / "c_copy_of_b.png")
    engine = LocalEngine(embedder, workers=0, vectors=VECTOR_KINDS)
    pack = 1 << 20 if fmt == "pack" else None
    settings = engine.info.output_settings(model=TINY_128K, format=fmt, pack_bytes=pack)  # type: ignore[arg-type]
    store = OutputStore(tmp_path / "out", settings).open()
    try:
        summary = run_job(expand_inputs([str(folder)]), store, engine)
    finally:
        store.close()
    assert summary.ok == 3 and summary.failed == 0
    for kind in VECTOR_KINDS:
        names, array = phi3embed.open(tmp_path / "out").vectors(kind)
        assert sorted(names) == sorted([odd, "b.png", "c_copy_of_b.png"])
        by_name = dict(zip(names, array, strict=True))
        np.testing.assert_array_equal(by_name[odd], reference[kind][IMAGES[0].name])
        np.testing.assert_array_equal(by_name["c_copy_of_b.png"], by_name["b.png"])
        for meta in (tmp_path / "out" / "vectors" / kind / "metadata").glob("*.parquet"):
            table = pq.read_table(meta)  # strict UTF-8 strings, or pyarrow would not have written them
            assert os.fsencode(odd) in table.column("name_bytes").to_pylist()
            assert "caf\\xe9\nx.png" in table.column("name").to_pylist()
