"""What to read: expand command-line INPUTs into a sorted, de-duplicated list of images.

Each image becomes a :class:`Source`: the path to read and its *name*, the path relative to its input
root, which is also its identity in the output directory (``imgs/a/b.jpg`` given as ``imgs`` has the
name ``a/b.jpg`` and the output ``a/b.jpg.npy``). The rules, one per kind of INPUT:

* a directory: recursed (symbolic links to directories are not followed, hidden entries are skipped);
  a regular file is an image if its extension is an image extension or its first bytes are an image
  signature. Names are relative to the directory.
* a glob pattern (``*``, ``?``, ``[``; ``**`` recurses): matching directories are recursed and matching
  files filtered as above. Names are relative to the pattern's literal leading directories.
* a file (and every line of ``-``, which reads newline-separated paths from stdin): taken as given,
  whatever it is, so that a bad file yields an error record (a named pipe or a device gets "not a regular
  file" when it is read, without being opened). Names are relative to the current directory; a path outside
  it keeps its absolute path without the leading ``/``.
* a ``.tar`` or ``.parquet`` file given as a file, matched by a glob or listed on stdin is an *archive*: its
  images are listed from its headers (:mod:`phi3embed.inputs.archives`), named ``<archive name>/<member>``.
  Folders never open archives: a directory INPUT yields only its loose images, and the archives in it are
  counted (:attr:`Listing.archive_paths`) so that encode and plan can say how to include them.

Brace patterns (``data/{000..099}.tar``, ``{a,b}``) are expanded first, as bash does, for every kind of INPUT
(an argument that names an existing file is taken literally).

Only regular files are ever opened here. Named pipes, sockets and devices found in folders and globs are
skipped and counted (:attr:`Listing.special`): opening a pipe blocks until someone writes to it, reading a
device may never end. The type comes from the directory entry itself (``d_type``, no system call on most
file systems), so this rule costs no extra pass over the files.

Symbolic links that loop (a link to itself, or ``**`` through a link to a folder above it) are skipped and
counted (:attr:`Listing.looping_links`).

Names never contain ``..`` or start with ``/``, so an output can never escape the output directory.
``select_shard`` splits the list for job arrays by a stable hash of each name (of the archive's name for the
images inside one, so that a part reads only its own archives).

Ten million images fit: the listing holds no :class:`Source` per image (:class:`SourceList`). Each INPUT keeps
one ``str`` per loose image, its name (the path is the INPUT's prefix plus the name), and each archive its
members; a Source is made when the list is read. Equal names are found by sorting their hashes (no dict of
all names); the list is sorted per INPUT, and the INPUTs are put one after another, or merged into one array
of positions when their names interleave. An archive whose images are all done (the ``finished_archive``
hook of :func:`list_inputs`, asked before the archive is opened) is only counted
(:attr:`Listing.finished_archives`).
"""

from __future__ import annotations

import errno
import functools
import glob
import hashlib
import heapq
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TextIO, overload

import numpy as np

from phi3embed.errors import Phi3EmbedError
from phi3embed.inputs.archives import Member, archive_kind, list_archive, member_label

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
        ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".jpx", ".jpf", ".avif", ".qoi",
    }
)  # fmt: skip

_GLOB_MAGIC = re.compile(r"[*?[]")


class InputError(Phi3EmbedError):
    """An INPUT argument names nothing usable (a usage error: reported before any work starts)."""


@functools.total_ordering
@dataclass(frozen=True, slots=True)
class Source:
    """One image to encode. ``name`` (identity) is a relative POSIX path. Sources sort by name, except that the
    images of one archive stay together in archive order (so that an archive is read front to back)."""

    name: str
    path: str  # what to open, as listed (relative to the current directory or absolute); for a member: the archive
    root: str  # the input root ``name`` is relative to ("" for single files)
    member: Member | None = None  # where the image lies inside the archive ``path`` (None: a loose file)

    def sort_key(self) -> tuple[str, int, str]:
        member = self.member
        return (self.name, 0, "") if member is None else (member.archive + "/", member.index, self.name)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Source):
            return NotImplemented
        return self.sort_key() < other.sort_key()

    @property
    def group(self) -> str:
        """What ``--shard`` hashes: the archive's name for its images (whole archives go to one part)."""
        return self.name if self.member is None else self.member.archive

    @property
    def label(self) -> str:
        """How errors name this image: its path, or ``<archive path>/<member path>``."""
        return self.path if self.member is None else member_label(self.path, self.member)


