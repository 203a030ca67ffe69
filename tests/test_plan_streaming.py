"""plan at any size: totals counted in one pass without keeping the rows, the rows of a long job left out (or
streamed with --rows), the notes and error lines bounded. "Long" is lowered in these tests (SHORT_JOB), not
reached by making thousands of files."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

import phi3embed.cli.plan as plan_cli
from phi3embed.core.config import PreprocessConfig, VisionConfig
from phi3embed.core.stages import STAGES
from phi3embed.inputs.listing import expand_inputs
from phi3embed.jobs.plan import OUT_DTYPE_ITEMSIZE, PlanRow, plan, plan_row

RELEASED = VisionConfig()
PRE = PreprocessConfig(num_crops=4)
LONG_NAME = "y" * 251 + ".png"  # too long for a file name with .npy: stored under another name


def _png(path: Path, width: int, height: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(path)


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """Good images of several sizes (two renamed), and images plan cannot read or encode cannot tile."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (w, h) in enumerate([(40, 30), (900, 500), (333, 1200), (1000, 750)]):
        _png(folder / f"good{i}.png", w, h, seed=i)
    _png(folder / LONG_NAME, 640, 480)
    _png(folder / ("z" * 250 + ".png"), 50, 2000)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image at all")
    _png(folder / "strip.png", 10000, 1)  # the HD transform cannot tile it
    return folder


def test_streaming_totals_equal_the_sum_of_the_rows(mixed: Path) -> None:
    sources = expand_inputs([str(mixed)])
    rows = [plan_row(s, vision=RELEASED, preprocess=PRE, itemsize=4, exif_transpose=False) for s in sources]
    good = [r for r in rows if r.ok]
    assert len(rows) == 9 and len(good) == 6 and sum(r.renamed is not None for r in good) == 2
    for keep_rows in (None, 0, 3, 9):
        result = plan(iter(sources), vision=RELEASED, preprocess=PRE, keep_rows=keep_rows, keep_notes=1)
        t = result.totals
        assert (t.images, t.ok, t.errors, t.renamed) == (9, 6, 3, 2)
        assert t.crops == sum(r.crops or 0 for r in good)
        assert t.num_tokens == sum(r.num_tokens or 0 for r in good)
        assert t.bytes == sum(r.bytes or 0 for r in good)
        assert t.flops == sum(r.flops or 0 for r in good)
        assert t.stage_bytes == {st: sum((r.stage_bytes or {})[st] for r in good) for st in STAGES}
        kept = keep_rows is None or keep_rows >= 9
        assert result.rows == (rows if kept else []) and result.rows_omitted == (0 if kept else 9)
        assert result.first_errors == [r for r in rows if not r.ok][:1]
        assert result.first_renamed == [r for r in good if r.renamed][:1]


def test_rows_of_a_long_job_are_not_held(mixed: Path) -> None:
    """Past keep_rows no row stays alive but the kept first errors and renamed rows: memory does not grow."""
    alive: list[weakref.ref[PlanRow]] = []
    consumed = []

    def sources() -> Any:  # a generator: plan reads it once, as it goes
        for s in expand_inputs([str(mixed)]):
            consumed.append(s.name)
            yield s

    def seen(row: PlanRow) -> None:
        assert consumed[-1] == row.name  # made as its source is read, not after the listing is exhausted
        alive.append(weakref.ref(row))

    result = plan(sources(), vision=RELEASED, preprocess=PRE, keep_rows=4, keep_notes=1, on_row=seen)
    gc.collect()
    assert len(alive) == 9 and result.rows == [] and result.rows_omitted == 9
    assert {id(r()) for r in alive if r() is not None} == {id(result.first_errors[0]), id(result.first_renamed[0])}


def _json(runner: CliRunner, app: typer.Typer, *args: str) -> tuple[Any, Any]:
    result = runner.invoke(app, ["plan", *args, "--num-crops", "4", "--json"])
    return result, json.loads(result.stdout)


