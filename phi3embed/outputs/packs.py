"""Packed outputs (``--pack SIZE``): pack files ``DIR/emb-00000.safetensors``, one tensor per image keyed by its name
(a name that is not UTF-8 by the key :func:`phi3embed.outputs.names.pack_key` gives it).

One of the two embedding writers behind :class:`phi3embed.outputs.store.EmbeddingWriter`. A pack is the unit of
commit: it is published when full (or at the end), and only then are its records appended (``commit``).
Pack contents depend only on the sorted input order and the tensor sizes, so a run killed at any moment and
rerun writes byte-identical packs. Each pack also carries its records in its metadata, so a kill between the
rename and the manifest append is repaired on the next open (:meth:`PackWriter.recover`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from phi3embed.core.safetensors_io import read_metadata, write_safetensors
from phi3embed.errors import Phi3EmbedError
from phi3embed.inputs.listing import Source
from phi3embed.outputs.names import pack_key
from phi3embed.outputs.publish import Publisher
from phi3embed.outputs.records import ImageFacts, OutputSettings, Record, new_record

PACK_FORMAT = "phi3embed-pack/1"  # metadata "format" of our pack files


@dataclass
class _PendingPack:
    entries: list[tuple[Record, torch.Tensor | None]] = field(default_factory=list)  # None: a duplicate's record
    nbytes: int = 0
    by_name: dict[str, Record] = field(default_factory=dict)  # the records of the tensors it holds


class PackWriter:
    """Images into packs of about ``settings.pack_bytes``; ``commit`` appends (and syncs) a pack's records."""

    concurrent = False

    def __init__(
        self,
        settings: OutputSettings,
        publisher: Publisher,
        commit: Callable[[Sequence[Record]], None],
        *,
        shard: tuple[int, int] | None = None,
    ) -> None:
        assert settings.pack_bytes is not None
        self.settings, self.publisher, self.commit = settings, publisher, commit
        self.limit = settings.pack_bytes
        self.prefix = f"emb-{shard[0]}of{shard[1]}-" if shard else "emb-"  # the parts of a job array never collide
        self._pending = _PendingPack()
        self._next = 0

    def expected_output(self, source: Source) -> None:
        """Any pack of this run may hold the image."""
        return None

    def pack_file(self, index: int) -> str:
        return f"{self.prefix}{index:05d}.safetensors"

    def pack_index(self, filename: str) -> int | None:
        match = re.fullmatch(re.escape(self.prefix) + r"(\d{5,})\.safetensors", filename)
        return int(match.group(1)) if match else None

    def write(self, source: Source, facts: ImageFacts, tensor: torch.Tensor) -> Record:
        """Queue one image for the current pack (publishing the pack first when it would overflow)."""
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending.entries and self._pending.nbytes + nbytes > self.limit:
            self._write_pack()
        output = self.pack_file(self._next)
        record = new_record(
            self.settings,
            source,
            facts,
            status="ok",
            output=output,
            key=pack_key(source.name),
            shape=tuple(tensor.shape),
        )
        self._pending.entries.append((record, tensor))
        self._pending.nbytes += nbytes
        self._pending.by_name[record.name] = record
        return record

    def write_duplicate(self, source: Source, facts: ImageFacts, first: Record) -> Record:
        """``source`` (same bytes as ``first``, an ok record) points at ``first``'s pack file and key; no new
        bytes. Its record goes with the current pack (into its metadata records too, for recovery), or at
        once when no pack is waiting."""
        record = new_record(
            self.settings,
            source,
            facts,
            status="ok",
            output=first.output,
            key=first.key,
            shape=tuple(first.shape or ()),
            duplicate_of=first.name,
        )
        if self._pending.entries:
            self._pending.entries.append((record, None))
        else:
            self.commit([record])
        return record

    def pending(self, name: str) -> Record | None:
        """The record of ``name`` when its tensor waits in the current pack."""
        return self._pending.by_name.get(name)

    def flush(self) -> None:
        """Publish the last, partial pack."""
        if self._pending.entries:
            self._write_pack()

    def _write_pack(self) -> None:
        entries = self._pending.entries
        records = [r for r, _ in entries]
        meta = {"format": PACK_FORMAT, "records": json.dumps([r.to_json() for r in records], ensure_ascii=True)}
        tensors = [(r.key or r.name, t) for r, t in entries if t is not None]
        self.publisher.atomic_write(
            self.publisher.real / self.pack_file(self._next), lambda fh: write_safetensors(fh, tensors, meta)
        )
        self._pending = _PendingPack()
        self._next += 1
        self.commit(records)  # the commit point: after the pack is in place

    def recover(self, manifest: Iterable[Record]) -> list[Record]:
        """The records of packs whose manifest lines a killed run did not write; sets the next pack index."""
        indices = {}
        for entry in os.scandir(self.publisher.real):
            index = self.pack_index(entry.name)
            if index is not None and entry.is_file():
                indices[index] = entry.name
        if not indices:
            return []
        self._next = max(indices) + 1
        last, have_last = -1, set[str]()  # the highest pack the manifest names, and the names it gives it (only
        for record in manifest:  # that pack and later ones can lack lines: the names of earlier ones are not kept)
            index = self.pack_index(record.output or "")
            if index is not None and index >= last:
                if index > last:
                    last, have_last = index, set()
                have_last.add(record.name)
        referenced = {last: have_last}
        missing: list[Record] = []
        for index in sorted(i for i in indices if i >= last):
            try:
                meta = read_metadata(self.publisher.real / indices[index])
                stored = json.loads(meta["records"]) if meta.get("format") == PACK_FORMAT else []
            except (OSError, ValueError, KeyError, Phi3EmbedError):
                continue  # not one of ours
            have = referenced.get(index, set())
            for data in stored:
                kept = Record.from_json(data) if isinstance(data, dict) else None
                if kept is not None and kept.name not in have:
                    missing.append(kept)
        return missing
