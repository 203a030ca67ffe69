"""The compact listing gives exactly the sources a plain listing gives: random trees (folders, hidden entries,
links, names that are not UTF-8, tar and parquet archives) listed through random INPUTs (folders, globs with
``**``, files, braces, ``-``, absolute paths, paths outside the current directory, repeats), compared with a
reference built here from ``os.walk``, ``glob`` and a dict of names; the finished-archive hook; and that no
Source object per image is held."""

from __future__ import annotations

import gc
import glob
import io
import os
import random
import re
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from archivefiles import TINY, make_parquet, make_tar

from phi3embed.inputs import listing as listing_module
from phi3embed.inputs.archives import archive_kind, list_archive
from phi3embed.inputs.listing import (
    IMAGE_EXTENSIONS,
    InputError,
    Source,
    expand_braces,
    list_inputs,
    looks_like_image,
    select_shard,
    shard_of,
)

PNG_HEAD = b"\x89PNG\r\n\x1a\n" + b"\0" * 8
MAGIC = re.compile(r"[*?[]")

# --------------------------------------------------------------------------- the reference: a plain listing


def _display(path: str, cwd: str) -> str:
    absolute = os.path.abspath(path)
    return os.path.relpath(absolute, cwd) if absolute.startswith(cwd.rstrip("/") + "/") else absolute


def _file_name(path: str, cwd: str) -> str:
    absolute = os.path.abspath(os.path.join(cwd, path))
    if absolute == cwd or absolute.startswith(cwd.rstrip("/") + "/"):
        return os.path.relpath(absolute, cwd)
    return absolute.lstrip("/")


def _under(path: str, root: str) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(root))


def _walk_files(top: str, excluded: set[str]) -> list[str]:
    """What a folder INPUT lists under ``top``: regular files (or links to them) that are images and not
    archives, broken links with an image extension; no hidden entry, no link to a folder followed."""
    out = []
    for folder, dirs, files in os.walk(top, followlinks=False):
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".")
            and not os.path.islink(os.path.join(folder, d))
            and os.path.abspath(os.path.join(folder, d)) not in excluded
        ]
        for name in files:
            path = os.path.join(folder, name)
            if name.startswith("."):
                continue
            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:  # a broken link
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    out.append(path)
                continue
            if stat.S_ISREG(mode) and archive_kind(name) is None and looks_like_image(path):
                out.append(path)
    return out


def _reference_file(path: str, name: str, root: str, cwd: str) -> list[Source]:
    if archive_kind(path) is None:
        return [Source(name, path, root)]
    found = list_archive(os.path.join(cwd, path), name, image_extensions=IMAGE_EXTENSIONS, repeated=[])
    return [Source(n, path, root, m) for n, m in found]


def _reference_glob(arg: str, cwd: str, excluded: set[str]) -> list[Source]:
    parts = Path(arg).parts
    literal = []
    for part in parts[:-1]:
        if MAGIC.search(part):
            break
        literal.append(part)
    root_arg = os.path.join(*literal) if literal else "."
    root = os.path.join(cwd, root_arg)
    found: list[Source] = []
    for match in sorted(glob.glob(os.path.join(cwd, arg), recursive=True)):
        try:
            mode: int | None = os.stat(match).st_mode
        except OSError:
            mode = None
        if mode is not None and stat.S_ISDIR(mode):
            found += [Source(_under(p, root), _display(p, cwd), root_arg) for p in _walk_files(match, excluded)]
        elif mode is not None and not stat.S_ISREG(mode):
            continue
        elif mode is not None and archive_kind(match) is not None:
            found += _reference_file(_display(match, cwd), _under(match, root), root_arg, cwd)
        elif os.path.splitext(match)[1].lower() in IMAGE_EXTENSIONS if mode is None else looks_like_image(match):
            found.append(Source(_under(match, root), _display(match, cwd), root_arg))
    if not found:
        raise InputError("no image matches this pattern", path=arg)
    return found


