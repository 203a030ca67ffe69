"""A bad file never stalls the job (issue 14): special files, endless files, stuck reads and crashing decoders,
through the real ``phi3embed`` console script.

The stalls and the crash are simulated without hooks in the product: a ``sitecustomize.py`` put on the
subprocess's PYTHONPATH (see :data:`SITECUSTOMIZE`) registers a test-only Pillow format (its own magic bytes, in files named like
images) whose header open sleeps forever, whose load sleeps forever, or whose load segfaults its process, and makes ``os.pread`` (the
system call phi3embed reads an image's bytes with) block forever on a file named ``stalled-read.jpg``, as a
read on a dead NFS server blocks. Pipes and ``/dev/zero`` are real.

Two runs, at the same time: the CPU default (``--workers 0``: images are read in one helper process under the
timeout) and ``--workers 2``. Each must finish within :data:`HARD_TIMEOUT` (a regression fails instead of
hanging CI), write both good images, give every bad file one error record naming it and the reason, skip the
pipe and the socket in the folder (and say so), and exit 1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import GOLDEN, TINY_128K

_SCRIPT = Path(sys.executable).with_name("phi3embed")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "phi3embed"]
IMAGE_TIMEOUT = 3
HARD_TIMEOUT = 150  # seconds; a run that hangs is killed and fails the test
GOOD = ["photo_1000x750.jpg", "tiny_7x9.png"]

SITECUSTOMIZE = '''
"""Test-only (tests/test_bad_inputs_e2e.py): a Pillow format that stalls or crashes, and a read that stalls."""
import os
import signal
import time

from PIL import Image, ImageFile

MAGIC = b"PHI3TEST:"


class StallingImageFile(ImageFile.ImageFile):
    format = "PHI3TEST"
    format_description = "phi3embed test image that stalls or crashes"

    def _open(self):
        self.behaviour = self.fp.read(32)[len(MAGIC):].split(b"\\n")[0]
        if self.behaviour == b"stall-open":
            time.sleep(3600)  # a decoder stuck while reading the header
        self._mode = "RGB"
        self._size = (8, 8)
        self.tile = []

    def load(self):
        if self.behaviour == b"stall-load":
            time.sleep(3600)  # a decoder in an endless loop
        if self.behaviour == b"segfault":
            os.kill(os.getpid(), signal.SIGSEGV)  # a decoder that crashes its process
        return super().load()


Image.register_open(StallingImageFile.format, StallingImageFile, lambda prefix: prefix.startswith(MAGIC))

_pread = os.pread


def _stalling_pread(fd, length, offset):
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = ""
    if name.endswith("stalled-read.jpg"):
        time.sleep(3600)  # a read that never returns (a dead network mount)
    return _pread(fd, length, offset)


os.pread = _stalling_pread
'''


@dataclass
class Run:
    rc: int
    stderr: str
    seconds: float
    records: dict[str, dict[str, Any]]


@dataclass
class Workspace:
    root: Path
    socket: socket.socket
    procs: dict[str, tuple[subprocess.Popen[bytes], float]]

    def wait(self, mode: str) -> Run:
        proc, start = self.procs[mode]
        try:
            _, err = proc.communicate(timeout=max(1.0, start + HARD_TIMEOUT - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"phi3embed encode ({mode}) did not finish within {HARD_TIMEOUT} s: a bad file stalled it")
        lines = (self.root / mode / "manifest.jsonl").read_text().splitlines()
        by_name = {r["name"]: r for r in map(json.loads, lines)}
        assert len(by_name) == len(lines), "one record per image"
        return Run(proc.returncode, err.decode(), time.monotonic() - start, by_name)


def _write_plugin_image(path: Path, behaviour: str) -> None:
    path.write_bytes(b"PHI3TEST:" + behaviour.encode() + b"\n" + b"\0" * 64)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    imgs = root / "imgs"
    imgs.mkdir()
    for name in GOOD:
        shutil.copy(GOLDEN / "images" / name, imgs / name)
    os.mkfifo(imgs / "pipe.jpg")  # in a folder: skipped, counted
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(imgs / "service.sock"))
    _write_plugin_image(imgs / "stall-open.png", "stall-open")
    _write_plugin_image(imgs / "stall-load.tif", "stall-load")
    _write_plugin_image(imgs / "segfault.webp", "segfault")
    shutil.copy(GOLDEN / "images" / GOOD[0], imgs / "stalled-read.jpg")
    os.mkfifo(root / "named.pipe")  # named explicitly: an error record, never opened
    env = {
        **{k: v for k, v in os.environ.items() if k != "PHI3EMBED_MODEL"},
        "PYTHONPATH": str(root / "site"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    common = ["--model", str(GOLDEN / "checkpoints" / TINY_128K), "--num-crops", "4"]
    common += ["--image-timeout", str(IMAGE_TIMEOUT)]
    procs = {}
    for mode, workers in (("inline", "0"), ("workers", "2")):
        args = [*CLI, "encode", "imgs", "named.pipe", "/dev/zero", "-o", mode, "--workers", workers, *common]
        proc = subprocess.Popen(
            args, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        procs[mode] = (proc, time.monotonic())
    yield Workspace(root, sock, procs)
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
    sock.close()


#: bad file (its name in the manifest) -> words its error record must hold
EXPECTED = {
    "named.pipe": "not a regular file (named pipe)",
    "dev/zero": "not a regular file (character device)",
    "stall-open.png": f"longer than the image timeout ({IMAGE_TIMEOUT} s)",
    "stall-load.tif": f"longer than the image timeout ({IMAGE_TIMEOUT} s)",
    "stalled-read.jpg": f"longer than the image timeout ({IMAGE_TIMEOUT} s)",
    "segfault.webp": "crashed",
}


@pytest.mark.e2e  # two console-script runs of ~15-30 s each, side by side
@pytest.mark.parametrize("mode", ["inline", "workers"])
def test_bad_files_never_stall_the_job(ws: Workspace, mode: str) -> None:
    run = ws.wait(mode)
    assert run.rc == 1, run.stderr
    for name in GOOD:
        assert run.records[name]["status"] == "ok" and (ws.root / mode / f"{name}.npy").is_file()
    failed = {n: r for n, r in run.records.items() if r["status"] == "error"}
    assert set(failed) == set(EXPECTED), run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    for name, reason in EXPECTED.items():
        error = failed[name]["error"]
        source = {"named.pipe": name, "dev/zero": "/dev/zero"}.get(name, f"imgs/{name}")
        assert error.startswith(f"{source}: ") and reason in error, error
        assert errors.count(f"error: {error}") == 1
    assert "pipe.jpg" not in run.records and "service.sock" not in run.records
    summary = " ".join(run.stderr.split())  # the summary table wraps its cells
    assert "2 written, 6 failed; skipped 2 special files (not regular files)" in summary
    # three stalls of IMAGE_TIMEOUT each, one after another at worst: nothing waited for more than that
    assert run.seconds < HARD_TIMEOUT


@pytest.mark.e2e  # waits for the two runs above
def test_stalled_workers_leave_no_process_behind(ws: Workspace) -> None:
    """After both runs: no process of theirs (helper, replaced or stuck workers) is left sleeping."""
    for mode in ws.procs:
        ws.wait(mode)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = _processes_with_cwd(ws.root)
        if not left:
            return
        time.sleep(0.2)
    pytest.fail(f"processes left behind: {left}")


def _processes_with_cwd(root: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if Path(os.readlink(entry / "cwd")) == root:
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        found.append(int(entry.name))
            except OSError:
                continue
    return found
