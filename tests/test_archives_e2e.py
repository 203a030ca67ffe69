"""Tar and parquet INPUTs through the real ``phi3embed`` console script (issue 12): bad data, resume, ``--shard``
covering every member once, members bit-identical to loose files, and the Ray engine on a tar file
(token matrices, and --vectors alone)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from archivefiles import PHOTO, SQUARE, TINY, make_parquet, make_tar, member_offset, sample_tar
from conftest import GOLDEN, TINY_128K

import phi3embed as phi3embed_lib  # the module; phi3embed() below runs the console script

_SCRIPT = Path(sys.executable).with_name("phi3embed")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "phi3embed"]
MODEL = str(GOLDEN / "checkpoints" / TINY_128K)
CORRUPT = PHOTO[:600]  # a JPEG cut short: the decoder fails on it

pytestmark = pytest.mark.e2e  # console-script subprocesses


def phi3embed(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def encode(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return phi3embed(cwd, "encode", *args, "--model", MODEL, "--num-crops", "4", "--jsonl", "-q")


def records(run: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in map(json.loads, run.stdout.splitlines())}


def test_tar_files_with_bad_members_resume_and_match_loose_files(tmp_path: Path) -> None:
    sample_tar(tmp_path / "000.tar")
    make_tar(tmp_path / "001.tar", [("a.jpg", PHOTO), ("../evil.jpg", SQUARE), ("bad.jpg", CORRUPT), ("b.png", TINY)])
    whole = sample_tar(tmp_path / "x.tar").read_bytes()
    cut = member_offset(tmp_path / "x.tar", "s1.png") + 100
    (tmp_path / "002.tar").write_bytes(whole[:cut])
    (tmp_path / "x.tar").unlink()
    run = encode(tmp_path, "{000..002}.tar", "--workers", "2", "-o", "out")
    assert run.returncode == 1, run.stderr
    got = records(run)
    ok = {n for n, r in got.items() if r["status"] == "ok"}
    assert ok == {"000.tar/s2.jpg", "000.tar/s1.png", "001.tar/a.jpg", "001.tar/b.png", "002.tar/s2.jpg"}
    assert got["001.tar/../evil.jpg"]["error"].startswith("001.tar/../evil.jpg: unsafe member name '../evil.jpg'")
    assert got["001.tar/bad.jpg"]["error"].startswith("001.tar/bad.jpg: ")
    assert got["002.tar"]["error"] == f"002.tar: truncated at byte {cut} (in member s1.png)"
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "out" / "evil.jpg").exists()
    assert sorted(p.name for p in (tmp_path / "out" / "001.tar").iterdir()) == ["a.jpg.npy", "b.png.npy"]

    # the same bytes as loose files, encoded in another run: bit-identical outputs
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "s2.jpg").write_bytes(PHOTO)
    (tmp_path / "loose" / "b.png").write_bytes(TINY)
    loose = encode(tmp_path, "loose", "-o", "loose-out")
    assert loose.returncode == 0, loose.stderr
    out = tmp_path / "out"
    assert (out / "000.tar" / "s2.jpg.npy").read_bytes() == (tmp_path / "loose-out" / "s2.jpg.npy").read_bytes()
    assert (out / "001.tar" / "b.png.npy").read_bytes() == (tmp_path / "loose-out" / "b.png.npy").read_bytes()
    assert records(loose)["s2.jpg"]["sha256"] == got["000.tar/s2.jpg"]["sha256"]

    # a rerun skips every finished member; the bad ones fail again; a changed archive is encoded again
    again = encode(tmp_path, "{000..002}.tar", "--workers", "2", "-o", "out")
    assert again.returncode == 1
    assert set(records(again)) == {"001.tar/../evil.jpg", "001.tar/bad.jpg", "002.tar"}
    sample_tar(tmp_path / "000.tar")  # rewritten: a new modification time
    changed = encode(tmp_path, "000.tar", "-o", "out")
    assert changed.returncode == 0 and set(records(changed)) == {"000.tar/s2.jpg", "000.tar/s1.png"}


def test_parquet_rows_hf_struct_and_plain_bytes_with_a_null_row(tmp_path: Path) -> None:
    make_parquet(
        tmp_path / "hf.parquet",
        {"id": [10, 11, 12], "image": [{"bytes": PHOTO, "path": "p.jpg"}, None, {"bytes": TINY, "path": None}]},
        row_group_size=2,
    )
    make_parquet(tmp_path / "plain.parquet", {"pixels": [TINY, None]})
    run = encode(tmp_path, "hf.parquet", "-o", "out", "--workers", "2")
    assert run.returncode == 1, run.stderr
    got = records(run)
    assert {n: r["status"] for n, r in got.items()} == {
        "hf.parquet/10": "ok",
        "hf.parquet/11": "error",
        "hf.parquet/12": "ok",
    }
    assert got["hf.parquet/11"]["error"] == "hf.parquet/11: null image in column 'image'"
    plain = encode(tmp_path, "plain.parquet", "-o", "out", "--image-column", "pixels")
    assert {n: r["status"] for n, r in records(plain).items()} == {
        "plain.parquet/00000000": "ok",
        "plain.parquet/00000001": "error",
    }
    out = tmp_path / "out"
    assert (out / "hf.parquet" / "12.npy").read_bytes() == (out / "plain.parquet" / "00000000.npy").read_bytes()


def test_shards_cover_every_member_once_and_combine_agrees(tmp_path: Path) -> None:
    for i in range(6):
        make_tar(tmp_path / f"{i:03d}.tar", [(f"s{i}.png", TINY), (f"s{i}.txt", b"caption")])
    names: list[str] = []
    for part in range(2):
        run = encode(tmp_path, "*.tar", "--shard", f"{part}/2", "-o", f"part{part}")
        assert run.returncode == 0, run.stderr
        names += list(records(run))
    assert sorted(names) == [f"{i:03d}.tar/s{i}.png" for i in range(6)]
    plan = phi3embed(tmp_path, "plan", "*.tar", "--num-crops", "4", "--json")
    assert sorted(row["name"] for row in json.loads(plan.stdout)["images"]) == sorted(names)
    combined = phi3embed(tmp_path, "combine", "part0", "part1", "--inputs", "*.tar", "-q")
    assert combined.returncode == 0, combined.stderr


def test_ray_engine_reads_tar_members_on_the_workers_with_the_local_engines_outputs(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    make_tar(tmp_path / "000.tar", [("a.jpg", PHOTO), ("bad.jpg", CORRUPT), ("b.png", SQUARE)])
    local = encode(tmp_path, "000.tar", "-o", "local")
    ray = encode(tmp_path, "000.tar", "-o", "ray", "--engine", "ray", "--actors", "1")
    assert local.returncode == ray.returncode == 1, ray.stderr
    assert {n: r["status"] for n, r in records(ray).items()} == {n: r["status"] for n, r in records(local).items()}
    assert records(ray)["000.tar/bad.jpg"]["error"] == records(local)["000.tar/bad.jpg"]["error"]
    for name in ("a.jpg.npy", "b.png.npy"):
        assert (tmp_path / "ray" / "000.tar" / name).read_bytes() == (
            tmp_path / "local" / "000.tar" / name
        ).read_bytes()


def test_ray_engine_writes_the_local_engines_vectors_alone_from_a_tar_file(tmp_path: Path) -> None:
    """``encode --stage none --vectors cls,mean,tokens`` through the console script on both engines: the same
    vector shards and metadata byte for byte, no token matrices, a repeated image's row its first's."""
    pytest.importorskip("ray")
    pytest.importorskip("pyarrow")
    make_tar(tmp_path / "000.tar", [("a.jpg", PHOTO), ("bad.jpg", CORRUPT), ("b.png", SQUARE), ("c.jpg", PHOTO)])
    args = ["000.tar", "--stage", "none", "--vectors", "cls,mean,tokens"]
    local = encode(tmp_path, *args, "-o", "local")
    ray = encode(tmp_path, *args, "-o", "ray", "--engine", "ray", "--actors", "1")
    assert local.returncode == ray.returncode == 1, ray.stderr
    assert ray.stderr.strip().startswith("error: 000.tar/bad.jpg"), ray.stderr

    def files(out: Path) -> dict[str, bytes]:
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    shards = {
        name: data
        for name, data in files(tmp_path / "ray").items()
        if name not in ("manifest.jsonl", "manifest.jsonl.idx")
    }
    assert shards == {
        n: d for n, d in files(tmp_path / "local").items() if n not in ("manifest.jsonl", "manifest.jsonl.idx")
    }
    assert all(name.startswith("vectors/") for name in shards) and len(shards) == 6  # 3 kinds x (npy + parquet)
    volatile = ("time", "device")
    assert {n: {k: v for k, v in r.items() if k not in volatile} for n, r in records(ray).items()} == {
        n: {k: v for k, v in r.items() if k not in volatile} for n, r in records(local).items()
    }
    assert records(ray)["000.tar/c.jpg"]["duplicate_of"] == "000.tar/a.jpg"
    for kind in ("cls", "mean", "tokens"):
        names, vectors = phi3embed_lib.open(tmp_path / "ray").vectors(kind)
        rows = dict(zip(names, vectors, strict=True))
        assert sorted(rows) == ["000.tar/a.jpg", "000.tar/b.png", "000.tar/c.jpg"]
        assert np.array_equal(rows["000.tar/c.jpg"], rows["000.tar/a.jpg"])
