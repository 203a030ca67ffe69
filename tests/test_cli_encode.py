"""End-to-end: the real ``phi3embed`` console script in subprocesses, on the golden tiny checkpoints.

The runs are independent processes, so the module starts most of them at once (2 cores: the CPU time
of imports and model loads overlaps) and each test then waits for the runs it checks:

* A   golden images folder, tiny 128k checkpoint at its own num_crops (16), npy, --jsonl, 2 workers
* B   stdin list + glob pattern + a folder of every bad-input kind, tiny 3.5 checkpoint at num_crops 4,
      --pack (2 images per pack file), --jsonl; as root with CAP_DAC_OVERRIDE dropped, so that chmod 000 bites
* K1  A's command, SIGKILLed after its first finished image; then K2 (SIGINT mid-way) and K3 finish it
* KP1 B's command, SIGKILLed after its first pack; then KP2 finishes it
* S0, S1  A's command with --shard 0/2 and 1/2 into one folder, at the same time
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer.main
from badfiles import EXPECTED_REASONS, make_bad_files
from conftest import GOLDEN, TINY_35, TINY_128K, GoldenEmbeddings, golden_embeddings
from typer.testing import CliRunner

import phi3embed
from phi3embed.cli.app import app, parse_size
from phi3embed.outputs.manifest import MANIFEST
from phi3embed.outputs.publish import TMP_DIR

_SCRIPT = Path(sys.executable).with_name("phi3embed")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "phi3embed"]
CKPT_128K = str(GOLDEN / "checkpoints" / TINY_128K)
CKPT_35 = str(GOLDEN / "checkpoints" / TINY_35)
IMAGES = GOLDEN / "images"
ENV = {
    **{k: v for k, v in os.environ.items() if k != "PHI3EMBED_MODEL"},
    "OMP_NUM_THREADS": "1",  # several runs share 2 cores; torch threads would only wait on each other
    "HF_HUB_OFFLINE": "1",
}
STDIN_JPEGS = [f"imgs/{p.name}" for p in sorted(IMAGES.iterdir()) if p.suffix != ".png"]
B_STDIN = "".join(f"{line}\n" for line in [*STDIN_JPEGS, "bad/dir.jpg"])
PACK = "600kB"  # 757 tokens x 96 x float32 = 290,688 bytes: two images per pack
REQUIRED_FIELDS = {
    "name", "source", "output", "status", "error", "width", "height", "image_sizes", "crops", "num_tokens",
    "dtype", "num_crops", "model", "fingerprint", "sha256",
}  # fmt: skip


def ok_lines(out: Path) -> int:
    try:
        return (out / MANIFEST).read_text().count('"status": "ok"')
    except FileNotFoundError:
        return 0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    children_at_signal: list[int]


class Run:
    """One ``phi3embed`` process; optionally signalled as soon as ``signal_when()`` holds."""

    def __init__(
        self,
        args: list[str],
        *,
        cwd: Path,
        stdin: str = "",
        prefix: list[str] | None = None,
        signal_when: Callable[[], bool] | None = None,
        sig: int = signal.SIGKILL,
    ) -> None:
        self.logs = cwd / f".log-{time.monotonic_ns()}"
        self.logs.mkdir()
        self._out = open(self.logs / "stdout", "w+b")  # noqa: SIM115 - closed in wait()
        self._err = open(self.logs / "stderr", "w+b")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*(prefix or []), *CLI, "encode", *args],
            cwd=cwd,
            env=ENV,
            stdin=subprocess.PIPE,
            stdout=self._out,
            stderr=self._err,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(stdin.encode())
        self.proc.stdin.close()
        self.signalled = False
        self.children_at_signal: list[int] = []
        if signal_when is not None:
            threading.Thread(target=self._watch, args=(signal_when, sig), daemon=True).start()
        self._result: Result | None = None

    def _watch(self, when: Callable[[], bool], sig: int) -> None:
        while self.proc.poll() is None:
            if when():
                self.children_at_signal = children(self.proc.pid)
                self.proc.send_signal(sig)
                self.signalled = True
                return
            time.sleep(0.02)

    def wait(self, timeout: float = 240) -> Result:
        if self._result is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
            self._out.seek(0)
            self._err.seek(0)
            self._result = Result(
                self.proc.returncode,
                self._out.read().decode(),
                self._err.read().decode(),
                self.children_at_signal,
            )
            self._out.close()
            self._err.close()
            shutil.rmtree(self.logs)
        return self._result


def a_args(out: Path, *extra: str, workers: int = 2) -> list[str]:
    return [str(IMAGES), "-o", str(out), "--model", CKPT_128K, "--workers", str(workers), *extra]


def b_args(out: Path, *extra: str) -> list[str]:
    return ["-", "imgs/*.png", "bad", "-o", str(out), "--model", CKPT_35, "--num-crops", "4", "--pack", PACK, *extra]


def unreadable_prefix() -> tuple[list[str], bool]:
    """How to run so that a chmod 000 file cannot be read: as root, drop the capabilities that bypass it."""
    if os.geteuid() != 0:
        return [], True
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return [], False
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"], True


@dataclass
class Workspace:
    root: Path
    runs: dict[str, Run]
    unreadable_checked: bool

    def out(self, name: str) -> Path:
        return self.root / name


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    if not (GOLDEN / "MANIFEST.json").is_file():
        pytest.fail(f"golden data not found at {GOLDEN}")
    root = tmp_path_factory.mktemp("cli")
    (root / "imgs").symlink_to(IMAGES, target_is_directory=True)
    make_bad_files(root / "bad", IMAGES / "photo_1000x750.jpg")
    prefix, unreadable_checked = unreadable_prefix()
    if not unreadable_checked:
        (root / "bad" / "unreadable.jpg").unlink()
    runs = {
        "K1": Run(a_args(root / "K"), cwd=root, signal_when=lambda: ok_lines(root / "K") >= 1),
        "KP1": Run(
            b_args(root / "KP"), cwd=root, stdin=B_STDIN, prefix=prefix, signal_when=lambda: ok_lines(root / "KP") >= 1
        ),
        "A": Run(a_args(root / "A", "--jsonl"), cwd=root),
        "B": Run(b_args(root / "B", "--jsonl"), cwd=root, stdin=B_STDIN, prefix=prefix),
        # inline reading (no worker processes): the bytes must not depend on it
        "S0": Run(a_args(root / "S", "--shard", "0/2", "--quiet", workers=0), cwd=root),
        "S1": Run(a_args(root / "S", "--shard", "1/2", "--quiet", workers=0), cwd=root),
        "NOMODEL": Run([str(IMAGES), "-o", "NOMODEL", "--model", str(root / "no-such-model")], cwd=root),
    }
    yield Workspace(root, runs, unreadable_checked)
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()


def invoke(args: list[str], *, cwd: Path) -> Any:
    """The command in this process (typer's CliRunner), run from ``cwd``, as the subprocesses run it."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        env = {"PHI3EMBED_MODEL": None, "HF_HUB_OFFLINE": "1"}
        return CliRunner().invoke(app, args, env=env, catch_exceptions=False)
    finally:
        os.chdir(here)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` except the manifest (whose records carry times), with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".idx")
    }


def all_paths(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def golden(ckpt: str, num_crops: int, image: str) -> GoldenEmbeddings:
    stem = image.rsplit(".", 1)[0]
    return golden_embeddings(f"expected/{ckpt}/{num_crops}/{stem}.npz")


# --------------------------------------------------------------------------- crash safety first (long chains)


@pytest.mark.e2e  # console-script subprocesses (the module starts them all, kill -9 and resume among them)
def test_sigkill_then_resume_gives_identical_files_and_no_strays(ws: Workspace) -> None:
    k1 = ws.runs["K1"].wait()
    out = ws.out("K")
    assert ws.runs["K1"].signalled and k1.rc == -signal.SIGKILL
    first = {r["name"] for r in records(out) if r["status"] == "ok"}
    assert 1 <= len(first) < 14, "the kill must land mid-way"
    deadline = time.monotonic() + 5
    while any(alive(p) for p in k1.children_at_signal) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert k1.children_at_signal and not any(alive(p) for p in k1.children_at_signal), "orphaned workers"
    mtimes = {n: (out / f"{n}.npy").stat().st_mtime_ns for n in first}

    # resume, and stop that run too, with Ctrl-C this time
    resumed = Run(
        a_args(out, workers=1), cwd=ws.root, signal_when=lambda: ok_lines(out) > len(first), sig=signal.SIGINT
    )
    k2 = resumed.wait()
    assert k2.rc == 130, k2.stderr
    assert "stopped by SIGINT" in k2.stderr and f"{len(first)} already done" in k2.stderr
    second = {r["name"] for r in records(out) if r["status"] == "ok"}
    assert first < second < {p.name for p in IMAGES.iterdir()}
    assert not (out / TMP_DIR).exists()

    k3 = Run(a_args(out, workers=0), cwd=ws.root).wait()
    assert k3.rc == 0, k3.stderr
    assert f"{len(second)} already done" in k3.stderr

    a = ws.runs["A"].wait()
    assert a.rc == 0, a.stderr
    assert all_paths(out) == all_paths(ws.out("A"))  # no temp folder, no partial file
    assert tree_bytes(out) == tree_bytes(ws.out("A"))
    recs = records(out)
    assert all(r["status"] == "ok" for r in recs)
    assert sorted(r["name"] for r in recs) == sorted({r["name"] for r in recs})  # no image encoded twice
    assert {n: (out / f"{n}.npy").stat().st_mtime_ns for n in first} == mtimes  # finished work was not redone


@pytest.mark.e2e  # console-script subprocesses (the module starts them all, kill -9 and resume among them)
def test_sigkill_of_a_packed_run_then_resume_gives_identical_packs(ws: Workspace) -> None:
    kp1 = ws.runs["KP1"].wait()
    out = ws.out("KP")
    assert ws.runs["KP1"].signalled and kp1.rc == -signal.SIGKILL
    done = [r for r in records(out) if r["status"] == "ok"]
    assert 1 <= len(done) < 14 and {r["output"] for r in done} == {"emb-00000.safetensors"}
    kp2 = Run(b_args(out), cwd=ws.root, stdin=B_STDIN, prefix=unreadable_prefix()[0]).wait()
    assert kp2.rc == 1, kp2.stderr  # the bad inputs fail again
    b = ws.runs["B"].wait()
    assert b.rc == 1, b.stderr
    assert all_paths(out) == all_paths(ws.out("B"))
    assert tree_bytes(out) == tree_bytes(ws.out("B"))
    ok_names = [r["name"] for r in records(out) if r["status"] == "ok"]
    assert sorted(ok_names) == sorted(r["name"] for r in records(ws.out("B")) if r["status"] == "ok")
    assert len(set(ok_names)) == len(ok_names) == 14


# --------------------------------------------------------------------------- outputs


@pytest.mark.e2e  # console-script subprocesses (the module starts them all, kill -9 and resume among them)
def test_outputs_equal_the_golden_embeddings(ws: Workspace) -> None:
    a = ws.runs["A"].wait()
    assert a.rc == 0, a.stderr
    out = ws.out("A")
    worst = 0.0
    for image in sorted(p.name for p in IMAGES.iterdir()):
        ours = np.load(out / f"{image}.npy")
        expected = golden(TINY_128K, 16, image)
        assert ours.shape == expected.shape and ours.dtype == np.float32
        worst = max(worst, expected.max_abs(ours))
    assert worst <= 1e-4, worst
    for record in records(out):
        assert set(record) >= REQUIRED_FIELDS
        assert record["num_crops"] == 16 and record["dtype"] == "float32" and record["status"] == "ok"
        assert record["num_tokens"] == record["shape"][0] and len(record["sha256"]) == 64


@pytest.mark.e2e  # console-script subprocesses (the module starts them all, kill -9 and resume among them)
def test_jsonl_stdout_holds_only_the_records(ws: Workspace) -> None:
    a = ws.runs["A"].wait()
    lines = a.stdout.splitlines()
    assert len(lines) == 14 and a.stdout.endswith("\n")
    printed = [json.loads(line) for line in lines]
    assert sorted(printed, key=lambda r: r["name"]) == sorted(records(ws.out("A")), key=lambda r: r["name"])
    assert "phi3embed encode" in a.stderr and "14 written" in a.stderr and "error:" not in a.stderr


@pytest.mark.e2e  # console-script subprocesses (the module starts them all, kill -9 and resume among them)
def test_stdin_glob_and_packs_read_back_exactly(ws: Workspace) -> None:
    b = ws.runs["B"].wait()
    out = ws.out("B")
    assert sorted(p.name for p in out.iterdir()) == [f"emb-{i:05d}.safetensors" for i in range(7)] + [
        MANIFEST,
        MANIFEST + ".idx",
    ]
    got = list(phi3embed.read(out))
    pngs = sorted(p.name for p in IMAGES.glob("*.png"))
    assert [r["name"] for r, _ in got] == sorted(STDIN_JPEGS + pngs)
    for record, tensor in got:
        expected = golden(TINY_35, 4, record["name"].removeprefix("imgs/"))
        assert expected.max_abs(tensor.numpy()) <= 1e-4
        assert record["key"] == record["name"] and record["format"] == "pack"
    printed = [json.loads(line) for line in b.stdout.splitlines()]
    assert sorted(printed, key=lambda r: r["name"]) == sorted(records(out), key=lambda r: r["name"])


@pytest.mark.e2e  # console-script subprocesses (the module starts them all, kill -9 and resume among them)
def test_every_bad_input_gets_an_error_record_and_one_stderr_line(ws: Workspace) -> None:
    b = ws.runs["B"].wait()
    assert b.rc == 1, b.stderr
    by_name = {r["name"]: r for r in records(ws.out("B"))}
    expected = dict(EXPECTED_REASONS)
    expected["bad/dir.jpg"] = "is a directory"
    if not ws.unreadable_checked:
        del expected["unreadable.jpg"]  # root without setpriv reads chmod 000 files: nothing to check
    assert {n for n, r in by_name.items() if r["status"] == "error"} == set(expected)
    error_lines = [line for line in b.stderr.splitlines() if line.startswith("error: ")]
    for name, reason in expected.items():
        record = by_name[name]
        assert record["output"] is None and record["key"] is None
        source = name if name.startswith("bad/") else f"bad/{name}"
        assert record["error"].startswith(f"{source}: ") and reason in record["error"], record["error"]
        assert error_lines.count(f"error: {record['error']}") == 1
    assert len(error_lines) == len(expected)
    assert by_name["strip.png"]["width"] == 5000 and by_name["strip.png"]["height"] == 1
    assert "14 written" in b.stderr and f"{len(expected)} failed" in b.stderr


@pytest.mark.e2e  # console-script subprocesses (the module starts them all, kill -9 and resume among them)
def test_shard_parts_together_equal_a_full_run(ws: Workspace) -> None:
    s0, s1 = ws.runs["S0"].wait(), ws.runs["S1"].wait()
    assert (s0.rc, s1.rc) == (0, 0), s0.stderr + s1.stderr
    assert s0.stdout == s1.stdout == s0.stderr == s1.stderr == ""  # --quiet
    a = ws.runs["A"].wait()
    assert a.rc == 0
    out = ws.out("S")
    assert tree_bytes(out) == tree_bytes(ws.out("A"))
    assert not (out / TMP_DIR).exists()
    recs = records(out)
    assert sorted(r["name"] for r in recs) == sorted(p.name for p in IMAGES.iterdir())  # each once


# --------------------------------------------------------------------------- usage


@pytest.mark.e2e  # console-script subprocesses (the module starts them all, kill -9 and resume among them)
def test_model_errors_exit_2_before_any_work(ws: Workspace) -> None:
    r = ws.runs["NOMODEL"].wait()
    assert r.rc == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1 and "no-such-model" in r.stderr
    assert not ws.out("NOMODEL").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nothing-here", "-o", "x"], "no such file or directory"),
        (["imgs", "-o", "x", "--shard", "2/2"], "0 <= I < N"),
        (["imgs", "-o", "x", "--pack", "lots"], "SIZE must look like"),
        (["imgs", "-o", "x", "--format", "npy", "--out-dtype", "bfloat16"], "npy cannot store bfloat16"),
        (["imgs", "-o", "x", "--format", "npy", "--pack", "1GB"], "--pack writes safetensors"),
        (["imgs", "-o", "x", "--batch-size", "0"], "Invalid value"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    # in this process: what is checked is the option handling, not the console script (NOMODEL runs that)
    (tmp_path / "imgs").symlink_to(IMAGES, target_is_directory=True)
    r = invoke(["encode", *args], cwd=tmp_path)
    assert r.exit_code == 2 and r.stdout == "" and message in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_pack_sizes() -> None:
    assert parse_size("1GB") == 10**9 and parse_size("512MiB") == 2**29 and parse_size("1.5kb") == 1500
    assert parse_size("123") == 123
    for bad in ("", "GB", "1 parsec", "0"):
        with pytest.raises(Exception, match="SIZE"):
            parse_size(bad)


def test_help_for_every_command() -> None:
    group = typer.main.get_command(app)
    commands = sorted(group.commands)  # type: ignore[attr-defined]
    shown = [c for c in commands if not group.commands[c].hidden]  # type: ignore[attr-defined]
    assert "encode" in commands and "combine" in shown and "merge-manifests" not in shown
    top = subprocess.run([*CLI, "--help"], env=ENV, capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and all(c in top.stdout for c in shown) and top.stderr == ""
    for command in commands:  # each command's help in this process: the console script is checked above
        r = invoke([command, "--help"], cwd=Path.cwd())
        assert r.exit_code == 0 and "Usage:" in r.stdout and r.stderr == "", command


def test_readme_option_table_matches_the_command() -> None:
    """Every option in the README's table exists, and every option of ``encode`` is in the table."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("## Encode images", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(--[a-z-]+)", table, flags=re.M))
    encode = typer.main.get_command(app).commands["encode"]  # type: ignore[attr-defined]
    actual = {opt for param in encode.params for opt in param.opts if opt.startswith("--")} - {"--help"}
    assert documented == actual
