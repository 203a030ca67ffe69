"""The local engine through the job core, in-process: ordering, bad inputs, worker crashes, interruption,
out of memory."""

from __future__ import annotations

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

import numpy as np
import pytest
import torch
from badfiles import EXPECTED_REASONS, make_bad_files
from conftest import GOLDEN, TINY_128K, GoldenEmbeddings
from conftest import golden_embeddings as golden_embeddings_of
from filewrites import FileWriteProbe

from phi3embed import Phi3VisionEmbedder
from phi3embed.inputs.listing import Source, expand_inputs
from phi3embed.jobs.core import STOPS, JobStop, JobSummary, Reporter, run_job
from phi3embed.jobs.local import LocalEngine
from phi3embed.jobs.pool import OrderedPool
from phi3embed.jobs.prepare import Preparer
from phi3embed.outputs.manifest import iter_manifest
from phi3embed.outputs.publish import TMP_DIR, OutputError
from phi3embed.outputs.records import ImageFacts, OutputSettings, Record, error_record, new_record
from phi3embed.outputs.store import OutputStore

GOOD = ["photo_1000x750.jpg", "portrait_600x1400.png", "panorama_4000x120.png", "tiny_7x9.png"]


@pytest.fixture(scope="module")
def embedder(golden: Path) -> Iterator[Phi3VisionEmbedder]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core box: more threads only wait on each other
    yield Phi3VisionEmbedder.from_pretrained(golden / "checkpoints" / TINY_128K, num_crops=4, batch_size=3)
    torch.set_num_threads(threads)


def store_for(out: Path, e: Phi3VisionEmbedder, **kw: Any) -> OutputStore:
    s = OutputSettings(
        model=TINY_128K, fingerprint=e.fingerprint, num_crops=e.num_crops, dtype=e.dtype, compute_dtype=e.dtype
    )
    return OutputStore(out, s, **kw)


def run_local(
    embedder: Phi3VisionEmbedder,
    sources: list[Source],
    store: OutputStore,
    *,
    workers: int = 1,
    reporter: Reporter | None = None,
    file_threads: int = 4,
) -> JobSummary:
    """One job on the local engine, as the command runs it."""
    engine = LocalEngine(embedder, workers=workers)
    return run_job(sources, store, engine, reporter=reporter, file_threads=file_threads)


def golden_embeddings(name: str) -> GoldenEmbeddings:
    stem = name.rsplit(".", 1)[0]
    return golden_embeddings_of(f"expected/{TINY_128K}/4/{stem}.npz")


class Recorder:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.started: tuple[int, int] | None = None
        self.stopped = False

    def start(self, *, total: int, skipped: int) -> None:
        self.started = (total, skipped)

    def advance(self, record: Record) -> None:
        self.records.append(record)

    def stop(self) -> None:
        self.stopped = True


def test_good_and_bad_images_in_worker_processes(tmp_path: Path, embedder: Phi3VisionEmbedder) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in GOOD:
        shutil.copy(GOLDEN / "images" / name, imgs / name)
    make_bad_files(imgs / "bad", GOLDEN / "images" / "photo_1000x750.jpg")
    sources = expand_inputs([str(imgs)])
    rec = Recorder()
    with store_for(tmp_path / "emb", embedder) as store:
        summary = run_local(embedder, sources, store, workers=2, reporter=rec)
    assert rec.started == (len(sources), 0) and rec.stopped
    by_name = {r["name"]: r for r in rec.records}
    assert sorted(by_name) == sorted(s.name for s in sources)
    for name in GOOD:
        assert by_name[name]["status"] == "ok"
        out = np.load(tmp_path / "emb" / f"{name}.npy")
        assert golden_embeddings(name).max_abs(out) <= 1e-4
    as_root = os.geteuid() == 0  # root reads a chmod 000 file: the CLI test covers that case
    for fname, reason in EXPECTED_REASONS.items():
        record = by_name[f"bad/{fname}"]
        if fname == "unreadable.jpg" and as_root:
            continue
        assert record["status"] == "error" and reason in record["error"], record["error"]
        assert record["error"].startswith(str(imgs / "bad" / fname) + ": ")
    assert summary.ok == len(GOOD) + as_root and summary.failed == len(sources) - len(GOOD) - as_root
    ok_order = [r["name"] for r in rec.records if r["status"] == "ok"]
    assert ok_order == sorted(ok_order)  # encoded images are written in input order