def reference(inputs: Sequence[str], cwd: str, stdin: Sequence[str], exclude: Sequence[str] = ()) -> list[Source]:
    """The sources of ``inputs`` as a dict of all names and a sort of all Sources give them; an InputError
    names the first pair of files that would share a name (any such pair: see :func:`conflicts`)."""
    excluded = {os.path.abspath(e) for e in exclude}
    found: list[Source] = []
    for arg in inputs:
        if arg == "-":
            for line in stdin:
                found += _reference_file(line, _file_name(line, cwd), "", cwd)
            continue
        for one in [arg] if os.path.lexists(os.path.join(cwd, arg)) else expand_braces(arg):
            path = os.path.join(cwd, one)
            if os.path.isdir(path):
                found += [Source(_under(p, path), _display(p, cwd), one) for p in _walk_files(path, excluded)]
            elif os.path.lexists(path):
                found += _reference_file(one, _file_name(one, cwd), "", cwd)
            elif MAGIC.search(one):
                found += _reference_glob(one, cwd, excluded)
            else:
                raise InputError("no such file or directory", path=one)
    by_name: dict[str, Source] = {}
    problems = []
    for src in found:
        seen = by_name.setdefault(src.name, src)
        if os.path.abspath(os.path.join(cwd, seen.path)) != os.path.abspath(os.path.join(cwd, src.path)):
            first, second = sorted([seen.path, src.path])
            message = (
                f"{first} and {second} would both be written as {src.name!r}; "
                "encode them in separate runs or list them relative to a common directory"
            )
            problems.append(str(InputError(message, path=src.name)))
    if problems:
        raise Conflicts(problems)
    return sorted(by_name.values(), key=Source.sort_key)


