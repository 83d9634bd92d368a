"""Plots and tables of the estimators' cost, from the JSON of ``python -m studies.cost.estimators --json PATH``.

Run from the repository root::

    python -m studies.cost.plot [--input studies/cost/results/estimators_cpu.json] [--out studies/cost/results]

The input is a list of records with the keys ``problem`` (``fewshot`` or ``whole_network``), ``estimator`` (a spec
string such as ``greedy(0.99)``: the label of its line and row), ``T``, ``seconds_per_step``, ``peak_bytes`` and
``ratio`` (``null`` where its reference was not run). The
``plain_step`` row of ``whole_network`` (one ordinary training step of the net, ``T = 1``) is the reference of that
problem: it is drawn as a horizontal dashed line and listed under the table.

Outputs in ``--out``:

- ``memory_vs_T.png``: peak memory (MiB) of one outer step against T, one panel per problem, one line per
  estimator (a log-scale y axis where the values of a panel span more than a factor of 8, else a linear one from 0);
- ``time_vs_T.png``: seconds per outer step against T, likewise;
- ``cost.md``: per problem, a table with a row per estimator and, for each T, the seconds per step, the time
  ratio and the peak MiB.

The input is complete when it holds records for T = 200 of both problems; otherwise what it holds is plotted and a
warning says what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from studies.common import StudyParser, atomic_path, writable_folder, write_text  # noqa: E402
from studies.cost.estimators import Record  # noqa: E402

PROBLEMS = ("fewshot", "whole_network")
PLAIN_STEP = "plain_step"
COMPLETE_T = 200
LOG_SCALE_SPAN = 8.0  # a panel gets a log-scale y axis when max / min of its values exceeds this
RATIO_NOTES = {
    "fewshot": "ratio = s/step / FO's s/step at the same T.",
    "whole_network": "ratio = s/step / (T × plain_step's s/step): the cost of one inner step in plain training steps.",
}
TITLES = {
    "fewshot": "fewshot (backbone = hyperparameters)",
    "whole_network": "whole_network (per-entry weight decay)",
}
REQUIRED_KEYS = ("problem", "estimator", "T", "seconds_per_step", "peak_bytes", "ratio")


def load_records(path: Path) -> list[Record]:
    """The records of the JSON file at ``path``.

    Raises:
        SystemExit: the file is missing, does not parse (it may still be being written), or lacks a key.
    """
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(
            f"{path} does not exist; write it with: python -m studies.cost.estimators --json {path}"
        ) from None
    except json.JSONDecodeError as error:
        raise SystemExit(
            f"{path} is not valid JSON ({error}); is python -m studies.cost.estimators still writing it?"
        ) from error
    if not isinstance(raw, list):
        raise SystemExit(f"{path} must hold a list of records, got {type(raw).__name__}")
    records = []
    for index, item in enumerate(raw):
        missing = [key for key in REQUIRED_KEYS if key not in item]
        if missing:
            raise SystemExit(f"{path}: record {index} lacks {', '.join(missing)}")
        records.append(
            Record(
                problem=str(item["problem"]),
                estimator=str(item["estimator"]),
                T=int(item["T"]),
                seconds_per_step=float(item["seconds_per_step"]),
                peak_bytes=int(item["peak_bytes"]),
                ratio=None if item["ratio"] is None else float(item["ratio"]),
            )
        )
    return records


def missing_for_completeness(records: Sequence[Record]) -> list[str]:
    """The problems that have no record at ``T = 200`` (empty when the input is complete)."""
    present = {r.problem for r in records if r.T == COMPLETE_T}
    return [problem for problem in PROBLEMS if problem not in present]


def estimators_in_order(records: Sequence[Record]) -> list[str]:
    """The estimators of ``records`` in the order they first appear, without the plain step."""
    names: list[str] = []
    for r in records:
        if r.estimator != PLAIN_STEP and r.estimator not in names:
            names.append(r.estimator)
    return names


def problems_in(records: Sequence[Record]) -> list[str]:
    """The problems present, the known ones first."""
    found = {r.problem for r in records}
    return [p for p in PROBLEMS if p in found] + sorted(found - set(PROBLEMS))


# ------------------------------------------------------------------------------------------------------ plots


def plot_metric(records: Sequence[Record], metric: str, ylabel: str, title: str, path: Path) -> None:
    """One panel per problem: ``metric`` of each estimator against T; the plain step as a dashed line."""
    problems = problems_in(records)
    fig, axes = plt.subplots(1, len(problems), figsize=(5.6 * len(problems), 4.2), squeeze=False)
    for ax, problem in zip(axes[0], problems):
        rows = [r for r in records if r.problem == problem]
        values: list[float] = []
        for name in estimators_in_order(rows):
            points = sorted((r.T, _value(r, metric)) for r in rows if r.estimator == name)
            ax.plot([t for t, _ in points], [v for _, v in points], marker="o", markersize=4, label=name)
            values += [v for _, v in points]
        for plain in (r for r in rows if r.estimator == PLAIN_STEP):
            value = _value(plain, metric)
            ax.axhline(value, color="black", linestyle="--", linewidth=1, label="plain training step")
            values.append(value)
        t_values = sorted({r.T for r in rows if r.estimator != PLAIN_STEP})
        ax.set_xscale("log")
        ax.set_xticks(t_values, [str(t) for t in t_values])
        ax.minorticks_off()
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) > LOG_SCALE_SPAN:
            ax.set_yscale("log")
        else:
            # a linear axis from zero, so that near-equal values look near-equal
            ax.set_ylim(0, 1.15 * max(values, default=1.0))
        ax.set_xlabel("T (inner steps)")
        ax.set_ylabel(ylabel)
        ax.set_title(TITLES.get(problem, problem))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right" if ax.get_yscale() == "linear" else "best")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)


def _value(record: Record, metric: str) -> float:
    """The plotted value of ``record``: peak MiB or seconds per step."""
    return record.peak_mib if metric == "peak_mib" else record.seconds_per_step


# ----------------------------------------------------------------------------------------------------- tables


def _number(value: float | None, digits: int) -> str:
    """``value`` rounded for a table cell, ``–`` where missing."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def markdown_table(records: Sequence[Record], problem: str) -> str:
    """Rows: estimators; for each T three columns: s/step, time ratio and peak MiB."""
    rows = [r for r in records if r.problem == problem]
    t_values = sorted({r.T for r in rows if r.estimator != PLAIN_STEP})
    by_key = {(r.estimator, r.T): r for r in rows}
    header = ["estimator"] + [f"{label} (T={t})" for t in t_values for label in ("s/step", "ratio", "peak MiB")]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in estimators_in_order(rows):
        cells = []
        for t in t_values:
            r = by_key.get((name, t))
            if r is None:
                cells += ["–", "–", "–"]
            else:
                cells += [_number(r.seconds_per_step, 4), _number(r.ratio, 2), _number(r.peak_mib, 1)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(records: Sequence[Record], source: Path, missing: Sequence[str]) -> str:
    """The whole of ``cost.md``."""
    lines = [
        "# Cost of the hypergradient estimators",
        "",
        f"From `{source}` (written by `python -m studies.cost.estimators --json`). s/step: seconds per outer step "
        "(median); "
        "peak MiB: peak memory of one outer step above what was in use before it.",
    ]
    if missing:
        lines += ["", f"**Incomplete input:** no records at T={COMPLETE_T} for {', '.join(missing)}."]
    for problem in problems_in(records):
        lines += ["", f"## {problem}", "", markdown_table(records, problem), "", RATIO_NOTES.get(problem, "")]
        for plain in (r for r in records if r.problem == problem and r.estimator == PLAIN_STEP):
            lines.append(
                f"Reference `{PLAIN_STEP}` (one ordinary training step): {plain.seconds_per_step:.4f} s, "
                f"{plain.peak_mib:.1f} MiB."
            )
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line options (see the module docstring)."""
    parser = StudyParser(prog="python -m studies.cost.plot", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--input",
        default="studies/cost/results/estimators_cpu.json",
        help="the JSON of python -m studies.cost.estimators --json (default studies/cost/results/estimators_cpu.json)",
    )
    parser.add_argument(
        "--out", type=writable_folder, default="studies/cost/results", help="output folder (studies/cost/results)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Write the plots and the tables; return the output paths and whether the input was complete."""
    args = parse_args(argv)
    source, out = Path(args.input), Path(args.out)
    records = load_records(source)
    if not records:
        raise SystemExit(f"{source} holds no records")
    missing = missing_for_completeness(records)
    if missing:
        print(f"warning: {source} has no records at T={COMPLETE_T} for {', '.join(missing)}", file=sys.stderr)
    paths = {"memory": out / "memory_vs_T.png", "time": out / "time_vs_T.png", "markdown": out / "cost.md"}
    plot_metric(records, "peak_mib", "peak memory (MiB)", "Peak memory of one outer step", paths["memory"])
    plot_metric(records, "seconds", "seconds per outer step", "Time of one outer step", paths["time"])
    report = markdown_report(records, source, missing)
    write_text(paths["markdown"], report)
    print(report)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return {"paths": paths, "complete": not missing}


if __name__ == "__main__":
    main()
