"""Random access to what ``phi3embed encode`` wrote: ``store = phi3embed.open("emb/"); store["a/b.jpg"]``.

:func:`open_outputs` reads the manifest once and keeps, per image whose latest record is ``ok``, only what it
takes to find its tensor: the name (all names in one sorted byte blob, looked up by bisection), the
manifest line's offset (:meth:`EmbeddingStore.record` reads it again when asked) and small codes for the
output file and the tensor key (per-image outputs are ``<prefix><name><suffix>``, or ``<prefix>`` and the
storable form of the name (:func:`phi3embed.outputs.names.output_path`), so no path is stored per
image). That is a few dozen bytes per image and no Python object per image, so a million-image store opens
in seconds, stays small, and DataLoader workers forked from it do not copy it page by page (reference
counts of per-image objects would).

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

import bisect
import io
import json
import math
import os
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phi3embed.core.safetensors_io import SafetensorsFormatError, read_header_with
from phi3embed.errors import Phi3EmbedError
from phi3embed.outputs.formats import OUTPUT_DTYPES
from phi3embed.outputs.manifest import MANIFEST, iter_manifest_lines
from phi3embed.outputs.names import exact_bytes, from_bytes, output_path
from phi3embed.outputs.records import Record, exact_field

MAX_NDIM = 4  # stored tensors have 2 (projected, hd) or 3 (clip) dimensions
_NPY_DTYPES = {np.dtype("<f4"): torch.float32, np.dtype("<f2"): torch.float16}
_NO_KEY, _KEY_IS_NAME = -1, -2  # key codes besides indices into the interned keys
_OPEN_FILES = 64  # descriptors kept open per process (pack files are read again and again)


class _SortedNames(Sequence[bytes]):
    """The names' exact bytes (:func:`phi3embed.outputs.names.exact_bytes`) in one blob with offsets, sorted by
    those bytes: a sequence :mod:`bisect` can search."""

    def __init__(self, blob: bytes, offsets: np.ndarray) -> None:
        self.blob, self.offsets = blob, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:  # type: ignore[override]
        return self.blob[self.offsets[i] : self.offsets[i + 1]]

    def find(self, name: str) -> int | None:
        """The position of ``name``, or None."""
        key = exact_bytes(name)
        i = bisect.bisect_left(self, key)
        return i if i < len(self) and self[i] == key else None


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
        index: dict[str, int] = {}  # name -> row, while reading (dropped after sorting)
        line_off, out_id, key_id = array("q"), array("i"), array("i")
        failed: dict[str, int] = {}  # name -> line offset of its latest (error) record
        files: dict[_Template, int] = {}  # how outputs are found from names (_file_template) -> id
        keys: dict[str, int] = {}
        for offset, data in iter_manifest_lines(self.manifest):
            name = exact_field(data, "name")
            if data.get("status") != "ok":
                failed[name] = offset
                continue
            failed.pop(name, None)
            row = index.setdefault(name, len(index))
            if row == len(line_off):
                line_off.append(0)
                out_id.append(-1)
                key_id.append(_NO_KEY)
            line_off[row] = offset
            output, key = exact_field(data, "output"), exact_field(data, "key")
            out_id[row] = files.setdefault(_file_template(name, output), len(files)) if isinstance(output, str) else -1
            key_id[row] = (
                _NO_KEY
                if not isinstance(key, str)
                else _KEY_IS_NAME
                if key == name
                else keys.setdefault(key, len(keys))
            )
        for name in failed:  # an ok record followed by an error: the image is failed now
            index.pop(name, None)
        encoded = sorted(exact_bytes(n) for n in index)
        rows = np.fromiter((index[from_bytes(b)] for b in encoded), dtype=np.int64, count=len(encoded))
        del index
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        self._names = _SortedNames(b"".join(encoded), offsets)
        del encoded
        self._line_off = np.frombuffer(line_off, dtype=np.int64)[rows].copy()
        self._out_id = np.frombuffer(out_id, dtype=np.int32)[rows].copy()
        self._key_id = np.frombuffer(key_id, dtype=np.int32)[rows].copy()
        self._files = [template for template, _ in sorted(files.items(), key=lambda kv: kv[1])]
        self._keys = [key for key, _ in sorted(keys.items(), key=lambda kv: kv[1])]
        self._failed = dict(sorted(failed.items()))
        n = len(rows)
        # where each tensor is, once its file's header has been read (offset -1: not yet)
        self._loc_off = np.full(n, -1, dtype=np.int64)
        self._loc_dtype = np.zeros(n, dtype=np.int8)
        self._loc_shape = np.zeros((n, MAX_NDIM), dtype=np.int64)
        self._loc_ndim = np.zeros(n, dtype=np.int8)

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
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self._names)):
            yield from_bytes(self._names[i])

    def __contains__(self, name: object) -> bool:
        name = from_bytes(name) if isinstance(name, bytes) else name
        return isinstance(name, str) and self._names.find(name) is not None

    def __getitem__(self, name: str | bytes) -> torch.Tensor:
        return self.tensor_at(self.index(name))

    def __repr__(self) -> str:
        return f"<EmbeddingStore {str(self.root)!r}: {len(self)} images, {len(self._failed)} failed>"

    def index(self, name: str | bytes) -> int:
        """The position of ``name`` in sorted order; KeyError when it has no ``ok`` latest record."""
        name = from_bytes(name) if isinstance(name, bytes) else name
        i = self._names.find(name) if isinstance(name, str) else None
        if i is None:
            why = "its latest record is an error" if name in self._failed else "not in the manifest"
            raise KeyError(f"{name!r}: {why}")
        return i

    def name_at(self, i: int) -> str:
        """The ``i``-th name in sorted order."""
        return from_bytes(self._names[i])

    def tensor_at(self, i: int) -> torch.Tensor:
        """The tensor of the ``i``-th name in sorted order (what a Dataset indexes)."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        whole = None
        if self._loc_off[i] < 0:
            # a per-image file is read whole, header included, in one call (one trip to the disk, as the
            # raw read of its tensor would take); a pack's header once, then only the tensors asked for
            if self._out_id[i] >= 0 and self._files[self._out_id[i]][2] != _LITERAL:
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
        i = self._names.find(name)
        if i is not None:
            offset = int(self._line_off[i])
        elif name in self._failed:
            offset = self._failed[name]
        else:
            raise KeyError(f"{name!r}: not in the manifest")
        fd = self._fd(str(self.manifest))
        line = bytearray()
        while not line.endswith(b"\n"):
            chunk = os.pread(fd, 1 << 16, offset + len(line))
            if not chunk:
                break
            line += chunk[: chunk.find(b"\n") + 1] if b"\n" in chunk else chunk
        record = Record.from_json(json.loads(line))
        assert record is not None and record.name == name, (name, offset)
        return record

    @property
    def failed(self) -> list[str]:
        """Names whose latest record is an error (sorted)."""
        return list(self._failed)

    def path_at(self, i: int) -> Path:
        """The output file of the ``i``-th name."""
        return Path(self._path(i))

    def _path(self, i: int) -> str:
        out = int(self._out_id[i])
        if out < 0:
            raise Phi3EmbedError(f"the ok record of {self.name_at(i)} names no output", path=self.manifest)
        prefix, suffix, how = self._files[out]
        if how == _LITERAL:
            return os.path.join(self._root, prefix)
        name = self.name_at(i)
        return os.path.join(self._root, prefix + (name + suffix if how == _PLAIN else output_path(name, suffix)))

    def key_at(self, i: int) -> str | None:
        """The safetensors key of the ``i``-th name's tensor (None for npy)."""
        code = int(self._key_id[i])
        return None if code == _NO_KEY else self.name_at(i) if code == _KEY_IS_NAME else self._keys[code]

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
            j = i if k == key else self._names.find(k)
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

    def close(self) -> None:
        """Close this process's descriptors (they reopen when needed)."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self.close()


_PLAIN, _STORED, _LITERAL = 0, 1, 2  # output = prefix + name + suffix / prefix + output_path(name, suffix) / prefix
_Template = tuple[str, str, int]


def _file_template(name: str, output: str) -> _Template:
    """How ``output`` follows from ``name`` (per-image files, also under a combined manifest's ``../part-3/``):
    ``(prefix, suffix, _PLAIN)`` around the name, ``(prefix, suffix, _STORED)`` around the storable form of a
    name that could not be stored as it is, else ``(output, "", _LITERAL)`` (a pack file)."""
    dot = output.rfind(".")
    stem = output[:dot] if dot >= 0 else output
    if stem.endswith(name):
        return output[: len(stem) - len(name)], output[len(stem) :], _PLAIN
    if "~" in output:  # every storable form has one (a pack file's name has none)
        suffix = output[dot:] if dot >= 0 else ""
        stored = output_path(name, suffix)
        if output.endswith(stored) and stored != name + suffix:
            return output[: len(output) - len(stored)], suffix, _STORED
    return output, "", _LITERAL


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
