"""The Table 2 runs' records, ``<out>/runs/*.json``: reading them, and what makes one unusable.

A record of a planned run that cannot be used (not JSON, ``{}``, an accuracy ``null`` ...) is named with what is
wrong: ``run`` refuses to start until it is deleted (the run is then redone); ``report`` skips a malformed file,
planned or not, with a warning.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from studies.table2.settings import COMPARED_SETTINGS, canonical

RECORD_FIELDS = ("dataset", "ways", "method", "seed", "val_acc", "test_acc")
"""The fields that every record needs (the report's); ``run`` also needs :data:`COMPARED_SETTINGS`."""
OPTIONAL_NUMBERS = ("seconds_per_step", "wall_seconds", "jvps", "inner_steps")
"""Fields that the report computes with when a record has them: numbers or ``null``."""
DELETE_ADVICE = "delete the file to rerun that run (the same `run` command then redoes it)"


class MalformedRecord(ValueError):
    """A record file that cannot be used: unreadable, not JSON, not a JSON object or lacking a usable field.

    Its message names the file, what is wrong and what to do (delete it, so that ``run`` redoes that run).
    """

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}; {DELETE_ADVICE}")
        self.path = path
        self.problem = problem


def read_record(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when there is no such file.

    Raises:
        MalformedRecord: the file cannot be read, is not JSON or holds something else than a JSON object.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise MalformedRecord(path, f"cannot be read ({reason})") from None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise MalformedRecord(path, f"is not JSON ({error})") from None
    if not isinstance(data, dict):
        raise MalformedRecord(path, f"holds {_shown(data)} ({type(data).__name__}), not a JSON object")
    return data


def _shown(value: Any) -> str:
    """``value`` as JSON writes it (``null``, ``"3"``), shortened."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a finite JSON number (``true`` and ``false`` are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def record_problem(record: dict[str, Any], settings: bool = False) -> str | None:
    """What makes ``record`` unusable, ``None`` when nothing does.

    The report needs :data:`RECORD_FIELDS` (accuracies as fractions in [0, 1], the method as an estimator spec)
    and numbers or ``null`` in :data:`OPTIONAL_NUMBERS`; with ``settings``, the record must also state the
    :data:`COMPARED_SETTINGS` (``run`` compares them with the requested run's) as positive integers.
    """
    required = [*RECORD_FIELDS, *(COMPARED_SETTINGS if settings else ())]
    missing = [name for name in required if name not in record]
    if missing:
        return f"has no {', '.join(missing)}"
    for name in ("dataset", "method"):
        if not isinstance(record[name], str):
            return f"{name} is {_shown(record[name])}, not a string"
    for name, least in (("ways", 2), ("seed", 0), *((name, 1) for name in COMPARED_SETTINGS if settings)):
        if not _is_int(record[name]) or record[name] < least:
            return f"{name} is {_shown(record[name])}, not an integer >= {least}"
    try:
        canonical(record["method"])
    except ValueError:
        return f"its method {record['method']!r} is not an estimator spec string (e.g. 'greedy(0.99)')"
    for name in ("val_acc", "test_acc"):
        if not is_number(record[name]) or not 0.0 <= record[name] <= 1.0:
            return f"{name} is {_shown(record[name])}, not an accuracy in [0, 1]"
    for name in OPTIONAL_NUMBERS:
        value = record.get(name)
        if value is not None and not is_number(value):
            return f"{name} is {_shown(value)}, not a number"
    return None


def load_records(out: Path) -> list[dict[str, Any]]:
    """All usable records under ``out/runs``; each malformed file is reported on stderr (with what is wrong and
    what to do) and skipped."""
    records = []
    for path in sorted((out / "runs").glob("*.json")):
        try:
            record = read_record(path)
            problem = None if record is None else record_problem(record)
            if problem is not None:
                raise MalformedRecord(path, problem)
        except MalformedRecord as error:
            print(f"warning: skipping {error}", file=sys.stderr)
            continue
        if record is not None:  # None: the file went away since the listing
            records.append(record)
    return records
