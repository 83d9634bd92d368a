"""``compile.md`` from the study's record: the table of seconds per outer step, the ratios and the compile seconds,
and the issue's two targets with whether each is met."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from studies.common import report_from_record

SPEEDUP_TARGET = 1.3
"""Compiled at least this many times faster than eager (per outer step)."""
PEER_TARGET = 0.8
"""Compiled at most this fraction of the fastest peer's first-order MAML (per outer step)."""


def median_iqr(values: Sequence[float]) -> dict[str, float] | None:
    """The median and the quartiles (``statistics.quantiles``, inclusive) of the finite ``values``; ``None`` without
    any."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3}


def record_path(out: str | Path, quick: bool) -> Path:
    """The record in ``out``: ``compile.json``, or ``compile_quick.json`` for ``--quick``."""
    return Path(out) / ("compile_quick.json" if quick else "compile.json")


def _fmt(summary: dict[str, float] | None, digits: int = 3) -> str:
    if not summary:
        return "-"
    return f"{summary['median']:.{digits}f} [{summary['q1']:.{digits}f}, {summary['q3']:.{digits}f}]"


def _rows(record: dict[str, Any]) -> dict[tuple[str, int, str], dict[str, Any]]:
    return {(row["problem"], row["T"], row["name"]): row for row in record["methods"]}


def twin_speedup(record: dict[str, Any], row: dict[str, Any]) -> dict[str, float] | None:
    """A compiled method's speedup over its eager twin, round by round (eager seconds / compiled seconds)."""
    twin = _rows(record).get((row["problem"], row["T"], row["twin"]))
    if row["status"] != "timed" or twin is None or twin["status"] != "timed":
        return None
    return median_iqr([e / c for e, c in zip(twin["seconds"], row["seconds"])])


