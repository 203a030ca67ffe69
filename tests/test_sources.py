"""Input expansion: what is listed, under which name, in which order, and which shard."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from phi3embed.inputs.listing import (
    InputError,
    Source,
    expand_inputs,
    is_image_signature,
    parse_shard,
    select_shard,
    shard_of,
)


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), (1, 2, 3)).save(path, format="PNG")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """imgs/ with nested images, an extensionless PNG, a non-image, hidden entries and a dir named x.jpg."""
    root = tmp_path / "imgs"
    _png(root / "b.png")
    _png(root / "a" / "b.jpg")  # PNG bytes under .jpg: still an image by extension
    _png(root / "a" / "noext")  # found by content
    (root / "a" / "notes.txt").write_text("hello")
    (root / "a" / "data.bin").write_bytes(b"\x00" * 64)
    _png(root / ".hidden" / "h.png")
    _png(root / "._appledouble.jpg")
    _png(root / "dir.jpg" / "inside.png")  # a directory named like an image is just a directory here
    return tmp_path


def names(sources: list[Source]) -> list[str]:
    return [s.name for s in sources]


def test_directory_is_recursed_by_extension_and_content(tree: Path) -> None:
    found = expand_inputs(["imgs"], cwd=str(tree))
    assert names(found) == ["a/b.jpg", "a/noext", "b.png", "dir.jpg/inside.png"]
    assert [s.path for s in found] == [os.path.join("imgs", *n.split("/")) for n in names(found)]
    assert all(s.root == "imgs" for s in found)


def test_single_files_are_taken_as_given_relative_to_cwd(tree: Path) -> None:
    found = expand_inputs(["imgs/a/notes.txt", "./imgs/b.png"], cwd=str(tree))
    assert [(s.name, s.path) for s in found] == [
        ("imgs/a/notes.txt", "imgs/a/notes.txt"),
        ("imgs/b.png", "./imgs/b.png"),
    ]


def test_files_outside_cwd_keep_their_absolute_path_without_anchor(tree: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    target = tree / "imgs" / "b.png"
    (found,) = expand_inputs([str(target)], cwd=str(elsewhere))
    assert found.name == str(target).lstrip("/")
    (up,) = expand_inputs(["../imgs/b.png"], cwd=str(elsewhere))
    assert up.name == found.name and ".." not in up.name.split("/")


def test_glob_patterns_are_relative_to_their_literal_prefix(tree: Path) -> None:
    assert names(expand_inputs(["imgs/a/*"], cwd=str(tree))) == ["b.jpg", "noext"]
    assert names(expand_inputs(["imgs/**/*.png"], cwd=str(tree))) == ["b.png", "dir.jpg/inside.png"]
    assert names(expand_inputs(["imgs/*.png"], cwd=str(tree))) == ["b.png"]
    with pytest.raises(InputError, match="no image matches"):
        expand_inputs(["imgs/*.gif"], cwd=str(tree))


def test_stdin_list(tree: Path) -> None:
    stdin = io.StringIO("imgs/b.png\n\nimgs/dir.jpg\r\nimgs/missing.jpg\n")
    found = expand_inputs(["-"], stdin=stdin, cwd=str(tree))
    # listed paths are kept even when they are not images: they get error records later
    assert names(found) == ["imgs/b.png", "imgs/dir.jpg", "imgs/missing.jpg"]


def test_missing_input_is_a_usage_error(tree: Path) -> None:
    with pytest.raises(InputError, match="no such file or directory"):
        expand_inputs(["nope"], cwd=str(tree))


def test_duplicates_are_merged_and_collisions_refused(tree: Path) -> None:
    found = expand_inputs(["imgs", "imgs", "imgs/b.png"], cwd=str(tree))
    assert names(found) == ["a/b.jpg", "a/noext", "b.png", "dir.jpg/inside.png", "imgs/b.png"]
    _png(tree / "other" / "b.png")
    with pytest.raises(InputError, match="would both be written as 'b.png'"):
        expand_inputs(["imgs", "other"], cwd=str(tree))


def test_broken_links_listed_dir_links_not_followed(tree: Path) -> None:
    (tree / "imgs" / "gone.jpg").symlink_to(tree / "nowhere.jpg")
    (tree / "imgs" / "linkdir").symlink_to(tree / "imgs" / "a", target_is_directory=True)
    found = names(expand_inputs(["imgs"], cwd=str(tree)))
    assert "gone.jpg" in found
    assert not any(n.startswith("linkdir") for n in found)


def test_output_dir_inside_the_input_is_not_read(tree: Path) -> None:
    _png(tree / "imgs" / "emb" / "old.png")
    found = expand_inputs(["imgs"], cwd=str(tree), exclude=[str(tree / "imgs" / "emb")])
    assert not any(n.startswith("emb/") for n in names(found))


def test_signatures() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="JPEG")
    assert is_image_signature(buf.getvalue()[:16])
    for fmt in ("PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM"):
        buf = io.BytesIO()
        Image.new("RGB", (2, 2)).save(buf, format=fmt)
        assert is_image_signature(buf.getvalue()[:16]), fmt
    assert not is_image_signature(b"hello world, not an image")
    assert not is_image_signature(b"\x93NUMPY\x01\x00")
    assert not is_image_signature(b"")


def test_shards_partition_the_list_stably() -> None:
    sources = [Source(f"d{i % 7}/img{i}.jpg", f"x/{i}", "x") for i in range(200)]
    parts = [select_shard(sources, i, 3) for i in range(3)]
    assert sorted(s for p in parts for s in p) == sorted(sources)
    assert all(parts) and sum(map(len, parts)) == len(sources)
    # adding images never moves an existing one to another shard
    more = sources + [Source(f"new{i}.jpg", f"y/{i}", "y") for i in range(50)]
    for i in range(3):
        assert set(parts[i]) <= set(select_shard(more, i, 3))
    assert shard_of("a/b.jpg", 5) == shard_of("a/b.jpg", 5)


def test_parse_shard() -> None:
    assert parse_shard("0/4") == (0, 4)
    assert parse_shard(" 3 / 4 ") == (3, 4)
    for bad in ("4/4", "1/0", "a/b", "1", "-1/2"):
        with pytest.raises(InputError):
            parse_shard(bad)
