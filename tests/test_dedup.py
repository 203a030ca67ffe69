"""Exact duplicates encoded once (issue 12, item 8): copies of an image's bytes share its output.

In-process jobs on the tiny checkpoint; the encoder is wrapped to see which images it encodes. The kill -9 +
resume run through the console script is ``-m e2e``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import GOLDEN, TINY_128K
from typer.testing import CliRunner

import phi3embed
from phi3embed import Phi3VisionEmbedder
from phi3embed.cli.app import app
from phi3embed.core.batching import HostResult
from phi3embed.core.safetensors_io import read_metadata as read_safetensors_metadata
from phi3embed.inputs.listing import Source, expand_inputs
from phi3embed.jobs.core import EngineInfo, JobSummary, Result, run_job
from phi3embed.jobs.dedup import Duplicate, Duplicates, Held
from phi3embed.jobs.local import LocalEngine
from phi3embed.jobs.prepare import Preparer
from phi3embed.outputs.combine import check_outputs, write_combined
from phi3embed.outputs.manifest import MANIFEST, iter_manifest, latest_records
from phi3embed.outputs.packs import PACK_FORMAT
from phi3embed.outputs.records import OutputSettings, Record
from phi3embed.outputs.store import OutputStore

IMAGES = GOLDEN / "images"
A, C = "photo_1000x750.jpg", "tiny_7x9.png"
#: name -> golden image it copies; sorted: a.jpg precedes its copies, c.png precedes d.png
SET = {"a.jpg": A, "b.jpg": A, "c.png": C, "d.png": C, "z.jpg": A}
FIRSTS = {"b.jpg": "a.jpg", "d.png": "c.png", "z.jpg": "a.jpg"}


@pytest.fixture(scope="module")
def embedder() -> Iterator[Phi3VisionEmbedder]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Phi3VisionEmbedder.from_pretrained(GOLDEN / "checkpoints" / TINY_128K, num_crops=4, batch_size=3)
    torch.set_num_threads(threads)


@pytest.fixture
def encoded(embedder: Phi3VisionEmbedder, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names the encoder is given, in order (the embedder's stream, wrapped)."""
    seen: list[str] = []
    stream = embedder.embed_stream

    def counting(items: Any, **kw: Any) -> Any:
        def noted() -> Iterator[Any]:
            for key, item in items:
                seen.append(key[0].name)
                yield key, item

        return stream(noted(), **kw)

    monkeypatch.setattr(embedder, "embed_stream", counting)
    return seen


def make_set(folder: Path, names: dict[str, str] = SET) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, original in names.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(IMAGES / original, folder / name)
    return folder


def store_for(out: Path, e: Phi3VisionEmbedder, fmt: Any = "npy", **kw: Any) -> OutputStore:
    pack = 300_000 if fmt == "pack" else None  # one real-size image per pack
    s = OutputSettings(
        model=TINY_128K, fingerprint=e.fingerprint, num_crops=e.num_crops, dtype=e.dtype, compute_dtype=e.dtype,
        format=fmt, pack_bytes=pack,
    )  # fmt: skip
    return OutputStore(out, s, **kw)


def encode(
    e: Phi3VisionEmbedder, imgs: Path, out: Path, *, fmt: Any = "npy", file_threads: int = 4, **kw: Any
) -> tuple[JobSummary, dict[str, Record]]:
    """One job on the local engine (inline reading); the latest record per name after it."""
    with store_for(out, e, fmt, overwrite=kw.pop("overwrite", False)) as store:
        summary = run_job(expand_inputs([str(imgs)]), store, LocalEngine(e, workers=0), file_threads=file_threads, **kw)
    return summary, latest_records(out)


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return {record.name: tensor for record, tensor in phi3embed.read(out)}