def is_image_signature(head: bytes) -> bool:
    """True when ``head`` (the first 16+ bytes of a file) starts like an image format Pillow reads."""
    return (
        head.startswith(b"\x89PNG\r\n\x1a\n")
        or head.startswith(b"\xff\xd8\xff")  # JPEG
        or head.startswith((b"GIF87a", b"GIF89a"))
        or (head.startswith(b"BM") and len(head) >= 14 and head[6:10] == b"\0\0\0\0")  # BMP: reserved = 0
        or head.startswith((b"II*\x00", b"MM\x00*"))  # TIFF
        or (head.startswith(b"RIFF") and head[8:12] == b"WEBP")
        or head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n")  # JPEG 2000 (jp2)
        or head.startswith(b"\xff\x4f\xff\x51")  # JPEG 2000 codestream
        or (head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"))
        or head.startswith(b"qoif")
        or (len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3] in b" \t\r\n")  # PNM
    )


def looks_like_image(path: str) -> bool:
    """For a regular file: by extension first; otherwise by content (16 bytes are read, the open never
    blocks). Unreadable files are not images."""
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and is_image_signature(os.read(fd, 16))
    except OSError:
        return False
    finally:
        os.close(fd)


class _Loose:
    """Loose files of one INPUT (or of consecutive lines of ``-``): one ``str`` (the name) per image; the path is
    the prefix of the root plus the name, or given per image (``paths``, None where it is the name)."""

    __slots__ = ("names", "paths", "prefix", "root", "abs_root", "cwd")

    def __init__(self, root: str, abs_root: str, cwd: str, *, explicit: bool = False) -> None:
        self.names: list[str] = []
        self.paths: list[str | None] | None = [] if explicit else None
        self.root, self.abs_root, self.cwd = root, abs_root, cwd
        self.prefix = None if explicit else _display_prefix(abs_root, cwd)

    def add(self, name: str, path: str | None = None) -> None:
        self.names.append(name)
        if self.paths is not None:
            self.paths.append(None if path == name else path)

    def path(self, i: int) -> str:
        if self.paths is not None:
            return self.paths[i] or self.names[i]
        if self.prefix is not None:
            return self.prefix + self.names[i]
        return _display(os.path.join(self.abs_root, self.names[i]), self.cwd)

    def source(self, i: int) -> Source:
        return Source(self.names[i], self.path(i), self.root)

    def sources(self) -> Iterator[Source]:
        root, prefix = self.root, self.prefix
        if self.paths is None and prefix is not None:
            return (Source(name, prefix + name, root) for name in self.names)
        return (self.source(i) for i in range(len(self.names)))

    def key(self, i: int) -> tuple[str, int, str]:
        return (self.names[i], 0, "")

    def group(self, i: int) -> str:
        return self.names[i]

    def groups(self) -> Iterator[str]:
        return iter(self.names)

    def keep(self, kept: Sequence[bool]) -> None:
        self.names = [n for n, k in zip(self.names, kept, strict=True) if k]
        if self.paths is not None:
            self.paths = [p for p, k in zip(self.paths, kept, strict=True) if k]

    def sort(self) -> None:
        if self.paths is None:
            self.names.sort()
        else:
            order = sorted(range(len(self.names)), key=self.names.__getitem__)
            self.names = [self.names[i] for i in order]
            self.paths = [self.paths[i] for i in order]

    def copy(self) -> _Loose:
        other = _Loose.__new__(_Loose)
        other.names, other.paths = list(self.names), None if self.paths is None else list(self.paths)
        other.prefix, other.root, other.abs_root, other.cwd = self.prefix, self.root, self.abs_root, self.cwd
        return other


