"""Output failures in the store (issue 17 item 3): one wording for every cause, the reason of a short write kept,
a manifest append that fails part way, and a last pack refused at close (tests/test_output_failures_e2e.py runs
the same through the console script on a real full / read-only disk)."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import output_settings as settings

from phi3embed.inputs.listing import Source
from phi3embed.outputs import manifest as manifest_module
from phi3embed.outputs.manifest import MANIFEST, iter_manifest
from phi3embed.outputs.publish import TMP_DIR, OutputError, Publisher, WriteOnly, output_failure
from phi3embed.outputs.records import ImageFacts
from phi3embed.outputs.store import OutputStore


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EROFS, "read-only file system"),
        (errno.EIO, "input/output error"),
    ],
)
def test_every_cause_is_one_line_naming_the_folder(tmp_path: Path, code: int, cause: str) -> None:
    error = output_failure(OSError(code, os.strerror(code)), tmp_path, "writing a.jpg.npy")
    assert str(error) == f"{tmp_path}: {cause} (writing a.jpg.npy)"


def test_a_removed_output_folder_is_named_as_such(tmp_path: Path) -> None:
    gone = tmp_path / "out"
    error = output_failure(FileNotFoundError(errno.ENOENT, "No such file or directory"), gone, "writing x")
    assert str(error) == f"{gone}: the output folder was removed while the job ran (writing x)"
    gone.mkdir()  # the folder is there: a missing file inside it is not a removed folder
    error = output_failure(FileNotFoundError(errno.ENOENT, "No such file or directory"), gone, "writing x")
    assert str(error) == f"{gone}: no such file or directory (writing x)"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_numpy_through_write_keeps_the_reason_of_a_short_write() -> None:
    array = np.zeros((300, 300), np.float32)
    with open("/dev/full", "wb", buffering=0) as fh, pytest.raises(OSError) as kept:
        np.save(WriteOnly(fh), array)  # type: ignore[arg-type]
    assert kept.value.errno == errno.ENOSPC


def test_write_only_files_hold_the_same_bytes(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    expected = io.BytesIO()
    np.save(expected, array, allow_pickle=False)
    publisher = Publisher(tmp_path, "all")
    publisher.open()
    try:
        publisher.atomic_write(tmp_path / "a.npy", lambda fh: np.save(fh, array, allow_pickle=False))
    finally:
        publisher.close()
    assert (tmp_path / "a.npy").read_bytes() == expected.getvalue()


def test_a_failed_write_is_one_line_and_leaves_no_temp_file(tmp_path: Path) -> None:
    publisher = Publisher(tmp_path, "all")
    publisher.open()

    def full(fh: Any) -> None:
        fh.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        with pytest.raises(OutputError) as failed:
            publisher.atomic_write(tmp_path / "sub" / "a.npy", full)
        assert str(failed.value) == f"{tmp_path}: no space left on device (writing sub/a.npy)"
        assert list(publisher.tmp.iterdir()) == []
    finally:
        publisher.close()


def _source(tmp_path: Path, name: str) -> Source:
    path = tmp_path / "imgs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(name.encode())
    return Source(name, str(path), str(path.parent))


def _facts(source: Source) -> ImageFacts:
    st = os.stat(source.path)
    return ImageFacts("0" * 64, st.st_size, st.st_mtime_ns, 10, 20, (336, 336), (1, 1), 6)


def test_a_manifest_append_that_fails_part_way_leaves_whole_lines(tmp_path: Path, monkeypatch: Any) -> None:
    real_write = os.write
    full = {"on": False}

    def write(fd: int, data: Any) -> int:
        if full["on"]:
            real_write(fd, bytes(data[:7]))  # part of the line fits, then the disk is full
            full["on"] = False
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(manifest_module.os, "write", write)
    out = tmp_path / "out"
    a, b, c = (_source(tmp_path, n) for n in ("a.jpg", "b.jpg", "c.jpg"))
    store = OutputStore(out, settings()).open()
    try:
        store.write(a, _facts(a), torch.ones(6, 4))
        full["on"] = True
        with pytest.raises(OutputError, match="no space left on device \\(appending to manifest.jsonl\\)"):
            store.write(b, _facts(b), torch.ones(6, 4))
        store.write(c, _facts(c), torch.ones(6, 4))  # space again: the next line starts on its own
    finally:
        store.close()
    assert [r.name for r in iter_manifest(out / MANIFEST)] == ["a.jpg", "c.jpg"]


def test_a_last_pack_refused_at_close_raises_after_releasing_the_directory(tmp_path: Path, monkeypatch: Any) -> None:
    out = tmp_path / "out"
    a = _source(tmp_path, "a.jpg")
    store = OutputStore(out, settings(format="pack", pack_bytes=10**6)).open()
    store.write(a, _facts(a), torch.ones(6, 4))  # waits in the pack

    def refuse(final: Path, write: Any) -> None:
        raise output_failure(OSError(errno.ENOSPC, "No space left on device"), out, f"writing {final.name}")

    monkeypatch.setattr(store.publisher, "atomic_write", refuse)
    with pytest.raises(OutputError, match="no space left on device \\(writing emb-00000.safetensors\\)"):
        store.close()
    assert not (out / TMP_DIR).exists()  # the temp area is gone and the lock released: a rerun can start
    with OutputStore(out, settings(format="pack", pack_bytes=10**6)) as again:
        assert not again.is_done(a)
