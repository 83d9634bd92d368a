"""The horizon study's records: reading one, and refusing one made with other settings (shared by both parts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_record(path: Path) -> dict[str, Any]:
    """A record, or ``SystemExit`` naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {path} is no JSON record ({error}); delete it to redo it") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise SystemExit(f"error: {path} is no record of this study (no settings); delete it to redo it")
    return data


def check_settings(path: Path, data: dict[str, Any], expected: dict[str, Any]) -> None:
    """``SystemExit`` naming the settings that differ when ``data`` was made with others than ``expected``."""
    if data["settings"] != expected:
        differ = sorted(k for k in {*expected, *data["settings"]} if data["settings"].get(k) != expected.get(k))
        raise SystemExit(
            f"error: {path} was made with other settings ({', '.join(differ)} differ): use another --out, or delete "
            "the records to redo them"
        )