class _Archive:
    """The images of one archive, from its headers: their names and members (in archive order)."""

    __slots__ = ("names", "members", "archive_path", "root")

    def __init__(self, archive_path: str, root: str, found: list[tuple[str, Member]]) -> None:
        self.archive_path, self.root = archive_path, root
        self.names = [name for name, _ in found]
        self.members = [member for _, member in found]

    def path(self, i: int) -> str:  # noqa: ARG002 - every image's path is the archive's
        return self.archive_path

    def source(self, i: int) -> Source:
        return Source(self.names[i], self.archive_path, self.root, self.members[i])

    def sources(self) -> Iterator[Source]:
        path, root = self.archive_path, self.root
        return (Source(n, path, root, m) for n, m in zip(self.names, self.members, strict=True))

    def key(self, i: int) -> tuple[str, int, str]:
        member = self.members[i]
        return (member.archive + "/", member.index, self.names[i])

    def group(self, i: int) -> str:
        return self.members[i].archive

    def groups(self) -> Iterator[str]:
        return (m.archive for m in self.members)

    def keep(self, kept: Sequence[bool]) -> None:
        self.names = [n for n, k in zip(self.names, kept, strict=True) if k]
        self.members = [m for m, k in zip(self.members, kept, strict=True) if k]

    def sort(self) -> None:
        keys = [(m.index, n) for n, m in zip(self.names, self.members, strict=True)]
        if any(a > b for a, b in zip(keys, keys[1:], strict=False)):  # archive order is sorted already
            order = sorted(range(len(keys)), key=keys.__getitem__)
            self.names = [self.names[i] for i in order]
            self.members = [self.members[i] for i in order]

    def copy(self) -> _Archive:
        other = _Archive(self.archive_path, self.root, [])
        other.names, other.members = list(self.names), list(self.members)
        return other


_Segment = _Loose | _Archive


def _display_prefix(abs_root: str, cwd: str) -> str | None:
    """What :func:`_display` puts before a name relative to ``abs_root``, or None when it depends on the name
    (``abs_root`` lies above ``cwd``: some of its files are inside ``cwd``, others not)."""
    inside = cwd.rstrip(os.sep) + os.sep
    if abs_root == cwd:
        return ""
    if abs_root.startswith(inside):
        return os.path.relpath(abs_root, cwd) + "/"
    if cwd.startswith(abs_root.rstrip(os.sep) + os.sep):
        return None
    return abs_root.rstrip(os.sep) + "/"


class SourceList(Sequence[Source]):
    """The sources of a :class:`Listing`, sorted (:meth:`Source.sort_key`), without a :class:`Source` object per
    image: each INPUT keeps one name per image (and an archive its members); sources are made as they are
    read. Iterating is one pass; indexing finds its image by the counts of the INPUTs (and, when the names of
    several INPUTs interleave, by one integer per image giving the order)."""

    def __init__(self, segments: Sequence[_Segment] = (), order: np.ndarray | None = None) -> None:
        self._segments = list(segments)
        self._starts = np.cumsum([0] + [len(s.names) for s in self._segments], dtype=np.int64)
        self._order = order  # global positions in sorted order; None: the segments one after another

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __iter__(self) -> Iterator[Source]:
        if self._order is None:
            for segment in self._segments:
                yield from segment.sources()
            return
        for start in range(0, len(self._order), 1 << 16):
            chunk = self._order[start : start + (1 << 16)]
            owners = np.searchsorted(self._starts, chunk, side="right") - 1
            for position, owner in zip(chunk.tolist(), owners.tolist(), strict=True):
                yield self._segments[owner].source(position - int(self._starts[owner]))

    def _locate(self, i: int) -> tuple[_Segment, int]:
        position = i if self._order is None else int(self._order[i])
        owner = int(np.searchsorted(self._starts, position, side="right")) - 1
        return self._segments[owner], position - int(self._starts[owner])

    @overload
    def __getitem__(self, i: int) -> Source: ...
    @overload
    def __getitem__(self, i: slice) -> list[Source]: ...
    def __getitem__(self, i: int | slice) -> Source | list[Source]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError("source index out of range")
        segment, at = self._locate(i % n)
        return segment.source(at)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SourceList | list | tuple):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SourceList({len(self)} sources)"

    def select(self, index: int, count: int) -> SourceList:
        """The sources of shard ``index`` of ``count`` (:func:`select_shard`), in the same order."""
        kept_parts: list[np.ndarray] = []
        segments: list[_Segment] = []
        for segment in self._segments:
            kept = np.fromiter((shard_of(g, count) == index for g in _shard_groups(segment)), bool, len(segment.names))
            kept_parts.append(kept)
            if kept.all():
                segments.append(segment)
                continue
            part = segment.copy()
            part.keep(kept.tolist())
            segments.append(part)
        order = None
        if self._order is not None:
            kept_all = np.concatenate(kept_parts) if kept_parts else np.zeros(0, bool)
            renumbered = np.cumsum(kept_all, dtype=np.int64) - 1
            order = renumbered[self._order[kept_all[self._order]]]
        return SourceList([s for s in segments if s.names], order if order is None or len(order) else None)


