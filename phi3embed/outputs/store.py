"""One output directory ``DIR``, composed of its parts: publish, manifest, resume index, embedding writer.

:class:`OutputStore` is the facade the jobs use:

* :mod:`phi3embed.outputs.publish`: the temp area (also the run's lock), atomic writes, folder durability;
* :mod:`phi3embed.outputs.manifest`: ``DIR/manifest.jsonl``, the append-only log of :class:`Record`;
* :mod:`phi3embed.outputs.resume`: which images are done;
* an :class:`EmbeddingWriter`: one file per image (:mod:`phi3embed.outputs.files`) or packs
  (:mod:`phi3embed.outputs.packs`).

The store is used from one thread at a time, except :meth:`OutputStore.write_file`, which several threads
may run at once (per-image formats); its records then go to :meth:`OutputStore.commit` from one thread, in
input order (:class:`phi3embed.jobs.core.Writer` does that).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from phi3embed.inputs.listing import Source
from phi3embed.outputs.files import FileWriter
from phi3embed.outputs.manifest import ManifestLog, iter_manifest
from phi3embed.outputs.packs import PackWriter
from phi3embed.outputs.publish import OutputError, Publisher, output_failure
from phi3embed.outputs.records import ImageFacts, OutputSettings, Record, error_record
from phi3embed.outputs.resume import ResumeIndex


class EmbeddingWriter(Protocol):
    """Where one image's embeddings go: per-image files or packs."""

    #: True: :meth:`write` may run in several threads and returns records the caller commits in input
    #: order. False: the writer commits records itself (a pack's, once the pack is in place).
    concurrent: bool

    def expected_output(self, source: Source) -> str | None: ...  # for resume; None: any output

    def write(self, source: Source, facts: ImageFacts, tensor: torch.Tensor) -> Record: ...

    def write_duplicate(self, source: Source, facts: ImageFacts, first: Record) -> Record: ...

    def pending(self, name: str) -> Record | None: ...  # a record written but not yet committed (packs)

    def flush(self) -> None: ...  # publish what is still waiting (the last pack)


