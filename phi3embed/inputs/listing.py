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
  Folders never open archives: a directory INPUT yields only its loose images.

Brace patterns (``data/{000..099}.tar``, ``{a,b}``) are expanded first, as bash does, for every kind of INPUT
(an argument that names an existing file is taken literally).

Only regular files are ever opened here. Named pipes, sockets and devices found in folders and globs are
skipped and counted (:attr:`Listing.special`): opening a pipe blocks until someone writes to it, reading a
device may never end. The type comes from the directory entry itself (``d_type``, no system call on most
file systems), so this rule costs no extra pass over the files.

Names never contain ``..`` or start with ``/``, so an output can never escape the output directory.
``select_shard`` splits the list for job arrays by a stable hash of each name (of the archive's name for the
images inside one, so that a part reads only its own archives).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import re
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TextIO

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


@dataclass
class Listing:
    """What the INPUTs name: the sources, and the special files (pipes, sockets, devices) skipped in folders
    and globs, by absolute path (one count however many INPUTs reach them)."""

    sources: list[Source]
    special_paths: set[str] = field(default_factory=set)

    @property
    def special(self) -> int:
        """How many special files were skipped."""
        return len(self.special_paths)


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


def _walk(root: str, excluded: set[str], special: set[str]) -> Iterator[str]:
    """Image files under ``root`` (hidden entries and ``excluded`` directories skipped, links to directories not
    followed); special files found are added to ``special``. One ``scandir`` per directory: the entry's type
    says what it is without a ``stat`` (only links, and file systems without ``d_type``, cost one)."""
    folders = [root]
    while folders:
        try:
            entries = os.scandir(folders.pop())
        except OSError:  # unreadable or vanished: os.walk's default, nothing listed from it
            continue
        with entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    kind = _entry_kind(entry)
                except OSError:
                    continue
                if kind == "dir":
                    if os.path.abspath(entry.path) not in excluded:
                        folders.append(entry.path)
                elif kind == "special":
                    special.add(os.path.abspath(entry.path))
                elif kind == "broken" and _has_image_extension(entry.name):
                    yield entry.path  # listed, so that it gets an error record
                elif kind == "file" and looks_like_image(entry.path):
                    yield entry.path


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


def _file(path: str, name: str, root: str, cwd: str, image_column: str | None) -> list[Source]:
    """A listed file: one source, or the images of an archive (the archive's name is ``name``)."""
    if archive_kind(path) is None:
        return [Source(name, path, root)]
    members = list_archive(os.path.join(cwd, path), name, image_extensions=IMAGE_EXTENSIONS, image_column=image_column)
    return [Source(member_name, path, root, member) for member_name, member in members]


def _expand_one(arg: str, cwd: str, excluded: set[str], special: set[str], image_column: str | None) -> list[Source]:
    path = os.path.join(cwd, arg) if not os.path.isabs(arg) else arg
    if os.path.isdir(path):
        return [Source(_name_under(p, path), _display(p, cwd), arg) for p in _walk(path, excluded, special)]
    if os.path.lexists(path):  # a file, a broken link, a fifo...: taken as given
        return _file(arg, _name_of_file(arg, cwd), "", cwd, image_column)
    if _GLOB_MAGIC.search(arg):
        root_arg = _glob_root(arg)
        root = os.path.join(cwd, root_arg)
        found: list[Source] = []
        for match in sorted(glob.glob(os.path.join(cwd, arg) if not os.path.isabs(arg) else arg, recursive=True)):
            try:
                mode = os.stat(match).st_mode
            except OSError:  # a broken link: listed by its extension, to get an error record
                mode = None
            if mode is not None and stat.S_ISDIR(mode):
                found.extend(
                    Source(_name_under(p, root), _display(p, cwd), root_arg) for p in _walk(match, excluded, special)
                )
            elif mode is not None and not stat.S_ISREG(mode):
                special.add(os.path.abspath(match))
            elif mode is not None and archive_kind(match) is not None:
                found.extend(_file(_display(match, cwd), _name_under(match, root), root_arg, cwd, image_column))
            elif _has_image_extension(match) if mode is None else looks_like_image(match):
                found.append(Source(_name_under(match, root), _display(match, cwd), root_arg))
        if not found:
            raise InputError("no image matches this pattern", path=arg)
        return found
    raise InputError("no such file or directory", path=arg)


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
    lines = (os.fsdecode(line) if isinstance(line, bytes) else line for line in stream)
    return [line.rstrip("\r\n") for line in lines if line.rstrip("\r\n")]


def list_inputs(
    inputs: Sequence[str],
    *,
    stdin: TextIO | None = None,
    cwd: str | None = None,
    exclude: Sequence[str] = (),
    image_column: str | None = None,
) -> Listing:
    """INPUT arguments -> sorted, de-duplicated sources, and the special files skipped on the way. ``-`` reads a
    path list from ``stdin``.

    Raises InputError for an argument that names nothing, and when two different files would get the same
    name (and so the same output).
    """
    base = os.path.abspath(cwd or os.getcwd())
    excluded = {os.path.abspath(e) for e in exclude}
    special: set[str] = set()
    found: list[Source] = []
    for arg in inputs:
        if arg == "-":
            for line in read_path_list(stdin if stdin is not None else sys.stdin.buffer):
                found.extend(_file(line, _name_of_file(line, base), "", base, image_column))
        else:
            literal = os.path.lexists(os.path.join(base, arg))  # a file really named "{a,b}.jpg" is that file
            for one in [arg] if literal else expand_braces(arg):
                found.extend(_expand_one(one, base, excluded, special, image_column))
    by_name: dict[str, Source] = {}
    for src in found:
        seen = by_name.get(src.name)
        if seen is None:
            by_name[src.name] = src
        elif os.path.abspath(os.path.join(base, seen.path)) != os.path.abspath(os.path.join(base, src.path)):
            first, second = sorted([seen.path, src.path])
            raise InputError(
                f"{first} and {second} would both be written as {src.name!r}; "
                "encode them in separate runs or list them relative to a common directory",
                path=src.name,
            )
    return Listing(sorted(by_name.values()), special)


def expand_inputs(
    inputs: Sequence[str],
    *,
    stdin: TextIO | None = None,
    cwd: str | None = None,
    exclude: Sequence[str] = (),
    image_column: str | None = None,
) -> list[Source]:
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


def select_shard(sources: Sequence[Source], index: int, count: int) -> list[Source]:
    """The sources of shard ``index`` of ``count``, still sorted. All shards together are ``sources``. The
    images of one archive share its shard (:attr:`Source.group`): no part reads another's archives."""
    return [s for s in sources if shard_of(s.group, count) == index]
