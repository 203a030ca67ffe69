"""plan lists exactly what encode processes, with the token counts encode writes.

One folder holds the cases where listing rules can drift: a hidden image (skipped by both), an image without an
extension (found by its content), a text file named like an image (listed, and an error for both), nested
folders. The same inputs are given as a folder, as a quoted glob and as a ``-`` list on stdin.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import GOLDEN, TINY_128K
from typer.testing import CliRunner

from phi3embed.cli.app import app

MODEL = str(GOLDEN / "checkpoints" / TINY_128K)


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    images = GOLDEN / "images"
    folder = tmp_path / "imgs"
    (folder / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(images / "photo_1000x750.jpg", folder / "photo.jpg")
    shutil.copy(images / "rgb_336x336.png", folder / ".hidden.png")
    shutil.copy(images / "portrait_600x1400.png", folder / "no_extension")
    (folder / "fake.jpg").write_text("a text file named like an image")
    shutil.copy(images / "panorama_4000x120.png", folder / "sub" / "pano.png")
    shutil.copy(images / "tiny_7x9.png", folder / "sub" / "deeper" / "tiny.png")
    (folder / "sub" / "notes.txt").write_text("not an image")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PHI3EMBED_MODEL", raising=False)
    yield tmp_path


def _plan(args: list[str], stdin: str | None) -> dict[str, dict[str, Any]]:
    result = CliRunner().invoke(app, ["plan", *args, "--model", MODEL, "--num-crops", "4", "--json"], input=stdin)
    assert result.exit_code == 1, result.output  # fake.jpg cannot be planned
    return {row["name"]: row for row in json.loads(result.stdout)["images"]}


def _encode(args: list[str], stdin: str | None, out: Path) -> dict[str, dict[str, Any]]:
    cmd = ["encode", *args, "--model", MODEL, "--num-crops", "4", "--device", "cpu", "--out", str(out), "-q"]
    result = CliRunner().invoke(app, cmd, input=stdin)
    assert result.exit_code == 1, result.output  # fake.jpg fails
    lines = (out / "manifest.jsonl").read_text().splitlines()
    return {r["name"]: r for r in map(json.loads, lines)}


STDIN = "imgs/photo.jpg\nimgs/no_extension\nimgs/fake.jpg\nimgs/sub/pano.png\n"


@pytest.mark.parametrize(
    ("args", "stdin"),
    [(["imgs"], None), (["imgs/**/*"], None), (["-"], STDIN)],
    ids=["folder", "glob", "stdin"],
)
def test_plan_names_and_tokens_equal_encode_manifest(workdir: Path, args: list[str], stdin: str | None) -> None:
    planned = _plan(args, stdin)
    encoded = _encode(args, stdin, workdir / "out")
    assert set(planned) == set(encoded)
    assert not any(Path(name).name.startswith(".") for name in planned)
    assert any(Path(name).name == "no_extension" for name in planned)
    for name, record in encoded.items():
        row = planned[name]
        assert (row["status"], record["status"]) in (("ok", "ok"), ("error", "error")), name
        if record["status"] == "ok":
            assert row["num_tokens"] == record["num_tokens"]
            stored = np.load(workdir / "out" / f"{name}.npy")
            assert stored.shape == (row["num_tokens"], 96)
    if "-" not in args:
        assert os.path.join("sub", "deeper", "tiny.png") in planned
