"""Images inside archives: WebDataset-style tar files and parquet files, listed from their headers and read
in place, never extracted.

Listing reads only what names the images: a tar file's member headers (the data is skipped by seeking), a
parquet file's metadata and its key column. Each image becomes a :class:`~phi3embed.inputs.listing.Source` whose
``path`` is the archive and whose ``member`` (:class:`Member`) says where its bytes are:

* tar: every regular member with an image extension; its name is ``<archive name>/<member path>``
  (``000.tar/sample0001.jpg``). Sibling members (``.txt``, ``.json``, ``.cls``...) and folders are not images.
* parquet: one image per row of the image column (``image_column``; by default the first of ``image``,
  ``jpg``, ``png``, ``img``), a Hugging Face image struct ``{bytes, path}`` or plain bytes; its name is
  ``<file name>/<key>``, the key from a ``__key__``, ``key`` or ``id`` column, else the row number in 8 digits.

Bad data costs one record each: a member whose name would lead outside the output directory (``..``, an
absolute path), a link or device member, a null row, or an archive that breaks (truncated, an unreadable
header) gets a source whose member carries the error line; an archive that breaks keeps the members listed
before the break, and the break is one more source named after the archive.

:func:`read_member` gives a member's bytes by one positioned read (tar) or from the row group (parquet),
holding a few open archives and one row group per process.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from phi3embed.errors import ImageError, Phi3EmbedError

TAR_EXTENSIONS = frozenset({".tar"})
PARQUET_EXTENSIONS = frozenset({".parquet"})
IMAGE_COLUMNS = ("image", "jpg", "png", "img")  # the default image column: the first present
KEY_COLUMNS = ("__key__", "key", "id")  # the row key: the first present, else the row number


@dataclass(frozen=True, slots=True)
class Member:
    """Where an image lies inside an archive (``Source.path``): a tar member's data, or a parquet row."""

    archive: str  # the archive's name: the prefix of its images' names, and what --shard hashes
    index: int  # order inside the archive (tar: member number, parquet: row number): the read order
    inner: str  # tar: the member's path; parquet: the row's key
    offset: int = 0  # tar: the first byte of the data; parquet: the row group
    size: int = 0  # tar: bytes of data; parquet: the row inside its row group
    column: str = ""  # parquet: the image column ("" for tar)
    error: str = ""  # why this cannot be read (unsafe name, the archive broke here): its error record


class ParquetUnavailableError(Phi3EmbedError):
    """pyarrow is not installed (the ``parquet`` extra)."""


def archive_kind(path: str) -> str | None:
    """``"tar"``, ``"parquet"`` or None, from the extension."""
    ext = os.path.splitext(path)[1].lower()
    return "tar" if ext in TAR_EXTENSIONS else "parquet" if ext in PARQUET_EXTENSIONS else None


def member_label(path: str, member: Member) -> str:
    """How errors name a member: ``<archive path>/<member path>`` (the archive alone for a break)."""
    return f"{path}/{member.inner}" if member.inner else path


# --------------------------------------------------------------------------- listing


def safe_inner(inner: str) -> str | None:
    """A member path as a relative name (``./a//b.jpg`` -> ``a/b.jpg``), or None when it would lead out of
    the output directory (``..``, absolute) or names nothing."""
    parts = inner.split("/")
    if inner.startswith("/") or ".." in parts:
        return None  # (names the file system cannot hold, e.g. with a NUL byte, get a storable output name)
    kept = [p for p in parts if p not in ("", ".")]
    return "/".join(kept) or None


def list_archive(
    path: str, name: str, *, image_extensions: frozenset[str], image_column: str | None = None
) -> list[tuple[str, Member]]:
    """``(name, member)`` of every image in the archive at ``path`` (its name ``name``), in archive order;
    errors as members with an ``error``. A file that cannot be opened is one error named ``name``."""
    try:
        with open(path, "rb") as fh:  # noqa: PTH123 - a plain file object for tarfile / pyarrow
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                return [(name, Member(name, 0, "", error="not a regular file"))]
            if archive_kind(path) == "parquet":
                return _list_parquet(fh, name, image_column=image_column)
            return _list_tar(fh, st.st_size, name, image_extensions)
    except OSError as exc:
        return [(name, Member(name, 0, "", error=f"cannot read the archive: {exc.strerror or exc}"))]


