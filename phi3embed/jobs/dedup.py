"""Exact duplicates encoded once: which images are duplicates (same bytes, same settings) of another.

:class:`Duplicates` decides, from a prepared image's sha256, whether it is

* the first image of its bytes in this job (encode it),
* a duplicate of an earlier image of this job (``Duplicate(first, earlier=False)``: the first is encoded, the duplicate
  shares its output), or
* a duplicate of an ``ok`` output an earlier run made with the same settings (``Duplicate(first, earlier=True)``:
  nothing is encoded; :meth:`phi3embed.outputs.resume.ResumeIndex.identical`).

The writer then gives a duplicate its own record (``duplicate_of``) and output (a hard link to the first's file,
or the first's pack file and key): :meth:`phi3embed.outputs.store.OutputStore.write_duplicate`. The first of
a job precedes its duplicates in input order, and results reach the writer in input order, so the first's
record is there before any duplicate's; :class:`Held` keeps that order for an engine that skips duplicates before
they reach its encoder (the local engine).

Memory (measured with tracemalloc over 10^6 images): about 110 bytes per distinct image of the job (a dict
entry: the 32-byte digest and a reference to the name the source already holds), 35 per image for the set
of the job's names (references), and 30 per ok record for the resume index's sha256 index: about 0.17 GB per
million images, beside the resume index's own record per image.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from phi3embed.inputs.listing import Source
from phi3embed.outputs.resume import ResumeIndex

T = TypeVar("T")


@dataclass(frozen=True)
class Duplicate:
    """An image whose bytes ``first`` (a name) already has: it is not encoded."""

    first: str
    earlier: bool  # the first's output comes from an earlier run (else from this job)


class Duplicates:
    """The decision of the module docstring, for one job over ``todo`` with ``index`` of its output directory."""

    def __init__(self, index: ResumeIndex, todo: Sequence[Source]) -> None:
        self._index = index
        if todo:
            index.index_sha256()  # now, before the writer thread notes records (nothing to encode: no need)
        self._todo = frozenset(s.name for s in todo)  # their earlier outputs are being redone: not shareable
        self._firsts: dict[bytes, str] = {}  # digest -> first name in this job
        self._earlier: dict[bytes, str] = {}  # digest -> name of an earlier run's ok output

    def find(self, name: str, sha256: str | None) -> Duplicate | None:
        """None: encode ``name`` (its bytes are new, or unknown). Call once per image, in input order;
        calling again for a first gives None again."""
        if not sha256:
            return None
        digest = bytes.fromhex(sha256)
        first = self._firsts.get(digest)
        if first is not None:
            return None if first == name else Duplicate(first, earlier=False)
        earlier = self._earlier.get(digest)
        if earlier is None:
            found = self._index.identical(sha256)
            if found is not None and found.name not in self._todo:
                earlier = self._earlier[digest] = found.name
        if earlier is not None:
            return Duplicate(earlier, earlier=True)
        self._firsts[digest] = name
        return None


class Held(Generic[T]):
    """Duplicates an engine took out of its encoder's input, released in input order among the encoded images.

    :meth:`hold` a duplicate after ``fed`` images went to the encoder before it (:meth:`fed`); :meth:`release`
    after each encoded image the engine yields gives the duplicates that came before the next one.
    """

    def __init__(self) -> None:
        self._held: deque[tuple[int, T]] = deque()
        self._fed = 0
        self._out = 0

    def fed(self) -> None:
        """One more image went to the encoder."""
        self._fed += 1

    def hold(self, item: T) -> None:
        self._held.append((self._fed, item))

    def release(self, *, end: bool = False) -> Iterator[T]:
        """After one more encoded image was yielded (or, ``end``, after the last): the duplicates now in turn."""
        self._out += 0 if end else 1
        while self._held and (end or self._held[0][0] <= self._out):
            yield self._held.popleft()[1]