@pytest.mark.parametrize(("fmt", "file_threads"), [("npy", 4), ("safetensors", 1)])
def test_duplicates_are_encoded_once_and_get_their_own_record_and_linked_file(
    embedder: Phi3VisionEmbedder, encoded: list[str], tmp_path: Path, fmt: str, file_threads: int
) -> None:
    imgs, out = make_set(tmp_path / "imgs"), tmp_path / "out"
    summary, records = encode(embedder, imgs, out, fmt=fmt, file_threads=file_threads)
    assert encoded == ["a.jpg", "c.png"]
    assert (summary.ok, summary.failed, summary.reused_in_job, summary.reused_earlier) == (5, 0, 3, 0)
    assert {n: r.duplicate_of for n, r in records.items() if r.duplicate_of} == FIRSTS
    lines = [r.name for r in iter_manifest(out / MANIFEST)]
    assert lines == sorted(SET)  # input order, copies included
    for copy, first in FIRSTS.items():
        c, f = records[copy], records[first]
        assert c.ok and c.output == f"{copy}.{fmt}" and c.sha256 == f.sha256 and c.source.endswith(copy)
        assert (c.shape, c.num_tokens, c.image_sizes) == (f.shape, f.num_tokens, f.image_sizes)
        assert os.stat(out / c.output).st_ino == os.stat(out / str(f.output)).st_ino  # a hard link
    read = tensors(out)
    opened = phi3embed.open(out)
    assert sorted(read) == sorted(opened) == sorted(SET)
    for copy, first in FIRSTS.items():
        assert torch.equal(read[copy], read[first]) and torch.equal(opened[copy], read[first])


def test_no_dedup_encodes_everything_and_gives_the_same_bytes(
    embedder: Phi3VisionEmbedder, encoded: list[str], tmp_path: Path
) -> None:
    imgs = make_set(tmp_path / "imgs")
    summary, records = encode(embedder, imgs, tmp_path / "plain", dedup=False)
    assert encoded == sorted(SET) and summary.reused_in_job == summary.reused_earlier == 0
    assert not any(r.duplicate_of for r in records.values())
    encoded.clear()
    encode(embedder, imgs, tmp_path / "dedup")
    assert encoded == ["a.jpg", "c.png"]
    for name in SET:
        plain, dedup = tmp_path / "plain" / f"{name}.npy", tmp_path / "dedup" / f"{name}.npy"
        assert plain.read_bytes() == dedup.read_bytes()
        assert os.stat(plain).st_nlink == 1


def test_packs_point_at_the_first_pack_file_and_key(
    embedder: Phi3VisionEmbedder, encoded: list[str], tmp_path: Path
) -> None:
    imgs, out = make_set(tmp_path / "imgs"), tmp_path / "out"
    summary, records = encode(embedder, imgs, out, fmt="pack")
    assert encoded == ["a.jpg", "c.png"] and summary.reused_in_job == 3
    for copy, first in FIRSTS.items():
        assert (records[copy].output, records[copy].key) == (records[first].output, first)
        assert records[copy].duplicate_of == first
    packs = sorted(p.name for p in out.glob("emb-*.safetensors"))
    assert packs == ["emb-00000.safetensors", "emb-00001.safetensors"]  # no bytes for copies
    in_meta = {}
    for pack in packs:
        meta = read_safetensors_metadata(out / pack)
        assert meta["format"] == PACK_FORMAT
        for data in json.loads(meta["records"]):  # the pack's own records, for recovery after a kill
            in_meta[data["name"]] = data
    assert sorted(in_meta) == sorted(SET)
    assert all(in_meta[c]["duplicate_of"] == f and in_meta[c]["key"] == f for c, f in FIRSTS.items())
    read, opened = tensors(out), phi3embed.open(out)
    for copy, first in FIRSTS.items():
        assert torch.equal(read[copy], read[first]) and torch.equal(opened[copy], read[first])


def test_a_later_run_reuses_outputs_with_the_same_bytes(
    embedder: Phi3VisionEmbedder, encoded: list[str], tmp_path: Path
) -> None:
    imgs, out = make_set(tmp_path / "imgs", {"a.jpg": A, "c.png": C}), tmp_path / "out"
    encode(embedder, imgs, out)
    make_set(imgs, {"new/n.jpg": A, "m.png": C})
    encoded.clear()
    summary, records = encode(embedder, imgs, out)
    assert encoded == [] and (summary.skipped, summary.reused_in_job, summary.reused_earlier) == (2, 0, 2)
    assert records["new/n.jpg"].duplicate_of == "a.jpg" and records["m.png"].duplicate_of == "c.png"
    assert os.stat(out / "new/n.jpg.npy").st_ino == os.stat(out / "a.jpg.npy").st_ino
    assert torch.equal(tensors(out)["new/n.jpg"], tensors(out)["a.jpg"])
    # a rerun: the copies are done like any image; --overwrite encodes again (once per distinct image)
    summary, _ = encode(embedder, imgs, out)
    assert summary.skipped == 4 and encoded == []
    summary, records = encode(embedder, imgs, out, overwrite=True)
    assert encoded == ["a.jpg", "c.png"] and (summary.reused_in_job, summary.reused_earlier) == (2, 0)
    assert records["new/n.jpg"].duplicate_of == "a.jpg"