def test_preparer_reports_facts(embedder: Phi3VisionEmbedder) -> None:
    path = GOLDEN / "images" / "portrait_600x1400.png"
    p = Preparer(embedder.preprocess_config)(Source("p.png", str(path), ""))
    assert p.error is None and p.item is not None
    assert (p.facts.width, p.facts.height, p.facts.crops) == (600, 1400, (2, 1))
    assert p.facts.size == path.stat().st_size and len(p.facts.sha256 or "") == 64


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_cleanly_keeping_finished_outputs(
    tmp_path: Path, embedder: Phi3VisionEmbedder, sig: signal.Signals
) -> None:
    small = ["rgb_336x336.png", "tiny_7x9.png", "gray_L_640x480.png"]
    sources = [Source(f"{i:02d}-{n}", str(GOLDEN / "images" / n), "") for i in range(2) for n in small]
    sources.sort()
    rec = Recorder()
    advance = rec.advance

    def advance_then_interrupt(record: Record) -> None:
        advance(record)
        if len(rec.records) == 2:
            os.kill(os.getpid(), sig)

    rec.advance = advance_then_interrupt  # type: ignore[method-assign]
    out = tmp_path / "emb"
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]  # Ray, if it ran, leaves its own
    with store_for(out, embedder) as store:
        summary = run_local(embedder, sources, store, workers=1, reporter=rec)
    assert summary.interrupted == sig.name
    # usually the job stops early; on a loaded host the encoder may have finished every image before the writer
    # thread sends the signal: the job then writes what has arrived and still reports the signal
    assert 2 <= summary.ok <= len(sources)
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # handlers restored
    done = [r for r in iter_manifest(out / "manifest.jsonl") if r["status"] == "ok"]
    assert len(done) == summary.ok and all((out / r["output"]).is_file() for r in done)
    assert not (out / TMP_DIR).exists()
    with store_for(out, embedder) as store:  # and the rerun picks up where it stopped
        rest = run_local(embedder, sources, store, workers=0)
    assert rest.skipped == summary.ok and rest.ok == len(sources) - summary.ok and rest.failed == 0


class _OutOfMemory:
    """Wraps the real embedder; its encoder runs out of memory on the first batch."""

    def __init__(self, inner: Phi3VisionEmbedder) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def embed_stream(self, items: Any, *, times: Any = None) -> Any:
        for _ in items:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        yield from ()


def test_out_of_memory_is_one_clear_message(tmp_path: Path, embedder: Phi3VisionEmbedder) -> None:
    sources = [Source(n, str(GOLDEN / "images" / n), "") for n in GOOD]
    with store_for(tmp_path / "emb", embedder) as store:
        summary = run_local(_OutOfMemory(embedder), sources, store, workers=0)  # type: ignore[arg-type]
    assert summary.fatal is not None and "--batch-size 3" in summary.fatal
    assert "try a smaller --batch-size (e.g. 1)" in summary.fatal and "\n" not in summary.fatal


def test_summary_counts_each_record_once_and_keeps_the_first_errors() -> None:
    """JobSummary.count is the bookkeeping the writer does per written record, whatever the engine."""
    rec = Recorder()
    summary = JobSummary(listed=4)
    s = OutputSettings(model="m", fingerprint="f", num_crops=4, dtype=torch.float32, compute_dtype=torch.float32)
    src = Source("a.png", "a.png", "")
    written = [
        new_record(s, src, ImageFacts(num_tokens=10), status="ok"),
        error_record(s, src, "a.png: first"),
        new_record(s, src, ImageFacts(), status="ok"),
        error_record(s, src, "b.png: second"),
    ]
    for record in written:
        summary.count(record, reporter=rec, keep_errors=1)
    assert (summary.ok, summary.failed, summary.tokens, summary.errors) == (2, 2, 10, ["a.png: first"])
    assert rec.records == written


def test_waited_for_adds_the_time_spent_waiting_for_each_input() -> None:
    def slow() -> Iterator[int]:
        for i in range(3):
            time.sleep(0.02)
            yield i

    summary = JobSummary()
    assert list(summary.waited_for(slow())) == [0, 1, 2]
    assert summary.wait_input_s >= 0.05


