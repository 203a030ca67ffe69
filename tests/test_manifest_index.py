"""The manifest in columns (outputs/manifest_index.py) and resume on top of it (outputs/resume.py).

Every decision is compared with the rule computed here from the manifest's lines the plain way (every line parsed,
the latest record of each name, the resume rule written out), over random histories: several runs with two
settings, failed attempts, outputs deleted or truncated, sources touched, lines that are not records, and the
index file kept, deleted, damaged, or left behind by a manifest that grew or was replaced.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from conftest import output_settings

from phi3embed.inputs.listing import Source
from phi3embed.outputs import resume
from phi3embed.outputs.manifest import MANIFEST
from phi3embed.outputs.manifest_index import INDEX_SUFFIX, ManifestIndex
from phi3embed.outputs.names import exact_bytes, output_path
from phi3embed.outputs.records import ImageFacts, OutputSettings, Record
from phi3embed.outputs.store import OutputStore

NAMES = ["a.jpg", "b.png", "sub/c.jpg", "sub/d e.jpg", "é/f.png", "z" * 248 + ".png", "sub/x.jpg#2", "0.png"]


def plain_latest(manifest: Path) -> tuple[dict[str, Record], dict[str, int], int]:
    """Latest record and number of records per name, and lines that are not records: every line parsed."""
    latest: dict[str, Record] = {}
    counts: dict[str, int] = {}
    unreadable = 0
    for line in manifest.read_bytes().splitlines(keepends=True):
        if not line.endswith(b"\n") or not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError:
            data = None
        record = Record.from_json(data) if isinstance(data, dict) else None
        if record is None:
            unreadable += 1
            continue
        latest[record.name] = record
        counts[record.name] = counts.get(record.name, 0) + 1
    return latest, counts, unreadable


def plain_done(root: Path, settings: OutputSettings, latest: dict[str, Record], src: Source) -> bool:
    """The resume rule, written out: ok, same settings, the expected output whole, the source unchanged."""
    seen = latest.get(src.name)
    if seen is None or seen.status != "ok" or seen.signature() != settings.signature():
        return False
    if seen.output != output_path(src.name, f".{settings.format}"):
        return False
    try:
        out = os.stat(root / seen.output)
        st = os.stat(src.path)
    except OSError:
        return False
    return out.st_size == seen.output_size and (st.st_size, st.st_mtime_ns) == (seen.size, seen.mtime_ns)


def _sources(folder: Path) -> list[Source]:
    sources = []
    for i, name in enumerate(NAMES):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (i + 3))
        sources.append(Source(name, str(path), str(folder)))
    return sources


def _facts(src: Source) -> ImageFacts:
    st = os.stat(src.path)
    sha = f"{len(src.name) % 7:064x}"  # some sources share bytes (duplicates look them up by sha256)
    return ImageFacts(sha, st.st_size, st.st_mtime_ns, 10, 20, (336, 672), (1, 2), 6)


def _run(out: Path, settings: OutputSettings, sources: list[Source], rng: random.Random) -> None:
    with OutputStore(out, settings) as store:
        for src in sources:
            if rng.random() < 0.2:
                store.write_error(src, f"{src.path}: broken")
            else:
                store.write(src, _facts(src), torch.full((6, 4), float(rng.randint(0, 9))))


def _check(out: Path, settings: OutputSettings, sources: list[Source]) -> None:
    latest, counts, unreadable = plain_latest(out / MANIFEST)
    for name, record in latest.items():  # every record's attempt counts on from the lines before it
        assert record.attempt is None or record.attempt == counts[name], name
    with OutputStore(out, settings) as store:
        assert store.unreadable_lines == unreadable
        for src in sources:
            assert store.is_done(src) == plain_done(out, settings, latest, src), src.name
            got = store.index.latest(src.name)
            assert got == latest.get(src.name), src.name
            assert store.index.attempts(src.name) == counts.get(src.name, 0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fold", [None, 3])
def test_resume_decisions_equal_the_plain_rule_over_random_histories(
    tmp_path: Path, seed: int, fold: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fold``: a run folds its records into the columns every few records (as a long first run does)."""
    if fold is not None:
        monkeypatch.setattr(resume, "FOLD_RECORDS", fold)
    rng = random.Random(seed)
    sources = _sources(tmp_path / "imgs")
    out = tmp_path / "emb"
    a, b = output_settings(), output_settings(num_crops=8)
    index_file = out / (MANIFEST + INDEX_SUFFIX)
    for step in range(5):
        _run(out, rng.choice([a, a, b]), rng.sample(sources, rng.randint(1, len(sources))), rng)
        latest, _, _ = plain_latest(out / MANIFEST)
        ok = [r for r in latest.values() if r.ok and r.output]
        for record in rng.sample(ok, min(len(ok), 2)):  # damage outputs, touch sources
            path = out / record.output  # type: ignore[operator]
            if not path.exists():
                continue  # damaged at an earlier step already
            if rng.random() < 0.5:
                path.unlink()
            else:
                path.write_bytes(path.read_bytes()[:-3])
        touched = rng.choice(sources)
        os.utime(touched.path, ns=(1, 10**18 + step))
        what = rng.choice(["keep", "keep", "delete", "damage", "garbage line", "torn line"])
        if what == "delete":
            index_file.unlink(missing_ok=True)
        elif what == "damage" and index_file.exists():
            data = index_file.read_bytes()
            index_file.write_bytes(data[: rng.randint(0, len(data) - 1)])
        elif what == "garbage line":
            with open(out / MANIFEST, "ab") as fh:
                fh.write(b"not json\n\n[1, 2]\n")
        elif what == "torn line":
            with open(out / MANIFEST, "ab") as fh:
                fh.write(b'{"name": "a.jpg", "status": "o')
        _check(out, a, sources)
        _check(out, b, sources)


