"""The temp area of a run and atomic publishing into the output directory ``DIR``.

Every file is written to ``DIR/.phi3embed-tmp/<tag>/``, fsynced, then renamed into place, so a reader or a
rerun never sees a partial output. That folder is also the run's lock (``flock``): a second run on the same
DIR and ``--shard`` part is refused, and a rerun deletes what a killed run left in it. The folders that
received renames are remembered until :meth:`Publisher.sync_folders` makes them durable: the manifest syncs
them before itself, so that after a power cut no durable record names a file whose rename was lost.
Output paths are checked to stay inside DIR (no ``..``, no symbolic link leading out). Names come storable
(:mod:`phi3embed.outputs.names`); a file system that still refuses one (a DIR path over 1023 bytes, a smaller
name limit, a file system that accepts only UTF-8) costs that one image an error record, not the job.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any

from phi3embed.errors import ImageError, Phi3EmbedError

try:  # advisory locks: POSIX only; elsewhere a second concurrent run is simply not detected
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TMP_DIR = ".phi3embed-tmp"
#: What ``os.link`` says where a copy must do: another device, links not supported or not allowed, too many.
LINK_REFUSED = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES})
#: What the file system says about a name it cannot hold: too long, not in its encoding.
NAME_REFUSED = frozenset({errno.ENAMETOOLONG, errno.EILSEQ})


def _name_refused(exc: OSError, rel: str) -> ImageError:
    return ImageError(f"the file system cannot hold this output name: {exc.strerror or exc}", path=rel)


class OutputError(Phi3EmbedError):
    """The output directory cannot be used (not writable, locked by another run, disk full...)."""


#: How an output failure is named: the causes people act on, in words that say what to do about them.
_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
    errno.EFBIG: "file too large for the file system",
}


def output_failure(exc: OSError, root: Path, doing: str) -> OutputError:
    """The one line for an output directory that failed while ``doing`` something (``writing a.jpg.npy``):
    ``DIR: <cause> (<doing>)``. The same words whatever wrote (a per-image file, a pack, the manifest), so
    every output failure ends a job the same way; a folder removed under the job says so."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE) and not os.path.isdir(root):
        cause = "the output folder was removed while the job ran"
    elif exc.errno in _CAUSES:
        cause = _CAUSES[exc.errno]
    else:
        text = exc.strerror or str(exc) or type(exc).__name__
        cause = text[:1].lower() + text[1:]
    return OutputError(f"{cause} ({doing})", path=root)


class WriteOnly:
    """A file seen through ``write`` alone, for ``np.save``. numpy writes an array to a real file with C
    ``fwrite``, which loses the reason of a short write ("72672 requested and 13280 written"); through this it
    writes with Python's ``write``, whose OSError keeps it (no space left, quota, read-only). Writers that need
    more of a file (pyarrow seeks and asks whether it is closed) get the file itself."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh

    def write(self, data: bytes | memoryview) -> int:
        return self._fh.write(data)


def write_file_atomically(final: Path, write: Callable[[IO[bytes]], object]) -> None:
    """``write`` a file that is not a job's output (a combined vector shard, an index) into place whole: a temp
    file beside ``final`` (its folder made), fsync, rename. Phi3EmbedError naming the file when that fails."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise Phi3EmbedError(f"cannot write {final}: {exc.strerror or exc}", path=final) from None


def save_npy(fh: IO[bytes], array: Any) -> None:
    """``np.save`` of ``array`` into ``fh`` through Python's ``write`` (:class:`WriteOnly`)."""
    import numpy as np

    np.save(WriteOnly(fh), array, allow_pickle=False)  # type: ignore[arg-type,unused-ignore]  # write() is all it needs


