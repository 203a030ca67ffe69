"""What people see on stderr during ``phi3embed encode``: a progress bar, one line per failed image, a summary.

On a terminal the bar shows images done, images/s, tokens/s, failures so far, elapsed time and ETA. When
stderr is not a terminal (a batch job's log) a plain status line is printed every ``status_interval``
seconds instead. stdout is never touched here.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # importing jobs pulls in torch: not needed to print a line
    from phi3embed.core.cpu import Bf16Advice
    from phi3embed.inputs.listing import Listing
    from phi3embed.jobs.core import EngineInfo, JobSummary
    from phi3embed.outputs.records import Record


def say(console: Console, line: str, style: str | None = None) -> None:
    """One line for people, never wrapped or interpreted as markup."""
    console.print(Text(line, style=style or ""), soft_wrap=True, highlight=False)


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class _RatesColumn(ProgressColumn):
    """images/s and tokens/s averaged since the start of encoding."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        images = _rate(task.completed, elapsed)
        tokens = _rate(task.fields.get("tokens", 0), elapsed)
        return Text(f"{images:6.2f} img/s {tokens:9,.0f} tok/s", style="cyan")


class _FailedColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        failed = task.fields.get("failed", 0)
        return Text(f"{failed} failed", style="bold red" if failed else "dim")


class ProgressReporter:
    """Implements :class:`phi3embed.jobs.core.Reporter` for people. Thread-safe (``advance`` runs in the writer)."""

    def __init__(self, console: Console, *, show_progress: bool = True, status_interval: float = 30.0) -> None:
        self.console = console
        self.show_progress = show_progress
        self.status_interval = status_interval
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._task: Any = None
        self._total = 0
        self._done = self._failed = self._tokens = 0
        self._start = self._last_status = time.monotonic()

    def start(self, *, total: int, skipped: int) -> None:
        self._total = total
        self._start = self._last_status = time.monotonic()
        if self.show_progress and self.console.is_terminal and total:
            self._progress = Progress(
                TextColumn("[bold]encode"),
                BarColumn(bar_width=None),
                MofNCompleteColumn(),
                _RatesColumn(),
                _FailedColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
                refresh_per_second=4,
            )
            self._task = self._progress.add_task("encode", total=total, tokens=0, failed=0)
            self._progress.start()

    def advance(self, record: Record) -> None:
        with self._lock:
            self._done += 1
            if record.ok:
                self._tokens += record.num_tokens or 0
            else:
                self._failed += 1
                say(self.console, f"error: {record.error}", "red")
            if self._progress is not None:
                self._progress.update(self._task, advance=1, tokens=self._tokens, failed=self._failed)
            elif self.show_progress and time.monotonic() - self._last_status >= self.status_interval:
                self._last_status = time.monotonic()
                say(self.console, self.status_line())

    def status_line(self) -> str:
        elapsed = time.monotonic() - self._start
        images = _rate(self._done, elapsed)
        eta = _duration((self._total - self._done) / images) if images else "?"
        return (
            f"encode: {self._done}/{self._total} images, {images:.2f} img/s, "
            f"{_rate(self._tokens, elapsed):,.0f} tok/s, {self._failed} failed, "
            f"elapsed {_duration(elapsed)}, ETA {eta}"
        )

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@dataclass(frozen=True)
class RunInfo:
    """The facts of a run the summary shows besides the counts."""

    out_dir: str
    output: str  # e.g. "npy float32" or "safetensors packs of up to 1,000,000,000 bytes, bfloat16"
    model: str
    engine: EngineInfo  # its workers: decode workers (local engine) or actors (Ray)
    exit_code: int
    special: int = 0  # special files (pipes, sockets, devices) the listing skipped
    notes: tuple[str, ...] = ()  # what else was skipped or renamed (listing_notes, manifest_note): one row each
    dtype_note: str | None = None  # what --dtype bfloat16 would give on this CPU (cpu_note), after the setup


def _s(count: int) -> str:
    return "s" if count != 1 else ""


def skipped_special(count: int) -> str:
    """The words for ``count`` special files skipped while listing folders and globs (encode and plan)."""
    return f"skipped {count} special file{_s(count)} (not regular files)"


def _shown(path: str) -> str:
    """An absolute path as people typed it: relative to the current directory when inside it."""
    return os.path.relpath(path) if path.startswith(os.getcwd() + os.sep) else path


def listing_notes(listing: Listing) -> list[str]:
    """One line per kind of thing the listing left out or renamed (special files aside: see
    :func:`skipped_special`), with its count and what to do about it; the same lines in encode and plan."""
    notes = []
    if listing.archive_paths:
        n = len(listing.archive_paths)
        first = min(listing.archive_paths)
        shown = _shown(first)
        pattern = os.path.join(os.path.dirname(shown), "**", "*" + os.path.splitext(first)[1])
        notes.append(
            f"skipped {n} archive{_s(n)} inside folder INPUTs ({shown}{', ...' if n > 1 else ''}): folders never "
            f"open tar or parquet files; to encode their images name them as INPUT, e.g. '{pattern}'"
        )
    if listing.looping_links:
        n = len(listing.looping_links)
        notes.append(
            f"skipped {n} looping symbolic link{_s(n)} ({_shown(min(listing.looping_links))}{', ...' if n > 1 else ''})"
        )
    if listing.repeated:
        n = len(listing.repeated)
        notes.append(
            f"{n} image{_s(n)} inside archives repeat{'s' if n == 1 else ''} the name of an earlier image of the "
            f"archive: kept under <name>#2, #3... (e.g. {listing.repeated[0]})"
        )
    return notes


