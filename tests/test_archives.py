"""Tar and parquet INPUTs (issue 12): listing from headers, bad members, reading in place, brace patterns and
``--shard`` by archive. The console-script runs are in test_archives_e2e.py."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from archivefiles import IMAGES, PHOTO, SQUARE, TINY, make_parquet, make_tar, member_offset, sample_tar

from phi3embed.core.config import PreprocessConfig
from phi3embed.errors import ImageError
from phi3embed.inputs.archives import ParquetUnavailableError, read_member, safe_inner
from phi3embed.inputs.listing import InputError, Source, expand_braces, list_inputs, select_shard, shard_of
from phi3embed.jobs.prepare import Preparer


def listed(tmp_path: Path, *inputs: str, **kw: object) -> list[Source]:
    return list_inputs(inputs, cwd=str(tmp_path), **kw).sources  # type: ignore[arg-type]


def errors(sources: list[Source]) -> dict[str, str]:
    return {s.name: s.member.error for s in sources if s.member is not None and s.member.error}


def test_a_tar_file_lists_its_image_members_in_archive_order(tmp_path: Path) -> None:
    sample_tar(tmp_path / "000.tar")
    sources = listed(tmp_path, "000.tar")
    assert [s.name for s in sources] == ["000.tar/s2.jpg", "000.tar/s1.png"]  # the archive's order, not names'
    assert all(s.path == "000.tar" and s.member is not None and not s.member.error for s in sources)
    assert [s.label for s in sources] == ["000.tar/s2.jpg", "000.tar/s1.png"]
    assert sources == sorted(sources)


def test_bad_members_get_errors_and_nothing_leaves_the_output_folder(tmp_path: Path) -> None:
    make_tar(
        tmp_path / "bad.tar",
        [
            ("./ok.jpg", PHOTO),
            ("../evil.jpg", PHOTO),
            ("/abs.jpg", PHOTO),
            ("link.jpg", "->ok.jpg"),
            ("folder.jpg", "dir"),
            ("empty.png", b""),
        ],
    )
    sources = listed(tmp_path, "bad.tar")
    assert [s.name for s in sources] == [
        "bad.tar/ok.jpg", "bad.tar/../evil.jpg", "bad.tar//abs.jpg", "bad.tar/link.jpg", "bad.tar/empty.png"
    ]  # fmt: skip
    errs = errors(sources)
    assert errs["bad.tar/../evil.jpg"].startswith("unsafe member name '../evil.jpg'")
    assert errs["bad.tar//abs.jpg"].startswith("unsafe member name '/abs.jpg'")
    assert errs["bad.tar/link.jpg"] == "not a regular file (symbolic link to ok.jpg)"
    for source in sources[1:4]:
        assert source.member is not None
        with pytest.raises(ImageError, match="unsafe member|symbolic link"):
            read_member(str(tmp_path / source.path), source.member, max_bytes=2**30)
    empty = sources[4].member
    assert empty is not None
    with pytest.raises(ImageError, match=r"bad.tar/empty.png: empty member \(0 bytes\)"):
        read_member(str(tmp_path / "bad.tar"), empty, max_bytes=2**30)
    assert [safe_inner(n) for n in ("a//b/./c.jpg", "a/../b.jpg", "/x.jpg", "./")] == ["a/b/c.jpg", None, None, None]


@pytest.mark.parametrize("cut", ["in-member", "in-header", "garbage-header", "empty"])
def test_a_broken_tar_file_keeps_the_members_before_the_break_and_names_where_it_broke(
    tmp_path: Path, cut: str
) -> None:
    whole = sample_tar(tmp_path / "whole.tar").read_bytes()
    second = member_offset(tmp_path / "whole.tar", "s1.png")
    text_header = member_offset(tmp_path / "whole.tar", "s2.txt") - 512
    broken = tmp_path / "003.tar"
    expected_names = ["003.tar/s2.jpg", "003.tar"]
    if cut == "in-member":
        broken.write_bytes(whole[: second + 100])
        expected = f"truncated at byte {second + 100} (in member s1.png)"
    elif cut == "in-header":
        broken.write_bytes(whole[: text_header + 10])
        expected = f"truncated at byte {text_header + 10} (after member s2.jpg)"
    elif cut == "garbage-header":
        broken.write_bytes(whole[:text_header] + b"\x07" * 2048)
        expected = f"unreadable member header at byte {text_header} (after member s2.jpg)"
    else:
        broken.write_bytes(b"")
        expected_names = ["003.tar"]
        expected = "empty archive (0 bytes)"
    sources = listed(tmp_path, "003.tar")
    assert [s.name for s in sources] == expected_names
    assert errors(sources) == {"003.tar": expected}
    assert sources[-1].label == "003.tar"  # the error line names the archive: "003.tar: truncated at byte ..."


def test_a_member_is_prepared_exactly_as_the_same_bytes_in_a_loose_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample_tar(tmp_path / "a.tar")
    (tmp_path / "s2.jpg").write_bytes(PHOTO)
    member = listed(tmp_path, "a.tar")[0]
    preparer = Preparer(PreprocessConfig(num_crops=4))
    monkeypatch.chdir(tmp_path)
    inside, loose = preparer(member), preparer(Source("s2.jpg", "s2.jpg", ""))
    assert inside.item is not None and loose.item is not None
    assert np.array_equal(inside.item.tiles, loose.item.tiles) and inside.item.grid == loose.item.grid
    assert inside.facts.sha256 == loose.facts.sha256
    st = os.stat(tmp_path / "a.tar")  # resume compares the archive's size and time
    assert (inside.facts.size, inside.facts.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert member.member is not None
    data, _ = read_member("a.tar", member.member, max_bytes=2**30)
    assert data == PHOTO
    with pytest.raises(ImageError, match="member too large"):
        read_member("a.tar", member.member, max_bytes=100)


def test_parquet_rows_are_named_by_key_or_row_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pyarrow")
    hf = {"bytes": PHOTO, "path": "x.jpg"}
    make_parquet(
        tmp_path / "hf.parquet",
        {"__key__": ["k0", "k1", "../k2", "k0"], "image": [hf, None, hf, hf]},
        row_group_size=2,
    )
    make_parquet(tmp_path / "plain.parquet", {"caption": ["a", "b"], "png": [SQUARE, TINY]})
    sources = listed(tmp_path, "*.parquet")
    names = [s.name for s in sources]
    assert names == [
        "hf.parquet/k0",
        "hf.parquet/k1",
        "hf.parquet/../k2",
        "hf.parquet/k0#2",  # a repeated key: a record of its own (issue 17)
        "plain.parquet/00000000",
        "plain.parquet/00000001",
    ]
    assert errors(sources) == {
        "hf.parquet/../k2": "unsafe key '../k2': it would be written outside the output directory"
    }
    monkeypatch.chdir(tmp_path)
    assert read_member("hf.parquet", sources[0].member, max_bytes=2**30)[0] == PHOTO  # type: ignore[arg-type]
    null = sources[1].member
    assert null is not None
    with pytest.raises(ImageError, match=r"hf.parquet/k1: null image in column 'image'"):
        read_member("hf.parquet", null, max_bytes=2**30)
    assert read_member("plain.parquet", sources[5].member, max_bytes=2**30)[0] == TINY  # type: ignore[arg-type]
    other = listed(tmp_path, "plain.parquet", image_column="caption")[0]
    with pytest.raises(ImageError, match="holds str, not image bytes"):
        read_member("plain.parquet", other.member, max_bytes=2**30)  # type: ignore[arg-type]
    missing = listed(tmp_path, "plain.parquet", image_column="jpeg")
    assert errors(missing) == {"plain.parquet": "no image column ('jpeg') among caption, png"}


def test_parquet_without_pyarrow_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ParquetUnavailableError, match=r"pip install 'phi3embed\[parquet\]'"):
        listed(tmp_path, "x.parquet")


def test_brace_patterns_expand_as_bash_does() -> None:
    assert expand_braces("data/{000..003}.tar") == [f"data/{i:03d}.tar" for i in range(4)]
    assert expand_braces("{a,b{c,d}}.jpg") == ["a.jpg", "bc.jpg", "bd.jpg"]
    assert expand_braces("{1..10..4}{x}") == ["1{x}", "5{x}", "9{x}"]
    assert expand_braces("{c..a}") == ["c", "b", "a"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("plain{") == ["plain{"]


def test_brace_patterns_work_for_every_input_kind(tmp_path: Path) -> None:
    for i in range(3):
        sample_tar(tmp_path / f"{i:03d}.tar")
    (tmp_path / "d1").mkdir()
    (tmp_path / "d1" / "a.png").write_bytes(TINY)
    (tmp_path / "b.png").write_bytes(TINY)
    (tmp_path / "{x}.png").write_bytes(TINY)  # a file really named so is that file
    sources = listed(tmp_path, "{000..001}.tar", "{d1,b.png}", "{000,002}*.tar", "{x}.png")
    assert [s.name for s in sources] == [
        "000.tar/s2.jpg", "000.tar/s1.png", "001.tar/s2.jpg", "001.tar/s1.png", "002.tar/s2.jpg", "002.tar/s1.png",
        "a.png", "b.png", "{x}.png",
    ]  # fmt: skip
    with pytest.raises(InputError, match="no such file"):
        listed(tmp_path, "{000..009}.tar")


def test_folders_yield_loose_images_only_and_stdin_lines_may_be_archives(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    sample_tar(tmp_path / "d" / "000.tar")
    (tmp_path / "d" / "a.png").write_bytes(TINY)
    assert [s.name for s in listed(tmp_path, "d")] == ["a.png"]
    import io

    sources = list_inputs(["-"], stdin=io.StringIO("d/000.tar\n"), cwd=str(tmp_path)).sources
    assert [s.name for s in sources] == ["d/000.tar/s2.jpg", "d/000.tar/s1.png"]


def test_shards_take_whole_archives_and_together_cover_every_image(tmp_path: Path) -> None:
    for i in range(8):
        sample_tar(tmp_path / f"{i:03d}.tar")
    for i in range(6):
        (tmp_path / f"loose{i}.png").write_bytes(TINY)
    sources = listed(tmp_path, "*.tar", "*.png")
    parts = [select_shard(sources, i, 3) for i in range(3)]
    assert sorted(s.name for part in parts for s in part) == sorted(s.name for s in sources)
    for i, part in enumerate(parts):
        for s in part:
            assert shard_of(s.member.archive if s.member else s.name, 3) == i
    archives = [{s.path for s in part if s.member} for part in parts]
    assert sum(len(a) for a in archives) == 8  # no archive in two parts


def test_sources_sort_with_each_archive_together(tmp_path: Path) -> None:
    sample_tar(tmp_path / "m.tar")
    (tmp_path / "a.png").write_bytes(TINY)
    (tmp_path / "z.png").write_bytes(TINY)
    (tmp_path / "m.tar.png").write_bytes(TINY)
    names = [s.name for s in listed(tmp_path, ".")]
    assert names == ["a.png", "m.tar.png", "z.png"]  # a folder: no archive read
    names = [s.name for s in listed(tmp_path, "*")]
    assert names == ["a.png", "m.tar.png", "m.tar/s2.jpg", "m.tar/s1.png", "z.png"]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_member_headers_are_read_as_tarfile_reads_them(tmp_path: Path, fmt: int) -> None:
    """Plain headers are parsed without tarfile; long names (ustar prefix, GNU and pax long-name headers),
    non-ASCII names and links go through it: the listing is tarfile's either way."""
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "p" * 90
    names = ["a.jpg", f"{long_dir}/b.png", "sub/é.png", f"{'x' * 150}.jpg" if fmt != tarfile.USTAR_FORMAT else "c.jpg"]
    path = tmp_path / "f.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        for n in names:
            info = tarfile.TarInfo(n)
            info.size = len(TINY)
            tf.addfile(info, io.BytesIO(TINY))
    sources = listed(tmp_path, "f.tar")
    with tarfile.open(path) as tf:
        expected = [(m.name, m.offset_data, m.size) for m in tf.getmembers()]
    got = [(s.member.inner, s.member.offset, s.member.size) for s in sources if s.member is not None]
    assert got == expected