def _shard_groups(segment: _Segment) -> Iterator[str]:
    """The group of each image of ``segment``; an archive's images share one (one hash for all of them)."""
    if isinstance(segment, _Loose):
        return iter(segment.names)
    return segment.groups()


def _arrange(segments: list[_Segment]) -> SourceList:
    """Sorted sources from de-duplicated segments: each sorted, then one after another when their key ranges
    do not overlap (the usual case: one folder, or archives), else merged into one order array."""
    for segment in segments:
        segment.sort()
    segments = sorted((s for s in segments if s.names), key=lambda s: s.key(0))
    if all(a.key(len(a.names) - 1) < b.key(0) for a, b in zip(segments, segments[1:], strict=False)):
        return SourceList(segments)
    starts = np.cumsum([0] + [len(s.names) for s in segments], dtype=np.int64)
    runs = [_keyed(segment, start) for segment, start in zip(segments, starts.tolist(), strict=False)]
    merged = (item[3] for item in heapq.merge(*runs))
    return SourceList(segments, np.fromiter(merged, np.int64, int(starts[-1])))


def _keyed(segment: _Segment, start: int) -> Iterator[tuple[str, int, str, int]]:
    """``(*sort key, position)`` of each image of ``segment`` (whose first image is at ``start``)."""
    key = segment.key
    for i in range(len(segment.names)):
        yield (*key(i), start + i)


def _drop_repeats(segments: list[_Segment], base: str) -> None:
    """De-duplicate by name across all segments, as a dict of names in listing order would: the first image
    of a name stays, a later one with the same file (by absolute path) goes, a later one with another file is
    an InputError (the first such in listing order). Equal names are found by sorting the names' hashes:
    a few integers per image while it runs, no dict of all names."""
    counts = [len(s.names) for s in segments]
    total = sum(counts)
    if total < 2:
        return
    starts = np.cumsum([0, *counts], dtype=np.int64)

    def fill(hashes: np.ndarray) -> np.ndarray:
        for segment, start, count in zip(segments, starts.tolist(), counts, strict=False):
            hashes[start : start + count] = np.fromiter(map(hash, segment.names), np.int64, count)
        return hashes

    hashes = fill(np.empty(total, np.int64))
    hashes.sort()  # in place: the usual answer (no two equal) costs 8 bytes per image
    if not (hashes[1:] == hashes[:-1]).any():
        return
    hashes = fill(hashes)
    order = np.argsort(hashes, kind="stable")  # equal hashes together, in listing order
    hashes = hashes[order]
    same = hashes[1:] == hashes[:-1]
    del hashes
    in_run = np.zeros(total, bool)
    in_run[:-1] |= same
    in_run[1:] |= same
    candidates = order[in_run]
    del order, in_run, same
    owners = np.searchsorted(starts, candidates, side="right") - 1
    first: dict[str, tuple[_Segment, int]] = {}
    dropped: list[int] = []
    conflict: tuple[int, str, str, str] | None = None
    for position, owner in zip(candidates.tolist(), owners.tolist(), strict=True):
        segment, at = segments[owner], position - int(starts[owner])
        name = segment.names[at]
        seen = first.setdefault(name, (segment, at))
        if seen == (segment, at):
            continue
        seen_path, path = seen[0].path(seen[1]), segment.path(at)
        if os.path.abspath(os.path.join(base, seen_path)) == os.path.abspath(os.path.join(base, path)):
            dropped.append(position)
        elif conflict is None or position < conflict[0]:
            conflict = (position, name, seen_path, path)
    if conflict is not None:
        _, name, seen_path, path = conflict
        _same_name(seen_path, path, name)
    if dropped:
        kept = np.ones(total, bool)
        kept[dropped] = False
        for segment, start, count in zip(segments, starts.tolist(), counts, strict=False):
            part = kept[start : start + count]
            if not part.all():
                segment.keep(part.tolist())


