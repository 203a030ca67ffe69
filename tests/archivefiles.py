"""Test archives: WebDataset-style tar files (with the bad members the issue names) and parquet files."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conftest import GOLDEN

IMAGES = GOLDEN / "images"
PHOTO = (IMAGES / "photo_1000x750.jpg").read_bytes()
SQUARE = (IMAGES / "rgb_336x336.png").read_bytes()
TINY = (IMAGES / "tiny_7x9.png").read_bytes()


def make_tar(path: Path, members: Sequence[tuple[str, bytes | str]]) -> Path:
    """A tar file of ``members`` in this order: ``(name, bytes)`` is a regular file; ``(name, "->target")`` a
    symbolic link; ``(name, "dir")`` a folder."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, bytes):
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
            elif content.startswith("->"):
                info.type, info.linkname = tarfile.SYMTYPE, content[2:]
                tf.addfile(info)
            else:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
    return path


def sample_tar(path: Path) -> Path:
    """A WebDataset-style tar file: two samples with sibling members, written out of name order."""
    return make_tar(
        path,
        [
            ("s2.jpg", PHOTO),
            ("s2.txt", b"a caption"),
            ("s1.png", SQUARE),
            ("s1.json", b"{}"),
            ("s1.cls", b"3"),
        ],
    )


def member_offset(path: Path, name: str) -> int:
    """Where the data of member ``name`` starts."""
    with tarfile.open(path) as tf:
        return tf.getmember(name).offset_data


def make_parquet(path: Path, columns: dict[str, list[Any]], *, row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path
