"""Input edges through the real ``phi3embed`` console script (issue 17 items 2, 4, 5): repeated names inside
archives keep a record each (both engines, stable on resume, the same in plan); a truncated output is encoded
again; combine judges the images listed now; what the listing skipped is said once per kind, the same in plan;
a compressed tar file is one clear error."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from archivefiles import PHOTO, SQUARE, TINY, make_parquet, make_tar
from conftest import GOLDEN, TINY_128K
from safetensors import safe_open

_SCRIPT = Path(sys.executable).with_name("phi3embed")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "phi3embed"]
MODEL = str(GOLDEN / "checkpoints" / TINY_128K)

pytestmark = pytest.mark.e2e  # console-script subprocesses


def phi3embed(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False)


def encode(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return phi3embed(cwd, "encode", *args, "--model", MODEL, "--num-crops", "4", "--jsonl")


def plan(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return phi3embed(cwd, "plan", *args, "--num-crops", "4", "--json")


def records(run: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in map(json.loads, run.stdout.splitlines())}


def notes(stderr: str) -> list[str]:
    """The summary's note rows (or plan's note lines), unfolded."""
    return [line.split("note", 1)[1].strip(" :") for line in stderr.splitlines() if line.lstrip().startswith("note")]


def test_repeated_names_inside_archives_get_a_record_each_in_both_engines(tmp_path: Path) -> None:
    make_tar(tmp_path / "a.tar", [("x.png", TINY), ("x.txt", b"caption"), ("x.png", SQUARE), ("y.jpg", PHOTO)])
    make_parquet(tmp_path / "k.parquet", {"__key__": ["k", "k"], "png": [SQUARE, TINY]})
    expected = {"a.tar/x.png", "a.tar/x.png#2", "a.tar/y.jpg", "k.parquet/k", "k.parquet/k#2"}
    planned_names: set[str] = set()
    for archive in ("a.tar", "k.parquet"):  # one at a time: plan over a tar and a parquet file together sometimes
        planned = plan(tmp_path, archive)  # aborts at exit (pyarrow/torch threads, also before issue 17)
        assert planned.returncode == 0, planned.stderr
        doc = json.loads(planned.stdout)
        planned_names |= {row["name"] for row in doc["images"]}
        assert doc["totals"]["repeated_names"] == 1
        assert "1 image inside archives repeats the name of an earlier image" in planned.stderr
    assert planned_names == expected

    run = encode(tmp_path, "a.tar", "k.parquet", "-o", "out")
    assert run.returncode == 0, run.stderr
    got = records(run)
    assert set(got) == expected and all(r["status"] == "ok" for r in got.values())
    out = tmp_path / "out"
    assert got["a.tar/x.png#2"]["sha256"] != got["a.tar/x.png"]["sha256"]  # two images, each encoded
    assert not np.array_equal(np.load(out / "a.tar" / "x.png#2.npy"), np.load(out / "a.tar" / "x.png.npy"))
    assert "2 images inside archives repeat the name of an earlier image of the archive: kept under <name>#2, " in (
        " ".join(run.stderr.split())  # the summary table folds long rows
    )
    again = encode(tmp_path, "a.tar", "k.parquet", "-o", "out")
    assert again.returncode == 0 and records(again) == {}  # stable: the rerun finds every image done

    if pytest.importorskip("ray"):
        ray = encode(tmp_path, "a.tar", "k.parquet", "-o", "ray", "--engine", "ray", "--actors", "1", "-q")
        assert ray.returncode == 0, ray.stderr
        assert set(records(ray)) == expected
        for name in ("a.tar/x.png#2.npy", "k.parquet/k#2.npy", "a.tar/x.png.npy"):
            assert (tmp_path / "ray" / name).read_bytes() == (out / name).read_bytes()


@pytest.mark.parametrize("pack", [False, True], ids=["files", "pack"])
def test_a_truncated_output_is_encoded_again_and_combine_calls_it_lost(tmp_path: Path, pack: bool) -> None:
    (tmp_path / "imgs").mkdir()
    for name, data in (("a.png", TINY), ("b.png", SQUARE), ("c.jpg", PHOTO)):
        (tmp_path / "imgs" / name).write_bytes(data)
    args = ["--pack", "1GB"] if pack else []
    first = encode(tmp_path, "imgs", "-o", "out", "-q", *args)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out"
    damaged = out / ("emb-00000.safetensors" if pack else "b.png.npy")
    whole = damaged.read_bytes()
    os.truncate(damaged, len(whole) - 100)  # a copy cut short
    combined = phi3embed(tmp_path, "combine", "out", "--inputs", "imgs", "--json", "-q")
    assert combined.returncode == 1
    lost = json.loads(combined.stdout)["lost"]
    assert lost == (["c.jpg"] if pack else ["b.png"])  # a pack keeps the members that lie inside what is left
    again = encode(tmp_path, "imgs", "-o", "out", "-q", *args)
    assert again.returncode == 0, again.stderr
    assert set(records(again)) == set(lost)
    if pack:
        record = records(again)["c.jpg"]
        with safe_open(str(out / record["output"]), "np") as f:
            assert list(f.get_tensor(record["key"]).shape) == record["shape"]
    else:
        assert damaged.read_bytes() == whole  # the same bytes as the first run
    assert phi3embed(tmp_path, "combine", "out", "--inputs", "imgs", "-q").returncode == 0


def test_combine_judges_the_images_listed_now(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(TINY)
    (tmp_path / "imgs" / "bad.png").write_bytes(PHOTO[:600])  # cut short: fails
    assert encode(tmp_path, "imgs", "-o", "out", "-q").returncode == 1
    (tmp_path / "imgs" / "bad.png").unlink()  # the user removes the bad file and reruns: nothing to do
    assert encode(tmp_path, "imgs", "-o", "out", "-q").returncode == 0
    combined = phi3embed(tmp_path, "combine", "out", "--inputs", "imgs", "--json")
    assert combined.returncode == 0, combined.stderr
    report = json.loads(combined.stdout)
    assert report["complete"] and report["stale"] == ["bad.png"] and report["failed"] == []
    assert "no longer among the inputs" in combined.stderr
    assert phi3embed(tmp_path, "combine", "out", "-q").returncode == 1  # without --inputs: every record is judged


def test_what_the_listing_skips_is_said_once_per_kind_in_encode_and_plan(tmp_path: Path) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.png").write_bytes(TINY)
    make_tar(d / "sub" / "000.tar", [("x.png", TINY)])
    make_tar(d / "001.tar", [("y.png", TINY)])
    os.symlink("loop.png", d / "loop.png")
    run = encode(tmp_path, "d", "-o", "out")
    assert run.returncode == 0, run.stderr
    assert set(records(run)) == {"a.png"}
    expected = [
        "skipped 2 archives inside folder INPUTs (d/001.tar, ...): folders never open tar or parquet files; to "
        "encode their images name them as INPUT, e.g. 'd/**/*.tar'",
        "skipped 1 looping symbolic link (d/loop.png)",
    ]
    planned = plan(tmp_path, "d")
    assert notes(planned.stderr) == expected
    totals = json.loads(planned.stdout)["totals"]
    assert (totals["skipped_archives"], totals["skipped_looping_links"]) == (2, 1)
    summary = " ".join(run.stderr.split())  # the summary table folds long rows
    for line in expected:
        assert line in summary
    with (tmp_path / "out" / "manifest.jsonl").open("a") as fh:
        fh.write("not a record\n")
    rerun = encode(tmp_path, "d", "-o", "out")
    assert rerun.returncode == 0
    manifest = tmp_path / "out" / "manifest.jsonl"
    assert f"skipped 1 line of {manifest.relative_to(tmp_path)} that cannot be read" in " ".join(rerun.stderr.split())
    archives = encode(tmp_path, "d/**/*.tar", "-o", "out2", "-q")  # the recipe the note gives
    assert archives.returncode == 0 and set(records(archives)) == {"001.tar/y.png", "sub/000.tar/x.png"}


def test_a_compressed_tar_file_is_one_clear_error(tmp_path: Path) -> None:
    plain = make_tar(tmp_path / "p.tar", [("x.png", TINY)])
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    run = encode(tmp_path, "s.tar.gz", "-o", "out", "-q")
    assert run.returncode == 1
    expected = (
        "s.tar.gz: compressed tar file (gzip): members are read in place, which compressed bytes do not allow; "
        "decompress it once and pass the .tar (gzip -dc s.tar.gz > s.tar)"
    )
    assert records(run)["s.tar.gz"]["error"] == expected
    assert run.stderr.strip() == f"error: {expected}"
    planned = plan(tmp_path, "s.tar.gz")
    assert planned.returncode == 1 and f"error: {expected}" in planned.stderr
    subprocess.run("gzip -dc s.tar.gz > s.tar", shell=True, cwd=tmp_path, check=True)  # the recipe works
    fixed = encode(tmp_path, "s.tar", "-o", "out", "-q")
    assert fixed.returncode == 0 and set(records(fixed)) == {"s.tar/x.png"}