@dataclass
class Listing:
    """What the INPUTs name: the sources, and what was left out on the way (by absolute path, so one count
    however many INPUTs reach a file):

    * ``special_paths``: special files (pipes, sockets, devices) in folders and globs;
    * ``archive_paths``: tar and parquet files inside folder INPUTs (folders never open archives; an archive
      is read when it is named, matched by a glob or listed on stdin);
    * ``looping_links``: symbolic links that lead back to themselves or to a folder above them;
    * ``finished_archives``: archives the ``finished_archive`` hook of :func:`list_inputs` said are done, by
      name, with their number of images: not opened, not in ``sources`` (:attr:`finished_images`);

    and ``repeated``: the names given to images whose name an earlier image of their archive has
    (:func:`phi3embed.inputs.archives.unique_names`; they are listed, under these names)."""

    sources: Sequence[Source] = field(default_factory=SourceList)
    special_paths: set[str] = field(default_factory=set)
    archive_paths: set[str] = field(default_factory=set)
    looping_links: set[str] = field(default_factory=set)
    repeated: list[str] = field(default_factory=list)
    named_archives: set[str] = field(default_factory=set)  # archives read (named as INPUT): not skipped
    finished_archives: dict[str, int] = field(default_factory=dict)
    finished_paths: dict[str, str] = field(default_factory=dict, repr=False)  # name -> absolute path

    @property
    def special(self) -> int:
        """How many special files were skipped."""
        return len(self.special_paths)

    @property
    def finished_images(self) -> int:
        """The images of the finished archives: listed, and all done."""
        return sum(self.finished_archives.values())


#: ``finished_archive(absolute path, archive name, stat)``: the number of images of an archive whose images are
#: all done (it is then not opened), or None (it is listed).
FinishedArchive = Callable[[str, str, os.stat_result], int | None]


class _Lister:
    """One :func:`list_inputs` call: the segments found in listing order, and what was skipped."""

    def __init__(
        self,
        cwd: str,
        excluded: set[str],
        image_column: str | None,
        finished: FinishedArchive | None,
        shard: tuple[int, int] | None,
    ) -> None:
        self.cwd, self.excluded, self.image_column = cwd, excluded, image_column
        self.finished, self.shard = finished, shard
        self.listing = Listing()
        self.segments: list[_Segment] = []
        self.finished_hits = 0  # archives the hook said are done (a glob that finds only those found something)

    def loose(self, root: str, abs_root: str, *, explicit: bool = False) -> _Loose:
        """The segment the next loose files go to: the last one when it has the same root, else a new one."""
        last = self.segments[-1] if self.segments else None
        if (
            isinstance(last, _Loose)
            and last.root == root
            and last.abs_root == abs_root
            and (last.paths is not None) == explicit
        ):
            return last
        segment = _Loose(root, abs_root, self.cwd, explicit=explicit)
        self.segments.append(segment)
        return segment

    def file(self, path: str, name: str, root: str, abs_root: str, *, explicit: bool) -> None:
        """A listed file: one loose image, or the images of an archive (the archive's name is ``name``)."""
        if archive_kind(path) is None:
            self.loose(root, abs_root, explicit=explicit).add(name, path)
            return
        absolute = os.path.abspath(os.path.join(self.cwd, path))
        self.listing.named_archives.add(absolute)
        if self._finished(absolute, name):
            return
        members = list_archive(
            os.path.join(self.cwd, path),
            name,
            image_extensions=IMAGE_EXTENSIONS,
            image_column=self.image_column,
            repeated=self.listing.repeated,
        )
        self.segments.append(_Archive(path, root, members))

    def _finished(self, absolute: str, name: str) -> bool:
        """Whether the hook says the archive is done (then it is counted, not opened)."""
        if self.finished is None or (self.shard is not None and shard_of(name, self.shard[1]) != self.shard[0]):
            return False
        try:
            st = os.stat(absolute)
        except OSError:
            return False  # listed: reading it gives its error record
        if not stat.S_ISREG(st.st_mode):
            return False
        images = self.finished(absolute, name, st)
        if images is None:
            return False
        known = self.listing.finished_paths.setdefault(name, absolute)
        if known != absolute:
            _same_name(known, absolute, name)
        self.listing.finished_archives[name] = images
        self.finished_hits += 1
        return True

    def walk(self, folder: str, root: str, abs_root: str, prefix: str) -> None:
        """The images under ``folder`` (names ``prefix`` + the path below it), into the loose segment of
        ``root``; see :func:`_walk`."""
        add = self.loose(root, abs_root).names.append
        for name in _walk(folder, prefix, self.excluded, self.listing):
            add(name)

    def expand(self, arg: str) -> None:
        cwd = self.cwd
        path = os.path.join(cwd, arg) if not os.path.isabs(arg) else arg
        if os.path.isdir(path):
            self.walk(path, arg, os.path.abspath(path), "")
            return
        if os.path.lexists(path):  # a file, a broken link, a fifo...: taken as given
            self.file(arg, _name_of_file(arg, cwd), "", cwd, explicit=True)
            return
        if _GLOB_MAGIC.search(arg):
            self.glob(arg)
            return
        raise InputError("no such file or directory", path=arg)

    def glob(self, arg: str) -> None:
        cwd, skipped = self.cwd, self.listing
        root_arg = _glob_root(arg)
        root = os.path.join(cwd, root_arg)
        abs_root = os.path.abspath(root)
        segments, hits = len(self.segments), self.finished_hits
        last = len(self.segments[-1].names) if self.segments else 0
        loops: dict[str, str | None] = {}
        for match in sorted(glob.glob(os.path.join(cwd, arg) if not os.path.isabs(arg) else arg, recursive=True)):
            looping = _looping_link(os.path.dirname(os.path.abspath(match)), loops)
            if looping is not None:
                skipped.looping_links.add(looping)
                continue
            try:
                mode = os.stat(match).st_mode
            except OSError:  # a broken link: listed by its extension, to get an error record
                mode = None
            if mode is not None and stat.S_ISDIR(mode):
                under = _name_below(match, root, abs_root)
                self.walk(match, root_arg, abs_root, under + "/" if under else "")
            elif mode is not None and not stat.S_ISREG(mode):
                skipped.special_paths.add(os.path.abspath(match))
            elif mode is not None and archive_kind(match) is not None:
                self.file(_display(match, cwd), _name_below(match, root, abs_root), root_arg, abs_root, explicit=False)
            elif _has_image_extension(match) if mode is None else looks_like_image(match):
                self.loose(root_arg, abs_root).names.append(_name_below(match, root, abs_root))
        grown = segments > 0 and len(self.segments[segments - 1].names) > last
        if not grown and hits == self.finished_hits and not any(s.names for s in self.segments[segments:]):
            raise InputError("no image matches this pattern", path=arg)


