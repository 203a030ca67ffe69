"""The job core alone, with a fake engine (no model): resume, error records, order, fatal output errors,
engine failures and signals end every engine's job the same way."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from phi3embed.core.batching import HostResult
from phi3embed.inputs.listing import Source
from phi3embed.jobs.core import EngineInfo, JobSummary, Result, run_job
from phi3embed.outputs.manifest import MANIFEST, iter_manifest
from phi3embed.outputs.publish import TMP_DIR, OutputError
from phi3embed.outputs.records import ImageFacts, OutputSettings, Record
from phi3embed.outputs.store import OutputStore

INFO = EngineInfo(
    fingerprint="f" * 32,
    num_crops=4,
    compute_dtype=torch.float32,
    stored_dtype=torch.float32,
    device="cpu",
    batch_size=2,
    workers=0,
)


class FakeEngine:
    """Results made up from the source names: "bad" in a name is an error; ``raise_at`` raises while
    producing that index; ``on_result`` runs before each result is handed over."""

    def __init__(self, *, raise_at: int | None = None, exc: Exception | None = None, explain: bool = True) -> None:
        self.info = INFO
        self.raise_at, self.exc, self.explain = raise_at, exc, explain
        self.opened: list[str] = []
        self.closed = 0

    def open(self, todo: Sequence[Source], summary: JobSummary) -> None:
        self.todo = list(todo)
        self.opened = [s.name for s in todo]

    def results(self, early: Callable[[Result], None]) -> Iterator[Result]:
        for i, source in enumerate(self.todo):
            if i == self.raise_at:
                raise self.exc or RuntimeError("boom")
            facts = ImageFacts(size=os.stat(source.path).st_size, mtime_ns=os.stat(source.path).st_mtime_ns)
            if "bad" in source.name:
                yield Result(source, facts, error=f"{source.path}: not an image")
            else:
                yield Result(source, facts, embeddings=HostResult(torch.full((3, 2), float(i))))

    def failure(self, exc: Exception) -> str | None:
        return f"engine: {exc}" if self.explain else None

    def close(self) -> None:
        self.closed += 1


def sources(tmp_path: Path, names: list[str]) -> list[Source]:
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(name.encode())
    return [Source(n, str(folder / n), str(folder)) for n in names]


def store(out: Path, **kw: object) -> OutputStore:
    settings = OutputSettings(
        model="fake", fingerprint=INFO.fingerprint, num_crops=4, dtype=torch.float32, compute_dtype=torch.float32
    )
    return OutputStore(out, settings, **kw)  # type: ignore[arg-type]


class Recorder:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.calls: list[str] = []

    def start(self, *, total: int, skipped: int) -> None:
        self.calls.append(f"start {total} {skipped}")

    def advance(self, record: Record) -> None:
        self.records.append(record)

    def stop(self) -> None:
        self.calls.append("stop")


def test_results_become_records_in_order_and_a_rerun_skips_what_is_done(tmp_path: Path) -> None:
    srcs = sources(tmp_path, ["a.png", "b_bad.png", "c.png", "d.png"])
    rec, engine = Recorder(), FakeEngine()
    with store(tmp_path / "out") as st:
        summary = run_job(srcs, st, engine, reporter=rec, file_threads=3)
    assert (summary.listed, summary.skipped, summary.ok, summary.failed) == (4, 0, 3, 1)
    assert summary.errors == [f"{srcs[1].path}: not an image"] and engine.closed == 1
    names = [r.name for r in iter_manifest(tmp_path / "out" / MANIFEST)]
    assert names == ["a.png", "b_bad.png", "c.png", "d.png"] == [r.name for r in rec.records]
    assert rec.calls == ["start 4 0", "stop"]
    again = FakeEngine()
    with store(tmp_path / "out") as st:
        rerun = run_job(srcs, st, again)
    assert again.opened == ["b_bad.png"]  # only the failed image is tried again
    assert (rerun.skipped, rerun.failed) == (3, 1)


def test_an_output_failure_ends_the_job_keeping_the_records_before_it(tmp_path: Path) -> None:
    srcs = sources(tmp_path, ["a.png", "b.png", "c.png"])
    with store(tmp_path / "out") as st:
        real = st.write_file

        def write_file(source: Source, facts: ImageFacts, embeddings: torch.Tensor) -> Record:
            if source.name == "b.png":
                raise OutputError("No space left on device", path=tmp_path / "out")
            return real(source, facts, embeddings)

        st.write_file = write_file  # type: ignore[method-assign]
        summary = run_job(srcs, st, FakeEngine(), file_threads=2)
    assert summary.fatal == f"{tmp_path / 'out'}: No space left on device"
    assert [r.name for r in iter_manifest(tmp_path / "out" / MANIFEST)] == ["a.png"]
    assert not (tmp_path / "out" / TMP_DIR).exists()


def test_an_engine_failure_is_one_line_or_a_bug(tmp_path: Path) -> None:
    srcs = sources(tmp_path, ["a.png", "b.png"])
    engine = FakeEngine(raise_at=1, exc=RuntimeError("the cluster went away"))
    with store(tmp_path / "out") as st:
        summary = run_job(srcs, st, engine)
    assert summary.fatal == "engine: the cluster went away" and summary.ok == 1 and engine.closed == 1
    bug = FakeEngine(raise_at=0, exc=KeyError("x"), explain=False)
    with store(tmp_path / "out2") as st, pytest.raises(KeyError):
        run_job(srcs, st, bug)
    assert bug.closed == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_job_and_what_arrived_is_written(tmp_path: Path, sig: signal.Signals) -> None:
    srcs = sources(tmp_path, ["a.png", "b.png", "c.png", "d.png"])

    class Signalled(FakeEngine):
        def results(self, early: Callable[[Result], None]) -> Iterator[Result]:
            for i, result in enumerate(super().results(early)):
                if i == 2:
                    os.kill(os.getpid(), sig)
                yield result

    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with store(tmp_path / "out") as st:
        summary = run_job(srcs, st, Signalled())
    assert summary.interrupted == sig.name and summary.ok == 2
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
    assert [r.name for r in iter_manifest(tmp_path / "out" / MANIFEST)] == ["a.png", "b.png"]


def test_a_first_signal_while_the_job_cleans_up_is_reported_not_fatal(tmp_path: Path) -> None:
    """The engine has produced everything and the job is cleaning up (here: closing the engine) when a first
    signal comes: the job still writes every record and reports the signal; the process does not exit (only a
    second signal exits at once). Before, this exited the process (the test run with it)."""
    srcs = sources(tmp_path, ["a.png", "b.png", "c.png"])

    class SignalledAtClose(FakeEngine):
        def close(self) -> None:
            super().close()
            os.kill(os.getpid(), signal.SIGTERM)

    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with store(tmp_path / "out") as st:
        summary = run_job(srcs, st, SignalledAtClose())
    assert summary.interrupted == "SIGTERM" and summary.ok == len(srcs)
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
    assert [r.name for r in iter_manifest(tmp_path / "out" / MANIFEST)] == ["a.png", "b.png", "c.png"]


def test_packs_are_written_through_the_same_core(tmp_path: Path) -> None:
    srcs = sources(tmp_path, ["a.png", "b.png", "c.png"])
    settings = OutputSettings(
        model="fake", fingerprint=INFO.fingerprint, num_crops=4, dtype=torch.float32, compute_dtype=torch.float32,
        format="pack", pack_bytes=2 * 3 * 2 * 4,
    )  # fmt: skip
    with OutputStore(tmp_path / "out", settings) as st:
        summary = run_job(srcs, st, FakeEngine())
    assert summary.ok == 3
    outputs = [r.output for r in iter_manifest(tmp_path / "out" / MANIFEST)]
    assert outputs == ["emb-00000.safetensors", "emb-00000.safetensors", "emb-00001.safetensors"]


def test_an_early_result_is_written_before_the_engine_yields_again(tmp_path: Path) -> None:
    """The local engine learns of a decode error inside the encoder's input stream: handed over through
    ``early``, its record is written even when the job stops before the encoder returns anything."""
    srcs = sources(tmp_path, ["a-bad.png", "b.png"])

    class EarlyThenStopped(FakeEngine):
        def results(self, early: Callable[[Result], None]) -> Iterator[Result]:
            early(Result(self.todo[0], ImageFacts(), error=f"{self.todo[0].path}: not an image"))
            os.kill(os.getpid(), signal.SIGTERM)
            yield from ()

    with store(tmp_path / "out") as st:
        summary = run_job(srcs, st, EarlyThenStopped())
    assert summary.interrupted == "SIGTERM" and summary.failed == 1
    assert [(r.name, r.status) for r in iter_manifest(tmp_path / "out" / MANIFEST)] == [("a-bad.png", "error")]


def test_what_is_left_of_a_lazy_listing_is_kept_as_positions(tmp_path: Path) -> None:
    """run_job keeps the images to encode of a lazy listing as positions (8 bytes each), not Source objects;
    reading them gives the same sources, in order, as the plain list."""
    from phi3embed.inputs.listing import list_inputs
    from phi3embed.jobs.core import Picked, _not_done

    for i in range(7):
        (tmp_path / "imgs" / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / f"d{i % 2}" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(8))
    sources = list_inputs([str(tmp_path / "imgs")]).sources

    class Done:
        def is_done(self, source: Any) -> bool:
            return source.name.endswith(("1.png", "4.png"))

    todo = _not_done(sources, Done())  # type: ignore[arg-type]
    plain = [s for s in list(sources) if not Done().is_done(s)]
    assert isinstance(todo, Picked) and len(todo.positions) == len(plain) == 5
    assert list(todo) == plain and [todo[i] for i in range(len(todo))] == plain and todo[1:3] == plain[1:3]
    assert _not_done(list(sources), Done()) == plain  # type: ignore[arg-type]