def test_summary_records_how_a_job_stopped_early() -> None:
    stops = [JobStop("SIGTERM"), KeyboardInterrupt(), OutputError("disk full", path="out")]
    assert all(isinstance(exc, STOPS) for exc in stops)
    summaries = [JobSummary() for _ in stops]
    for summary, exc in zip(summaries, stops, strict=True):
        summary.stopped(exc)
    assert [(s.interrupted, s.fatal) for s in summaries] == [
        ("SIGTERM", None),
        ("SIGINT", None),
        (None, "out: disk full"),
    ]


def test_stage_times_account_for_the_encoding_thread(tmp_path: Path, embedder: Phi3VisionEmbedder) -> None:
    """The summary says where the encoding thread spent its time: every batch counted, every stage timed."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in GOOD:
        shutil.copy(GOLDEN / "images" / name, imgs / name)
    with store_for(tmp_path / "emb", embedder) as store:
        summary = run_local(embedder, expand_inputs([str(imgs)]), store, workers=0)
    crops = sum(embedder.preprocess(GOLDEN / "images" / n).num_real_crops for n in GOOD)
    stages = summary.stages
    assert stages.batches == -(-crops // embedder.batch_size)  # full batches of 3 crops, then the rest
    assert stages.assemble_s > 0 and stages.forward_s > 0 and stages.embed_s > 0 and summary.to_host_s > 0
    timed = stages.assemble_s + stages.forward_s + stages.embed_s + summary.to_host_s
    assert timed < summary.wall_s
    assert summary.encoder_cpu_s > 0 and summary.encoder_preempted >= 0


@pytest.mark.slow  # asserts how the kernel accounts and preempts threads, not our code: out of the default run
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_thread_usage_counts_this_threads_cpu_and_the_times_it_lost_its_core() -> None:
    """The encoding thread's figures in the summary: its own CPU time only, and preemptions when another
    process wants the same core (what the kernel reports through RUSAGE_THREAD)."""
    from phi3embed.jobs.local import thread_usage

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    cpu0, _ = thread_usage()
    other = threading.Thread(target=spin, args=(0.2,))  # CPU spent by another thread is not ours
    other.start()
    other.join()
    time.sleep(0.05)
    assert thread_usage()[0] - cpu0 < 0.1

    core = min(os.sched_getaffinity(0))
    mask = os.sched_getaffinity(0)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, {core})
        os.sched_setaffinity(0, {core})  # this thread and the hog now share one core
        cpu0, switches0 = thread_usage()
        spin(0.3)
        cpu1, switches1 = thread_usage()
    finally:
        os.sched_setaffinity(0, mask)
        hog.kill()
        hog.wait()
    assert cpu1 - cpu0 >= 0.3 and switches1 - switches0 > 0


class _ThreadWatcher:
    """Wraps the real embedder; records torch's thread count while the job encodes."""

    def __init__(self, inner: Phi3VisionEmbedder) -> None:
        self.inner = inner
        self.threads: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def embed_stream(self, items: Any, *, times: Any = None) -> Any:
        for out in self.inner.embed_stream(items, times=times):
            self.threads.append(torch.get_num_threads())
            yield out


def test_encoder_threads_make_room_for_busy_workers_only_on_cuda() -> None:
    from phi3embed.jobs.local import encoder_threads

    assert encoder_threads("cuda", 16, 15, 16) == 1  # 15 decoders feeding a GPU: one thread for host copies
    assert encoder_threads("cuda", 16, 4, 16) == 12
    assert encoder_threads("cuda", 16, 40, 16) == 1
    assert encoder_threads("cuda", 8, 0, 16) == 8  # decoding inline: nothing to make room for
    assert encoder_threads("cpu", 2, 1, 2) == 2  # CPU: the encoder is the work; workers are nicer instead


