"""Names the file system or a format cannot hold, through the real ``phi3embed`` console script (issue 17 items 1
and 6): random byte strings as file names, tar member names and parquet keys (the issue's 250-character file name
and 300-character key among them), in both engines and every output format.

Each run: no traceback, one record per listed image, the outputs ``plan`` named beforehand, every manifest line
strict UTF-8 JSON, every output read by numpy / safetensors and ``phi3embed.open``; a rerun writes nothing
new, and the outputs are byte-identical to a clean run's; ``--shard`` parts combine to the whole.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from archivefiles import make_parquet
from conftest import GOLDEN, TINY_128K
from namegen import has_image_extension, loose_names, member_names, parquet_keys
from PIL import Image
from test_names import assert_readable

from phi3embed.inputs.archives import safe_inner
from phi3embed.outputs.manifest import MANIFEST
from phi3embed.outputs.names import exact_bytes, from_bytes, is_text
from phi3embed.outputs.records import exact_field

_SCRIPT = Path(sys.executable).with_name("phi3embed")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "phi3embed"]
MODEL = str(GOLDEN / "checkpoints" / TINY_128K)

pytestmark = pytest.mark.e2e  # console-script subprocesses


def phi3embed(cwd: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    run = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, input=stdin, timeout=600, check=False)
    assert b"Traceback" not in run.stderr, run.stderr.decode("utf-8", "replace")[-3000:]
    return run


def encode(cwd: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return phi3embed(cwd, "encode", *args, "--model", MODEL, "--num-crops", "4", "-q", stdin=stdin)


def png(rng: random.Random) -> bytes:
    """A small PNG of its own colour and size: images that are not duplicates of each other."""
    size = (rng.randint(5, 40), rng.randint(5, 40))
    buf = io.BytesIO()
    Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3))).save(buf, format="PNG")  # type: ignore[arg-type]
    return buf.getvalue()


def make_inputs(root: Path, seed: int, n: int) -> tuple[list[str], dict[str, str]]:
    """A folder, a tar file and a parquet file with binary keys, all of random names (plus the issue's own
    examples); returns the INPUTs and each listed name's expected status."""
    rng = random.Random(seed)
    expected: dict[str, str] = {}
    files = [*loose_names(seed, n), b"x" * 250 + b".png", b"caf\xe9.png", b"new\nline.png"]
    for raw in files:
        path = os.path.join(os.fsencode(root / "imgs"), raw)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(png(rng))
        expected[os.fsdecode(raw)] = "ok"
    members = member_names(seed, n)
    with tarfile.open(root / "w.tar", "w", format=tarfile.PAX_FORMAT, errors="surrogateescape") as tf:
        for raw in members:
            data = png(rng)
            info = tarfile.TarInfo(os.fsdecode(raw))
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            if has_image_extension(raw):
                text = os.fsdecode(raw)
                expected[f"w.tar/{text}"] = "error" if text.startswith("../") else "ok"
    keys = [*parquet_keys(seed, n), b"k" * 300]
    make_parquet(root / "k.parquet", {"__key__": keys, "image": [png(rng) for _ in keys]}, row_group_size=4)
    expected |= {f"k.parquet/{safe_inner(from_bytes(k))}": "ok" for k in keys}
    return ["imgs", "w.tar", "k.parquet"], expected


def latest(out: Path) -> dict[str, dict[str, Any]]:
    lines = [json.loads(line) for line in (out / MANIFEST).read_bytes().decode("utf-8").splitlines()]
    return {exact_field(d, "name"): d for d in lines}


def files_of(out: Path) -> dict[bytes, bytes]:
    """Every output file but the manifest, by path relative to ``out`` (bytes: names as stored)."""
    root = os.fsencode(out)
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if name not in (MANIFEST.encode(), MANIFEST.encode() + b".idx"):
                with open(path, "rb") as fh:
                    found[os.path.relpath(path, root)] = fh.read()
    return found


