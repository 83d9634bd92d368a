"""The files of a run's folder and the reading of its curve, shared by the runner, the timing and the report."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

CHECKPOINT, CURVE, RECORD, TIMING, LOCK = "checkpoint.pt", "curve.jsonl", "record.json", "timing.json", ".lock"


def read_curve(path: Path) -> list[dict[str, Any]]:
    """The curve's complete lines (a line cut short by a kill is left out)."""
    if not path.is_file():
        return []
    points = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            points.append(json.loads(line))
    return points