class Publisher:
    """Temp area, lock, atomic writes and folder durability for one run on ``root``.

    :meth:`atomic_write` and :meth:`safe_path` may run in several threads at once.
    """

    def __init__(self, root: Path, tag: str) -> None:
        self.root, self.tag = root, tag
        self.real = Path(os.path.realpath(root))
        self.tmp = self.real / TMP_DIR / tag
        self._lock = threading.Lock()  # what writing threads share: folders, temp names, counters
        self._lock_fd: int | None = None
        self._tmp_count = 0
        self._checked_dirs: set[str] = set()
        self._dirty_dirs: set[Path] = set()  # folders with renames not yet made durable (fsync)
        self.bytes_written = 0
        self.files_written = 0

    def open(self) -> None:
        """Take the lock and delete what a killed run left behind (OSError on an unusable DIR)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.tmp, os.O_RDONLY)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                what = "this --shard part of the job" if self.tag != "all" else "it"
                raise OutputError(f"another phi3embed encode is writing {what} right now", path=self.root) from None
        self._lock_fd = fd
        for stale in self.tmp.iterdir():
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()

    def close(self) -> None:
        """Remove the temp area (and its parent when no other part's run uses it), release the lock."""
        if self._lock_fd is None:
            return
        shutil.rmtree(self.tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.tmp.parent.rmdir()
        os.close(self._lock_fd)
        self._lock_fd = None

    def safe_path(self, rel: str) -> Path:
        """DIR/rel, creating folders; refuses names and symbolic links that would lead outside DIR."""
        parts = PurePosixPath(rel).parts
        if (
            not rel
            or rel.startswith("/")
            or any(p in ("", ".", "..") for p in parts)
            or "\0" in rel
            or parts[0] == TMP_DIR
        ):
            raise ImageError(f"unsafe output name {rel!r}", path=rel)
        try:
            with self._lock:
                current = self.real
                for i, part in enumerate(parts[:-1]):
                    current = current / part
                    sub = "/".join(parts[: i + 1])
                    if sub not in self._checked_dirs:
                        self._check_folder(current, sub, rel)
                        self._checked_dirs.add(sub)
            final = current / parts[-1]
            if final.is_dir() and not final.is_symlink():
                raise ImageError("output path exists and is a folder", path=rel)
        except OSError as exc:
            if exc.errno not in NAME_REFUSED:
                raise
            raise _name_refused(exc, rel) from None
        return final

    def _check_folder(self, folder: Path, sub: str, rel: str) -> None:
        if folder.is_symlink():
            real = os.path.realpath(folder)
            if not (real == str(self.real) or real.startswith(str(self.real) + os.sep)):
                raise ImageError(f"output folder {sub} is a symbolic link leading outside {self.root}", path=rel)
        if not folder.exists():
            folder.mkdir()
        elif not folder.is_dir():
            raise ImageError(f"output folder {sub} exists and is not a folder", path=rel)

    def atomic_write(self, final: Path, write: Callable[[IO[bytes]], None]) -> int:
        """``write`` into a temp file, fsync it, rename it to ``final``; its size in bytes. OutputError when
        that fails."""

        def fill(tmp: Path) -> int:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
                return fh.tell()

        return self._publish(final, fill)

    def link_or_copy(self, existing: Path, final: Path) -> bool:
        """Publish ``existing`` (a file already in place in DIR) under ``final`` too: a hard link (no new
        bytes), or a copy where the filesystem refuses links (another device, no link support, too many
        links); same temp name + rename rules as :meth:`atomic_write`. True when it linked."""
        linked = True

        def fill(tmp: Path) -> int:
            nonlocal linked
            try:
                os.link(existing, tmp)
                return 0
            except OSError as exc:
                if exc.errno not in LINK_REFUSED:
                    raise
            linked = False
            with open(existing, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
                return dst.tell()

        self._publish(final, fill)
        return linked

    def _publish(self, final: Path, fill: Callable[[Path], int]) -> int:
        """``fill`` a fresh temp path (returns the bytes it wrote), rename it to ``final``, note the folder;
        the bytes written."""
        with self._lock:
            self._tmp_count += 1
            tmp = self.tmp / f"{self._tmp_count:09d}.part"
        try:
            size = fill(tmp)
            os.replace(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):  # a read-only or removed folder refuses this too
                tmp.unlink(missing_ok=True)
            if exc.errno in NAME_REFUSED and exc.filename2 is not None:  # the rename: this name, not DIR
                raise _name_refused(exc, os.path.relpath(final, self.real)) from None
            raise output_failure(exc, self.root, f"writing {self.relative(final)}") from None
        with self._lock:
            self._dirty_dirs.add(final.parent)
            self.bytes_written += size
            self.files_written += 1
        return size

    def relative(self, path: Path) -> str:
        """``path`` (inside DIR) as people name it in messages: relative to DIR."""
        try:
            return path.relative_to(self.real).as_posix()
        except ValueError:
            return str(path)

    def remove(self, path: Path) -> None:
        """Delete a published file (if there), its folder noted for the next :meth:`sync_folders`."""
        path.unlink(missing_ok=True)
        with self._lock:
            self._dirty_dirs.add(path.parent)

    def sync_folders(self) -> None:
        """Make the renames so far durable (kill -9 cannot undo a rename; a power cut can)."""
        with self._lock:
            dirty, self._dirty_dirs = self._dirty_dirs, set()
        for folder in sorted(dirty):
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
