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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from phi3embed.errors import Phi3EmbedError
from phi3embed.inputs.listing import Source
from phi3embed.outputs.files import FileWriter
from phi3embed.outputs.manifest import MANIFEST, ManifestLog, iter_manifest
from phi3embed.outputs.manifest_index import ManifestIndex
from phi3embed.outputs.packs import PackWriter
from phi3embed.outputs.publish import OutputError, Publisher, output_failure
from phi3embed.outputs.records import NO_STAGE, ImageFacts, OutputSettings, Record, error_record
from phi3embed.outputs.resume import ResumeIndex
from phi3embed.outputs.vectors import VECTORS_DIR, VectorOnlyWriter, VectorShards, require_pyarrow

#: A rebuilt index file is written at once (not only when the run ends) when it took this many manifest lines.
LOAD_SAVE_LINES = 10_000


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
        vector_rows: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.settings = settings
        self.overwrite = overwrite
        self.shard = shard
        self.on_record = on_record
        self.fsync_interval = fsync_interval
        self.vector_rows = vector_rows  # rows per vector shard (None: outputs.vectors.DEFAULT_SHARD_ROWS)
        self.recovered = 0  # records restored from pack metadata at open
        self.unreadable_lines = 0  # manifest lines that are not JSON records, skipped at open
        self.vectors_moved = 0  # vector rows rewritten to agree with the manifest (outputs/vectors.py)
        self._waiting_vectors: dict[str, dict[str, np.ndarray]] = {}  # name -> vectors, until its record commits
        self._archives: dict[str, tuple[str, int]] = {}  # archive name -> (path, images asked about by is_done)
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
            self.unreadable_lines = self.index.load(save=LOAD_SAVE_LINES)
            self.manifest.attempts_before = self.index.attempts
            self.index.on_fold = self.manifest.forget_attempts
            self.manifest.open()
            if isinstance(self.writer, PackWriter):
                missing = self.writer.recover(iter_manifest(self.manifest.path))
                if missing:
                    self._append(missing)
                    self.recovered = len(missing)
            if self.vectors is not None:
                self.vectors_moved += self.vectors.reconcile(self.index.latest_records())
        except OSError as exc:
            raise output_failure(exc, self.root, "opening the output directory") from None
        return self

    def _build(self) -> None:
        """The parts, on DIR's real path (the same before DIR is created: missing folders are no links)."""
        s, shard = self.settings, self.shard
        self.publisher = Publisher(self.root, f"{shard[0]}of{shard[1]}" if shard else "all")
        real = self.publisher.real
        self.manifest = ManifestLog(real, sync_first=self.publisher.sync_folders, fsync_interval=self.fsync_interval)
        self.vectors = self._vector_shards()
        present = self.vectors.present if self.vectors is not None and s.vectors else None
        self.index = ResumeIndex(real, s.signature(), overwrite=self.overwrite, vectors_present=present)
        self.writer: EmbeddingWriter
        if s.stage == NO_STAGE:
            self.writer = VectorOnlyWriter(s)
        elif s.format == "pack":
            self.writer = PackWriter(s, self.publisher, self._commit_pack, shard=shard)
        else:
            self.writer = FileWriter(s, self.publisher)

    def _vector_shards(self) -> VectorShards | None:
        """The vector shards of this run: with ``--vectors``; without, where DIR has vectors (their rows are
        then made to agree with the records, which no longer name them once re-encoded)."""
        if not self.settings.vectors:
            if not (self.publisher.real / VECTORS_DIR).is_dir():
                return None
            try:
                require_pyarrow()
            except Phi3EmbedError:
                return None
        rows = {"rows": self.vector_rows} if self.vector_rows else {}
        return VectorShards(self.settings, self.publisher, self._commit_pack, shard=self.shard, **rows)

    def close(self) -> None:
        """Publish the last pack and vector shard, sync the manifest, remove the temp area, release the lock.
        Every step is taken even when one fails (a full disk refuses the last pack); then that failure is
        raised (OutputError)."""
        failure: OutputError | None = None
        try:
            if self.manifest.is_open:
                try:
                    self.writer.flush()
                    if self.vectors is not None:
                        self.vectors.flush()
                        self.vectors_moved += self.vectors.reconcile(self.index.latest_records())
                except OutputError as exc:
                    failure = exc
                try:
                    self.manifest.close()
                except OSError as exc:
                    failure = failure or output_failure(exc, self.root, "syncing manifest.jsonl")
                if failure is None:  # the columns for the next run (a cache: failing to write it is no failure)
                    self.index.save(self._archives, self._expected_output)
        finally:
            self.publisher.close()
        if failure is not None:
            raise failure

    def flush(self) -> None:
        self.writer.flush()
        if self.vectors is not None:
            self.vectors.flush()
        if self.manifest.is_open:
            self.manifest.sync()

    # ------------------------------------------------------------------ resume

    def is_done(self, source: Source) -> bool:
        """True when the image need not be encoded again (:mod:`phi3embed.outputs.resume`). The images of
        archives asked about are counted: when the run ends, an archive whose every image is done gets a
        completion record (:meth:`finished_archives`)."""
        member = source.member
        if member is not None:
            _, seen = self._archives.get(member.archive, ("", 0))
            self._archives[member.archive] = (source.path, seen + 1)
        return self.index.is_done(source, self.writer.expected_output(source))

    def _expected_output(self, name: str) -> str | None:
        return self.writer.expected_output(Source(name, "", ""))

    @staticmethod
    def completed_archives(root: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
        """The completion records in DIR (name -> record with the archive's absolute ``path``, ``size``,
        ``mtime_ns`` and ``images``), read before the store is opened so that listing can leave those archives
        unread: each must still be confirmed by :meth:`confirm_archives` once the store is open."""
        return ManifestIndex.completed_archives(Path(root) / MANIFEST)

    def confirm_archives(self, finished: Mapping[str, tuple[str, int]]) -> list[str]:
        """Of the archives listing left unread (name -> (path, images)), those whose images are NOT all done with
        this run's settings (they must be listed after all); the others count as listed and done."""
        failed = []
        for name, (path, images) in finished.items():
            try:
                st = os.stat(path)
            except OSError:
                failed.append(name)
                continue
            if not self.index.archive_done(name, images, st, self._expected_output):
                failed.append(name)
        return failed

    # ------------------------------------------------------------------ writing

    @property
    def concurrent_files(self) -> bool:
        """Whether :meth:`write_file` applies (per-image formats), so that several files can be written at once."""
        return self.writer.concurrent

    def write(
        self,
        source: Source,
        facts: ImageFacts,
        embeddings: torch.Tensor | None,
        vectors: Mapping[str, np.ndarray] | None = None,
    ) -> Record:
        """Store one image's ``[T, D]`` embeddings (any device/dtype; converted to the stored dtype).

        Returns the record. Per-image formats append it at once; packed records are appended when their
        pack is written. A problem with this one output (e.g. its folder would leave DIR) gives an error
        record instead; a problem with DIR itself raises OutputError.
        """
        self._keep_vectors(source, vectors)
        tensor = self._host_tensor(embeddings) if embeddings is not None else None
        record = self.writer.write(source, facts, tensor)  # type: ignore[arg-type]  # None: --stage none
        return self.commit(record) if self.writer.concurrent else self._commit_if_unheld(record)

    def _keep_vectors(self, source: Source, vectors: Mapping[str, np.ndarray] | None) -> None:
        """``source``'s vectors wait for its record's commit (which holds both until their shard is out)."""
        if self.settings.vectors:
            if vectors is None:
                raise ValueError(f"{source.name}: this run writes vectors, and none came with the embeddings")
            self._waiting_vectors[source.name] = dict(vectors)

    def _commit_if_unheld(self, record: Record) -> Record:
        """A record the embedding writer returned without committing it: packs commit theirs later; the
        vector-only writer's is committed (held with its vectors) here."""
        return self.commit(record) if isinstance(self.writer, VectorOnlyWriter) else record

    def write_duplicate(self, source: Source, facts: ImageFacts, first: str) -> Record:
        """Give ``source``, whose bytes are those of the image named ``first`` (committed before it, or
        waiting in the current pack), its record and output without encoding it
        (:meth:`EmbeddingWriter.write_duplicate`). When ``first`` has no usable output (it failed), ``source``
        gets an error record saying so: a rerun encodes both. Returns the record as :meth:`write` does."""
        waiting = self.vectors.pending(first) if self.vectors is not None else None
        found = self.writer.pending(first) or waiting or self.index.latest(first)
        stored = found is not None and (found.output or self.settings.stage == NO_STAGE)
        usable = found is not None and found.ok and stored and found.sha256 == facts.sha256
        if found is None or not usable or found.signature() != self.settings.signature():
            why = found.error if found is not None and found.error else "it has no output made with these settings"
            return self.write_error(source, f"{source.label}: same bytes as {first}, which failed: {why}", facts)
        if self.settings.vectors:  # a duplicate's row repeats the first's vectors
            assert self.vectors is not None
            # the first's vectors wait with it (its pack is not out yet), are held for their shard, or are on disk
            vectors = self._waiting_vectors.get(found.name) or self.vectors.vectors_of(found)
            if vectors is None:
                return self.write_error(source, f"{source.label}: same bytes as {first}, whose vectors are gone", facts)
            self._keep_vectors(source, vectors)
        record = self.writer.write_duplicate(source, facts, found)
        return self.commit(record) if self.writer.concurrent else self._commit_if_unheld(record)

    def write_file(
        self,
        source: Source,
        facts: ImageFacts,
        embeddings: torch.Tensor,
        vectors: Mapping[str, np.ndarray] | None = None,
    ) -> Record:
        """Per-image formats: write ``source``'s file durably into place and return its record, which is not
        in the manifest until :meth:`commit`. Several threads may call this at once."""
        assert self.writer.concurrent, "packs are written by write()"
        self._keep_vectors(source, vectors)
        return self.writer.write(source, facts, self._host_tensor(embeddings))

    def write_error(self, source: Source, error: str, facts: ImageFacts | None = None) -> Record:
        """Record that ``source`` failed (``error``: one line naming the file and the reason)."""
        return self.commit(error_record(self.settings, source, error, facts))

    def commit(self, record: Record) -> Record:
        """Append one record to the manifest (one thread, in input order); returns it stamped. With
        ``--vectors`` an ok record waits with its vectors for their shard instead (returned unstamped)."""
        if self._hold(record):
            return record
        return self._append([record])[0]

    def _hold(self, record: Record) -> bool:
        """Hand an ok record with vectors to the shards (True), which commit it once its row is published."""
        vectors = self._waiting_vectors.pop(record.name, None)
        if vectors is None or not record.ok or self.vectors is None:
            return False
        self.vectors.hold(record, vectors)
        return True

    def _commit_pack(self, records: Sequence[Record]) -> None:
        """Append a published pack's (or vector shard's) records and sync."""
        rest = [r for r in records if r.vectors is not None or not self._hold(r)]
        if rest:
            self._append(rest)
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