def _name_below(path: str, root: str, abs_root: str) -> str:
    """:func:`_name_under` (``""`` for the root itself), without its path arithmetic when ``path`` is plainly
    ``abs_root/...`` (what glob gives for a pattern without ``.`` or ``..`` parts)."""
    if path.startswith(abs_root) and path[len(abs_root) : len(abs_root) + 1] == "/":
        rest = path[len(abs_root) + 1 :].rstrip("/")
        parts = rest.split("/")
        if rest and "" not in parts and "." not in parts and ".." not in parts and os.sep == "/":
            return rest
    name = _name_under(path, root)
    return "" if name == "." else name


def _name_of_file(path: str, cwd: str) -> str:
    """Name of a single listed file: relative to ``cwd`` when inside it, else absolute minus the anchor."""
    absolute = os.path.abspath(os.path.join(cwd, path))
    if absolute == cwd or absolute.startswith(cwd.rstrip(os.sep) + os.sep):
        rel = os.path.relpath(absolute, cwd)
    else:
        rel = absolute.lstrip(os.sep)
    return PurePosixPath(*Path(rel).parts).as_posix()


def _name_under(path: str, root: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    assert not rel.startswith(".."), (path, root)  # walk and glob results lie under their root
    return PurePosixPath(*Path(rel).parts).as_posix()


def _walk(root: str, prefix: str, excluded: set[str], skipped: Listing) -> Iterator[str]:
    """The names (``prefix`` + the path below ``root``) of the image files under ``root`` (hidden entries and
    ``excluded`` directories skipped, links to directories not followed); special files, archives and looping
    links found are noted in ``skipped``. One ``scandir`` per directory: the entry's type says what it is
    without a ``stat`` (only links, and file systems without ``d_type``, cost one)."""
    folders = [(root, prefix)]
    while folders:
        folder, below = folders.pop()
        try:
            entries = os.scandir(folder)
        except OSError:  # unreadable or vanished: os.walk's default, nothing listed from it
            continue
        with entries:
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                if entry.is_file(follow_symlinks=False):  # the usual case first: a regular file
                    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                        yield below + name
                        continue
                    kind = "file"
                else:
                    try:
                        kind = _entry_kind(entry)
                    except OSError as exc:
                        if exc.errno == errno.ELOOP:
                            skipped.looping_links.add(os.path.abspath(entry.path))
                        continue
                if kind == "dir":
                    if os.path.abspath(entry.path) not in excluded:
                        folders.append((entry.path, below + name + "/"))
                elif kind == "special":
                    skipped.special_paths.add(os.path.abspath(entry.path))
                elif kind == "broken" and _has_image_extension(name):
                    yield below + name  # listed, so that it gets an error record
                elif kind == "file" and archive_kind(name) is not None:
                    skipped.archive_paths.add(os.path.abspath(entry.path))
                elif kind == "file" and looks_like_image(entry.path):
                    yield below + name


def _entry_kind(entry: os.DirEntry[str]) -> str:
    """ "dir" (a real directory), "file" (a regular file, or a link to one), "link-dir" (a link to a directory:
    not followed), "broken" (a link to nothing) or "special" (pipe, socket, device, or a link to one)."""
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    if entry.is_file(follow_symlinks=False):
        return "file"
    if not entry.is_symlink():
        return "special"
    try:
        mode = entry.stat().st_mode  # the link's target
    except FileNotFoundError:
        return "broken"
    return "link-dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "special"


def _has_image_extension(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _glob_root(pattern: str) -> str:
    """The literal directories before the first component with a wildcard (``.`` when none)."""
    parts = Path(pattern).parts
    literal: list[str] = []
    for part in parts[:-1]:
        if _GLOB_MAGIC.search(part):
            break
        literal.append(part)
    return os.path.join(*literal) if literal else "."


def _looping_link(folder: str, cache: dict[str, str | None]) -> str | None:
    """The first symbolic link on the way to ``folder`` (absolute, links not resolved) that leads back to a
    folder at or above it, or None. ``**`` follows links to folders: through such a link the same files
    come again under ever longer names."""
    if folder in cache:
        return cache[folder]
    parent = os.path.dirname(folder)
    found = None
    if parent != folder:
        found = _looping_link(parent, cache)
        if found is None and os.path.islink(folder):
            target, above = os.path.realpath(folder), os.path.realpath(parent)
            if above == target or above.startswith(target.rstrip(os.sep) + os.sep):
                found = folder
    cache[folder] = found
    return found


_BRACE_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?|([A-Za-z])\.\.([A-Za-z])")


def expand_braces(text: str) -> list[str]:
    """Bash brace expansion: ``{a,b}`` alternatives, ``{000..099}`` ranges (zero-padded as written, with an
    optional step), ``{a..e}``, nested; a brace that is neither stays literal."""
    for start, char in enumerate(text):
        if char != "{":
            continue
        depth, commas, end = 0, [], -1
        options: list[str] | None
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    end = i
                    break
            elif text[i] == "," and depth == 1:
                commas.append(i)
        if end < 0:
            return [text]  # unbalanced: the rest is literal
        if commas:
            cuts = [start, *commas, end]
            options = [text[a + 1 : b] for a, b in zip(cuts, cuts[1:], strict=False)]
        else:
            options = _brace_range(text[start + 1 : end])
            if options is None:
                continue  # "{x}": literal, look further
        head, tail = text[:start], text[end + 1 :]
        return [out for option in options for out in expand_braces(head + option + tail)]
    return [text]


def _brace_range(body: str) -> list[str] | None:
    match = _BRACE_RANGE.fullmatch(body)
    if match is None:
        return None
    first, last, step_text, letter_a, letter_b = match.groups()
    if letter_a is not None:
        a, b = ord(letter_a), ord(letter_b)
        return [chr(c) for c in (range(a, b + 1) if a <= b else range(a, b - 1, -1))]
    a, b, step = int(first), int(last), abs(int(step_text or 1)) or 1
    padded = any(len(t.lstrip("-")) > 1 and t.lstrip("-").startswith("0") for t in (first, last))
    width = max(len(first), len(last)) if padded else 0
    values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
    return [f"{v:0{width}d}" for v in values]


def _display(path: str, cwd: str) -> str:
    """A path as people would type it: relative to ``cwd`` when it lies inside, else absolute."""
    absolute = os.path.abspath(path)
    if absolute.startswith(cwd.rstrip(os.sep) + os.sep):
        return os.path.relpath(absolute, cwd)
    return absolute


def read_path_list(stream: TextIO | BinaryIO) -> list[str]:
    """Newline-separated paths (as ``find`` prints them); blank lines are ignored, nothing is stripped
    except the line ending, so names with leading or trailing spaces survive. From a binary stream, paths
    that are not UTF-8 are decoded as ``os`` functions decode them (``os.fsdecode``)."""
    return list(_path_lines(stream))


def _path_lines(stream: TextIO | BinaryIO) -> Iterator[str]:
    """The paths of :func:`read_path_list`, one at a time."""
    for line in stream:
        text = (os.fsdecode(line) if isinstance(line, bytes) else line).rstrip("\r\n")
        if text:
            yield text


def list_inputs(
    inputs: Sequence[str],
    *,
    stdin: TextIO | None = None,
    cwd: str | None = None,
    exclude: Sequence[str] = (),
    image_column: str | None = None,
    finished_archive: FinishedArchive | None = None,
    shard: tuple[int, int] | None = None,
) -> Listing:
    """INPUT arguments -> sorted, de-duplicated sources, and what was skipped on the way (:class:`Listing`).
    ``-`` reads a path list from ``stdin``.

    ``finished_archive(absolute path, name, stat)`` is asked about each archive before it is opened; a number
    means all that many images of it are done: it is not opened, only counted (:attr:`Listing.finished_archives`).
    With ``shard`` (``(index, count)``) only the archives of that shard are asked about (the others are listed:
    :func:`select_shard` drops them).

    Raises InputError for an argument that names nothing, and when two different files would get the same
    name (and so the same output).
    """
    base = os.path.abspath(cwd or os.getcwd())
    lister = _Lister(base, {os.path.abspath(e) for e in exclude}, image_column, finished_archive, shard)
    for arg in inputs:
        if arg == "-":
            for line in _path_lines(stdin if stdin is not None else sys.stdin.buffer):
                lister.file(line, _name_of_file(line, base), "", base, explicit=True)
        else:
            literal = os.path.lexists(os.path.join(base, arg))  # a file really named "{a,b}.jpg" is that file
            for one in [arg] if literal else expand_braces(arg):
                lister.expand(one)
    listing = lister.listing
    _check_finished(lister.segments, listing, base)
    _drop_repeats(lister.segments, base)
    listing.sources = _arrange(lister.segments)
    listing.archive_paths -= listing.named_archives  # in a folder INPUT, but also named: read
    return listing


def _check_finished(segments: list[_Segment], listing: Listing, base: str) -> None:
    """An archive listed under the name of another, finished one: the two would share their outputs."""
    for segment in segments:
        if isinstance(segment, _Archive) and segment.members:
            name = segment.members[0].archive
            finished = listing.finished_paths.get(name)
            if finished is not None and finished != os.path.abspath(os.path.join(base, segment.archive_path)):
                _same_name(finished, segment.archive_path, name)


def _same_name(first: str, second: str, name: str) -> None:
    first, second = sorted([first, second])
    raise InputError(
        f"{first} and {second} would both be written as {name!r}; "
        "encode them in separate runs or list them relative to a common directory",
        path=name,
    )


def expand_inputs(
    inputs: Sequence[str],
    *,
    stdin: TextIO | None = None,
    cwd: str | None = None,
    exclude: Sequence[str] = (),
    image_column: str | None = None,
) -> Sequence[Source]:
    """The sources of :func:`list_inputs`, for callers that do not report skipped special files."""
    return list_inputs(inputs, stdin=stdin, cwd=cwd, exclude=exclude, image_column=image_column).sources


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise InputError(f"--shard must look like I/N (e.g. 0/4), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise InputError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


def shard_of(name: str, count: int) -> int:
    """Which of ``count`` shards ``name`` belongs to: a stable hash of the name, so adding files to the
    input never moves an existing image to another shard."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def select_shard(sources: Sequence[Source], index: int, count: int) -> Sequence[Source]:
    """The sources of shard ``index`` of ``count``, still sorted. All shards together are ``sources``. The
    images of one archive share its shard (:attr:`Source.group`): no part reads another's archives. From a
    :class:`SourceList`, another one (no Source object per image)."""
    if isinstance(sources, SourceList):
        return sources.select(index, count)
    return [s for s in sources if shard_of(s.group, count) == index]