def test_the_job_runs_with_the_encoder_threads_it_chose_and_gives_them_back(
    tmp_path: Path, embedder: Phi3VisionEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import phi3embed.jobs.local as jobs

    chosen: list[tuple[str, int, int, int]] = []

    def choose(device_type: str, threads: int, workers: int, cpus: int) -> int:
        chosen.append((device_type, threads, workers, cpus))
        return 1

    monkeypatch.setattr(jobs, "encoder_threads", choose)
    monkeypatch.setattr(jobs, "usable_cpus", lambda: 3)
    sources = [Source(n, str(GOLDEN / "images" / n), "") for n in GOOD[:2]]
    watcher = _ThreadWatcher(embedder)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with store_for(tmp_path / "emb", embedder) as store:
            summary = run_local(watcher, sources, store, workers=2)  # type: ignore[arg-type]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert chosen == [("cpu", 2, 2, 3)]
    assert summary.ok == 2 and watcher.threads == [1, 1]


def _niceness(_: int) -> int:
    return os.nice(0)


def test_decode_workers_run_nicer_than_the_encoder() -> None:
    from phi3embed.jobs.local import WORKER_NICENESS

    pool: OrderedPool[int, int] = OrderedPool(
        _niceness, workers=2, window=4, on_crash=lambda x: -1, niceness=WORKER_NICENESS
    )
    pool.start(range(4))
    try:
        seen = set(pool)
    finally:
        pool.close()
    assert seen == {min(19, os.nice(0) + WORKER_NICENESS)}


def test_usable_cpus_follow_the_affinity_mask_and_size_the_default_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    import phi3embed.core.config as config

    if hasattr(os, "sched_getaffinity"):
        assert config.usable_cpus() == len(os.sched_getaffinity(0))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 9})  # e.g. a SLURM job given 3 CPUs
        assert config.usable_cpus() == 3
    for cpus, cuda_workers in ((1, 1), (2, 1), (16, 15), (96, 32)):
        monkeypatch.setattr(config, "usable_cpus", lambda n=cpus: n)
        assert (config.default_workers("cpu"), config.default_workers("cuda")) == (0, cuda_workers)


def test_files_are_written_several_at_a_time_and_recorded_in_input_order(
    tmp_path: Path, embedder: Phi3VisionEmbedder
) -> None:
    """The first file is the slowest to write; the manifest still lists the encoded images in input order
    (a bad image's record can come earlier: it skips the encoder), and the files overlapped in time."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    names = ["a.jpg", "b.png", "c_bad.png", "d.png", "e.png"]
    for name, src in zip(names, [*GOOD[:2], None, *GOOD[2:4]], strict=True):
        if src is None:
            (imgs / name).write_bytes(b"not an image")
        else:
            shutil.copy(GOLDEN / "images" / src, imgs / name)
    sources = expand_inputs([str(imgs)])
    with store_for(tmp_path / "emb", embedder) as store:
        probe = FileWriteProbe(store, lambda source: time.sleep(0.6 if source.name == "a.jpg" else 0.05))
        summary = run_local(embedder, sources, store, workers=0, file_threads=4)
    records = list(iter_manifest(tmp_path / "emb" / "manifest.jsonl"))
    assert [r["name"] for r in records if r["status"] == "ok"] == ["a.jpg", "b.png", "d.png", "e.png"]
    assert sorted(r["name"] for r in records) == names
    assert summary.ok == 4 and summary.failed == 1 and probe.peak >= 2
    for name in ("a.jpg", "b.png", "d.png", "e.png"):
        assert (tmp_path / "emb" / f"{name}.npy").is_file()


def test_a_failing_file_write_ends_the_job_keeping_the_records_before_it(
    tmp_path: Path, embedder: Phi3VisionEmbedder
) -> None:
    sources = [Source(f"{i}-{n}", str(GOLDEN / "images" / n), "") for i, n in enumerate(GOOD * 2)]

    def fail_the_third(source: Source) -> None:
        if source.name.startswith("2-"):
            time.sleep(0.2)  # later files finish first; their records must still not come before this one
            raise OutputError("cannot write 2-...: No space left on device", path=tmp_path / "emb")

    with store_for(tmp_path / "emb", embedder) as store:
        FileWriteProbe(store, fail_the_third)
        summary = run_local(embedder, sources, store, workers=0, file_threads=4)
    assert summary.fatal is not None and "No space left on device" in summary.fatal
    names = [r["name"] for r in iter_manifest(tmp_path / "emb" / "manifest.jsonl")]
    assert names == [s.name for s in sources[:2]]
    assert not (tmp_path / "emb" / TMP_DIR).exists()  # every file thread was done before the store closed
