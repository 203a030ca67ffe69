"""Watch the per-image files a job's writer writes: how many at once, and a hook to slow down or fail one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from phi3embed.inputs.listing import Source
from phi3embed.outputs.records import Record
from phi3embed.outputs.store import OutputStore


class FileWriteProbe:
    """Stands in for ``store.write_file`` of an open store: runs ``before(source)`` first, in the writing
    thread (sleep to delay that file, raise to fail it), then the real write; ``peak`` is the most files
    being written at the same time."""

    def __init__(self, store: OutputStore, before: Callable[[Source], None]) -> None:
        self.write_file, self.before = store.write_file, before
        self.active = self.peak = 0
        self._lock = threading.Lock()
        store.write_file = self  # type: ignore[method-assign]

    def __call__(self, source: Source, facts: Any, embeddings: torch.Tensor) -> Record:
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            self.before(source)
            return self.write_file(source, facts, embeddings)
        finally:
            with self._lock:
                self.active -= 1