def test_the_index_file_covers_a_prefix_and_only_new_lines_are_read(tmp_path: Path) -> None:
    rng = random.Random(1)
    sources = _sources(tmp_path / "imgs")
    out = tmp_path / "emb"
    _run(out, output_settings(), sources, rng)
    manifest = out / MANIFEST
    first = ManifestIndex.load(manifest)
    assert first.loaded_from_file and first.lines_read == 0  # the store wrote it when it closed
    _run(out, output_settings(), sources[:3], rng)  # its close writes the file again: still from the file
    again = ManifestIndex.load(manifest)
    assert again.loaded_from_file and again.lines_read == 0 and len(again) == len(sources)
    with open(manifest, "ab") as fh:  # another writer appended after the file was written
        fh.write(manifest.read_bytes().splitlines(keepends=True)[0])
    grown = ManifestIndex.load(manifest)
    assert grown.loaded_from_file and grown.lines_read == 1
    rebuilt = ManifestIndex.load(manifest.rename(tmp_path / "m.jsonl"))  # no index file beside it
    assert not rebuilt.loaded_from_file
    for column in rebuilt.cols:
        assert (rebuilt.cols[column] == grown.cols[column]).all(), column
    assert rebuilt.names.blob == grown.names.blob
    (tmp_path / "m.jsonl").rename(manifest)
    data = bytearray(manifest.read_bytes())
    data[10] ^= 1  # edited in place, same size: its first bytes no longer match
    manifest.write_bytes(bytes(data))
    assert not ManifestIndex.load(manifest).loaded_from_file


def test_names_sort_by_their_bytes_and_rows_read_back_their_records(tmp_path: Path) -> None:
    sources = _sources(tmp_path / "imgs")
    out = tmp_path / "emb"
    _run(out, output_settings(), sources, random.Random(3))
    index = ManifestIndex.load(out / MANIFEST)
    latest, counts, _ = plain_latest(out / MANIFEST)
    assert [index.name_at(i) for i in range(len(index))] == sorted(latest, key=exact_bytes)
    for name, record in latest.items():
        row = index.find(name)
        assert row is not None and index.record_at(row) == record and index.output_at(row) == record.output
    assert index.find("missing.png") is None
    lo, hi = index.archive_rows("sub")
    assert [index.name_at(i) for i in range(lo, hi)] == sorted(n for n in latest if n.startswith("sub/"))


def test_a_read_only_folder_keeps_working_without_an_index_file(tmp_path: Path) -> None:
    sources = _sources(tmp_path / "imgs")
    out = tmp_path / "emb"
    _run(out, output_settings(), sources, random.Random(4))
    (out / (MANIFEST + INDEX_SUFFIX)).unlink()
    os.chmod(out, 0o555)
    try:
        index = ManifestIndex.load(out / MANIFEST, save=True)
        assert not index.loaded_from_file and len(index) == len(sources)
        assert not (out / (MANIFEST + INDEX_SUFFIX)).exists() or os.geteuid() == 0
    finally:
        os.chmod(out, 0o755)


def test_open_reads_the_index_file_and_writes_it_when_it_had_to_read_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import phi3embed
    from phi3embed.outputs import mapping

    sources = _sources(tmp_path / "imgs")
    out = tmp_path / "emb"
    _run(out, output_settings(), sources, random.Random(5))
    latest, _, _ = plain_latest(out / MANIFEST)
    index_file = out / (MANIFEST + INDEX_SUFFIX)
    with_file = phi3embed.open(out)
    index_file.unlink()
    monkeypatch.setattr(mapping, "REBUILD_SAVE_BYTES", 1)
    rebuilt = phi3embed.open(out)
    assert index_file.exists()  # written back by the opening that had to read every line
    ok = sorted((n for n, r in latest.items() if r.ok), key=exact_bytes)
    for store in (with_file, rebuilt):
        assert list(store) == ok and store.failed == sorted(n for n, r in latest.items() if not r.ok)
        for name in ok:
            assert torch.equal(store[name], with_file[name]) and store.record(name) == latest[name]


def test_a_rebuild_in_small_chunks_gives_the_same_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long manifest is read a chunk of names at a time (bounded memory): the columns do not depend on it."""
    from phi3embed.outputs import manifest_index

    rng = random.Random(7)
    sources = _sources(tmp_path / "imgs")
    out = tmp_path / "emb"
    for _ in range(4):
        _run(out, rng.choice([output_settings(), output_settings(num_crops=8)]), rng.sample(sources, 5), rng)
    whole = ManifestIndex.load(out / MANIFEST)
    (out / (MANIFEST + INDEX_SUFFIX)).unlink()
    monkeypatch.setattr(manifest_index, "_CHUNK", 2)
    chunked = ManifestIndex.load(out / MANIFEST)
    assert not chunked.loaded_from_file and chunked.names.blob == whole.names.blob
    for column in whole.cols:
        assert (chunked.cols[column] == whole.cols[column]).all(), column
