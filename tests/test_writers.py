"""OutputStore and its parts: formats, atomic writes, manifest, resume rules, packs and their repair, the reader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import output_settings as settings
from safetensors import safe_open

import phi3embed
from phi3embed.errors import ConfigError
from phi3embed.inputs.listing import Source
from phi3embed.outputs.manifest import MANIFEST, iter_manifest
from phi3embed.outputs.manifest_index import INDEX_SUFFIX
from phi3embed.outputs.publish import TMP_DIR, OutputError
from phi3embed.outputs.records import ImageFacts, Record
from phi3embed.outputs.store import OutputStore


@pytest.fixture
def images(tmp_path: Path) -> list[Source]:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    sources = []
    for i, name in enumerate(["a.jpg", "b.png", "sub/c.jpg", "sub/d.jpg", "e.webp"]):
        (folder / name).write_bytes(b"x" * (i + 1))
        sources.append(Source(name, str(folder / name), str(folder)))
    return sources


def facts_for(src: Source, tokens: int) -> ImageFacts:
    st = os.stat(src.path)
    return ImageFacts("0" * 64, st.st_size, st.st_mtime_ns, 10, 20, (336, 672), (1, 2), tokens)


def emb(i: int, tokens: int = 6, dim: int = 4) -> torch.Tensor:
    return torch.arange(tokens * dim, dtype=torch.float32).reshape(tokens, dim) * (i + 1) / 7


INDEX = MANIFEST + INDEX_SUFFIX  # the manifest's columns, written when a store closes


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_npy_files_manifest_and_reader(tmp_path: Path, images: list[Source]) -> None:
    out = tmp_path / "emb"
    seen = []
    with OutputStore(out, settings(), on_record=seen.append) as store:
        for i, src in enumerate(images):
            store.write(src, facts_for(src, 6), emb(i))
        store.write_error(images[0], f"{images[0].path}: broken\nsecond line")
    assert listing(out) == sorted(
        [MANIFEST, INDEX, "a.jpg.npy", "b.png.npy", "e.webp.npy", "sub", "sub/c.jpg.npy", "sub/d.jpg.npy"]
    )
    np.testing.assert_array_equal(np.load(out / "sub" / "c.jpg.npy"), emb(2).numpy())
    records = list(iter_manifest(out / MANIFEST))
    assert records == seen and len(records) == 6
    ok = records[1]
    assert ok["name"] == "b.png" and ok["status"] == "ok" and ok["output"] == "b.png.npy"
    assert ok["image_sizes"] == [336, 672] and ok["crops"] == [1, 2] and ok["shape"] == [6, 4]
    assert ok["dtype"] == "float32" and ok["fingerprint"] == "f" * 32 and ok["attempt"] == 1
    assert records[-1]["status"] == "error" and records[-1]["attempt"] == 2
    assert records[-1]["error"] == f"{images[0].path}: broken second line"
    # the reader yields the latest ok record per image: a.jpg failed last, so it is left out
    got = {r["name"]: t for r, t in phi3embed.read(out)}
    assert sorted(got) == ["b.png", "e.webp", "sub/c.jpg", "sub/d.jpg"]
    torch.testing.assert_close(got["sub/d.jpg"], emb(3), rtol=0, atol=0)
    assert phi3embed.latest_records(out)["a.jpg"]["status"] == "error"


def test_safetensors_file_layout(tmp_path: Path, images: list[Source]) -> None:
    out = tmp_path / "emb"
    with OutputStore(out, settings(format="safetensors", dtype=torch.bfloat16)) as store:
        store.write(images[1], facts_for(images[1], 6), emb(1))
    with safe_open(str(out / "b.png.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["image_embeds"]
        assert f.get_tensor("image_embeds").dtype == torch.bfloat16
        torch.testing.assert_close(f.get_tensor("image_embeds"), emb(1).bfloat16(), rtol=0, atol=0)
        meta = f.metadata()
    assert meta["source"] == images[1].path and meta["num_crops"] == "4" and meta["model"] == "tiny"
    assert json.loads(meta["image_sizes"]) == [336, 672] and meta["fingerprint"] == "f" * 32


def test_resume_rules(tmp_path: Path, images: list[Source]) -> None:
    out = tmp_path / "emb"
    with OutputStore(out, settings()) as store:
        for i, src in enumerate(images[:3]):
            store.write(src, facts_for(src, 6), emb(i))
        store.write_error(images[3], "bad")
    with OutputStore(out, settings()) as store:
        assert [store.is_done(s) for s in images] == [True, True, True, False, False]
    for other in (settings(fingerprint="0" * 32), settings(num_crops=16), settings(dtype=torch.float16)):
        with OutputStore(out, other) as store:
            assert not any(store.is_done(s) for s in images), other
    with OutputStore(out, settings(), overwrite=True) as store:
        assert not any(store.is_done(s) for s in images)
    (out / "a.jpg.npy").unlink()  # output gone
    Path(images[1].path).write_bytes(b"changed!")  # source changed
    with OutputStore(out, settings()) as store:
        assert [store.is_done(s) for s in images[:3]] == [False, False, True]


def test_torn_manifest_line_is_ignored_and_not_glued_to(tmp_path: Path, images: list[Source]) -> None:
    out = tmp_path / "emb"
    with OutputStore(out, settings()) as store:
        store.write(images[0], facts_for(images[0], 6), emb(0))
    with open(out / MANIFEST, "ab") as fh:
        fh.write(b'{"name": "b.png", "status": "o')  # a writer killed mid-line
    with OutputStore(out, settings()) as store:
        assert store.is_done(images[0]) and not store.is_done(images[1])
        store.write(images[1], facts_for(images[1], 6), emb(1))
    assert [r["name"] for r in iter_manifest(out / MANIFEST)] == ["a.jpg", "b.png"]


def test_stale_temp_files_are_removed_and_a_second_run_is_refused(tmp_path: Path, images: list[Source]) -> None:
    out = tmp_path / "emb"
    stale = out / TMP_DIR / "all" / "000000001.part"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    store = OutputStore(out, settings()).open()
    assert not stale.exists()
    with pytest.raises(OutputError, match="another phi3embed encode"):
        OutputStore(out, settings()).open()
    OutputStore(out, settings(), shard=(0, 2)).open().close()  # another shard of the job may run beside it
    store.close()
    assert not (out / TMP_DIR).exists()


def test_outputs_never_escape_the_directory(tmp_path: Path, images: list[Source]) -> None:
    out = tmp_path / "emb"
    outside = tmp_path / "outside"
    outside.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(outside, target_is_directory=True)
    src = images[2]  # name sub/c.jpg
    with OutputStore(out, settings()) as store:
        record = store.write(src, facts_for(src, 6), emb(0))
        evil = [Source(n, images[0].path, "") for n in ("../evil.jpg", f"{TMP_DIR}/all/x.jpg", "/abs.jpg")]
        evil_records = [store.write(e, facts_for(images[0], 6), emb(0)) for e in evil]
    assert record["status"] == "error" and "symbolic link leading outside" in record["error"]
    assert all(r["status"] == "error" and "unsafe output name" in r["error"] for r in evil_records)
    assert list(outside.iterdir()) == [] and not (tmp_path / "evil.jpg.npy").exists()


def test_reader_names_a_lost_output(tmp_path: Path, images: list[Source]) -> None:
    out = tmp_path / "emb"
    with OutputStore(out, settings(format="safetensors")) as store:
        store.write(images[0], facts_for(images[0], 6), emb(0))
    (out / "a.jpg.safetensors").unlink()
    with pytest.raises(phi3embed.Phi3EmbedError, match="cannot read the embeddings of a.jpg"):
        list(phi3embed.read(out))
    with pytest.raises(phi3embed.Phi3EmbedError, match="not a phi3embed output directory"):
        list(phi3embed.read(tmp_path))


def test_packs_by_size_and_reader(tmp_path: Path, images: list[Source]) -> None:
    out = tmp_path / "emb"
    one = emb(0).numel() * 4  # bytes of one image
    with OutputStore(out, settings(format="pack", pack_bytes=2 * one)) as store:
        for i, src in enumerate(images):
            record = store.write(src, facts_for(src, 6), emb(i))
            assert record["output"] == f"emb-{i // 2:05d}.safetensors" and record["key"] == src.name
        assert not (out / "emb-00002.safetensors").exists()  # the last pack is written at close
    assert listing(out) == ["emb-00000.safetensors", "emb-00001.safetensors", "emb-00002.safetensors", MANIFEST, INDEX]
    with safe_open(str(out / "emb-00001.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["sub/c.jpg", "sub/d.jpg"]
        assert f.metadata()["format"] == "phi3embed-pack/1"
    got = list(phi3embed.read(out))
    assert [r["name"] for r, _ in got] == sorted(s.name for s in images)
    for (record, tensor), i in zip(got, [0, 1, 4, 2, 3], strict=True):
        torch.testing.assert_close(tensor, emb(i), rtol=0, atol=0)
        assert record["shape"] == [6, 4]


def _pack_run(out: Path, images: list[Source], *, shard: tuple[int, int] | None = None) -> None:
    with OutputStore(out, settings(format="pack", pack_bytes=2 * emb(0).numel() * 4), shard=shard) as store:
        for i, src in enumerate(images):
            if not store.is_done(src):
                store.write(src, facts_for(src, 6), emb(i))


def test_pack_resume_after_kill_is_byte_identical_and_repairs_the_manifest(
    tmp_path: Path, images: list[Source]
) -> None:
    full = tmp_path / "full"
    _pack_run(full, images)
    killed = tmp_path / "killed"
    _pack_run(killed, images[:4])  # 2 full packs written...
    lines = (killed / MANIFEST).read_bytes().splitlines(keepends=True)
    (killed / MANIFEST).write_bytes(b"".join(lines[:3]))  # ...but the kill came before the last record
    (killed / TMP_DIR / "all").mkdir(parents=True)
    (killed / TMP_DIR / "all" / "000000003.part").write_bytes(b"half a shard")
    _pack_run(killed, images)
    assert listing(killed) == listing(full)
    for name in listing(full):
        if name not in (MANIFEST, INDEX):  # the index file holds the manifest's columns: its times differ
            assert (killed / name).read_bytes() == (full / name).read_bytes(), name
    records = [r for r in iter_manifest(killed / MANIFEST) if r["status"] == "ok"]
    assert sorted(r["name"] for r in records) == sorted(s.name for s in images)  # each exactly once


def test_packs_of_a_job_array_do_not_collide(tmp_path: Path, images: list[Source]) -> None:
    out = tmp_path / "emb"
    _pack_run(out, images[:2], shard=(0, 2))
    _pack_run(out, images[2:], shard=(1, 2))
    assert [p.name for p in sorted(out.glob("emb-*"))] == [
        "emb-0of2-00000.safetensors",
        "emb-1of2-00000.safetensors",
        "emb-1of2-00001.safetensors",
    ]
    assert len(list(phi3embed.read(out))) == len(images)


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="npy cannot store bfloat16"):
        settings(dtype=torch.bfloat16)
    with pytest.raises(ConfigError):
        settings(format="pack")


def test_renamed_folders_are_synced_before_the_manifest(
    tmp_path: Path, images: list[Source], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Durability order: the folders holding new files are fsynced before the manifest that names them."""
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    src = images[2]  # sub/c.jpg
    with OutputStore(tmp_path / "out", settings()) as store:
        store.write(src, facts_for(src, 6), emb(0))
        synced.clear()
        store.flush()
    sub = str((tmp_path / "out" / "sub").resolve())
    manifest = str((tmp_path / "out" / "manifest.jsonl").resolve())
    assert sub in synced and manifest in synced
    assert synced.index(sub) < synced.index(manifest)


