"""Finished archives are skipped whole (issue 20): a tar file whose every image is done gets a completion record
in the index file when the run ends; the next rerun does not open it, yet decides exactly as listing it would.

Each rerun is compared with the decision of the same rerun when every archive is listed (``--overwrite`` aside,
the index file deleted: the manifest alone), through the real command in this process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from archivefiles import IMAGES, SQUARE, TINY, make_tar
from conftest import GOLDEN, TINY_128K
from typer.testing import CliRunner

from phi3embed.cli.app import app
from phi3embed.inputs import listing as listing_module
from phi3embed.outputs.manifest import MANIFEST
from phi3embed.outputs.manifest_index import INDEX_SUFFIX, ManifestIndex

MODEL = str(GOLDEN / "checkpoints" / TINY_128K)


def encode(cwd: Path, *args: str) -> Any:
    here = os.getcwd()
    os.chdir(cwd)
    try:
        env = {"PHI3EMBED_MODEL": None, "HF_HUB_OFFLINE": "1"}
        return CliRunner().invoke(
            app, ["encode", "*.tar", "-o", "out", "--model", MODEL, "--num-crops", "4", *args], env=env
        )
    finally:
        os.chdir(here)


@pytest.fixture
def job(tmp_path: Path) -> Path:
    make_tar(tmp_path / "a.tar", [("x.png", TINY), ("x.txt", b"caption"), ("y.png", SQUARE)])
    make_tar(tmp_path / "b.tar", [("z.png", TINY), ("dup.png", (IMAGES / "tiny_7x9.png").read_bytes())])
    return tmp_path


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The archives whose headers listing reads."""
    seen: list[str] = []
    real = listing_module.list_archive

    def spy(path: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(listing_module, "list_archive", spy)
    return seen


def lines(job: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (job / "out" / MANIFEST).read_text().splitlines()]


def summary_counts(output: str) -> str:
    return " ".join(w for w in output.split() if w.isdigit())


def test_a_finished_archive_is_not_opened_and_the_rerun_decides_the_same(job: Path, opened: list[str]) -> None:
    first = encode(job)
    assert first.exit_code == 0, first.output
    assert sorted(opened) == ["a.tar", "b.tar"]
    archives = ManifestIndex.completed_archives(job / "out" / MANIFEST)
    assert {n: r["images"] for n, r in archives.items()} == {"a.tar": 2, "b.tar": 2}
    assert archives["a.tar"]["path"] == str(job / "a.tar")

    opened.clear()
    again = encode(job)
    assert again.exit_code == 0 and opened == []  # neither archive is read
    assert "4 listed" in again.output and "4 already done" in again.output, again.output
    assert len(lines(job)) == 4  # nothing written

    (job / "out" / (MANIFEST + INDEX_SUFFIX)).unlink()  # the plain way: every archive listed, every image checked
    plain = encode(job)
    assert plain.exit_code == 0 and sorted(opened) == ["a.tar", "b.tar"]
    assert summary_counts(plain.output) == summary_counts(again.output)


@pytest.mark.parametrize("damage", ["output removed", "output truncated", "archive touched", "other settings"])
def test_a_completion_record_that_no_longer_holds_lists_the_archive(job: Path, opened: list[str], damage: str) -> None:
    assert encode(job).exit_code == 0
    before = {r["name"]: r for r in lines(job)}
    args: list[str] = []
    if damage == "output removed":  # one name of three for the same bytes (hard links): only this one goes
        (job / "out" / "b.tar" / "z.png.npy").unlink()
    elif damage == "output truncated":  # (truncating a linked one would truncate all three)
        path = job / "out" / "a.tar" / "y.png.npy"
        path.write_bytes(path.read_bytes()[:-4])
    elif damage == "archive touched":
        os.utime(job / "a.tar", ns=(1, 1_000_000_000))
    else:
        args = ["--num-crops", "16"]
    opened.clear()
    rerun = encode(job, *args)
    assert rerun.exit_code == 0, rerun.output
    redone = {r["name"] for r in lines(job)[4:]}
    expected = {
        "output removed": {"b.tar/z.png"},
        "output truncated": {"a.tar/y.png"},
        "archive touched": {"a.tar/x.png", "a.tar/y.png"},
        "other settings": set(before),
    }[damage]
    assert redone == expected
    if damage in ("output truncated", "archive touched"):
        assert opened == ["a.tar"]  # the other one is still finished
    elif damage == "output removed":
        assert opened == ["b.tar"]
    archives = ManifestIndex.completed_archives(job / "out" / MANIFEST)
    assert set(archives) == {"a.tar", "b.tar"}  # done again, recorded again
    opened.clear()
    last = encode(job, *args)
    assert last.exit_code == 0 and opened == [] and len(lines(job)) == 4 + len(expected)


def test_overwrite_and_packs_list_every_archive(job: Path, opened: list[str]) -> None:
    assert encode(job).exit_code == 0
    opened.clear()
    assert encode(job, "--overwrite").exit_code == 0
    assert sorted(opened) == ["a.tar", "b.tar"] and len(lines(job)) == 8
    packed = encode(job, "--pack", "1MB", "--overwrite")
    assert packed.exit_code == 0
    opened.clear()
    assert encode(job, "--pack", "1MB").exit_code == 0
    assert sorted(opened) == ["a.tar", "b.tar"]  # pack members are judged from their records: listed as usual
    assert len(lines(job)) == 12
