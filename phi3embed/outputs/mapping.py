"""Random access to what ``phi3embed encode`` wrote: ``store = phi3embed.open("emb/"); store["a/b.jpg"]``.

:func:`open_outputs` takes the manifest's columns (:mod:`phi3embed.outputs.manifest_index`: the index file
``manifest.jsonl.idx`` encode and combine write beside it, plus any lines written after it; rebuilt and written
back when it is missing or stale) and keeps, per image, only what it takes to find its tensor: the name (all
names in one sorted byte blob, looked up by bisection), the manifest line's offset (:meth:`EmbeddingStore.record`
reads it again when asked), its status, and small codes for the output file and the tensor key (per-image
outputs are ``<prefix><name><suffix>``, or ``<prefix>`` and the storable form of the name
(:func:`phi3embed.outputs.names.output_path`), so no path is stored per image). That is about 55 bytes per image
and no Python object per image, so a million-image store opens in a fraction of a second, stays small, and
DataLoader workers forked from it do not copy it page by page (reference counts of per-image objects would).

Reading is a positioned read of exactly the tensor's bytes into a new tensor (``os.preadv``): the file's
header (npy, or the safetensors header of a per-image file or a pack) is parsed once per process and the
tensor's offset, dtype and shape are kept in columns, so a second read of the same image, or of any image
of an already seen pack, is one system call. Nothing stays mapped: memory is the tensors the caller holds.
File descriptors are opened lazily and per process (a forked or unpickled store opens its own), so the
store can be handed to DataLoader workers with any start method.

Layouts: one ``.npy`` or ``.safetensors`` file per image, ``--pack`` files, and a combined manifest written
by ``phi3embed combine -o FILE`` (its outputs are relative to FILE's folder). The store is a snapshot of the
manifest at opening: reopen it after another run on the same folder.
"""

from __future__ import annotations

import io
import math
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phi3embed.core.safetensors_io import SafetensorsFormatError, read_header_with
from phi3embed.errors import Phi3EmbedError
from phi3embed.outputs.formats import OUTPUT_DTYPES
from phi3embed.outputs.manifest import MANIFEST, iter_manifest
from phi3embed.outputs.manifest_index import (
    KEY_IS_NAME,
    LITERAL,
    NO_KEY,
    OPEN_COLUMNS,
    PLAIN,
    ManifestIndex,
    record_at_offset,
)
from phi3embed.outputs.names import from_bytes, output_path
from phi3embed.outputs.records import Record

#: An opening that has to read this many bytes of the manifest (no index file, or an old one) writes the index file.
REBUILD_SAVE_BYTES = 4 << 20

MAX_NDIM = 4  # stored tensors have 2 (projected, hd) or 3 (clip) dimensions
_NPY_DTYPES = {np.dtype("<f4"): torch.float32, np.dtype("<f2"): torch.float16}
_OPEN_FILES = 64  # descriptors kept open per process (pack files are read again and again)