def test_plan_reads_members_as_loose_files_from_their_first_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from phi3embed.core.config import VisionConfig
    from phi3embed.jobs import plan as plan_module

    exif = (IMAGES / "exif_rot6_640x480.jpg").read_bytes()
    big = (IMAGES / "photo_1000x750.jpg").read_bytes()
    assert len(big) > plan_module.HEAD_BYTES
    make_tar(tmp_path / "p.tar", [("exif.jpg", exif), ("big.jpg", big), ("bad.jpg", b"not an image")])
    for name, data in (("exif.jpg", exif), ("big.jpg", big), ("bad.jpg", b"not an image")):
        (tmp_path / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    vision = VisionConfig()
    loose = plan_module.plan(listed(tmp_path, "*.jpg"), vision=vision, preprocess=PreprocessConfig(num_crops=4))
    inside = plan_module.plan(listed(tmp_path, "p.tar"), vision=vision, preprocess=PreprocessConfig(num_crops=4))
    by_name = {row.name: row for row in loose.rows}
    for row in inside.rows:
        same = by_name[row.name.removeprefix("p.tar/")]
        assert (row.width, row.height, row.num_tokens, row.ok) == (same.width, same.height, same.num_tokens, same.ok)


def test_repeated_names_inside_an_archive_each_keep_an_image_under_a_suffix(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    make_tar(tmp_path / "a.tar", [("x.png", TINY), ("y.png", SQUARE), ("x.png", SQUARE), ("./x.png", PHOTO)])
    make_parquet(tmp_path / "k.parquet", {"__key__": ["k", "k#2", "k", "k"], "png": [TINY, SQUARE, PHOTO, TINY]})
    listing = list_inputs(["a.tar", "k.parquet"], cwd=str(tmp_path))
    tar = [s for s in listing.sources if s.name.startswith("a.tar/")]
    assert [s.name for s in tar] == ["a.tar/x.png", "a.tar/y.png", "a.tar/x.png#2", "a.tar/x.png#3"]  # archive order
    members = [s.member for s in tar if s.member is not None]
    assert [m.inner for m in members] == ["x.png", "y.png", "x.png", "x.png"]  # errors name the member as stored
    assert [read_member(str(tmp_path / "a.tar"), m, max_bytes=2**30)[0] for m in members] == [
        TINY,
        SQUARE,
        SQUARE,
        PHOTO,
    ]
    parquet = [s.name for s in listing.sources if s.name.startswith("k.parquet/")]
    assert parquet == ["k.parquet/k", "k.parquet/k#2", "k.parquet/k#3", "k.parquet/k#4"]  # "k#2" was a real key
    assert listing.repeated == ["a.tar/x.png#2", "a.tar/x.png#3", "k.parquet/k#3", "k.parquet/k#4"]
    again = list_inputs(["a.tar", "k.parquet"], cwd=str(tmp_path))
    assert [(s.name, s.member) for s in again.sources] == [(s.name, s.member) for s in listing.sources]  # stable


def test_folders_count_the_archives_and_looping_links_they_skip(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.png").write_bytes(TINY)
    make_tar(tmp_path / "d" / "sub" / "000.tar", [("x.png", TINY)])
    make_tar(tmp_path / "d" / "001.tar", [("y.png", TINY)])
    os.symlink("self.png", tmp_path / "d" / "self.png")  # a link to itself
    os.symlink("..", tmp_path / "d" / "sub" / "up")  # a link to a folder above it
    folder = list_inputs(["d"], cwd=str(tmp_path))
    assert [s.name for s in folder.sources] == ["a.png"]
    assert folder.archive_paths == {str(tmp_path / "d" / "sub" / "000.tar"), str(tmp_path / "d" / "001.tar")}
    assert folder.looping_links == {str(tmp_path / "d" / "self.png")}
    named = list_inputs(["d", "d/001.tar"], cwd=str(tmp_path))  # an archive also named is read, not skipped
    assert named.archive_paths == {str(tmp_path / "d" / "sub" / "000.tar")}
    assert "d/001.tar/y.png" in [s.name for s in named.sources]
    globbed = list_inputs(["d/**/*.png"], cwd=str(tmp_path))  # ** follows links to folders: not around a loop
    assert sorted(s.name for s in globbed.sources) == ["a.png", "self.png"]  # self.png: an error record when read
    assert globbed.looping_links == {str(tmp_path / "d" / "sub" / "up")}


@pytest.mark.parametrize(
    ("suffix", "tool"), [(".tar.gz", "gzip"), (".tgz", "gzip"), (".tar.bz2", "bzip2"), (".tar", "gzip")]
)
def test_a_compressed_tar_file_is_one_error_that_says_how_to_decompress_it(
    tmp_path: Path, suffix: str, tool: str
) -> None:
    import bz2
    import gzip

    plain = make_tar(tmp_path / "plain.tar", [("a.png", TINY)]).read_bytes()
    name = f"x{suffix}"
    (tmp_path / name).write_bytes(bz2.compress(plain) if tool == "bzip2" else gzip.compress(plain))
    (source,) = listed(tmp_path, name)
    target = "x-plain.tar" if suffix == ".tar" else "x.tar"
    assert source.name == name and source.member is not None
    assert source.member.error == (
        f"compressed tar file ({tool}): members are read in place, which compressed bytes do not allow; "
        f"decompress it once and pass the .tar ({tool} -dc {name} > {target})"
    )
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / name).write_bytes(b"")
    assert list_inputs(["d"], cwd=str(tmp_path)).archive_paths == {str(tmp_path / "d" / name)}  # counted in folders
