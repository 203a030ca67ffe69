"""benchmarks/bench_scale.py builds finished jobs synthetically; its figures mean something only if the real code
treats that folder as it treats a folder a real encode finished. Checked against a real encode of the same
inputs (both kinds), and the benchmark's own guard must fire on a folder that is not finished."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_scale  # noqa: E402

pytestmark = pytest.mark.e2e  # console-script subprocesses

N = 25  # loose: two subfolders; archives: one tar file


def manifest_records(folder: Path) -> dict[str, dict[str, Any]]:
    lines = (folder / bench_scale.MANIFEST).read_text().splitlines()
    return {r["name"]: r for r in map(json.loads, lines)}


@pytest.mark.parametrize("kind", ["loose", "archives"])
def test_synthetic_finished_job_is_what_a_real_encode_leaves(tmp_path: Path, kind: str, monkeypatch: Any) -> None:
    monkeypatch.setattr(bench_scale, "PER_FOLDER", 20)
    templates = bench_scale.make_templates(tmp_path)
    job = bench_scale.Job(tmp_path, kind, N, templates[kind])
    assert job.ensure_built() > 0
    assert job.ensure_built() == 0  # reused

    # The records a real encode of the same inputs writes, field by field (but when it ran, and dedup's note).
    real = tmp_path / "real"
    run = subprocess.run(
        [*bench_scale.CLI, "encode", bench_scale.input_arg(kind, job.src), "-o", str(real), *bench_scale.MODEL_ARGS],
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    ours, theirs = manifest_records(job.out), manifest_records(real)
    assert sorted(ours) == sorted(theirs) and len(ours) == N
    for name, record in theirs.items():
        assert {k: v for k, v in ours[name].items() if k not in ("time", "duplicate_of")} == {
            k: v for k, v in record.items() if k not in ("time", "duplicate_of")
        }
        assert (job.out / record["output"]).stat().st_size == (real / record["output"]).stat().st_size

    # The real commands on it: nothing to encode (the guard asserts it), the store opens and reads, plan and
    # combine succeed over the parts.
    job.rerun()
    job.rerun()
    job.open()
    job.plan()
    job.combine()

    # Restoring removes what runs and users added anywhere in the tree and puts the manifest back.
    extra = [job.out / "extra.bin", job.out / job.lookup.split("/")[0] / "extra.bin"]
    for path in extra:
        path.write_bytes(b"x")
    (job.out / "added").mkdir()
    with (job.out / bench_scale.MANIFEST).open("a") as fh:
        fh.write("{}\n")
    job.restore(job.out)
    assert not any(p.exists() for p in [*extra, job.out / "added"])
    assert manifest_records(job.out) == ours

    # A folder that is not finished (one output gone) gets an image encoded: the guard stops the benchmark.
    (job.out / ours[job.lookup]["output"]).unlink()
    with pytest.raises(AssertionError):
        job.rerun()
