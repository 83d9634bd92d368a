"""What both parts of the horizon study share: their records (path, reading, refusing other settings) and the
``run`` / ``report`` action."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from studies.common import log


class Record(dict):
    """A record's JSON object (and each object inside it): reading a key that it lacks ends the study with one line
    naming the file and the key (a record of another version of the study, or edited), not with a traceback."""

    path: Path

    def __missing__(self, key: Any) -> Any:
        raise SystemExit(
            f"error: {self.path} has no {key!r}: it is no complete record of this study; delete it to redo it"
        )


def read_record(path: Path) -> dict[str, Any]:
    """A record (:class:`Record`), or ``SystemExit`` naming the file and what is wrong with it."""

    def record(pairs: dict[str, Any]) -> Record:
        found = Record(pairs)
        found.path = path
        return found

    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_hook=record)
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


def record_path(folder: Path, method: str, seed: int) -> Path:
    """The record of ``method`` (its spec string, spaces left out) on ``seed`` in ``folder``."""
    return folder / f"{method.replace(' ', '')}-seed{seed}.json"


def add_action(parser: argparse.ArgumentParser) -> None:
    """The ``run`` / ``report`` positional argument of both parts."""
    parser.add_argument(
        "action",
        nargs="?",
        choices=("run", "report"),
        default="run",
        help="run: the missing records, then the report (default); report: the report only",
    )


def run_or_report(
    args: argparse.Namespace, run: Callable[[argparse.Namespace], int], report: Callable[[argparse.Namespace], int]
) -> int:
    """``report`` for the action ``report``, else ``run``; Ctrl-C stops a run, keeping the records written so far."""
    if args.action == "report":
        return report(args)
    try:
        return run(args)
    except KeyboardInterrupt:
        log("interrupted; the records written so far stay: rerun the same command to resume")
        return 130