class Conflicts(Exception):
    """Names two files share: the listing must report one of them (which one first depends on the order the
    file system lists a folder in)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(lines[0])
        self.lines = lines


# --------------------------------------------------------------------------- random trees and INPUTs

NAMES = ["x.png", "y.JPG", "z.webp", "noext", "sig", "notes.txt", ".hidden.png", "é.png", "s p.png", "{b,c}.png"]


def _write(path: Path | bytes, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def make_tree(rng: random.Random, root: Path) -> list[str]:
    """A random tree under ``root``; the relative paths of its files (what ``-`` lines are drawn from)."""
    folders = ["a", "b", "a/c", "a/c/d", "b/e", ".hid", "a/.hid2", "arch"]
    files: list[str] = []
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in rng.sample(NAMES, rng.randint(1, 5)):
            data = b"plain text" if name in ("noext", "notes.txt") else PNG_HEAD if name == "sig" else TINY
            _write(root / folder / name, data)
            files.append(f"{folder}/{name}")
        if rng.random() < 0.4:  # a name that is not UTF-8
            _write(os.fsencode(root / folder) + b"/\xff\xfe-" + bytes([rng.randint(0x80, 0xFF)]) + b".png", TINY)
        if rng.random() < 0.3:
            os.symlink(root / folder / "x.png", root / folder / "link.png")  # maybe broken
            files.append(f"{folder}/link.png")
        if rng.random() < 0.2 and folder != "b/e":
            os.symlink(root / "b" / "e", root / folder / "dirlink")  # followed by ** only (not around a loop)
    for i in range(rng.randint(1, 4)):
        folder = rng.choice(["arch", "a", "b/e"])
        members = [
            (f"m{rng.randint(0, 5)}.{rng.choice(['png', 'jpg', 'txt'])}", TINY) for _ in range(rng.randint(0, 5))
        ]
        make_tar(root / folder / f"t{i}.tar", members)
        files.append(f"{folder}/t{i}.tar")
    if rng.random() < 0.5:
        keys = [f"k{rng.randint(0, 3)}" for _ in range(rng.randint(1, 4))]
        make_parquet(root / "arch" / "p.parquet", {"__key__": keys, "jpg": [TINY] * len(keys)})
        files.append("arch/p.parquet")
    return files


ARGS = [
    "a", "./a", "b", "a/c", "arch", "*", "*/*.png", "**/*.png", "a/**", "**/*.tar", "*/*.parquet", "b/*",
    "{a,b}", "arch/t{0..2}.tar", "a/x.png", "./a/x.png", "a/c/../x.png", "**/*.JPG", "a/c/*", "-",
]  # fmt: skip


def random_inputs(rng: random.Random, root: Path, files: list[str]) -> tuple[list[str], str, list[str]]:
    """INPUTs, the current directory (``root`` or a folder in it, so that some paths lie outside it), and the
    lines of ``-``."""
    cwd = str(root) if rng.random() < 0.7 else str(root / "b")
    inputs = []
    args = rng.sample(ARGS, rng.randint(1, 4))
    args = [a for a in args if os.path.lexists(root / a) or MAGIC.search(a) or a == "-" or rng.random() < 0.1]
    if rng.random() < 0.05:
        args.append("nothing/*.png")
    for arg in args or ["."]:
        if rng.random() < 0.2 and not MAGIC.search(arg) and arg != "-":
            arg = str(root / arg)  # absolute
        elif cwd != str(root) and arg != "-":
            arg = "../" + arg
        inputs.append(arg)
    if rng.random() < 0.2:
        inputs.append(inputs[0])  # the same INPUT twice
    stdin = []
    for path in rng.sample(files, min(len(files), rng.randint(0, 6))):
        stdin.append(rng.choice([path, "./" + path, str(root / path), os.path.relpath(root / path, cwd)]))
    if stdin and rng.random() < 0.3:
        stdin.append(stdin[0])
    return inputs, cwd, stdin


def _listed(inputs: list[str], cwd: str, stdin: list[str], **kw: object) -> listing_module.Listing:
    return list_inputs(inputs, cwd=cwd, stdin=io.StringIO("".join(s + "\n" for s in stdin)), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(40))
def test_listing_equals_the_plain_listing_on_random_trees(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    files = make_tree(rng, tmp_path)
    for _ in range(6):
        inputs, cwd, stdin = random_inputs(rng, tmp_path, files)
        exclude = [str(tmp_path / "a" / "c")] if rng.random() < 0.2 else []
        try:
            expected = reference(inputs, cwd, stdin, exclude)
        except (InputError, Conflicts) as exc:
            with pytest.raises(InputError) as raised:
                _listed(inputs, cwd, stdin, exclude=exclude)
            allowed = exc.lines if isinstance(exc, Conflicts) else [str(exc)]
            assert str(raised.value) in allowed, (inputs, cwd, stdin)
            continue
        got = _listed(inputs, cwd, stdin, exclude=exclude).sources
        assert list(got) == expected, (inputs, cwd, stdin)
        assert len(got) == len(expected)
        if expected:
            for i in [0, len(expected) - 1, -1, rng.randrange(len(expected))]:
                assert got[i] == expected[i]
            assert got[1:-1:2] == expected[1:-1:2]
        for count in (1, 3):
            parts = [select_shard(got, i, count) for i in range(count)]
            for i, part in enumerate(parts):
                assert list(part) == [s for s in expected if shard_of(s.group, count) == i]
                assert len(part) == len(list(part))


def test_names_of_several_inputs_interleave_in_name_order(tmp_path: Path) -> None:
    """Two folders whose names interleave, and an archive whose name falls between them: one sorted list."""
    for folder, names in (("p", ["1.png", "3.png", "5.png"]), ("q", ["2.png", "4.png"])):
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_bytes(TINY)
    make_tar(tmp_path / "3.tar", [("b.png", TINY), ("a.png", TINY)])
    got = list_inputs(["p", "q", "3.tar"], cwd=str(tmp_path)).sources
    expected = reference(["p", "q", "3.tar"], str(tmp_path), [])
    assert [s.name for s in got] == ["1.png", "2.png", "3.png", "3.tar/b.png", "3.tar/a.png", "4.png", "5.png"]
    assert list(got) == expected and [got[i] for i in range(-7, 7)] == expected + expected
    for count in (2, 3):
        for i in range(count):
            assert list(select_shard(got, i, count)) == [s for s in expected if shard_of(s.group, count) == i]


def test_no_source_object_is_held_per_image(tmp_path: Path) -> None:
    for i in range(3000):
        (tmp_path / f"{i:05d}.png").write_bytes(b"")
    gc.collect()
    before = sum(type(o) is Source for o in gc.get_objects())
    listing = list_inputs([str(tmp_path)])
    gc.collect()
    held = sum(type(o) is Source for o in gc.get_objects()) - before
    assert len(listing.sources) == 3000 and held < 10
    assert sum(1 for _ in listing.sources) == 3000


# --------------------------------------------------------------------------- the finished-archive hook


def _hook(finished: set[str], calls: list[tuple[str, str]]) -> Callable[[str, str, os.stat_result], int | None]:
    def finished_archive(path: str, name: str, st: os.stat_result) -> int | None:
        assert os.path.isabs(path) and stat.S_ISREG(st.st_mode) and st.st_size == os.path.getsize(path)
        calls.append((path, name))
        return 7 if os.path.basename(path) in finished else None

    return finished_archive


@pytest.mark.parametrize("seed", range(12))
def test_finished_archives_are_counted_not_opened(tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(1000 + seed)
    files = make_tree(rng, tmp_path)
    archives = sorted({os.path.basename(f) for f in files if archive_kind(f)})
    opened: list[str] = []

    def listing_archive(path: str, *args: object, **kw: object) -> object:
        opened.append(os.path.abspath(path))
        return list_archive(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(listing_module, "list_archive", listing_archive)
    for _ in range(5):
        inputs, cwd, stdin = random_inputs(rng, tmp_path, files)
        try:
            everything = reference(inputs, cwd, stdin)
        except (InputError, Conflicts):
            continue
        finished = set(rng.sample(archives, rng.randint(0, len(archives))))
        calls: list[tuple[str, str]] = []
        opened.clear()
        listing = _listed(inputs, cwd, stdin, finished_archive=_hook(finished, calls))
        done = {path for path, _ in calls if os.path.basename(path) in finished}
        assert not done & set(opened)  # never opened
        assert set(opened) | done == {path for path, _ in calls}  # every archive listed was asked about first
        members = {os.path.abspath(os.path.join(cwd, s.path)): s.member.archive for s in everything if s.member}
        assert members.items() <= set(calls)
        assert listing.finished_archives == {name: 7 for path, name in calls if path in done}
        assert listing.finished_images == 7 * len(listing.finished_archives)
        kept = [s for s in everything if not s.member or os.path.abspath(os.path.join(cwd, s.path)) not in done]
        assert list(listing.sources) == kept
        for count in (2, 3):
            for index in range(count):
                calls.clear()
                part = _listed(inputs, cwd, stdin, finished_archive=_hook(finished, calls), shard=(index, count))
                assert all(shard_of(name, count) == index for _, name in calls)  # only this shard's are asked
                assert list(select_shard(part.sources, index, count)) == [
                    s for s in kept if shard_of(s.group, count) == index
                ]
                assert part.finished_archives == {
                    n: 7 for n in listing.finished_archives if shard_of(n, count) == index
                }


def test_a_glob_that_finds_only_finished_archives_found_something(tmp_path: Path) -> None:
    make_tar(tmp_path / "0.tar", [("a.png", TINY)])
    listing = list_inputs(["*.tar", "0.tar"], cwd=str(tmp_path), finished_archive=lambda p, n, s: 1)
    assert len(listing.sources) == 0 and listing.finished_archives == {"0.tar": 1}


def test_two_archives_with_one_name_one_finished_is_an_error(tmp_path: Path) -> None:
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        make_tar(tmp_path / folder / "0.tar", [(f"{folder}.png", TINY)])
    with pytest.raises(InputError, match="would both be written as '0.tar'"):
        list_inputs(
            ["x/*.tar", "y/*.tar"],
            cwd=str(tmp_path),
            finished_archive=lambda path, name, st: 1 if "/x/" in path else None,
        )
