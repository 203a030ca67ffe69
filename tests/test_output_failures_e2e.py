"""Output failures through the real ``phi3embed`` console script (issue 17 item 3): a full disk, a read-only file
system and an output folder removed under the job end with one line naming the folder and the cause, exit 2,
finished outputs kept and readable; after the cause is gone a rerun finishes with outputs byte-identical to a
clean run. Per-image files and ``--pack``, local engine and ``--engine ray``.

The disk is a small tmpfs mounted here (as root; the tests skip where mounting is not allowed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import GOLDEN, TINY_128K
from safetensors import safe_open

_SCRIPT = Path(sys.executable).with_name("phi3embed")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "phi3embed"]
MODEL = str(GOLDEN / "checkpoints" / TINY_128K)
IMAGES = ["cmyk_800x600.jpg", "gray_L_640x480.png", "photo_1000x750.jpg", "rgb_1050x950.png"]
IMAGES += ["rgb_336x336.png", "rgba_500x400.png", "tiny_7x9.png", "webp_700x500.webp"]
PACK = "700k"

pytestmark = pytest.mark.e2e  # console-script subprocesses


def encode(cwd: Path, out: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*CLI, "encode", "imgs", "-o", out, "--model", MODEL, "--num-crops", "4", "-q", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)


def pack_args(pack: bool) -> list[str]:
    return ["--pack", PACK] if pack else []


def outputs(out: Path) -> dict[str, bytes]:
    """Every output file (the manifest and the temp area aside) by its path in ``out``."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("manifest.jsonl", "manifest.jsonl.idx") and ".phi3embed-tmp" not in p.parts
    }


def latest(out: Path) -> dict[str, dict[str, object]]:
    path = out / "manifest.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {r["name"]: r for r in map(json.loads, lines)}


def assert_ok_records_readable(out: Path) -> None:
    for record in latest(out).values():
        assert record["status"] == "ok"
        path = out / str(record["output"])
        if str(record["output"]).endswith(".npy"):
            assert list(np.load(path).shape) == record["shape"]
        else:
            with safe_open(str(path), "pt") as f:
                assert list(f.get_slice(str(record["key"])).get_shape()) == record["shape"]


def one_error_line(run: subprocess.CompletedProcess[str], out: str, cause: str) -> None:
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: {cause}"), run.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The images, and clean runs of them (per-image and packs) on an ordinary disk."""
    root = tmp_path_factory.mktemp("outfail")
    (root / "imgs").mkdir()
    for name in IMAGES:
        shutil.copyfile(GOLDEN / "images" / name, root / "imgs" / name)
    for pack in (False, True):
        run = encode(root, f"clean-{pack}", *pack_args(pack))
        assert run.returncode == 0, run.stderr
    return root


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True, check=False).returncode == 0


@pytest.fixture
def disk(work: Path, tmp_path: Path) -> Iterator[Path]:
    """An empty tmpfs mounted at a fresh folder under ``work`` (sized by the test with :func:`resize`)."""
    mnt = work / f"mnt-{tmp_path.name}"
    mnt.mkdir()
    if shutil.which("mount") is None or not _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)):
        mnt.rmdir()
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def resize(mnt: Path, size: str, *more: str) -> None:
    assert _mount("-o", ",".join(["remount", f"size={size}", *more]), str(mnt))


def small_size(work: Path, pack: bool) -> str:
    """About 40% of a clean run's outputs: the disk fills part way."""
    total = sum(len(b) for b in outputs(work / f"clean-{pack}").values())
    return f"{total * 4 // 10 // 1024}k"


@pytest.mark.parametrize("engine", ["local", "ray"])
@pytest.mark.parametrize("pack", [False, True], ids=["files", "pack"])
def test_a_full_disk_stops_the_job_with_one_line_and_a_rerun_after_freeing_space_is_byte_identical(
    work: Path, disk: Path, pack: bool, engine: str
) -> None:
    if engine == "ray":
        pytest.importorskip("ray")
    engine_args = ["--engine", "ray", "--actors", "1"] if engine == "ray" else []
    out = f"{disk.name}/out"
    resize(disk, small_size(work, pack))
    full = encode(work, out, *pack_args(pack), *engine_args)
    one_error_line(full, out, "no space left on device (writing ")
    kept = latest(work / out)
    assert 0 < len(kept) < len(IMAGES)  # some finished before the disk filled: kept, each readable
    assert_ok_records_readable(work / out)
    clean = outputs(work / f"clean-{pack}")
    for rel, data in outputs(work / out).items():
        if any(r["output"] == rel for r in kept.values()):
            assert data == clean[rel], rel

    resize(disk, "64m")  # space freed
    again = encode(work, out, *pack_args(pack), *engine_args)
    assert again.returncode == 0, again.stderr
    assert outputs(work / out) == clean
    assert len(latest(work / out)) == len(IMAGES)
    assert_ok_records_readable(work / out)


@pytest.mark.parametrize("pack", [False, True], ids=["files", "pack"])
def test_a_read_only_file_system_is_named_and_the_rerun_finishes_once_writable(
    work: Path, disk: Path, pack: bool
) -> None:
    out = f"{disk.name}/out"
    resize(disk, small_size(work, pack))
    assert encode(work, out, *pack_args(pack)).returncode == 2  # a partial run, as in the test above
    before = outputs(work / out)
    resize(disk, "64m", "ro")
    refused = encode(work, out, *pack_args(pack))
    one_error_line(refused, out, "cannot write there (read-only file system")
    assert outputs(work / out) == before
    resize(disk, "64m", "rw")
    again = encode(work, out, *pack_args(pack))
    assert again.returncode == 0, again.stderr
    assert outputs(work / out) == outputs(work / f"clean-{pack}")


@pytest.mark.parametrize("pack", [False, True], ids=["files", "pack"])
def test_an_output_folder_removed_under_the_job_is_named_and_a_rerun_is_byte_identical(
    work: Path, tmp_path: Path, pack: bool
) -> None:
    out = tmp_path / "out"
    cmd = [*CLI, "encode", "imgs", "-o", str(out), "--model", MODEL, "--num-crops", "4", "-q", "--jsonl"]
    job = subprocess.Popen(
        [*cmd, *pack_args(pack)], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert job.stdout is not None and job.stderr is not None
    assert json.loads(job.stdout.readline())["status"] == "ok"  # the job is under way
    deadline = time.monotonic() + 60
    while out.exists() and time.monotonic() < deadline:  # the job may add a file while the tree is removed
        shutil.rmtree(out, ignore_errors=True)
    assert not out.exists()
    rest, err = job.communicate(timeout=600)
    assert job.returncode == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()]
    # what noticed first: writing the next output, or syncing the folders before the manifest
    assert err.startswith(f"error: {out}: the output folder was removed while the job ran ("), err
    again = encode(work, str(out), *pack_args(pack))
    assert again.returncode == 0, again.stderr
    assert outputs(out) == outputs(work / f"clean-{pack}")
