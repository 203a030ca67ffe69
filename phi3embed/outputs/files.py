"""Per-image outputs: ``DIR/<name>.npy`` or ``DIR/<name>.safetensors`` (key ``image_embeds``, string metadata);
a name the file system cannot hold gets the storable path of :func:`phi3embed.outputs.names.output_path`.

One of the two embedding writers behind :class:`phi3embed.outputs.store.EmbeddingWriter`. :meth:`FileWriter.write`
may run in several threads at once (one fsync per file, and a disk takes several in parallel faster than
one after another); the records it returns are committed to the manifest by the caller, in input order.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from phi3embed.core.safetensors_io import write_safetensors
from phi3embed.errors import ImageError
from phi3embed.inputs.listing import Source
from phi3embed.outputs.formats import EMBED_KEY
from phi3embed.outputs.names import output_path, readable
from phi3embed.outputs.publish import Publisher
from phi3embed.outputs.records import ImageFacts, OutputSettings, Record, error_record, new_record


class FileWriter:
    """One file per image, published atomically; records come back uncommitted."""

    concurrent = True

    def __init__(self, settings: OutputSettings, publisher: Publisher) -> None:
        self.settings, self.publisher = settings, publisher

    def expected_output(self, source: Source) -> str:
        """Where ``source``'s embeddings go, relative to DIR (``<name>.npy``, or a storable form of it)."""
        return output_path(source.name, f".{self.settings.format}")

    def write(self, source: Source, facts: ImageFacts, tensor: torch.Tensor) -> Record:
        """Write ``source``'s file durably into place (``tensor``: host, stored dtype, contiguous). A problem
        with this one output gives an error record; a problem with DIR itself raises OutputError."""
        rel = self.expected_output(source)
        try:
            final = self.publisher.safe_path(rel)
            if self.settings.format == "npy":
                array = tensor.numpy()
                self.publisher.atomic_write(final, lambda fh: np.save(fh, array, allow_pickle=False))
                key = None
            else:
                meta = self._metadata(source, facts)
                self.publisher.atomic_write(final, lambda fh: write_safetensors(fh, [(EMBED_KEY, tensor)], meta))
                key = EMBED_KEY
        except ImageError as exc:  # this one output (the file system refuses its name): an error record
            return error_record(self.settings, source, str(exc), facts)
        return new_record(self.settings, source, facts, status="ok", output=rel, key=key, shape=tuple(tensor.shape))

    def write_duplicate(self, source: Source, facts: ImageFacts, first: Record) -> Record:
        """Give ``source`` (same bytes as ``first``, an ok record) ``first``'s file under its own name: a hard
        link, or a copy where links are refused. (A safetensors file's metadata then names the first.)"""
        rel = self.expected_output(source)
        try:
            existing = self.publisher.safe_path(str(first.output))
            final = self.publisher.safe_path(rel)
            if not existing.is_file():
                return error_record(self.settings, source, f"{source.label}: the output of {first.name} is gone", facts)
            self.publisher.link_or_copy(existing, final)
        except ImageError as exc:
            return error_record(self.settings, source, str(exc), facts)
        return new_record(
            self.settings,
            source,
            facts,
            status="ok",
            output=rel,
            key=first.key,
            shape=tuple(first.shape or ()),
            duplicate_of=first.name,
        )

    def pending(self, name: str) -> None:
        """Records are never held here."""
        return None

    def _metadata(self, source: Source, facts: ImageFacts) -> dict[str, str]:
        s = self.settings
        return {  # safetensors metadata is UTF-8 text: names that are not are in their readable form
            "source": readable(source.path),
            "name": readable(source.name),
            "image_sizes": json.dumps(list(facts.image_sizes or ())),
            "num_crops": str(s.num_crops),
            "model": readable(s.model),
            "fingerprint": s.fingerprint,
            "stage": s.stage,
        }

    def flush(self) -> None:
        """Nothing waits here: every file is in place when :meth:`write` returns."""