def test_a_first_that_fails_leaves_an_error_on_its_duplicates_and_a_rerun_mends_both(
    embedder: Phi3VisionEmbedder, encoded: list[str], tmp_path: Path
) -> None:
    imgs, out = make_set(tmp_path / "imgs", {"x/a.jpg": A, "y.jpg": A}), tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("a file where the first's folder goes")
    summary, records = encode(embedder, imgs, out)
    assert encoded == ["x/a.jpg"] and summary.failed == 2 and summary.reused_in_job == 0
    assert "x exists and is not a folder" in str(records["x/a.jpg"].error)
    assert records["y.jpg"].status == "error" and "same bytes as x/a.jpg, which failed" in str(records["y.jpg"].error)
    (out / "x").unlink()
    encoded.clear()
    summary, records = encode(embedder, imgs, out)
    assert encoded == ["x/a.jpg"] and summary.failed == 0 and records["y.jpg"].duplicate_of == "x/a.jpg"


def test_a_refused_link_falls_back_to_a_copy(
    embedder: Phi3VisionEmbedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: Any, dst: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    imgs, out = make_set(tmp_path / "imgs", {"a.jpg": A, "b.jpg": A}), tmp_path / "out"
    _, records = encode(embedder, imgs, out)
    assert records["b.jpg"].duplicate_of == "a.jpg"
    assert (out / "b.jpg.npy").read_bytes() == (out / "a.jpg.npy").read_bytes()
    assert os.stat(out / "b.jpg.npy").st_ino != os.stat(out / "a.jpg.npy").st_ino


def test_combine_accepts_duplicates(embedder: Phi3VisionEmbedder, tmp_path: Path) -> None:
    imgs = make_set(tmp_path / "imgs")
    encode(embedder, imgs, tmp_path / "out")
    report = check_outputs([tmp_path / "out"], expand_inputs([str(imgs)]))
    assert report.complete and sorted(report.ok) == sorted(SET)
    write_combined(report, tmp_path / "all" / MANIFEST)
    combined = latest_records(tmp_path / "all")
    assert {n: r.duplicate_of for n, r in combined.items() if r.duplicate_of} == FIRSTS
    read = tensors(tmp_path / "all")
    assert torch.equal(read["z.jpg"], read["a.jpg"])


class EncodesEverything:
    """An engine that hashes and encodes in one step (as Ray's actors do): it cannot skip copies."""

    def __init__(self, e: Phi3VisionEmbedder) -> None:
        self.e = e
        self.info = EngineInfo(e.fingerprint, e.num_crops, e.dtype, e.dtype, "cpu", 3, 0)
        self.todo: list[Source] = []

    def open(self, todo: Any, summary: JobSummary) -> None:
        self.todo = list(todo)

    def results(self, early: Any) -> Iterator[Result]:
        prepare = Preparer(self.e.preprocess_config)
        for source in self.todo:
            p = prepare(source)
            assert p.item is not None
            yield Result(source, p.facts, embeddings=HostResult(self.e.embed([p.item])[0]))

    def failure(self, exc: Exception) -> None:
        return None

    def close(self) -> None:
        pass


def test_an_engine_that_encodes_duplicates_still_shares_the_first_output(
    embedder: Phi3VisionEmbedder, tmp_path: Path
) -> None:
    imgs, out = make_set(tmp_path / "imgs"), tmp_path / "out"
    with store_for(out, embedder) as store:
        summary = run_job(expand_inputs([str(imgs)]), store, EncodesEverything(embedder))
    records = latest_records(out)
    assert summary.reused_in_job == 3 and {n: r.duplicate_of for n, r in records.items() if r.duplicate_of} == FIRSTS
    assert os.stat(out / "z.jpg.npy").st_ino == os.stat(out / "a.jpg.npy").st_ino


def test_duplicates_decides_in_input_order_and_held_keeps_it(tmp_path: Path, embedder: Phi3VisionEmbedder) -> None:
    with store_for(tmp_path / "out", embedder) as store:
        duplicates = Duplicates(store.index, [])
        assert duplicates.find("a", "00" * 32) is None and duplicates.find("a", "00" * 32) is None
        assert duplicates.find("b", "00" * 32) == Duplicate("a", earlier=False)
        assert duplicates.find("c", None) is None and duplicates.find("d", "11" * 32) is None
    held: Held[str] = Held()
    held.fed()  # image 1 to the encoder
    held.hold("copy after 1")
    held.fed()
    held.hold("copy after 2")
    assert list(held.release()) == ["copy after 1"]
    assert list(held.release()) == ["copy after 2"]
    held.hold("last")
    assert list(held.release(end=True)) == ["last"]


def test_the_command_reports_reuse_prints_duplicate_of_and_no_dedup_turns_it_off(tmp_path: Path) -> None:
    imgs = make_set(tmp_path / "imgs", {"a.jpg": C, "b.jpg": C})
    model = ["--model", str(GOLDEN / "checkpoints" / TINY_128K), "--num-crops", "4", "--jsonl"]
    env = {"PHI3EMBED_MODEL": None, "HF_HUB_OFFLINE": "1"}
    r = CliRunner().invoke(app, ["encode", str(imgs), "-o", str(tmp_path / "d"), *model], env=env)
    assert r.exit_code == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["duplicate_of"] for line in lines] == [None, "a.jpg"]
    summary = " ".join(r.stderr.split())  # the table wraps long rows
    assert "reused 1 output of identical images (1 in this job, 0 from earlier runs), not encoded" in summary
    r = CliRunner().invoke(app, ["encode", str(imgs), "-o", str(tmp_path / "n"), *model, "--no-dedup"], env=env)
    assert r.exit_code == 0 and [json.loads(line)["duplicate_of"] for line in r.stdout.splitlines()] == [None, None]
    assert "reused" not in r.stderr


