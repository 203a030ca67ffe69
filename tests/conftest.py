"""Shared fixtures. The golden folder is required: parity tests fail, never skip, without it.

GOLDEN is the trimmed set in the repository (tests/data/golden) unless PHI3EMBED_GOLDEN names another one, e.g. the
full set. In the trimmed set most embedding files are compact (see GoldenEmbeddings); tests compare through it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from phi3embed.cli.inspect_commands import register

if TYPE_CHECKING:
    from phi3embed.outputs.records import OutputSettings

REPO = Path(__file__).resolve().parent.parent
IN_REPO_GOLDEN = REPO / "tests" / "data" / "golden"
GOLDEN = Path(os.environ.get("PHI3EMBED_GOLDEN") or IN_REPO_GOLDEN).resolve()
TINY_128K = "tiny-phi3v-128k-f32"
TINY_35 = "tiny-phi35v-bf16"


def _require_golden() -> Path:
    if not (GOLDEN / "MANIFEST.json").is_file():
        pytest.fail(f"golden data not found at {GOLDEN} (it ships in tests/data/golden; PHI3EMBED_GOLDEN overrides)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden() -> Path:
    return _require_golden()


@pytest.fixture(scope="session")
def manifest(golden: Path) -> dict[str, Any]:
    return json.loads((golden / "MANIFEST.json").read_text())


def load_manifest() -> dict[str, Any]:
    """For parametrisation at collection time (fails the run, not skips, when the data is missing)."""
    path = GOLDEN / "MANIFEST.json"
    if not path.is_file():
        return {"processor_cases": [], "embedding_cases": [], "merge_cases": [], "variant_cases": []}
    return json.loads(path.read_text())


@dataclass(frozen=True)
class GoldenEmbeddings:
    """One golden embeddings file: the full array, or (compact file of the trimmed set) a fixed sample of it, per-row
    sums / abs maxima and the sha256 of the whole float32 array."""

    shape: tuple[int, ...]
    array: np.ndarray | None
    sha256: str | None
    sample_index: np.ndarray  # into the flattened array
    sample: np.ndarray
    row_sum: np.ndarray | None = None
    row_absmax: np.ndarray | None = None

    def max_abs(self, ours: Any) -> float:
        """max |ours - golden|: exact with the full array or an equal sha256; otherwise the largest of the sample
        differences, |row sum difference| / row length and |row abs-max difference|, each a lower bound of it
        (so a result within atol of the golden array is always accepted, and one that fails this is a real miss)."""
        a = np.asarray(ours)
        if tuple(a.shape) != self.shape:
            return float("inf")
        if self.array is not None:
            return float(np.abs(a.astype(np.float64) - self.array.astype(np.float64)).max(initial=0.0))
        if a.dtype == np.float32 and self.sha256 == hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest():
            return 0.0
        a64 = a.astype(np.float64).reshape(self.shape[0], -1)
        assert self.row_sum is not None and self.row_absmax is not None
        return max(
            float(np.abs(a64.reshape(-1)[self.sample_index] - self.sample).max(initial=0.0)),
            float(np.abs(a64.sum(axis=1) - self.row_sum).max(initial=0.0)) / a64.shape[1],
            float(np.abs(np.abs(a64).max(axis=1) - self.row_absmax).max(initial=0.0)),
        )


@cache
def _sha256_by_file() -> dict[str, str]:
    m = load_manifest()
    return {c["file"]: c["embeddings_sha256"] for c in m["embedding_cases"] if "embeddings_sha256" in c}


def golden_embeddings(file: str | Path, sha256: str | None = None) -> GoldenEmbeddings:
    """The embeddings of a golden npz (path relative to GOLDEN); the sha256 comes from MANIFEST.json if not given."""
    if sha256 is None:
        sha256 = _sha256_by_file().get(str(file))
    with np.load(GOLDEN / file) as z:
        if "embeddings" in z:
            full = z["embeddings"]
            index = np.arange(full.size, dtype=np.int64)
            return GoldenEmbeddings(full.shape, full, sha256, index, full.reshape(-1).astype(np.float64))
        return GoldenEmbeddings(
            tuple(int(n) for n in z["embeddings_shape"]),
            None,
            sha256,
            z["embeddings_sample_index"],
            z["embeddings_sample"].astype(np.float64),
            z["embeddings_row_sum"],
            z["embeddings_row_absmax"],
        )


@pytest.fixture()
def app() -> typer.Typer:
    """The inspection commands (plan, preview, info, download) on an application of their own."""
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture()
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A CLI runner that does not see the caller's PHI3EMBED_MODEL."""
    monkeypatch.delenv("PHI3EMBED_MODEL", raising=False)
    return CliRunner()


def output_settings(**over: Any) -> OutputSettings:
    """OutputSettings of a made-up model (float32, 4 crops) for writer and store tests; ``over`` replaces fields."""
    import torch

    from phi3embed.outputs.records import OutputSettings

    base: dict[str, Any] = dict(
        model="tiny", fingerprint="f" * 32, num_crops=4, dtype=torch.float32, compute_dtype=torch.float32
    )
    return OutputSettings(**{**base, **over})
