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

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from phi3embed.errors import Phi3EmbedError
from phi3embed.inputs.listing import Source
from phi3embed.outputs.manifest import MANIFEST, encode_lines, latest_records
from phi3embed.outputs.records import Record, Signature
from phi3embed.outputs.resume import OutputCheck


@dataclass
class Found:
    """The record chosen for one image and the directory it came from."""

    record: Record
    root: Path
    output_ok: bool  # an ok record whose output file exists


@dataclass
class CombineReport:
    dirs: list[Path]
    listed: int | None  # images in the full input list (None when no input list was given)
    chosen: dict[str, Found] = field(default_factory=dict)  # name -> best record across dirs
    missing: list[str] = field(default_factory=list)  # listed, never attempted in any dir
    failed: list[str] = field(default_factory=list)  # latest attempts all errors
    lost: list[str] = field(default_factory=list)  # ok record, but the output is gone or not whole
    stale: list[str] = field(default_factory=list)  # recorded, but no longer among the inputs (a note)
    unreadable: int = 0  # manifest lines that cannot be read (not JSON records), skipped
    signatures: dict[Signature, int] = field(default_factory=dict)  # settings of ok records -> count

    @property
    def ok(self) -> list[str]:
        return [name for name, f in self.chosen.items() if f.output_ok]

    @property
    def mixed_settings(self) -> bool:
        return len(self.signatures) > 1

    @property
    def complete(self) -> bool:
        return not (self.missing or self.failed or self.lost or self.mixed_settings)


def check_outputs(dirs: Sequence[str | os.PathLike[str]], sources: Sequence[Source] | None = None) -> CombineReport:
    """Check that the outputs in ``dirs`` cover ``sources`` (the full, unsharded input list); without
    ``sources``, every recorded image is judged."""
    roots = [Path(d) for d in dirs]
    report = CombineReport(dirs=roots, listed=None if sources is None else len(sources))
    listed = None if sources is None else {s.name for s in sources}
    for root in roots:
        outputs = OutputCheck(root)
        unreadable: list[int] = []
        for name, record in latest_records(root, unreadable).items():
            if listed is not None and name not in listed:
                report.stale.append(name)
                continue
            found = Found(record, root, record.ok and outputs.whole(record))
            best = report.chosen.get(name)
            if best is None or _better(found, best):
                report.chosen[name] = found
        report.unreadable += len(unreadable)
    report.stale = sorted(set(report.stale))
    for name, found in sorted(report.chosen.items()):
        if found.output_ok:
            sig = found.record.signature()
            report.signatures[sig] = report.signatures.get(sig, 0) + 1
        elif found.record.ok:
            report.lost.append(name)
        else:
            report.failed.append(name)
    if sources is not None:
        report.missing = sorted(s.name for s in sources if s.name not in report.chosen)
    return report


def _better(a: Found, b: Found) -> bool:
    """``a`` is a better record of the image than ``b``: a usable output first, then the newer attempt."""
    if a.output_ok != b.output_ok:
        return a.output_ok
    return (a.record.time or "") > (b.record.time or "")


def write_combined(report: CombineReport, path: str | os.PathLike[str]) -> int:
    """Write the chosen record of every image (names sorted) to ``path``, outputs relative to its folder.

    Refuses to replace the manifest of one of the checked directories. Written to a temporary file and
    renamed into place. Returns the number of records written.
    """
    target = Path(path)
    real = os.path.realpath(target)
    for root in report.dirs:
        if real == os.path.realpath(root / MANIFEST):
            raise Phi3EmbedError(f"is the manifest of {root}; write the combined one elsewhere", path=target)
    folder = target.parent
    records = []
    for name in sorted(report.chosen):
        found = report.chosen[name]
        record = found.record
        if record.output:
            record = replace(record, output=Path(os.path.relpath(found.root / record.output, folder)).as_posix())
        records.append(record)
    folder.mkdir(parents=True, exist_ok=True)
    if any(f.record.vectors is not None for f in report.chosen.values()):  # encode --vectors: rows beside it
        from phi3embed.outputs.vectors import combine_vectors

        roots = [report.chosen[name].root for name in sorted(report.chosen)]
        records = combine_vectors(list(zip(records, roots, strict=True)), folder)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(encode_lines(records))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise Phi3EmbedError(f"cannot write the combined manifest: {exc.strerror or exc}", path=target) from None
    return len(records)