def targets(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for ours ``fo`` compiled on each problem and T: the speedup over eager and the ratio to the
    fastest peer, each with its median [IQR] over the rounds and whether the median meets it."""
    out = []
    rows = _rows(record)
    cases = sorted({(row["problem"], row["T"]) for row in record["methods"]}, key=lambda c: (c[1], c[0] != "maml"))
    for problem, steps in cases:
        compiled = rows.get((problem, steps, "ours fo compiled"))
        label = f"{problem} T={steps}"
        timed = compiled is not None and compiled["status"] == "timed"
        why = None if timed else f"not measured ({compiled['reason'] if compiled else 'no compiled method'})"
        speedup = twin_speedup(record, compiled) if timed else None
        out.append({"case": label, "target": f"compiled >= {SPEEDUP_TARGET}x faster than eager",
                    "value": speedup, "met": None if speedup is None else speedup["median"] >= SPEEDUP_TARGET,
                    "why": why})  # fmt: skip
        peer = record["fastest_peer"].get(label)
        ratio = compiled.get("ratio_to_fastest_peer") if timed else None
        out.append({"case": label, "target": f"compiled <= {PEER_TARGET}x the fastest peer ({peer or 'none'})",
                    "value": ratio, "met": None if not ratio else ratio["median"] <= PEER_TARGET,
                    "why": why if not timed else (None if ratio else "no peer timed")})  # fmt: skip
    return out


def _verdict(target: dict[str, Any], higher_is_better: bool, bound: float) -> str:
    if target["met"] is None:
        return target["why"] or "not measured"
    value = target["value"]
    straddles = value["q1"] < bound <= value["q3"] if higher_is_better else value["q1"] <= bound < value["q3"]
    word = "**met**" if target["met"] else "**not met**"
    return word + (" (the IQR straddles the target)" if straddles else "")


def protocol_text(p: dict[str, Any]) -> str:
    """The protocol of a record (:meth:`studies.compile.study.Protocol.as_record`) in one sentence, without its stop
    (the MAML scale study's report says it too)."""
    return (
        f"Protocol: {p['ways']}-way {p['shots']}-shot, {p['queries']} query image(s) per class, meta-batch "
        f"{p['meta_batch']}, images {'x'.join(map(str, p['image_shape']))}, conv {p['depth']} x {p['width']} "
        f"network, inner SGD lr {p['inner_lr']}, T = {', '.join(map(str, p['steps']))}; random images (seed "
        f"{p['seed']}), the same tasks and initial weights for every method"
    )


def markdown(record: dict[str, Any]) -> str:
    p = record["protocol"]
    lines = ["# torch.compile (`compile_losses=True`) against eager and against the peers", ""]
    if record["quick"]:
        lines += ["**`--quick`: a smoke test of the study on tiny sizes, not a measurement.**", ""]
    lines += [
        f"{protocol_text(p)}. Timed: {record['outer_step']}. "
        f"{record['rounds']} interleaved rounds after a warm-up, order rotated per round; median [IQR] over the "
        "rounds; ratios paired round by round (< 1: faster). Compile seconds: the first call of the compiled method "
        "less a warm call of its eager twin, Inductor's on-disk caches disabled (a method whose graphs an earlier one "
        "compiled, the same hooks with another estimator or T = 5 after T = 1, reports only its own new graphs, near "
        "0 where there are none).",
        "",
        f"Machine: {record['machine']}. /proc/loadavg before: `{record['loadavg']['before']}`, after: "
        f"`{record['loadavg']['after']}`. Versions: "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v)
        + ".",
        "",
        *(
            [f"A method is timed where its meta-gradient agrees: {record['agreement_rule']}.", ""]
            if record.get("agreement_rule")
            else []
        ),
        "## Seconds per outer step",
        "",
        f"| problem | T | method | cosine to `{record['reference']}` | cosine to `fo` in float64 | s / outer step | "
        "/ ours `fo` eager | / fastest peer | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in record["methods"]:
        agreement = row.get("agreement") or {}
        cosine = f"{agreement['cosine']:.6f}" if agreement.get("cosine") is not None else "-"
        exact = row.get("exact_agreement") or {}
        cosine += " | " + (f"{exact['cosine']:.6f}" if exact.get("cosine") is not None else "-")
        if row["status"] != "timed":
            seconds = f"{row['status']}: {row['reason']}"
            ratios = ["-", "-"]
        else:
            seconds = _fmt(row["summary"], 4)
            ratios = [_fmt(row.get("ratio_to_ours_eager"), 2), _fmt(row.get("ratio_to_fastest_peer"), 2)]
        compile_s = f"{row['compile_seconds']:.1f}" if row.get("compile_seconds") is not None else "-"
        lines.append(
            f"| {row['problem']} | {row['T']} | {row['name']} | {cosine} | {seconds} | {ratios[0]} | {ratios[1]} | "
            f"{compile_s} |"
        )
    compiled = [row for row in record["methods"] if row["compiled"] and row["status"] == "timed"]
    if compiled:
        lines += ["", "Each compiled method against its own eager twin (speedup: eager s / compiled s, per round):", ""]
        lines += ["| problem | T | estimator | speedup | cosine to eager twin | compile s |"]
        lines += ["|---|---|---|---|---|---|"]
        for row in compiled:
            twin = row.get("twin_agreement") or {}
            cosine = f"{twin['cosine']:.6f}" if twin.get("cosine") is not None else "-"
            compile_s = f"{row['compile_seconds']:.1f}" if row.get("compile_seconds") is not None else "-"
            lines.append(
                f"| {row['problem']} | {row['T']} | `{row['estimator']}` | {_fmt(twin_speedup(record, row), 2)} | "
                f"{cosine} | {compile_s} |"
            )
    lines += ["", "## The issue's targets (ours `fo` compiled, per outer step)", ""]
    lines += ["| case | target | value, median [IQR] | verdict |", "|---|---|---|---|"]
    for target in targets(record):
        higher = target["target"].startswith("compiled >=")
        bound = SPEEDUP_TARGET if higher else PEER_TARGET
        lines.append(
            f"| {target['case']} | {target['target']} | {_fmt(target['value'], 2)} | "
            f"{_verdict(target, higher, bound)} |"
        )
    if record["failures"]:
        lines += ["", "**Methods whose meta-gradient disagreed or that failed (not timed):**", ""]
        lines += [f"- {line}" for line in record["failures"]]
    if record.get("dynamo"):
        d = record["dynamo"]
        lines += ["", f"torch.compile: {d.get('unique_graphs')} graphs compiled, {d.get('graph_breaks')} graph breaks."]
    if record["missing_peers"]:
        lines += ["", "Left out: " + "; ".join(record["missing_peers"].values()) + "."]
    return "\n".join(lines) + "\n"


def write_report(out: Path, quick: bool = False) -> int:
    return report_from_record(record_path(out, quick), markdown, "python -m studies.compile run")
