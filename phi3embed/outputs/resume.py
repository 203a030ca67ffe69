"""Which images are done: the index of every image's latest record, and the resume rule.

An image is done when its latest record is ``ok``, was made with the same model fingerprint and settings
(:meth:`phi3embed.outputs.records.OutputSettings.signature`), names an output that exists (the expected
file for per-image formats, any pack file for ``--pack``), and the source file still has the recorded
size and modification time.
"""

from __future__ import annotations

import os
from pathlib import Path

from phi3embed.inputs.listing import Source
from phi3embed.outputs.records import Record, Signature


class ResumeIndex:
    """Latest record per image name, kept current as records are appended."""

    def __init__(self, root: Path, signature: Signature, *, overwrite: bool = False) -> None:
        self.root, self.signature, self.overwrite = root, signature, overwrite
        self._latest: dict[str, Record] = {}

    def note(self, record: Record) -> None:
        self._latest[record.name] = record

    def is_done(self, source: Source, expected_output: str | None) -> bool:
        """The rule of the module docstring; ``expected_output`` None accepts any output (packs)."""
        if self.overwrite:
            return False
        seen = self._latest.get(source.name)
        if seen is None or not seen.ok or seen.signature() != self.signature or seen.output is None:
            return False
        if expected_output is not None and seen.output != expected_output:
            return False
        if not (self.root / seen.output).is_file():
            return False
        try:
            st = os.stat(source.path)
        except OSError:
            return False
        return st.st_size == seen.size and st.st_mtime_ns == seen.mtime_ns