def test_records_keep_the_manifest_bytes_and_read_like_dicts(tmp_path: Path, images: list[Source]) -> None:
    """The one Record type writes the same JSON as ever (field order included) and reads back equal."""
    with OutputStore(tmp_path / "emb", settings()) as store:
        written = store.write(images[1], facts_for(images[1], 6), emb(1))
    line = (tmp_path / "emb" / MANIFEST).read_text().splitlines()[0]
    data = json.loads(line)
    # stage, duplicate_of and output_size came last, so lines of older versions keep their order (they read as "projected"
    # and not a duplicate)
    assert list(data) == [
        "name", "source", "status", "output", "key", "error", "width", "height", "image_sizes", "crops",
        "num_tokens", "shape", "dtype", "num_crops", "model", "fingerprint", "compute_dtype", "format", "alpha",
        "exif_transpose", "device", "sha256", "size", "mtime_ns", "stage", "duplicate_of", "output_size", "attempt",
        "time",
    ]  # fmt: skip
    assert data["output_size"] == (tmp_path / "emb" / "b.png.npy").stat().st_size
    old = Record.from_json({k: v for k, v in data.items() if k not in ("duplicate_of", "output_size")})
    assert old is not None and old.output_size is None
    old = Record.from_json({k: v for k, v in data.items() if k != "duplicate_of"})
    assert old is not None and old.duplicate_of is None and old == written
    assert line == json.dumps(written.to_json(), ensure_ascii=True)
    assert Record.from_json(data) == written and written["name"] == written.name == "b.png"
    assert "attempt" not in Record.from_json({**data, "attempt": None, "time": None}).to_json()  # type: ignore[union-attr]
    with pytest.raises(KeyError):
        written["nope"]
    assert Record.from_json({"status": "ok"}) is None
