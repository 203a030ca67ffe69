"""Build a folder holding one file of every kind of bad input ``phi3embed encode`` must survive."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` grey pixels, with an empty image stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def corrupt_png() -> bytes:
    """A PNG with valid chunks (CRCs recomputed) whose compressed pixel stream is garbage."""
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((64, 64)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4 : at])[0]
    body = at + 4
    data[body + 2 : body + length] = bytes((i * 37 + 11) % 256 for i in range(length - 2))
    data[body + length : body + length + 4] = struct.pack(">I", zlib.crc32(bytes(data[at : body + length])))
    return bytes(data)


# file name -> words its error message must contain
EXPECTED_REASONS = {
    "empty.jpg": "empty file (0 bytes)",
    "truncated.jpg": "truncated",
    "corrupt.png": "cannot decode image",
    "text.png": "not an image Pillow can identify",
    "bomb.png": "decompression bomb",
    "broken.jpg": "broken symbolic link",
    "strip.png": "too extreme for num_crops=4",
    "unreadable.jpg": "permission denied",
}


def make_bad_files(folder: Path, good_jpeg: Path) -> None:
    """Write every bad kind into ``folder`` (``folder/dir.jpg`` is a directory named like an image)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    data = good_jpeg.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.png").write_bytes(corrupt_png())
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "bomb.png").write_bytes(png_header_only(30000, 30000))
    (folder / "broken.jpg").symlink_to(folder / "no-such-file.jpg")
    Image.new("RGB", (5000, 1), (10, 200, 30)).save(folder / "strip.png")
    (folder / "unreadable.jpg").write_bytes(data)
    (folder / "unreadable.jpg").chmod(0)
    (folder / "dir.jpg").mkdir()