class OutputStore:
    """Outputs, manifest and resume for one output directory (see the module docstring)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        settings: OutputSettings,
        *,
        overwrite: bool = False,
        shard: tuple[int, int] | None = None,
        on_record: Callable[[Record], None] | None = None,
        fsync_interval: float = 2.0,
    ) -> None:
        self.root = Path(root)
        self.settings = settings
        self.overwrite = overwrite
        self.shard = shard
        self.on_record = on_record
        self.fsync_interval = fsync_interval
        self.recovered = 0  # records restored from pack metadata at open
        self.unreadable_lines = 0  # manifest lines that are not JSON records, skipped at open
        self._build()

    def __enter__(self) -> OutputStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> OutputStore:
        """Create DIR, take the lock, read the manifest, repair it from the packs a killed run wrote."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.publisher.open()
            unreadable: list[int] = []
            for record in iter_manifest(self.manifest.path, unreadable):
                self.manifest.count(record)
                self.index.note(record)
            self.unreadable_lines = len(unreadable)
            self.manifest.open()
            if isinstance(self.writer, PackWriter):
                missing = self.writer.recover(iter_manifest(self.manifest.path))
                if missing:
                    self._append(missing)
                    self.recovered = len(missing)
        except OSError as exc:
            raise output_failure(exc, self.root, "opening the output directory") from None
        return self

    def _build(self) -> None:
        """The parts, on DIR's real path (the same before DIR is created: missing folders are no links)."""
        s, shard = self.settings, self.shard
        self.publisher = Publisher(self.root, f"{shard[0]}of{shard[1]}" if shard else "all")
        real = self.publisher.real
        self.manifest = ManifestLog(real, sync_first=self.publisher.sync_folders, fsync_interval=self.fsync_interval)
        self.index = ResumeIndex(real, s.signature(), overwrite=self.overwrite)
        self.writer: EmbeddingWriter
        if s.format == "pack":
            self.writer = PackWriter(s, self.publisher, self._commit_pack, shard=shard)
        else:
            self.writer = FileWriter(s, self.publisher)

    def close(self) -> None:
        """Publish the last pack, sync the manifest, remove the temp area, release the lock. Every step is
        taken even when one fails (a full disk refuses the last pack); then that failure is raised
        (OutputError)."""
        failure: OutputError | None = None
        try:
            if self.manifest.is_open:
                try:
                    self.writer.flush()
                except OutputError as exc:
                    failure = exc
                try:
                    self.manifest.close()
                except OSError as exc:
                    failure = failure or output_failure(exc, self.root, "syncing manifest.jsonl")
        finally:
            self.publisher.close()
        if failure is not None:
            raise failure

    def flush(self) -> None:
        self.writer.flush()
        if self.manifest.is_open:
            self.manifest.sync()

    # ------------------------------------------------------------------ resume

    def is_done(self, source: Source) -> bool:
        """True when the image need not be encoded again (:mod:`phi3embed.outputs.resume`)."""
        return self.index.is_done(source, self.writer.expected_output(source))

    # ------------------------------------------------------------------ writing

    @property
    def concurrent_files(self) -> bool:
        """Whether :meth:`write_file` applies (per-image formats), so that several files can be written at once."""
        return self.writer.concurrent

    def write(self, source: Source, facts: ImageFacts, embeddings: torch.Tensor) -> Record:
        """Store one image's ``[T, D]`` embeddings (any device/dtype; converted to the stored dtype).

        Returns the record. Per-image formats append it at once; packed records are appended when their
        pack is written. A problem with this one output (e.g. its folder would leave DIR) gives an error
        record instead; a problem with DIR itself raises OutputError.
        """
        record = self.writer.write(source, facts, self._host_tensor(embeddings))
        return self.commit(record) if self.writer.concurrent else record

    def write_duplicate(self, source: Source, facts: ImageFacts, first: str) -> Record:
        """Give ``source``, whose bytes are those of the image named ``first`` (committed before it, or
        waiting in the current pack), its record and output without encoding it
        (:meth:`EmbeddingWriter.write_duplicate`). When ``first`` has no usable output (it failed), ``source``
        gets an error record saying so: a rerun encodes both. Returns the record as :meth:`write` does."""
        found = self.writer.pending(first) or self.index.latest(first)
        usable = found is not None and found.ok and found.output and found.sha256 == facts.sha256
        if found is None or not usable or found.signature() != self.settings.signature():
            why = found.error if found is not None and found.error else "it has no output made with these settings"
            return self.write_error(source, f"{source.label}: same bytes as {first}, which failed: {why}", facts)
        record = self.writer.write_duplicate(source, facts, found)
        return self.commit(record) if self.writer.concurrent else record

    def write_file(self, source: Source, facts: ImageFacts, embeddings: torch.Tensor) -> Record:
        """Per-image formats: write ``source``'s file durably into place and return its record, which is not
        in the manifest until :meth:`commit`. Several threads may call this at once."""
        assert self.writer.concurrent, "packs are written by write()"
        return self.writer.write(source, facts, self._host_tensor(embeddings))

    def write_error(self, source: Source, error: str, facts: ImageFacts | None = None) -> Record:
        """Record that ``source`` failed (``error``: one line naming the file and the reason)."""
        return self.commit(error_record(self.settings, source, error, facts))

    def commit(self, record: Record) -> Record:
        """Append one record to the manifest (one thread, in input order); returns it stamped."""
        return self._append([record])[0]

    def _commit_pack(self, records: Sequence[Record]) -> None:
        self._append(records)
        self._sync()

    def _append(self, records: Sequence[Record]) -> list[Record]:
        try:
            stamped = self.manifest.append(records)
        except OSError as exc:
            raise output_failure(exc, self.root, "appending to manifest.jsonl") from None
        for record in stamped:
            self.index.note(record)
            if self.on_record is not None:
                self.on_record(record)
        return stamped

    def _sync(self) -> None:
        try:
            self.manifest.sync()
        except OSError as exc:
            raise output_failure(exc, self.root, "syncing manifest.jsonl") from None

    def _host_tensor(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings.detach().to(self.settings.dtype).to("cpu").contiguous()
