"""What the benchmark scripts share about their reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_json(path: Path | None, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path`` (the scripts' ``--json``; nothing when None). Scripts call it after every
    run, so a run cut short by a timeout still leaves the figures it had."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
