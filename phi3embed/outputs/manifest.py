"""``DIR/manifest.jsonl``: the append-only log of records, one JSON object per line.

Every batch of records is appended with ONE ``write`` call (a crash can only lose whole lines) and the file
is fsynced at intervals, always after the folders of the files renamed since the last sync
(:meth:`phi3embed.outputs.publish.Publisher.sync_folders`). A torn last line (a writer killed mid-line on a
filesystem that allows it) is skipped when reading, and the next append starts on a fresh line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from phi3embed.errors import Phi3EmbedError
from phi3embed.outputs.records import Record

MANIFEST = "manifest.jsonl"


def iter_manifest_lines(
    path: str | os.PathLike[str], unreadable: list[int] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(byte offset, JSON object)`` of every complete record line, oldest first; the rest is skipped
    (a torn last line of a killed writer, lines that are not JSON objects with a string ``name``: the offsets
    of these complete lines are appended to ``unreadable``; blank lines are not counted)."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return
    offset = 0
    with fh:
        for line in fh:
            start, offset = offset, offset + len(line)
            if not line.endswith(b"\n"):
                continue  # torn last line of a killed writer
            try:
                data = json.loads(line)
            except ValueError:
                data = None
            if isinstance(data, dict) and isinstance(data.get("name"), str):
                yield start, data
            elif unreadable is not None and line.strip():
                unreadable.append(start)


def iter_manifest(path: str | os.PathLike[str], unreadable: list[int] | None = None) -> Iterator[Record]:
    """Records of a manifest, oldest first. Lines that are not complete JSON records are skipped (and counted
    into ``unreadable``, as :func:`iter_manifest_lines` does)."""
    for _, data in iter_manifest_lines(path, unreadable):
        record = Record.from_json(data)
        if record is not None:
            yield record


def latest_records(out_dir: str | os.PathLike[str], unreadable: list[int] | None = None) -> dict[str, Record]:
    """Image name -> its latest manifest record (``ok`` or ``error``), names sorted (lines that cannot be read
    are counted into ``unreadable``)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise Phi3EmbedError("no manifest.jsonl here: not a phi3embed output directory", path=Path(out_dir))
    latest = {record.name: record for record in iter_manifest(path, unreadable)}
    return {name: latest[name] for name in sorted(latest)}


def encode_lines(records: Sequence[Record]) -> bytes:
    """Records as manifest lines (the exact bytes appended)."""
    return b"".join(json.dumps(r.to_json(), ensure_ascii=True).encode() + b"\n" for r in records)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ManifestLog:
    """The open manifest of one run: stamps ``attempt`` / ``time`` and appends.

    ``sync_first`` runs before every fsync of the manifest (the publisher's folder sync); ``attempts_before``
    says how many records a name had when the log was opened (the store's index), so that ``attempt`` counts on.
    """

    def __init__(self, root: Path, *, sync_first: Callable[[], None], fsync_interval: float = 2.0) -> None:
        self.path = root / MANIFEST
        self.sync_first = sync_first
        self.fsync_interval = fsync_interval
        self._attempts: dict[str, int] = {}  # records of each name appended by this log, and those before
        self.attempts_before: Callable[[str], int] = lambda name: 0  # records a name had when the log opened
        self._fd: int | None = None
        self._last_sync = 0.0
        self._torn = False  # the last append failed part way: the next one starts with a newline

    def forget_attempts(self) -> None:
        """The counts of this log's names are in ``attempts_before`` now (the store folded its records)."""
        self._attempts.clear()

    def open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if os.fstat(self._fd).st_size:
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":  # a torn line: start ours on a fresh one
                    os.write(self._fd, b"\n")
        self._last_sync = time.monotonic()

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def append(self, records: Sequence[Record]) -> list[Record]:
        """Stamp ``records`` and append them with one write; sync when the interval has passed.
        Returns the stamped records. OSError when the write fails."""
        assert self._fd is not None, "manifest is not open"
        stamped = []
        for record in records:
            before = self._attempts.get(record.name)
            self._attempts[record.name] = (self.attempts_before(record.name) if before is None else before) + 1
            stamped.append(record.stamped(self._attempts[record.name], _now()))
        data = encode_lines(stamped)
        if self._torn:
            data = b"\n" + data  # after a failed append: start on a fresh line
        try:
            view = memoryview(data)
            while view:  # a full disk may take part of the bytes before it refuses the rest
                view = view[os.write(self._fd, view) :]
        except OSError:
            self._torn = True
            raise
        self._torn = False
        if time.monotonic() - self._last_sync > self.fsync_interval:
            self.sync()
        return stamped

    def sync(self) -> None:
        """The renamed folders first, then the manifest: a durable record never names a lost rename."""
        assert self._fd is not None
        self.sync_first()
        os.fsync(self._fd)
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """Sync and close (closed even when the sync fails: OSError then)."""
        if self._fd is not None:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = None