def _list_tar(fh: Any, size: int, name: str, image_extensions: frozenset[str]) -> list[tuple[str, Member]]:
    if size == 0:
        return [(name, Member(name, 0, "", error="empty archive (0 bytes)"))]
    found: list[tuple[str, Member]] = []
    seen: set[str] = set()
    index = 0
    for info in _tar_headers(fh, size):
        if isinstance(info, str):  # the archive broke here: one more record, named after the archive
            found.append((name, Member(name, index, "", error=info)))
            break
        if info.isdir() or os.path.splitext(info.name)[1].lower() not in image_extensions:
            continue
        inner = safe_inner(info.name)
        if inner is None:
            error = f"unsafe member name {info.name!r}: it would be written outside the output directory"
            found.append((f"{name}/{info.name}", Member(name, index, info.name, error=error)))
        elif inner in seen:
            continue  # a member stored twice (tar --append): the first one is the image
        else:
            seen.add(inner)
            error = "" if info.isreg() and not info.sparse else f"not a regular file ({_tar_kind(info)})"
            found.append((f"{name}/{inner}", Member(name, index, inner, info.offset_data, info.size, error=error)))
        index += 1
    return found


_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


def _tar_headers(fh: Any, size: int) -> Iterator[tarfile.TarInfo | str]:
    """Every member header of a tar file of ``size`` bytes, in order, then, unless it ends with an end-of-archive
    block, where and how it broke (a str). Data is skipped, never read. Plain ustar headers of files and folders
    (what WebDataset writers produce) are parsed here, several times faster than by tarfile; any other header
    (pax and GNU long names, links, devices, a bad checksum) is read by tarfile, from that header on."""
    offset, last = 0, ""
    while True:
        where = f"after member {last}" if last else "before the first member"
        fh.seek(offset)
        block = fh.read(tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE:
            yield f"truncated at byte {size} ({where})"
            return
        if block == _ZERO_BLOCK:
            return
        info = _plain_header(block, offset)
        if info is None:
            fh.seek(offset)
            try:  # tarfile reads from where the file is: this header, and any extended header before the member
                tf = tarfile.open(fileobj=fh, mode="r:")  # noqa: SIM115 - nothing to close: ``fh`` is ours
                info = tf.next()
            except tarfile.TarError:
                info = None
            if info is None:
                yield f"unreadable member header at byte {offset} ({where})"
                return
            following = tf.offset
        else:
            following = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if info.offset_data + info.size > size:
            yield f"truncated at byte {size} (in member {info.name})"
            return
        yield info
        offset, last = following, info.name


def _plain_header(block: bytes, offset: int) -> tarfile.TarInfo | None:
    """A ustar / v7 header of a regular file or folder with a valid checksum, as tarfile would read it; None for
    anything else."""
    kind = block[156:157]
    if kind not in (b"0", b"\0", b"5") or block[124] & 0x80:  # other types, or a base-256 size: tarfile's
        return None
    try:
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        checksum = int(block[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        return None
    raw = block[:100].split(b"\0", 1)[0]
    if block[257:265] == b"ustar\x0000" and block[345] != 0:  # POSIX ustar: a prefix holds the leading folders
        raw = block[345:500].split(b"\0", 1)[0] + b"/" + raw
    name = raw.decode("utf-8", "surrogateescape")
    info = tarfile.TarInfo(name)
    info.size, info.offset, info.offset_data = size, offset, offset + tarfile.BLOCKSIZE
    if kind == b"5" or name.endswith("/"):
        info.type, info.name = tarfile.DIRTYPE, name.rstrip("/")
    return info


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"symbolic link to {info.linkname}"
    if info.islnk():
        return f"hard link to {info.linkname}"
    if info.sparse:
        return "sparse member"
    return {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "named pipe"}.get(
        info.type, "special member"
    )


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ParquetUnavailableError("reading parquet files needs pyarrow: pip install 'phi3embed[parquet]'") from None
    return pq


def parquet_image_column(names: Sequence[str], wanted: str | None) -> str | None:
    """The image column: ``wanted`` when given and present, else the first of :data:`IMAGE_COLUMNS` present."""
    if wanted:
        return wanted if wanted in names else None
    return next((c for c in IMAGE_COLUMNS if c in names), None)


def _list_parquet(fh: Any, name: str, *, image_column: str | None) -> list[tuple[str, Member]]:
    pq = _pyarrow_parquet()
    try:
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        column = parquet_image_column(names, image_column)
        if column is None:
            wanted = repr(image_column) if image_column else "one of " + ", ".join(IMAGE_COLUMNS)
            return [(name, Member(name, 0, "", error=f"no image column ({wanted}) among {', '.join(names)}"))]
        key_column = next((c for c in KEY_COLUMNS if c in names), None)
        found: list[tuple[str, Member]] = []
        seen: set[str] = set()
        row = 0
        for group in range(pf.metadata.num_row_groups):
            count = pf.metadata.row_group(group).num_rows
            keys = (
                [_key_text(k) for k in pf.read_row_group(group, columns=[key_column])[0].to_pylist()]
                if key_column
                else [None] * count
            )
            for i, key in enumerate(keys):
                inner = f"{row:08d}" if key is None else safe_inner(key)
                if inner is None:
                    error = f"unsafe key {key!r}: it would be written outside the output directory"
                    found.append((f"{name}/{key}", Member(name, row, str(key), group, i, column, error=error)))
                elif inner not in seen:  # a repeated key: the first row is the image
                    seen.add(inner)
                    found.append((f"{name}/{inner}", Member(name, row, inner, group, i, column)))
                row += 1
    except Exception as exc:  # pyarrow raises its own types for broken files
        if isinstance(exc, ParquetUnavailableError):
            raise
        return [(name, Member(name, 0, "", error=f"not a readable parquet file ({_one_line(exc)})"))]
    return found


def _key_text(key: Any) -> str | None:
    """A parquet key cell as a name: text as it is, a binary key's bytes decoded as ``os`` functions decode a
    file name (UTF-8; bytes that are not UTF-8 kept exactly, as lone surrogates), numbers and others by ``str``."""
    if key is None:
        return None
    return bytes(key).decode("utf-8", "surrogateescape") if isinstance(key, (bytes, bytearray)) else str(key)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --------------------------------------------------------------------------- reading


class _OpenArchives:
    """A few archives held open per process (members of one archive are read one after another), and the last
    parquet row group read."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.fds: OrderedDict[str, int] = OrderedDict()
        self.group: tuple[tuple[str, int, str, int], Any] | None = None

    def fd(self, path: str) -> int:
        fd = self.fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
            while len(self.fds) >= self.keep:
                os.close(self.fds.popitem(last=False)[1])
        self.fds[path] = fd
        return fd

    def row_group(self, path: str, group: int, column: str, mtime_ns: int) -> Any:
        key = (path, group, column, mtime_ns)
        if self.group is None or self.group[0] != key:
            self.group = None  # the old one is let go before the new one is read
            pq = _pyarrow_parquet()
            with open(path, "rb") as fh:  # noqa: PTH123
                self.group = (key, pq.ParquetFile(fh).read_row_group(group, columns=[column])[0])
        return self.group[1]


_OPEN = _OpenArchives()


def read_member(
    path: str, member: Member, *, max_bytes: int, archive_label: str | None = None
) -> tuple[bytes, os.stat_result]:
    """A member's bytes and the archive's ``stat`` (what resume compares); ImageError naming the member
    (``<archive_label>/<member path>``, ``archive_label`` by default ``path``)."""
    label = member_label(archive_label or path, member)
    if member.error:
        raise ImageError(member.error, path=label)
    try:
        fd = _OPEN.fd(path)
        st = os.fstat(fd)
    except OSError as exc:
        raise ImageError(f"cannot read the archive: {exc.strerror or exc}", path=label) from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("the archive is not a regular file", path=label)
    if member.column:
        data = _parquet_cell(path, member, st, label)
    else:
        if member.size > max_bytes:
            raise ImageError(
                f"member too large for an image ({member.size:,} bytes; the limit is {max_bytes:,})", path=label
            )
        try:
            data = os.pread(fd, member.size, member.offset)
        except OSError as exc:
            raise ImageError(f"cannot read the archive: {exc.strerror or exc}", path=label) from None
        if len(data) < member.size:
            raise ImageError(f"the archive is truncated at byte {st.st_size} (in this member)", path=label)
    if not data:
        raise ImageError("empty member (0 bytes)", path=label)
    return data, st


def _parquet_cell(path: str, member: Member, st: os.stat_result, label: str) -> bytes:
    try:
        cell = _OPEN.row_group(path, member.offset, member.column, st.st_mtime_ns)[member.size].as_py()
    except ParquetUnavailableError:
        raise
    except Exception as exc:
        raise ImageError(f"cannot read the row ({_one_line(exc)})", path=label) from None
    if isinstance(cell, dict):  # the Hugging Face image struct {bytes, path}
        cell = cell.get("bytes")
    if cell is None:
        raise ImageError(f"null image in column {member.column!r}", path=label)
    if not isinstance(cell, (bytes, bytearray)):
        raise ImageError(f"column {member.column!r} holds {type(cell).__name__}, not image bytes", path=label)
    return bytes(cell)
