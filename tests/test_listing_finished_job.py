"""A rerun that skips finished archives without listing them reads as one that listed them and found every
image done: the same listed, skipped and todo counts (run_job's ``already_done``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from archivefiles import SQUARE, TINY, make_tar
from conftest import TINY_128K

from phi3embed import Phi3VisionEmbedder
from phi3embed.inputs.listing import list_inputs
from phi3embed.jobs.core import JobSummary, run_job
from phi3embed.jobs.local import LocalEngine
from phi3embed.outputs.records import OutputSettings, Record
from phi3embed.outputs.store import OutputStore


@pytest.fixture(scope="module")
def embedder(golden: Path) -> Iterator[Phi3VisionEmbedder]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Phi3VisionEmbedder.from_pretrained(golden / "checkpoints" / TINY_128K, num_crops=4, batch_size=3)
    torch.set_num_threads(threads)


class Started:
    def __init__(self) -> None:
        self.started: tuple[int, int] | None = None

    def start(self, *, total: int, skipped: int) -> None:
        self.started = (total, skipped)

    def advance(self, record: Record) -> None:
        pass

    def stop(self) -> None:
        pass


def job(e: Phi3VisionEmbedder, tmp_path: Path, **listing_kw: object) -> tuple[JobSummary, Started]:
    settings = OutputSettings(
        model=TINY_128K, fingerprint=e.fingerprint, num_crops=e.num_crops, dtype=e.dtype, compute_dtype=e.dtype
    )
    listing = list_inputs([str(tmp_path / "*.tar"), str(tmp_path / "*.png")], **listing_kw)  # type: ignore[arg-type]
    reporter = Started()
    with OutputStore(tmp_path / "out", settings) as store:
        summary = run_job(
            listing.sources,
            store,
            LocalEngine(e, workers=0),
            reporter=reporter,
            already_done=listing.finished_images,
        )
    return summary, reporter


def test_finished_archives_count_as_listed_and_skipped(tmp_path: Path, embedder: Phi3VisionEmbedder) -> None:
    make_tar(tmp_path / "0.tar", [("a.png", TINY), ("b.png", SQUARE), ("c.txt", b"x")])
    make_tar(tmp_path / "1.tar", [("a.png", SQUARE)])
    (tmp_path / "loose.png").write_bytes(TINY)
    first, _ = job(embedder, tmp_path)
    assert (first.listed, first.skipped, first.ok, first.failed) == (4, 0, 4, 0)
    (tmp_path / "2.tar").write_bytes(b"")  # new since: one error record
    listed, listed_reporter = job(embedder, tmp_path)

    sizes = {"0.tar": 2, "1.tar": 1}
    asked: list[str] = []

    def finished(path: str, name: str, st: os.stat_result) -> int | None:
        asked.append(name)
        return sizes.get(name)

    skipped, skipped_reporter = job(embedder, tmp_path, finished_archive=finished)
    assert sorted(asked) == ["0.tar", "1.tar", "2.tar"]
    counts = [(s.listed, s.skipped, s.todo, s.ok, s.failed) for s in (listed, skipped)]
    assert counts == [(5, 4, 1, 0, 1)] * 2  # 2.tar (empty) is new: its error record; the rest was done
    assert listed_reporter.started == skipped_reporter.started == (1, 4)