class EmbeddingStore(Mapping[str, torch.Tensor]):
    """A read-only mapping ``name -> tensor`` over one output folder's latest ``ok`` records.

    A name is the image's name as encode listed it: for a file name that is not UTF-8, the ``str`` Python's
    ``os`` functions give (``os.fsdecode``: ``os.listdir`` and ``os.path.relpath`` return it); its bytes
    (``b"caf\\xe9.png"``) are accepted too. Iteration gives the ``str`` form.

    ``len``, ``in`` and iteration (names in sorted order) never touch the output files. ``store[name]``
    reads one tensor (float32 / float16 as stored in npy, bfloat16 kept as bfloat16 from safetensors);
    an unknown name, or one whose latest record is an error, raises KeyError. :meth:`record` gives the
    manifest record of any name, failed ones included; :attr:`failed` lists those.
    """

    def __init__(self, manifest: str | os.PathLike[str]) -> None:
        self.manifest = Path(manifest)
        self.root = self.manifest.parent
        self._load()
        self._init_process_state()

    # ------------------------------------------------------------------ opening

    def _load(self) -> None:
        if ManifestIndex.uncovered(self.manifest) >= REBUILD_SAVE_BYTES:  # no (or an old) index file: all
            index = ManifestIndex.load(self.manifest, save=True)  # columns, written for the next opening
        else:
            index = ManifestIndex.load(self.manifest, columns=OPEN_COLUMNS)
        cols = index.cols
        self._names = index.names  # every name, failed ones too (their records can be asked for)
        self._status = cols["status"]
        self._line_off = cols["line"]
        ok = self._status == 1
        self._ok_rows: np.ndarray | None = None if ok.all() else np.flatnonzero(ok)  # position -> row
        rows = slice(None) if self._ok_rows is None else self._ok_rows
        self._out_id = cols["out_id"][rows]
        self._key_id = cols["key_id"][rows]
        self._files = index.templates
        self._keys = index.keys
        self._len = len(self._out_id)
        n = self._len
        # where each tensor is, once its file's header has been read (ndim 0: not yet); zeros are not resident
        # until written, so a store costs these columns only for the images it reads
        self._loc_off = np.zeros(n, dtype=np.int64)
        self._loc_dtype = np.zeros(n, dtype=np.int8)
        self._loc_shape = np.zeros((n, MAX_NDIM), dtype=np.int64)
        self._loc_ndim = np.zeros(n, dtype=np.int8)

    def _row(self, i: int) -> int:
        return i if self._ok_rows is None else int(self._ok_rows[i])

    def _position(self, name: str) -> int | None:
        """The position of ``name`` among the ok names, or None (unknown, or failed)."""
        row = self._names.find(name)
        if row is None or not self._status[row]:
            return None
        return row if self._ok_rows is None else int(np.searchsorted(self._ok_rows, row))

    def _init_process_state(self) -> None:
        self._root = str(self.root)
        self._npy_headers: dict[bytes, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        self._pid = os.getpid()
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for spawned DataLoader workers: the columns, not this process's descriptors."""
        state = self.__dict__.copy()
        for name in ("_pid", "_fds", "_lock", "_npy_headers"):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    # ------------------------------------------------------------------ the mapping

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[str]:
        for i in range(self._len):
            yield self.name_at(i)

    def __contains__(self, name: object) -> bool:
        name = from_bytes(name) if isinstance(name, bytes) else name
        return isinstance(name, str) and self._position(name) is not None

    def __getitem__(self, name: str | bytes) -> torch.Tensor:
        return self.tensor_at(self.index(name))

    def __repr__(self) -> str:
        return f"<EmbeddingStore {str(self.root)!r}: {len(self)} images, {len(self._names) - len(self)} failed>"

    def index(self, name: str | bytes) -> int:
        """The position of ``name`` in sorted order; KeyError when it has no ``ok`` latest record."""
        name = from_bytes(name) if isinstance(name, bytes) else name
        i = self._position(name) if isinstance(name, str) else None
        if i is None:
            row = self._names.find(name) if isinstance(name, str) else None
            why = "its latest record is an error" if row is not None else "not in the manifest"
            raise KeyError(f"{name!r}: {why}")
        return i

    def name_at(self, i: int) -> str:
        """The ``i``-th name in sorted order."""
        return from_bytes(self._names[self._row(i)])

    def tensor_at(self, i: int) -> torch.Tensor:
        """The tensor of the ``i``-th name in sorted order (what a Dataset indexes)."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        whole = None
        if self._loc_ndim[i] == 0:
            # a per-image file is read whole, header included, in one call (one trip to the disk, as the
            # raw read of its tensor would take); a pack's header once, then only the tensors asked for
            if self._out_id[i] >= 0 and self._files[self._out_id[i]][2] != LITERAL:
                whole = self._read_whole(i)
            self._locate(i, whole)
        shape = self._loc_shape[i, : self._loc_ndim[i]].tolist()
        dtype = OUTPUT_DTYPES[self._loc_dtype[i]]
        nbytes, offset = math.prod(shape) * dtype.itemsize, int(self._loc_off[i])
        if whole is not None:
            if offset + nbytes > len(whole):
                raise Phi3EmbedError(f"file ends before the tensor of {self.name_at(i)} does", path=self._path(i))
            out = whole[offset : offset + nbytes]
        else:
            out = np.empty(nbytes, dtype=np.uint8)
            self._pread_into(self._path(i), out, offset, name_index=i)
        return torch.from_numpy(out).view(dtype).reshape(shape)

    def _read_whole(self, i: int) -> np.ndarray:
        path = self._path(i)
        whole = np.empty(os.fstat(self._fd(path)).st_size, dtype=np.uint8)
        self._pread_into(path, whole, 0, name_index=i)
        return whole

    def record(self, name: str | bytes) -> Record:
        """The latest manifest record of ``name`` (ok or error), read again from the manifest."""
        name = from_bytes(name) if isinstance(name, bytes) else name
        row = self._names.find(name)
        if row is None:
            raise KeyError(f"{name!r}: not in the manifest")
        offset = int(self._line_off[row])
        record = record_at_offset(self._fd(str(self.manifest)), offset)
        assert record.name == name, (name, offset)
        return record

    @property
    def failed(self) -> list[str]:
        """Names whose latest record is an error (sorted)."""
        return [from_bytes(self._names[row]) for row in np.flatnonzero(self._status == 0).tolist()]

    def path_at(self, i: int) -> Path:
        """The output file of the ``i``-th name."""
        return Path(self._path(i))

    def _path(self, i: int) -> str:
        out = int(self._out_id[i])
        if out < 0:
            raise Phi3EmbedError(f"the ok record of {self.name_at(i)} names no output", path=self.manifest)
        prefix, suffix, how = self._files[out]
        if how == LITERAL:
            return os.path.join(self._root, prefix)
        name = self.name_at(i)
        return os.path.join(self._root, prefix + (name + suffix if how == PLAIN else output_path(name, suffix)))

    def key_at(self, i: int) -> str | None:
        """The safetensors key of the ``i``-th name's tensor (None for npy)."""
        code = int(self._key_id[i])
        return None if code == NO_KEY else self.name_at(i) if code == KEY_IS_NAME else self._keys[code]

    # ------------------------------------------------------------------ files

    def _fd(self, path: str) -> int:
        """A descriptor of ``path`` opened by this process (kept, least recently used closed first)."""
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's descriptors are the parent's
                self._init_process_state()
            fd = self._fds.get(path)
            if fd is not None:
                self._fds.move_to_end(path)
                return fd
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise Phi3EmbedError(f"cannot open: {exc.strerror or exc}", path=path) from None
        with self._lock:
            self._fds[path] = fd
            while len(self._fds) > _OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
        return fd

    def _pread_into(self, path: str, buffer: np.ndarray, offset: int, *, name_index: int) -> None:
        view = buffer.data.cast("B")
        done = 0
        fd = self._fd(path)
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise Phi3EmbedError(f"file ends before the tensor of {self.name_at(name_index)} does", path=path)
            done += n

    def _pread(self, path: str, size: int, offset: int) -> bytes:
        return os.pread(self._fd(path), size, offset)

    def _locate(self, i: int, whole: np.ndarray | None = None) -> None:
        """Read the header of the ``i``-th name's file (from ``whole``, the file's bytes, when given); note
        where its tensor (and, in a pack, every tensor of the store the pack holds) is."""
        path = self._path(i)
        key = self.key_at(i)

        def read(size: int, offset: int) -> bytes:
            return whole[offset : offset + size].tobytes() if whole is not None else self._pread(path, size, offset)

        try:
            if key is None:
                self._note(i, *self._npy_header(read))
                return
            size = len(whole) if whole is not None else os.fstat(self._fd(path)).st_size
            header = read_header_with(read, file=Path(path), file_size=size, where=path)
        except SafetensorsFormatError as exc:
            raise Phi3EmbedError(f"cannot read the header: {exc.reason}", path=path) from None
        except (OSError, ValueError, KeyError) as exc:
            raise Phi3EmbedError(f"cannot read the header: {exc}", path=path) from None
        if key not in header.tensors:
            raise Phi3EmbedError(f"no tensor {key!r} (the embeddings of {self.name_at(i)})", path=path)
        out = int(self._out_id[i])
        for k, info in header.tensors.items():  # a pack: every image of it this store reads from this file
            j = i if k == key else self._position(k)
            if j is not None and self._out_id[j] == out and self.key_at(j) == k:
                if info.torch_dtype not in OUTPUT_DTYPES:
                    raise Phi3EmbedError(f"tensor {k!r} is {info.dtype}, not an embedding", path=path)
                self._note(j, info.start, info.torch_dtype, info.shape)

    def _note(self, i: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        if len(shape) > MAX_NDIM:
            raise Phi3EmbedError(f"tensor of {self.name_at(i)} has {len(shape)} dimensions", path=self.path_at(i))
        self._loc_shape[i, : len(shape)] = shape
        self._loc_ndim[i] = len(shape)
        self._loc_dtype[i] = OUTPUT_DTYPES.index(dtype)
        self._loc_off[i] = offset

    def _npy_header(self, read: Callable[[int, int], bytes]) -> tuple[int, torch.dtype, tuple[int, ...]]:
        """``(data offset, dtype, shape)`` of an npy file (what np.save writes: C order, little endian).
        Headers are parsed once per distinct header (images with the same shape share one)."""
        head = read(128, 0)
        known = self._npy_headers.get(head)
        if known is not None:
            return known
        parsed = _parse_npy_header(head, lambda size: read(size, 0))
        if parsed[0] == len(head) and len(self._npy_headers) < 4096:  # the 128 bytes are the whole header
            self._npy_headers[head] = parsed
        return parsed

    def vectors(self, kind: str) -> tuple[list[str], np.ndarray]:
        """``(names, array [n, d])`` of the ``kind`` vectors (``cls``, ``mean`` or ``tokens``) written by
        ``encode --vectors``, aligned row for row, names sorted; memory-mapped where one shard holds them all
        in order (phi3embed.outputs.vectors)."""
        from phi3embed.outputs.vectors import read_vectors

        latest = {record.name: record for record in iter_manifest(self.manifest)}
        return read_vectors(self.root, kind, latest)

    def close(self) -> None:
        """Close this process's descriptors (they reopen when needed)."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self.close()


def _parse_npy_header(head: bytes, read: Callable[[int], bytes]) -> tuple[int, torch.dtype, tuple[int, ...]]:
    """``(data offset, dtype, shape)`` from the first bytes of an npy file (``read(n)``: its first n bytes)."""
    fh = io.BytesIO(head)
    version = np.lib.format.read_magic(fh)
    size_bytes = 2 if version == (1, 0) else 4
    (hlen,) = struct.unpack("<H" if size_bytes == 2 else "<I", head[8 : 8 + size_bytes])
    data_start = 8 + size_bytes + hlen
    if data_start > len(head):
        fh = io.BytesIO(read(data_start))
        np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(fh)
    if fortran or dtype not in _NPY_DTYPES:
        raise ValueError(f"npy array of {dtype} {'(Fortran order) ' if fortran else ''}is not an embedding")
    return data_start, _NPY_DTYPES[dtype], tuple(shape)


def open_outputs(path: str | os.PathLike[str]) -> EmbeddingStore:
    """Open an output folder (its ``manifest.jsonl``) or a manifest file (e.g. a combined one) for reading."""
    p = Path(path)
    manifest = p / MANIFEST if p.is_dir() else p
    if not manifest.is_file():
        raise Phi3EmbedError("no manifest.jsonl here: not a phi3embed output directory", path=p)
    return EmbeddingStore(manifest)
