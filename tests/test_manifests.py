"""combine: are the outputs of a job's --shard parts complete, and one manifest that reads as the whole job.

The parts are made by ``encode --shard I/N`` in this process (tiny checkpoint, no worker processes), the
check runs through the command, also in this process (the console script itself is tested in
test_cli_encode.py).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import GOLDEN, TINY_128K
from typer.testing import CliRunner

import phi3embed
from phi3embed.cli.app import app
from phi3embed.inputs.listing import expand_inputs, select_shard
from phi3embed.outputs.combine import check_outputs, write_combined
from phi3embed.outputs.manifest import MANIFEST

CKPT = str(GOLDEN / "checkpoints" / TINY_128K)
NAMES = ["rgb_336x336.png", "tiny_7x9.png", "gray_L_640x480.png", "palette_P_320x240.png", "webp_700x500.webp"]


@dataclass
class Job:
    root: Path

    def __truediv__(self, name: str) -> Path:
        return self.root / name


def cli(*args: str, cwd: Path) -> Any:
    """The command in this process, run from ``cwd`` (relative INPUTs resolve there)."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, list(args), catch_exceptions=False)
    finally:
        os.chdir(here)


def encode(cwd: Path, *args: str) -> None:
    result = cli("encode", *args, "--model", CKPT, "--num-crops", "2", "--workers", "0", "--quiet", cwd=cwd)
    assert result.exit_code in (0, 1), result.output


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, golden: Path) -> Job:
    root = tmp_path_factory.mktemp("shards")
    (root / "imgs").mkdir()
    for name in NAMES:
        (root / "imgs" / name).symlink_to(golden / "images" / name)
    sources = expand_inputs(["imgs"], cwd=str(root))
    assert all(select_shard(sources, i, 2) for i in range(2)), "both shards must hold images"
    encode(root, "imgs", "-o", "full")
    for i in range(2):
        encode(root, "imgs", "-o", f"part-{i}", "--shard", f"{i}/2")
    return Job(root)


def merge(job: Job, *args: str) -> tuple[int, dict[str, Any], str]:
    result = cli("combine", *args, "--json", cwd=job.root)
    return result.exit_code, json.loads(result.stdout), result.stderr


def test_shards_together_are_complete_and_read_as_the_full_run(job: Job) -> None:
    proc = cli(
        "combine", "part-0", "part-1", "--inputs", "imgs", "-o", "all/manifest.jsonl", "--json",
        cwd=job.root,
    )  # fmt: skip
    assert proc.exit_code == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["complete"] and report["listed"] == report["ok"] == len(NAMES)
    assert report["missing"] == report["failed"] == report["lost"] == [] and not report["mixed_settings"]
    assert "complete" in proc.stderr
    combined = [json.loads(line) for line in (job / "all" / MANIFEST).read_text().splitlines()]
    assert [r["name"] for r in combined] == sorted(NAMES)
    assert all(r["output"].startswith(("../part-0/", "../part-1/")) for r in combined)
    whole = {r["name"]: t for r, t in phi3embed.read(job / "full")}
    merged = {r["name"]: t for r, t in phi3embed.read(job / "all")}
    assert merged.keys() == whole.keys() and all(torch.equal(merged[n], whole[n]) for n in whole)


def test_a_missing_part_is_reported(job: Job) -> None:
    code, report, err = merge(job, "part-0", "--inputs", "imgs")
    expected = sorted(r["name"] for r in map(json.loads, (job / "part-1" / MANIFEST).read_text().splitlines()))
    assert code == 1 and not report["complete"]
    assert report["missing"] == expected
    assert "incomplete" in err and expected[0] in err
    # Without the input list only what was recorded is checked: part-0 alone is then "complete".
    code, report, _ = merge(job, "part-0")
    assert code == 0 and report["listed"] is None and report["missing"] == []


def test_failed_lost_and_mixed_outputs_are_reported(job: Job, tmp_path: Path) -> None:
    work = Job(tmp_path)
    for name in ("imgs", "part-0", "part-1"):
        shutil.copytree(job / name, work / name, symlinks=True)
    # lost: an ok record whose file was deleted
    victim = json.loads((work / "part-1" / MANIFEST).read_text().splitlines()[0])
    (work / "part-1" / victim["output"]).unlink()
    code, report, _ = merge(work, "part-0", "part-1", "--inputs", "imgs")
    assert code == 1 and report["lost"] == [victim["name"]]
    # ... until the part is run again (resume re-encodes exactly that image)
    encode(work.root, "imgs", "-o", "part-1", "--shard", "1/2")
    assert merge(work, "part-0", "part-1", "--inputs", "imgs")[0] == 0
    # failed: an input whose only record is an error
    (work / "bad").mkdir()
    (work / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    encode(work.root, "bad", "-o", "part-bad")
    code, report, err = merge(work, "part-0", "part-1", "part-bad", "--inputs", "imgs", "--inputs", "bad")
    assert code == 1 and [f["name"] for f in report["failed"]] == ["broken.png"]
    assert report["failed"][0]["error"].startswith("bad/broken.png: ") and "bad/broken.png" in err
    # mixed settings: one part made with another num_crops
    shutil.rmtree(work / "part-1")
    result = cli(
        "encode", "imgs", "-o", "part-1", "--shard", "1/2", "--model", CKPT, "--num-crops", "3", "--workers", "0",
        cwd=work.root,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    code, report, err = merge(work, "part-0", "part-1", "--inputs", "imgs")
    assert code == 1 and report["mixed_settings"] and "settings" in err


def test_an_ok_record_anywhere_beats_errors_elsewhere(job: Job, tmp_path: Path) -> None:
    good = job / "part-0"
    name = json.loads((good / MANIFEST).read_text().splitlines()[0])["name"]
    other = tmp_path / "retry"
    other.mkdir()
    error = {"name": name, "status": "error", "error": f"imgs/{name}: boom", "output": None, "time": "9999"}
    (other / MANIFEST).write_text(json.dumps(error) + "\n")
    report = check_outputs([good, other])
    assert report.chosen[name].root == good and report.failed == []


def test_usage_errors(job: Job, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = cli("combine", str(tmp_path / "empty"), cwd=job.root)
    assert result.exit_code == 2 and "no manifest.jsonl" in result.stderr
    result = cli("combine", "part-0", "part-1", "--out", "part-0/manifest.jsonl", cwd=job.root)
    assert result.exit_code == 2 and "is the manifest of part-0" in result.stderr
    result = cli("combine", "part-0", "--inputs", "nowhere", cwd=job.root)
    assert result.exit_code == 2 and "nowhere" in result.stderr
    with pytest.raises(phi3embed.Phi3EmbedError):
        write_combined(check_outputs([job / "part-0"]), job / "part-0" / MANIFEST)


def test_merge_manifests_is_a_hidden_alias_of_combine(job: Job, tmp_path: Path) -> None:
    """Scripts written for the old name keep working; the help lists only ``combine``."""
    out = tmp_path / "all.jsonl"
    proc = cli("merge-manifests", "part-0", "part-1", "--inputs", "imgs", "--out", str(out), "--json", cwd=job.root)
    assert proc.exit_code == 0 and json.loads(proc.stdout)["complete"], proc.stderr
    assert [json.loads(line)["name"] for line in out.read_text().splitlines()] == sorted(NAMES)
    top = cli("--help", cwd=job.root).stdout
    assert "combine" in top and "merge-manifests" not in top