# --------------------------------------------------------------------------- kill -9 and resume (e2e)

_SCRIPT = Path(sys.executable).with_name("phi3embed")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "phi3embed"]
ENV = {**{k: v for k, v in os.environ.items() if k != "PHI3EMBED_MODEL"}, "OMP_NUM_THREADS": "1"}


def cli_encode(imgs: Path, out: Path, *, kill_after_ok: int | None = None) -> int:
    args = [*CLI, "encode", str(imgs), "-o", str(out), "--model", str(GOLDEN / "checkpoints" / TINY_128K)]
    proc = subprocess.Popen([*args, "--num-crops", "4", "-q"], env=ENV)
    if kill_after_ok is not None:

        def watch() -> None:
            while proc.poll() is None:
                try:
                    if (out / MANIFEST).read_text().count('"status": "ok"') >= kill_after_ok:
                        proc.send_signal(signal.SIGKILL)
                        return
                except FileNotFoundError:
                    pass
                time.sleep(0.01)

        threading.Thread(target=watch, daemon=True).start()
    return proc.wait(timeout=300)


@pytest.mark.e2e  # three console-script runs (~10 s each)
def test_kill_then_resume_gives_the_outputs_of_an_uninterrupted_run(tmp_path: Path) -> None:
    names = {f"{i:02d}.{'jpg' if i % 3 else 'png'}": (A if i % 3 else C) for i in range(12)}
    names.update({"03.png": "portrait_600x1400.png", "07.jpg": "panorama_4000x120.png"})
    imgs = make_set(tmp_path / "imgs", names)
    assert cli_encode(imgs, tmp_path / "whole") == 0
    rc = cli_encode(imgs, tmp_path / "killed", kill_after_ok=2)
    assert rc in (-signal.SIGKILL, 0)
    assert cli_encode(imgs, tmp_path / "killed") == 0
    whole, killed = latest_records(tmp_path / "whole"), latest_records(tmp_path / "killed")
    assert sorted(whole) == sorted(killed) == sorted(names)
    assert {n: r.duplicate_of for n, r in whole.items()} == {n: r.duplicate_of for n, r in killed.items()}
    assert sum(1 for r in whole.values() if r.duplicate_of) == len(names) - 4
    for name in names:
        assert (tmp_path / "whole" / f"{name}.npy").read_bytes() == (tmp_path / "killed" / f"{name}.npy").read_bytes()
    assert not list((tmp_path / "killed").glob(".phi3embed-tmp/*/*"))
