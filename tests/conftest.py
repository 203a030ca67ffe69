"""Shared fixtures. The golden folder is required: parity tests fail, never skip, without it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(os.environ.get("PHI3EMBED_GOLDEN", REPO.parent / "shared" / "golden")).resolve()
TINY_128K = "tiny-phi3v-128k-f32"
TINY_35 = "tiny-phi35v-bf16"


def _require_golden() -> Path:
    if not (GOLDEN / "MANIFEST.json").is_file():
        pytest.fail(f"golden data not found at {GOLDEN} (set PHI3EMBED_GOLDEN or place shared/ beside the checkout)")
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
