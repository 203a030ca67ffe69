"""The outputs of a job's ``--shard`` parts, taken together: is the job complete, and one manifest for all of it.

A job split with ``--shard I/N`` (a slurm array, one process per GPU) leaves its results in one output
directory per part, or in one shared directory (each part appends its own records). :func:`check_outputs`
reads every manifest, takes each image's latest record per directory and its best across directories
(an ``ok`` record whose output is whole wins over failures: :class:`phi3embed.outputs.resume.OutputCheck`), and
compares that with the full input list: every listed image must be ``ok``, made with the same settings as the
others. Completeness is judged over the images listed now: records of images that are no longer inputs (a
failed file removed, then the job rerun) are reported as ``stale``, not as failures. :func:`write_combined`
writes the chosen records as one manifest whose ``output`` paths are relative to its own folder, so
``phi3embed.read`` reads the whole job through it.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import os
import posixpath
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from phi3embed.errors import Phi3EmbedError
from phi3embed.inputs.listing import Source
from phi3embed.outputs.manifest import MANIFEST, encode_lines
from phi3embed.outputs.manifest_index import ManifestIndex
from phi3embed.outputs.names import exact_bytes, from_bytes
from phi3embed.outputs.records import Record, Signature
from phi3embed.outputs.resume import OutputCheck


@dataclass
class Found:
    """The record chosen for one image and the directory it came from."""

    record: Record
    root: Path
    output_ok: bool  # an ok record whose output file exists


class Chosen(Mapping[str, Found]):
    """Name -> the record chosen for it, names sorted by their bytes: each choice is kept as (directory, row of
    that directory's :class:`ManifestIndex`), about a dozen bytes per image; its :class:`Found` (and record) is
    read back from the manifest when asked."""

    def __init__(self, roots: Sequence[Path], indexes: Sequence[ManifestIndex]) -> None:
        self.roots, self.indexes = roots, indexes
        self.dirs = array("h")
        self.rows = array("q")
        self.output_ok = array("b")

    def add(self, d: int, row: int, output_ok: bool) -> None:
        self.dirs.append(d)
        self.rows.append(row)
        self.output_ok.append(output_ok)

    def __len__(self) -> int:
        return len(self.rows)

    def key_at(self, i: int) -> bytes:
        return self.indexes[self.dirs[i]].names[self.rows[i]]

    def name_at(self, i: int) -> str:
        return self.indexes[self.dirs[i]].name_at(self.rows[i])

    def found_at(self, i: int) -> Found:
        d = self.dirs[i]
        return Found(self.indexes[d].record_at(self.rows[i]), self.roots[d], bool(self.output_ok[i]))

    def position(self, name: str) -> int | None:
        key = exact_bytes(name)
        i = bisect.bisect_left(range(len(self)), key, key=self.key_at)
        return i if i < len(self) and self.key_at(i) == key else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.position(name) is not None

    def __getitem__(self, name: str) -> Found:
        i = self.position(name)
        if i is None:
            raise KeyError(name)
        return self.found_at(i)

    def __iter__(self) -> Iterator[str]:
        return (self.name_at(i) for i in range(len(self)))


@dataclass
class CombineReport:
    dirs: list[Path]
    listed: int | None  # images in the full input list (None when no input list was given)
    chosen: Chosen  # name -> best record across dirs
    missing: list[str] = field(default_factory=list)  # listed, never attempted in any dir
    failed: list[str] = field(default_factory=list)  # latest attempts all errors
    lost: list[str] = field(default_factory=list)  # ok record, but the output is gone or not whole
    stale: list[str] = field(default_factory=list)  # recorded, but no longer among the inputs (a note)
    unreadable: int = 0  # manifest lines that cannot be read (not JSON records), skipped
    signatures: dict[Signature, int] = field(default_factory=dict)  # settings of ok records -> count
    ok_count: int = 0

    @property
    def ok(self) -> list[str]:
        chosen = self.chosen
        return [chosen.name_at(i) for i in range(len(chosen)) if chosen.output_ok[i]]

    @property
    def mixed_settings(self) -> bool:
        return len(self.signatures) > 1

    @property
    def complete(self) -> bool:
        return not (self.missing or self.failed or self.lost or self.mixed_settings)


def check_outputs(dirs: Sequence[str | os.PathLike[str]], sources: Sequence[Source] | None = None) -> CombineReport:
    """Check that the outputs in ``dirs`` cover ``sources`` (the full, unsharded input list); without
    ``sources``, every recorded image is judged. One pass over the directories' manifest columns in name order
    (:mod:`phi3embed.outputs.manifest_index`; their index files are written where they were missing or stale): a
    record is read from its manifest only where the columns cannot judge it or two directories hold the name."""
    roots = [Path(d) for d in dirs]
    for root in roots:
        if not (root / MANIFEST).is_file():
            raise Phi3EmbedError("no manifest.jsonl here: not a phi3embed output directory", path=root)
    indexes = [ManifestIndex.load(root / MANIFEST, save=True) for root in roots]
    chosen = Chosen(roots, indexes)
    report = CombineReport(dirs=roots, listed=None if sources is None else len(sources), chosen=chosen)
    report.unreadable = sum(ix.unreadable for ix in indexes)
    listed = None if sources is None else {s.name for s in sources}
    checks = [OutputCheck(root) for root in roots]
    stale: list[str] = []
    entries = heapq.merge(*(_rows(ix, d) for d, ix in enumerate(indexes)))
    for key, group in itertools.groupby(entries, key=lambda e: e[0]):
        name = from_bytes(bytes(key))
        if listed is not None and name not in listed:
            stale.append(name)
            continue
        candidates = [(d, r) for _, d, r in group]
        judged = [(d, r, _output_ok(indexes[d], checks[d], r)) for d, r in candidates]
        d, r, output_ok = judged[0]
        if len(judged) > 1:
            best = Found(indexes[d].record_at(r), roots[d], output_ok)
            for d2, r2, ok2 in judged[1:]:
                found = Found(indexes[d2].record_at(r2), roots[d2], ok2)
                if _better(found, best):
                    best, d, r, output_ok = found, d2, r2, ok2
        chosen.add(d, r, output_ok)
        ix = indexes[d]
        if output_ok:
            sig = ix.cols["sig"][r]
            signature = ix.signatures[sig] if sig >= 0 else ix.record_at(r).signature()
            report.signatures[signature] = report.signatures.get(signature, 0) + 1
            report.ok_count += 1
        elif ix.cols["status"][r]:
            report.lost.append(name)
        else:
            report.failed.append(name)
    report.stale = sorted(set(stale))
    if sources is not None:
        report.missing = sorted(s.name for s in sources if s.name not in chosen)
    return report


def _rows(index: ManifestIndex, d: int) -> Iterator[tuple[bytes, int, int]]:
    """``(name bytes, d, row)`` of every row of ``index``, in name order."""
    names = index.names
    for row in range(len(names)):
        yield names[row], d, row


def _output_ok(index: ManifestIndex, check: OutputCheck, row: int) -> bool:
    """Row ``row`` is an ok record whose output is whole (from the columns where they can tell)."""
    cols = index.cols
    if not cols["status"][row]:
        return False
    if cols["fast"][row]:
        return check.has_size(index.output_at(row), int(cols["output_size"][row]))
    return check.whole(index.record_at(row))


def _better(a: Found, b: Found) -> bool:
    """``a`` is a better record of the image than ``b``: a usable output first, then the newer attempt."""
    if a.output_ok != b.output_ok:
        return a.output_ok
    return (a.record.time or "") > (b.record.time or "")


def write_combined(report: CombineReport, path: str | os.PathLike[str]) -> int:
    """Write the chosen record of every image (names sorted) to ``path``, outputs relative to its folder, and
    its index file beside it.

    Refuses to replace the manifest of one of the checked directories. Written to a temporary file and
    renamed into place; records are read one at a time (a job's vector rows, when it has them, are gathered
    first). Returns the number of records written.
    """
    target = Path(path)
    real = os.path.realpath(target)
    for root in report.dirs:
        if real == os.path.realpath(root / MANIFEST):
            raise Phi3EmbedError(f"is the manifest of {root}; write the combined one elsewhere", path=target)
    folder = target.parent
    chosen = report.chosen

    bases = {root: Path(os.path.relpath(root, folder)).as_posix() for root in chosen.roots}

    def relative(found: Found) -> Record:  # outputs are relative, without "..": joining the parts is enough
        record = found.record
        if record.output:
            record = replace(record, output=posixpath.normpath(posixpath.join(bases[found.root], record.output)))
        return record

    def records() -> Iterator[Record]:
        for i in range(len(chosen)):
            yield relative(chosen.found_at(i))

    folder.mkdir(parents=True, exist_ok=True)
    stream: Iterable[Record] = records()
    if any(ix.vectors for ix in chosen.indexes):  # encode --vectors: rows beside it
        from phi3embed.outputs.vectors import combine_vectors

        found = [chosen.found_at(i) for i in range(len(chosen))]
        stream = combine_vectors([(relative(f), f.root) for f in found], folder)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    written = 0
    try:
        with open(tmp, "wb") as fh:
            batch: list[Record] = []
            for record in stream:
                batch.append(record)
                if len(batch) >= 4096:
                    fh.write(encode_lines(batch))
                    written += len(batch)
                    batch = []
            fh.write(encode_lines(batch))
            written += len(batch)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise Phi3EmbedError(f"cannot write the combined manifest: {exc.strerror or exc}", path=target) from None
    ManifestIndex.load(target, save=True)  # its index file, for phi3embed.open
    return written