def test_random_names_plan_encode_rerun_formats_and_shards(tmp_path: Path) -> None:
    inputs, expected = make_inputs(tmp_path, 5, 8)
    code = 1 if "error" in expected.values() else 0

    plan = phi3embed(tmp_path, "plan", *inputs, "--model", MODEL, "--num-crops", "4", "--json")
    assert plan.returncode == code, plan.stderr  # 1: the members named ../ cannot be encoded
    rows = json.loads(plan.stdout.decode("utf-8"))["images"]
    planned = {exact_field(r, "name"): r for r in rows}
    assert b"note: " in plan.stderr and b"get another output name" in plan.stderr

    run = encode(tmp_path, *inputs, "-o", "out")
    assert run.returncode == code, run.stderr
    assert_readable(tmp_path / "out", expected)
    records = latest(tmp_path / "out")
    for name, record in records.items():
        if record["status"] == "ok":
            assert record["output"] == planned[name]["output"], name  # plan said so beforehand
    assert any(r["renamed"] for r in planned.values()) and any(not r["renamed"] for r in planned.values())
    assert records["x" * 250 + ".png"]["output"] != "x" * 250 + ".png.npy"
    assert records[os.fsdecode(b"caf\xe9.png")]["name"] == "caf\\xe9.png"

    # a rerun writes no new output and no ok record; the outputs are those of a clean run
    before = files_of(tmp_path / "out")
    again = encode(tmp_path, *inputs, "-o", "out")
    assert again.returncode == code
    assert files_of(tmp_path / "out") == before
    new_lines = (tmp_path / "out" / MANIFEST).read_bytes().splitlines()[len(records) :]
    assert sorted(exact_field(json.loads(line), "name") for line in new_lines) == sorted(
        n for n, s in expected.items() if s == "error"
    )  # only the failed images are tried again
    clean = encode(tmp_path, *inputs, "-o", "clean")
    assert clean.returncode == code and files_of(tmp_path / "clean") == before

    # the other formats
    for fmt_args in (["--format", "safetensors"], ["--pack", "20kB"]):
        out = f"out{fmt_args[0]}"
        run = encode(tmp_path, *inputs, "-o", out, *fmt_args)
        assert run.returncode == code, run.stderr
        assert_readable(tmp_path / out, expected)
        first = files_of(tmp_path / out)
        assert encode(tmp_path, *inputs, "-o", out, *fmt_args).returncode == code
        assert files_of(tmp_path / out) == first

    # two --shard parts in their own folders combine to the whole
    for part in ("0/2", "1/2"):
        assert encode(tmp_path, *inputs, "-o", f"part{part[0]}", "--shard", part).returncode in (0, 1)
    combine = phi3embed(
        tmp_path, "combine", "part0", "part1", *[a for i in inputs for a in ("-i", i)], "-o", "all.jsonl", "--json"
    )
    report = json.loads(combine.stdout.decode("utf-8"))
    assert report["missing"] == [] and report["ok"] == sum(s == "ok" for s in expected.values())
    import phi3embed as lib

    whole = lib.open(tmp_path / "all.jsonl")
    single = lib.open(tmp_path / "out")
    assert sorted(whole, key=exact_bytes) == sorted(single, key=exact_bytes)
    for name in single:
        assert whole[name].equal(single[name])


def test_names_through_stdin_and_the_ray_engine(tmp_path: Path) -> None:
    inputs, expected = make_inputs(tmp_path, 9, 6)
    code = 1 if "error" in expected.values() else 0
    local = encode(tmp_path, *inputs, "-o", "local")
    assert local.returncode == code, local.stderr
    ray = encode(tmp_path, *inputs, "-o", "ray", "--engine", "ray")
    assert ray.returncode == code, ray.stderr
    assert_readable(tmp_path / "ray", expected)
    assert files_of(tmp_path / "ray") == files_of(tmp_path / "local")

    # paths that are not UTF-8 on stdin, as `find` prints them
    loose = [n for n in expected if not n.startswith(("w.tar/", "k.parquet/")) and "\n" not in n]
    listed = [os.fsencode(os.path.join("imgs", n)) for n in loose]
    run = encode(tmp_path, "-", "-o", "stdin", stdin=b"".join(p + b"\n" for p in listed))
    assert run.returncode == 0, run.stderr
    names = {os.fsdecode(p) for p in listed}
    assert_readable(tmp_path / "stdin", dict.fromkeys(names, "ok"))
    assert all(is_text(line.decode("utf-8")) for line in (tmp_path / "stdin" / MANIFEST).read_bytes().splitlines())
