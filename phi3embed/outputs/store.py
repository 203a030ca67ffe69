"""Where embeddings go: npy / safetensors files or packed shards, the manifest, atomic writes, resume.

:class:`OutputStore` owns an output directory ``DIR``:

* one file per image, ``DIR/<name>.npy`` or ``DIR/<name>.safetensors`` (key ``image_embeds``, string
  metadata), or with ``pack_bytes`` numbered shards ``DIR/emb-00000.safetensors`` holding one tensor per
  image under the key ``<name>``;
* ``DIR/manifest.jsonl``: one JSON record per image and attempt, appended with one ``write`` call per line
  (a crash can only lose whole lines) and fsynced at intervals, after the folders of the files renamed
  since the last sync (so after a power cut no durable record names a file whose rename was lost);
* every file is written to ``DIR/.phi3embed-tmp/<tag>/``, fsynced, then renamed into place, so a reader
  or a rerun never sees a partial output. That folder is also the run's lock (``flock``): a second run on
  the same DIR and shard is refused, and a rerun deletes what a killed run left in it.
* resume: :meth:`OutputStore.is_done` is true when the latest record for the image is ``ok``, was made
  with the same model fingerprint and settings (:meth:`OutputSettings.signature`), its output exists, and
  the source file still has the recorded size and modification time.

Packed shards are the unit of commit: a shard is renamed into place when full (or at the end), and only
then are its records appended. Shard contents depend only on the sorted input order and the tensor sizes,
so a run killed at any moment and rerun writes byte-identical shards. Each shard also carries its records
in its metadata, so a kill between the rename and the manifest append is repaired on the next open.

The store is used from one thread at a time, except :meth:`OutputStore.write_file`, which several threads may
run at once (per-image formats: one fsync per file, and a disk takes several in parallel faster than one
after another); its records then go to :meth:`OutputStore.commit` from one thread, in input order. The local
engine (:mod:`phi3embed.jobs.local`) does that from its writer threads; another engine producing tensors elsewhere
can reuse the store unchanged to get the same files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, NamedTuple

import numpy as np
import torch

from phi3embed.errors import ConfigError, ImageError, Phi3EmbedError
from phi3embed.inputs.listing import Source

try:  # advisory locks: POSIX only; elsewhere a second concurrent run is simply not detected
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

MANIFEST = "manifest.jsonl"
TMP_DIR = ".phi3embed-tmp"
EMBED_KEY = "image_embeds"
PACK_FORMAT = "phi3embed-pack/1"
Format = Literal["npy", "safetensors", "pack"]

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class OutputError(Phi3EmbedError):
    """The output directory cannot be used (not writable, locked by another run, disk full...)."""


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class OutputSettings:
    """Everything that determines the stored bytes (plus ``device``, recorded for information)."""

    model: str  # what the user passed: hub id, preset or path
    fingerprint: str  # of the vision weights (Phi3VisionEmbedder.fingerprint)
    num_crops: int
    dtype: torch.dtype  # stored
    compute_dtype: torch.dtype
    format: Format = "npy"
    pack_bytes: int | None = None  # target shard size, only with format "pack"
    alpha: str = "drop"
    exif_transpose: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in _ST_DTYPES or self.compute_dtype not in _ST_DTYPES:
            raise ConfigError("dtypes must be float32, float16 or bfloat16")
        if self.format == "npy" and self.dtype == torch.bfloat16:
            raise ConfigError("npy cannot store bfloat16: use --format safetensors, or --out-dtype float32/float16")
        if (self.format == "pack") != (self.pack_bytes is not None):
            raise ConfigError("pack_bytes goes with format 'pack' and only with it")

    def signature(self) -> tuple[Any, ...]:
        """What a finished record must match to be skipped on resume."""
        return (
            self.fingerprint,
            self.num_crops,
            dtype_name(self.dtype),
            dtype_name(self.compute_dtype),
            self.format,
            self.alpha,
            self.exif_transpose,
        )


def record_signature(record: dict[str, Any]) -> tuple[Any, ...]:
    keys = ("fingerprint", "num_crops", "dtype", "compute_dtype", "format", "alpha", "exif_transpose")
    return tuple(record.get(k) for k in keys)


@dataclass(frozen=True)
class ImageFacts:
    """What was learnt about one source while reading it (any field may be unknown after a failure)."""

    sha256: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    width: int | None = None
    height: int | None = None
    image_sizes: tuple[int, int] | None = None  # (H', W')
    crops: tuple[int, int] | None = None  # (rows, cols)
    num_tokens: int | None = None


# --------------------------------------------------------------------------- file formats


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A CPU contiguous tensor -> its little-endian bytes as a flat uint8 array (no copy)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def write_safetensors(
    fh: IO[bytes], tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file deterministically (tensors in the given order, JSON header padded to 8)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _ST_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    blob += b" " * (-len(blob) % 8)
    fh.write(struct.pack("<Q", len(blob)))
    fh.write(blob)
    for _, tensor in tensors:
        fh.write(_tensor_bytes(tensor).data)


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (header only)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise OutputError("not a safetensors file (shorter than 8 bytes)", path=Path(path))
        (n,) = struct.unpack("<Q", head)
        if n > 1 << 30:
            raise OutputError("not a safetensors file (header length is implausible)", path=Path(path))
        header = json.loads(fh.read(n))
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def iter_manifest(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Records of a manifest, oldest first. Lines that are not complete JSON objects are skipped."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return
    with fh:
        for line in fh:
            if not line.endswith(b"\n"):
                continue  # torn last line of a killed writer on a filesystem that allows it
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("name"), str):
                yield record


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Seen(NamedTuple):
    ok: bool
    output: str | None
    signature: tuple[Any, ...]
    size: int | None
    mtime_ns: int | None


@dataclass
class _PendingShard:
    entries: list[tuple[dict[str, Any], torch.Tensor]] = field(default_factory=list)
    nbytes: int = 0


# --------------------------------------------------------------------------- the store


class OutputStore:
    """Outputs, manifest and resume for one output directory. See the module docstring for the rules."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        settings: OutputSettings,
        *,
        overwrite: bool = False,
        shard: tuple[int, int] | None = None,
        on_record: Callable[[dict[str, Any]], None] | None = None,
        fsync_interval: float = 2.0,
    ) -> None:
        self.root = Path(root)
        self.settings = settings
        self.overwrite = overwrite
        self.tag = f"{shard[0]}of{shard[1]}" if shard else "all"
        self._pack_prefix = f"emb-{shard[0]}of{shard[1]}-" if shard else "emb-"
        self.on_record = on_record
        self.fsync_interval = fsync_interval
        self._signature = settings.signature()
        self._seen: dict[str, _Seen] = {}
        self._attempts: dict[str, int] = {}
        self._checked_dirs: set[str] = set()
        self._files_lock = threading.Lock()  # what write_file threads share: folders, temp names, counters
        self._tmp_count = 0
        self._dirty_dirs: set[Path] = set()  # folders with renames not yet made durable (fsync)
        self._manifest_fd: int | None = None
        self._lock_fd: int | None = None
        self._last_sync = 0.0
        self._pending = _PendingShard()
        self._next_shard = 0
        self.bytes_written = 0
        self.files_written = 0
        self.recovered = 0  # records restored from shard metadata at open
        self.skipped_lines = 0

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> OutputStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> OutputStore:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._real = Path(os.path.realpath(self.root))
            self._tmp = self._real / TMP_DIR / self.tag
            self._lock()
            for stale in self._tmp.iterdir():  # what a killed run left behind
                if stale.is_dir():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
            self._load_manifest()
            self._manifest_fd = os.open(self._real / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if os.fstat(self._manifest_fd).st_size:
                with open(self._real / MANIFEST, "rb") as fh:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":  # a torn line: start ours on a fresh one
                        os.write(self._manifest_fd, b"\n")
            if self.settings.format == "pack":
                self._recover_shards()
        except OSError as exc:
            raise OutputError(f"cannot use the output directory: {exc.strerror or exc}", path=self.root) from None
        self._last_sync = time.monotonic()
        return self

    def _lock(self) -> None:
        self._tmp.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._tmp, os.O_RDONLY)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                what = "this shard of the job" if self.tag != "all" else "it"
                raise OutputError(f"another phi3embed encode is writing {what} right now", path=self.root) from None
        self._lock_fd = fd

    def close(self) -> None:
        """Write the last (partial) shard, sync the manifest, remove the temp folder, release the lock."""
        try:
            if self._manifest_fd is not None:
                self.flush()
                os.close(self._manifest_fd)
                self._manifest_fd = None
        finally:
            if self._lock_fd is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                with contextlib.suppress(OSError):  # only when no other shard's run is using it
                    self._tmp.parent.rmdir()
                os.close(self._lock_fd)
                self._lock_fd = None

    def flush(self) -> None:
        if self._pending.entries:
            self._write_shard()
        if self._manifest_fd is not None:
            self._sync()

    def _sync(self) -> None:
        """Make the renames so far durable, then the manifest: a record on disk never names a file whose
        rename a power loss could still undo (kill -9 cannot undo a rename; a power cut can)."""
        assert self._manifest_fd is not None
        with self._files_lock:
            dirty, self._dirty_dirs = self._dirty_dirs, set()
        for folder in sorted(dirty):
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.fsync(self._manifest_fd)
        self._last_sync = time.monotonic()

    # ------------------------------------------------------------------ resume

    def _load_manifest(self) -> None:
        for record in iter_manifest(self._real / MANIFEST):
            name = record["name"]
            self._attempts[name] = self._attempts.get(name, 0) + 1
            self._seen[name] = _Seen(
                ok=record.get("status") == "ok",
                output=record.get("output"),
                signature=record_signature(record),
                size=record.get("size"),
                mtime_ns=record.get("mtime_ns"),
            )

    def output_name(self, source: Source) -> str:
        """Where ``source``'s embeddings go, relative to DIR (per-image formats)."""
        return f"{source.name}.{self.settings.format}"

    def is_done(self, source: Source) -> bool:
        """True when the image need not be encoded again (see the module docstring)."""
        if self.overwrite:
            return False
        seen = self._seen.get(source.name)
        if seen is None or not seen.ok or seen.signature != self._signature or seen.output is None:
            return False
        if self.settings.format != "pack" and seen.output != self.output_name(source):
            return False
        if not (self._real / seen.output).is_file():
            return False
        try:
            st = os.stat(source.path)
        except OSError:
            return False
        return st.st_size == seen.size and st.st_mtime_ns == seen.mtime_ns

    # ------------------------------------------------------------------ records

    def _record(
        self,
        source: Source,
        facts: ImageFacts | None,
        *,
        status: str,
        output: str | None = None,
        key: str | None = None,
        shape: Sequence[int] | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        f = facts or ImageFacts()
        s = self.settings
        return {
            "name": source.name,
            "source": source.path,
            "status": status,
            "output": output,
            "key": key,
            "error": error,
            "width": f.width,
            "height": f.height,
            "image_sizes": list(f.image_sizes) if f.image_sizes else None,
            "crops": list(f.crops) if f.crops else None,
            "num_tokens": f.num_tokens,
            "shape": list(shape) if shape is not None else None,
            "dtype": dtype_name(s.dtype),
            "num_crops": s.num_crops,
            "model": s.model,
            "fingerprint": s.fingerprint,
            "compute_dtype": dtype_name(s.compute_dtype),
            "format": s.format,
            "alpha": s.alpha,
            "exif_transpose": s.exif_transpose,
            "device": s.device,
            "sha256": f.sha256,
            "size": f.size,
            "mtime_ns": f.mtime_ns,
        }

    def _append(self, records: Sequence[dict[str, Any]]) -> None:
        """Stamp and append records with ONE write call, then tell ``on_record``."""
        assert self._manifest_fd is not None, "store is not open"
        stamped = []
        for record in records:
            name = record["name"]
            self._attempts[name] = self._attempts.get(name, 0) + 1
            stamped.append({**record, "attempt": self._attempts[name], "time": _now()})
        data = b"".join(json.dumps(r, ensure_ascii=True).encode() + b"\n" for r in stamped)
        try:
            os.write(self._manifest_fd, data)
            if time.monotonic() - self._last_sync > self.fsync_interval:
                self._sync()
        except OSError as exc:
            raise OutputError(
                f"cannot append to the manifest: {exc.strerror or exc}", path=self.root / MANIFEST
            ) from None
        for r in stamped:
            self._seen[r["name"]] = _Seen(
                r["status"] == "ok", r["output"], record_signature(r), r["size"], r["mtime_ns"]
            )
            if self.on_record is not None:
                self.on_record(r)

    def write_error(self, source: Source, error: str, facts: ImageFacts | None = None) -> dict[str, Any]:
        """Record that ``source`` failed (``error``: one line naming the file and the reason)."""
        return self.commit(self._error_record(source, error, facts))

    def _error_record(self, source: Source, error: str, facts: ImageFacts | None) -> dict[str, Any]:
        return self._record(source, facts, status="error", error=" ".join(error.split()))

    def write(self, source: Source, facts: ImageFacts, embeddings: torch.Tensor) -> dict[str, Any]:
        """Store one image's ``[T, D]`` embeddings (any device/dtype; converted to the stored dtype).

        Returns the record. Per-image formats append it at once; packed records are appended when their
        shard is written. A problem with this one output (e.g. its folder would leave DIR) gives an error
        record instead; a problem with DIR itself raises OutputError.
        """
        if self.settings.format == "pack":
            return self._add_to_shard(source, facts, self._host_tensor(embeddings))
        return self.commit(self.write_file(source, facts, embeddings))

    @property
    def concurrent_files(self) -> bool:
        """Whether :meth:`write_file` applies (per-image formats), so that several files can be written at once."""
        return self.settings.format != "pack"

    def commit(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append a record from :meth:`write_file` to the manifest (one thread, in input order)."""
        self._append([record])
        return record

    def _host_tensor(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings.detach().to(self.settings.dtype).to("cpu").contiguous()

    def write_file(self, source: Source, facts: ImageFacts, embeddings: torch.Tensor) -> dict[str, Any]:
        """Per-image formats: write ``source``'s file durably into place and return its record, which is not
        in the manifest until :meth:`commit`. Several threads may call this at once. A problem with this
        one output gives an error record; a problem with DIR itself raises OutputError."""
        assert self.concurrent_files, "packed shards are written by write()"
        tensor = self._host_tensor(embeddings)
        rel = self.output_name(source)
        try:
            with self._files_lock:
                final = self._safe_path(rel)
        except ImageError as exc:
            return self._error_record(source, str(exc), facts)
        if self.settings.format == "npy":
            array = tensor.numpy()
            self._atomic_write(final, lambda fh: np.save(fh, array, allow_pickle=False))
            key = None
        else:
            meta = self._file_metadata(source, facts)
            self._atomic_write(final, lambda fh: write_safetensors(fh, [(EMBED_KEY, tensor)], meta))
            key = EMBED_KEY
        return self._record(source, facts, status="ok", output=rel, key=key, shape=tuple(tensor.shape))

    def _file_metadata(self, source: Source, facts: ImageFacts) -> dict[str, str]:
        s = self.settings
        return {
            "source": source.path,
            "name": source.name,
            "image_sizes": json.dumps(list(facts.image_sizes or ())),
            "num_crops": str(s.num_crops),
            "model": s.model,
            "fingerprint": s.fingerprint,
        }

    # ------------------------------------------------------------------ files

    def _safe_path(self, rel: str) -> Path:
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
        current = self._real
        for i, part in enumerate(parts[:-1]):
            current = current / part
            sub = "/".join(parts[: i + 1])
            if sub in self._checked_dirs:
                continue
            if current.is_symlink():
                real = os.path.realpath(current)
                if not (real == str(self._real) or real.startswith(str(self._real) + os.sep)):
                    raise ImageError(f"output folder {sub} is a symbolic link leading outside {self.root}", path=rel)
            if not current.exists():
                current.mkdir()
            elif not current.is_dir():
                raise ImageError(f"output folder {sub} exists and is not a folder", path=rel)
            self._checked_dirs.add(sub)
        final = current / parts[-1]
        if final.is_dir() and not final.is_symlink():
            raise ImageError("output path exists and is a folder", path=rel)
        return final

    def _atomic_write(self, final: Path, write: Callable[[IO[bytes]], None]) -> None:
        with self._files_lock:
            self._tmp_count += 1
            tmp = self._tmp / f"{self._tmp_count:09d}.part"
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
                size = fh.tell()
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write {final}: {exc.strerror or exc}", path=self.root) from None
        with self._files_lock:
            self._dirty_dirs.add(final.parent)
            self.bytes_written += size
            self.files_written += 1

    # ------------------------------------------------------------------ packed shards

    def _shard_file(self, index: int) -> str:
        return f"{self._pack_prefix}{index:05d}.safetensors"

    def _shard_index(self, filename: str) -> int | None:
        match = re.fullmatch(re.escape(self._pack_prefix) + r"(\d{5,})\.safetensors", filename)
        return int(match.group(1)) if match else None

    def _add_to_shard(self, source: Source, facts: ImageFacts, tensor: torch.Tensor) -> dict[str, Any]:
        assert self.settings.pack_bytes is not None
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending.entries and self._pending.nbytes + nbytes > self.settings.pack_bytes:
            self._write_shard()
        record = self._record(
            source,
            facts,
            status="ok",
            output=self._shard_file(self._next_shard),
            key=source.name,
            shape=tuple(tensor.shape),
        )
        self._pending.entries.append((record, tensor))
        self._pending.nbytes += nbytes
        return record

    def _write_shard(self) -> None:
        entries = self._pending.entries
        name = self._shard_file(self._next_shard)
        meta = {"format": PACK_FORMAT, "records": json.dumps([r for r, _ in entries], ensure_ascii=True)}
        tensors = [(r["key"], t) for r, t in entries]
        self._atomic_write(self._real / name, lambda fh: write_safetensors(fh, tensors, meta))
        self._pending = _PendingShard()
        self._next_shard += 1
        self._append([r for r, _ in entries])  # the commit point: after the shard is in place
        self._sync()

    def _recover_shards(self) -> None:
        """Append the records of shards whose manifest lines a killed run did not write; set the next index."""
        indices = {}
        for entry in os.scandir(self._real):
            index = self._shard_index(entry.name)
            if index is not None and entry.is_file():
                indices[index] = entry.name
        if not indices:
            return
        self._next_shard = max(indices) + 1
        referenced: dict[int, set[str]] = {}
        for record in iter_manifest(self._real / MANIFEST):
            index = self._shard_index(record.get("output") or "")
            if index is not None:
                referenced.setdefault(index, set()).add(record["name"])
        last = max(referenced, default=-1)
        missing: list[dict[str, Any]] = []
        for index in sorted(i for i in indices if i >= last):
            try:
                meta = read_safetensors_metadata(self._real / indices[index])
                stored = json.loads(meta["records"]) if meta.get("format") == PACK_FORMAT else []
            except (OSError, ValueError, KeyError, Phi3EmbedError):
                continue  # not one of ours
            have = referenced.get(index, set())
            missing.extend(r for r in stored if r.get("name") not in have)
        if missing:
            self._append(missing)
            self.recovered = len(missing)