def cpu_note(advice: Bf16Advice, measure_hint: str = "") -> str:
    """The note on ``--dtype bfloat16`` (plan and encode): the CPU's bf16 matrix units, then the advice."""
    units = advice.units
    has = f"has bf16 matrix units ({units.label})" if units.any else "has no bf16 matrix units"
    return f"this CPU {has}: {advice.line(measure_hint=measure_hint)}"


def manifest_note(count: int, path: str) -> str:
    """The words for ``count`` lines of a manifest that cannot be read (not JSON records): skipped."""
    return f"skipped {count} line{_s(count)} of {path} that cannot be read (not JSON records)"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def reused_line(summary: JobSummary) -> str:
    """What deduplication saved: images identical to another that share its output instead of being encoded."""
    n = summary.reused_in_job + summary.reused_earlier
    return (
        f"{n} output{'s' if n != 1 else ''} of identical images ({summary.reused_in_job} in this job, "
        f"{summary.reused_earlier} from earlier runs), not encoded"
    )


def render_summary(console: Console, summary: JobSummary, info: RunInfo, *, bytes_written: int, files: int) -> None:
    """The one-screen summary at the end of a run."""
    if summary.interrupted:
        state = Text(f"stopped by {summary.interrupted}", style="bold yellow")
    elif summary.fatal:
        state = Text("stopped by an error", style="bold red")
    elif summary.failed:
        state = Text("finished with failures", style="bold yellow")
    else:
        state = Text("finished", style="bold green")
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    wall = summary.wall_s
    table.add_row("phi3embed encode", Text.assemble(state, f" in {wall:.1f} s"))
    not_done = summary.todo - summary.ok - summary.failed
    table.add_row(
        "images",
        f"{summary.listed} listed, {summary.skipped} already done, {summary.ok} written, "
        f"{summary.failed} failed"
        + (f", {not_done} not reached" if not_done else "")
        + (f"; {skipped_special(info.special)}" if info.special else ""),
    )
    for note in info.notes:
        table.add_row("note", note)
    if summary.reused_in_job or summary.reused_earlier:
        table.add_row("reused", reused_line(summary))
    table.add_row(
        "speed",
        f"{_rate(summary.ok + summary.failed, wall):.2f} images/s, {summary.tokens:,} tokens "
        f"({_rate(summary.tokens, wall):,.0f} tokens/s)",
    )
    table.add_row("output", f"{info.out_dir} ({info.output}; {files} files, {_bytes(bytes_written)}), manifest.jsonl")
    engine = info.engine
    table.add_row("model", f"{info.model} (vision weights {engine.fingerprint[:12]})")
    compute = str(engine.compute_dtype).removeprefix("torch.")
    table.add_row(
        "setup",
        f"{engine.device} {compute}, num_crops {engine.num_crops}, batch {engine.batch_size} crops, "
        f"{engine.workers} worker{'s' if engine.workers != 1 else ''}",
    )
    if engine.compile_note:
        table.add_row("compile", engine.compile_note)
    if info.dtype_note:
        table.add_row("note", info.dtype_note)
    table.add_row(
        "time",
        f"preprocess {summary.preprocess_s:.1f} s CPU (all workers), encoder waited for input "
        f"{summary.wait_input_s:.1f} s and for the writer {summary.wait_writer_s:.1f} s, "
        f"writing {summary.write_s:.1f} s"
        + (f", {summary.worker_restarts} worker restarts" if summary.worker_restarts else ""),
    )
    stages = summary.stages
    if stages.batches:  # the local engine's fast path (Ray actors time nothing here)
        table.add_row(
            "encoder",
            f"{stages.batches} batches: assembling {stages.assemble_s:.1f} s, encoder {stages.forward_s:.1f} s, "
            f"HD transform + projection {stages.embed_s:.1f} s, to host {summary.to_host_s:.1f} s; "
            f"{summary.encoder_cpu_s:.1f} s CPU, preempted {summary.encoder_preempted:,} times",
        )
    if summary.errors:
        shown = "\n".join(summary.errors)
        more = summary.failed - len(summary.errors)
        if more > 0:
            shown += f"\n... and {more} more: jq 'select(.status == \"error\")' {info.out_dir}/manifest.jsonl"
        table.add_row("failed", Text(shown, style="red"))
    if summary.fatal:
        table.add_row("error", Text(summary.fatal, style="bold red"))
    if summary.interrupted or summary.fatal or not_done:
        table.add_row("resume", "run the same command again: finished images are skipped")
    table.add_row("exit code", str(info.exit_code))
    console.print(table, highlight=False)
