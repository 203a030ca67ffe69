"""Only regular files are opened, and only as much of them as an image needs (issue 14).

Listing skips and counts pipes, sockets and devices in folders and globs; reading refuses them, and files over
the size limit, from their ``stat`` alone; a file Pillow does not identify costs a header read. Every call
that would block on a pipe runs under :func:`finishes`, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import GOLDEN
from PIL import Image

from phi3embed.core.config import PreprocessConfig
from phi3embed.core.preprocess import MAX_FILE_BYTES, read_image_file, read_image_size
from phi3embed.errors import ImageError
from phi3embed.inputs.listing import list_inputs
from phi3embed.jobs.prepare import Preparer

T = TypeVar("T")


def finishes(fn: Callable[[], T], seconds: float = 10) -> T:
    """``fn()`` in a daemon thread; fails the test when it has not returned after ``seconds`` (a blocked open)."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"blocked for more than {seconds} s (a special file was opened)")
    if errors:
        raise errors[0]
    return out[0]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    """imgs/ holding two images, a named pipe without an extension (the old listing sniffed it, and blocked),
    a pipe and a socket named like images, a link to the pipe; a pipe outside it."""
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 3)).save(imgs / "a.png")
    Image.new("RGB", (4, 3)).save(imgs / "sub" / "noext", format="PNG")
    os.mkfifo(imgs / "pipe")
    os.mkfifo(imgs / "sub" / "pipe.jpg")
    (imgs / "link.jpg").symlink_to(imgs / "pipe")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(imgs / "sock.png"))
    os.mkfifo(tmp_path / "named.jpg")
    yield tmp_path
    sock.close()


def test_listing_skips_and_counts_special_files_without_opening_them(tree: Path) -> None:
    listing = finishes(lambda: list_inputs(["imgs"], cwd=str(tree)))
    assert [s.name for s in listing.sources] == ["a.png", "sub/noext"]
    assert listing.special == 4  # pipe, sub/pipe.jpg, sock.png, and link.jpg (a link to a pipe)
    globbed = finishes(lambda: list_inputs(["imgs/*", "imgs/**/*", "imgs"], cwd=str(tree)))
    assert [s.name for s in globbed.sources] == ["a.png", "sub/noext"]
    assert globbed.special == 4  # each counted once, however many INPUTs reach it


def test_a_special_file_named_explicitly_is_listed_and_refused_unopened(tree: Path) -> None:
    named = str(tree / "named.jpg")
    listing = finishes(lambda: list_inputs([named, "/dev/zero"], cwd=str(tree)))
    assert [s.path for s in listing.sources] == ["/dev/zero", named] and listing.special == 0
    preparer = Preparer(PreprocessConfig(num_crops=4))
    for source, kind in zip(listing.sources, ["character device", "named pipe"], strict=True):
        prepared = finishes(lambda source=source: preparer(source))  # type: ignore[misc]
        assert prepared.error == f"{source.path}: not a regular file ({kind})"
    sock_path = str(tree / "imgs" / "sock.png")
    with pytest.raises(ImageError, match=r"sock\.png: not a regular file \(socket\)$"):
        finishes(lambda: read_image_size(sock_path))  # plan's header read obeys the same rules


def test_a_file_over_the_limit_is_refused_from_its_size(tmp_path: Path) -> None:
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as fh:
        fh.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(ImageError, match=r"file too large for an image \(1,073,741,825 bytes; the limit is"):
        read_image_file(huge, label=str(huge))
    small = Preparer(PreprocessConfig(num_crops=4), max_bytes=100)
    assert "the limit is 100)" in (small.prepare(str(GOLDEN / "images" / "tiny_7x9.png")).error or "")


def test_a_non_image_costs_a_header_read_and_an_image_is_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    pread = os.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        reads.append(length)
        return pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    big = tmp_path / "not-an-image.jpg"
    with open(big, "wb") as fh:
        fh.truncate(512 * 2**20)  # 512 MB of zeros named .jpg
    with pytest.raises(ImageError, match="not an image Pillow can identify"):
        read_image_file(big, label="not-an-image.jpg")
    assert reads == []  # identified from its header: the file itself was never read
    path = GOLDEN / "images" / "photo_1000x750.jpg"
    prepared = Preparer(PreprocessConfig(num_crops=4)).prepare(str(path))
    assert prepared.item is not None and reads == [path.stat().st_size]  # one read of the whole file
    assert prepared.facts.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