def test_long_job_json_leaves_the_rows_out_and_says_so(
    app: typer.Typer, runner: CliRunner, mixed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    short, short_doc = _json(runner, app, str(mixed))
    assert short.exit_code == 1 and len(short_doc["images"]) == 9 and "rows_omitted" not in short_doc
    monkeypatch.setattr(plan_cli, "SHORT_JOB", 5)
    monkeypatch.setattr(plan_cli, "ERRORS_SHOWN", 2)
    monkeypatch.setattr(plan_cli, "RENAMED_SHOWN", 1)
    long, doc = _json(runner, app, str(mixed))
    assert long.exit_code == 1  # some images cannot be encoded, as on a short job
    assert "images" not in doc and doc["rows_omitted"] == 9
    assert doc["totals"] == short_doc["totals"] and doc["settings"] == short_doc["settings"]
    errors = [line for line in long.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and errors[-1].startswith("error: ... and 1 more images cannot be encoded")
    assert errors[:2] == [line for line in short.stderr.splitlines() if line.startswith("error: ")][:2]
    assert "note: 9 images: their rows are left out (more than 5; plan --rows --json lists them)" in long.stderr
    assert "note: 2 images get another output name" in long.stderr and "  ... and 1 more" in long.stderr


def test_rows_json_streams_the_same_document(
    app: typer.Typer, runner: CliRunner, mixed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = runner.invoke(app, ["plan", str(mixed), "--num-crops", "4", "--json"])
    streamed = runner.invoke(app, ["plan", str(mixed), "--num-crops", "4", "--json", "--rows"])
    assert streamed.stdout == whole.stdout and streamed.exit_code == whole.exit_code == 1
    monkeypatch.setattr(plan_cli, "SHORT_JOB", 2)  # a long job: --rows still lists every row, the same ones
    long = runner.invoke(app, ["plan", str(mixed), "--num-crops", "4", "--json", "--rows"])
    assert json.loads(long.stdout) == json.loads(whole.stdout)
    counts = []
    for shard in ("0/2", "1/2"):  # one image in two shards: one of them is empty
        args = ["plan", str(mixed / "good0.png"), "--num-crops", "4", "--json", "--shard", shard]
        whole, streamed = runner.invoke(app, args), runner.invoke(app, [*args, "--rows"])
        assert streamed.stdout == whole.stdout and streamed.exit_code == whole.exit_code == 0
        counts.append(len(json.loads(streamed.stdout)["images"]))
    assert sorted(counts) == [0, 1]


def test_long_job_table_prints_totals_and_rows_only_when_asked(
    app: typer.Typer, runner: CliRunner, mixed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, doc = _json(runner, app, str(mixed))
    monkeypatch.setattr(plan_cli, "SHORT_JOB", 3)
    monkeypatch.setattr(plan_cli, "ERRORS_SHOWN", 1)
    args = ["plan", str(mixed), "--num-crops", "4"]
    totals = runner.invoke(app, args)
    assert totals.exit_code == 1
    assert "good0.png" not in totals.stdout and f"{doc['totals']['num_tokens']:,}" in totals.stdout
    assert "3 of 9 images cannot be encoded" in totals.stdout and "... and 2 more" in totals.stdout
    assert "their rows are left out (more than 3; plan --rows lists them)" in totals.stderr
    rows = runner.invoke(app, [*args, "--rows"])
    lines = [line.split("\t") for line in rows.stdout.splitlines() if "\t" in line]
    assert lines[0][0] == "image"
    by_name = {r["name"]: r for r in doc["images"] if r["status"] == "ok"}
    assert len(lines) == 1 + len(by_name) == 7
    for name, size, grid, crops, tokens, nbytes, _ in lines[1:]:
        row = by_name[name]
        assert size == f"{row['width']}x{row['height']}" and grid == "x".join(map(str, row["crops_grid"]))
        assert (int(crops), int(tokens), int(nbytes)) == (row["crops"], row["num_tokens"], row["bytes"])
    assert "their rows are left out" not in rows.stderr


@pytest.mark.parametrize("out_dtype", sorted(OUT_DTYPE_ITEMSIZE))
def test_library_plan_keeps_everything_by_default(mixed: Path, out_dtype: str) -> None:
    result = plan(expand_inputs([str(mixed)]), vision=RELEASED, preprocess=PRE, out_dtype=out_dtype)
    assert len(result.rows) == 9 and result.rows_omitted == 0
    assert result.first_errors == [r for r in result.rows if not r.ok]
    assert result.to_dict()["images"] == [r.to_dict() for r in result.rows]
