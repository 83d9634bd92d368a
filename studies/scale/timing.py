"""Seconds of one hypergradient on the horizon study's CNN, every exact method side by side in interleaved rounds,
and the issue's memory-and-time targets judged from them and the scale study's peak memory.

Run from the repository root (higher and TorchOpt from ``.peers/``: ``bash scripts/install_peers.sh``)::

    python -m studies.scale.timing run [--steps 100 1000] [--rounds 5] [--methods ...]
    python -m studies.scale.timing report

The problem and the methods are :mod:`studies.scale.study`'s (the CNN of ``python -m studies.horizon cnn`` trained
for T steps of SGD with momentum 0.9 on mini-batches of 32 Omniglot drawings, the per-layer log learning rates and
weight decays the hyperparameters; float32, one torch thread). Per T: each method's first call (a warm-up), then
``--rounds`` interleaved rounds, each running every method once in an order rotated from round to round
(:func:`studies.compile.study.time_rounds`). Reported: the median and interquartile range of the wall-clock seconds,
and of the per-round (paired) ratios to ``rmd`` and to ``rmd(checkpoint_every='sqrt')``; the peak memory of each
``(method, T)`` is read from the scale study's records (``--memory-from``, its ``records/``), where there is one.

The targets (the issue "exact without a second-order graph"): at T = 100, a form of ours at most 0.2x ``rmd``'s peak
memory at most 1.1x its time; at T = 1,000, a form below the memory of ``rmd(checkpoint_every='sqrt')`` (35 MiB when
the targets were set) at no more than its time. A ratio counts as met where its paired median is within the bound.

The record is ``<out>/timing.json``, written atomically; ``report`` writes ``timing.md`` from it. Before any work an
``--out`` that cannot be written is refused, and ``run`` holds ``<out>/.timing.lock`` while it measures.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from studies.common import (
    Progress,
    StudyParser,
    log,
    machine_description,
    report_from_record,
    require_positive,
    run_alone,
    writable_folder,
    write_json,
)
from studies.compile.report import median_iqr
from studies.compile.study import Case, Method, summarize, time_rounds
from studies.scale import study

PROG = "python -m studies.scale.timing"
OUT = "studies/scale/results_timing"
SQRT = "rmd(checkpoint_every='sqrt')"
MIB = 2**20
TARGETS = (
    {"T": 100, "memory_of": "rmd", "memory_ratio": 0.2, "time_of": "rmd", "time_ratio": 1.1},
    {"T": 1000, "memory_below": SQRT, "time_of": SQRT, "time_ratio": 1.0},
)
"""The issue's targets: at T, a form of ours within the memory bound (at most a ratio of a method's peak, or below a
method's peak) and within ``time_ratio`` of ``time_of``'s seconds (paired median)."""


def build_parser() -> argparse.ArgumentParser:
    parser = StudyParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", choices=("run", "report"), default="run",
                        help="run: measure, then the report (default); report: from the record")  # fmt: skip
    parser.add_argument("--out", type=writable_folder, default=OUT, help=f"results folder (default {OUT})")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000], help="T (default 100 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per T (default 5)")
    parser.add_argument(
        "--methods", nargs="+", default=list(study.METHODS), choices=study.METHODS, metavar="METHOD",
        help=f"of {', '.join(study.METHODS)} (default: all; rmd and its sqrt form are required)",
    )  # fmt: skip
    parser.add_argument(
        "--memory-from", default=study.OUT, help=f"the scale study's folder, for the peak memory (default {study.OUT})"
    )
    study.add_problem_arguments(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--peers-dir", default=".peers", help="where higher and TorchOpt are (default .peers)")
    return parser


def scale_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """The scale study's arguments for the same problem (its defaults for the rest), to build its bench."""
    words = ["run", "--data", args.data, "--characters", str(args.characters), "--size", str(args.size),
             "--width", str(args.width), "--batch", str(args.batch), "--threads", str(args.threads),
             "--peers-dir", args.peers_dir, "--out", args.memory_from, "--methods", *args.methods]  # fmt: skip
    if args.root:
        words += ["--root", args.root]
    return study.parse_args(words)[1]


def peaks(scale_args: argparse.Namespace) -> dict[tuple[str, int], int]:
    """The scale study's peak bytes by ``(method, T)``, from the records of the same settings (none: empty)."""
    try:
        records = study.load_records(scale_args)
    except SystemExit:  # records of other settings (a tiny test problem): no memory to show
        return {}
    return {key: record["peak_bytes"] for key, record in records.items()}


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    scale_args = scale_arguments(args)
    peers, missing = study._peers(scale_args)
    for reason in missing.values():
        log(f"note: {reason}: left out")
    methods = [m for m in args.methods if m not in missing]
    device = torch.device("cpu")
    splits = study._on(study._splits(scale_args), device, torch.float32)
    bench = study.Bench(splits, study._cnn(scale_args), scale_args.lr_init, scale_args.wd_init, device, peers)
    cases = [
        Case(
            "cnn",
            steps,
            [Method(m, "peer" if m in study.PEERS else "ours", study.hypergradient(bench, m, steps)) for m in methods],
        )  # fmt: skip
        for steps in args.steps
    ]
    # a unit per warm-up call (weighing 1) and per round (2 per method: time_rounds' weights)
    units = len(cases) * (len(methods) + args.rounds)
    progress = Progress(units, work=len(cases) * len(methods) * (1 + 2 * args.rounds))
    rows: dict[str, dict[str, Any]] = {}
    load_before = study.loadavg()
    for case in cases:
        for method in case.methods:
            method.run()  # the warm-up
            rows[case.key(method)] = {"method": method.name, "name": method.name, "who": method.who,
                                      "T": case.steps, "status": "timed"}  # fmt: skip
            progress.step(f"{case.key(method)}: warmed up")
    for case in cases:  # the rounds of one T together, so that a round's methods share the machine's state
        time_rounds([case], rows, args.rounds, progress)
    summarize(cases, rows)
    for case in cases:
        sqrt_row = rows.get(case.key(SQRT))
        for method in case.methods:
            row = rows[case.key(method)]
            row["ratio_to_rmd"] = row.pop("ratio_to_ours_eager")
            del row["name"]  # (the compile study's key)
            if sqrt_row is not None:
                per_round = [a / b for a, b in zip(row["seconds"], sqrt_row["seconds"])]
                row["ratio_to_sqrt"] = {"per_round": per_round, **(median_iqr(per_round) or {})}
    memory = peaks(scale_args)
    record = {
        "command": " ".join([PROG, *map(shlex.quote, args.argv)]),
        "problem": {
            **study._cnn(scale_args).as_dict(),
            "data": args.data,
            "lr_init": scale_args.lr_init,
            "wd_init": scale_args.wd_init,
            "dtype": "float32",
        },  # fmt: skip
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": args.threads,
        "machine": machine_description(device),
        "loadavg": {"before": load_before, "after": study.loadavg()},
        "memory_from": args.memory_from if memory else None,
        "missing_peers": missing,
        "rows": [{**row, "peak_bytes": memory.get((row["method"], row["T"]))} for row in rows.values()],
    }
    write_json(Path(args.out) / "timing.json", record)
    return report(args)


def _ratio(value: dict[str, Any] | None) -> str:
    if not value:
        return "-"
    return f"{value['median']:.2f} [{value['q1']:.2f}, {value['q3']:.2f}]"


def _label(method: str) -> str:
    return study.PEERS.get(method, f"`{method}`")


def table(record: dict[str, Any]) -> list[str]:
    """Every (T, method): peak MiB (from the scale study), seconds median [IQR], the paired ratios."""
    lines = [
        f"| T | method | peak MiB | s / hypergradient | / `rmd` | / `{SQRT}` | / fastest peer |",
        "|---:|---|---:|---|---|---|---|",
    ]
    for row in record["rows"]:
        s = row["summary"]
        peak = "-" if row.get("peak_bytes") is None else study.mib(row["peak_bytes"])
        lines.append(
            f"| {row['T']:,} | {_label(row['method'])} | {peak} | {s['median']:.3g} [{s['q1']:.3g}, {s['q3']:.3g}] | "
            f"{_ratio(row.get('ratio_to_rmd'))} | {_ratio(row.get('ratio_to_sqrt'))} | "
            f"{_ratio(row.get('ratio_to_fastest_peer'))} |"
        )
    return lines


def judge(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target: the forms of ours within its memory bound, their paired time ratio, and whether one meets it."""
    out = []
    for target in TARGETS:
        rows = {r["method"]: r for r in record["rows"] if r["T"] == target["T"]}
        result: dict[str, Any] = {**target, "candidates": [], "met": None, "why": None}
        if not rows:
            result["why"] = f"T = {target['T']:,} not timed"
            out.append(result)
            continue
        base = rows.get(target.get("memory_of") or target["memory_below"], {}).get("peak_bytes")
        bound = None if base is None else target.get("memory_ratio", 1.0) * base
        if bound is None or all(r.get("peak_bytes") is None for r in rows.values()):
            result["why"] = "no peak memory recorded for this T (run python -m studies.scale first)"
            out.append(result)
            continue
        key = "ratio_to_rmd" if target["time_of"] == "rmd" else "ratio_to_sqrt"
        for name, row in rows.items():
            peak = row.get("peak_bytes")
            # "at most 0.2x" rmd's peak; "below" the sqrt form's
            if row["who"] != "ours" or peak is None or peak > bound or ("memory_below" in target and peak >= bound):
                continue
            ratio = (row.get(key) or {}).get("median")
            result["candidates"].append({"method": name, "peak_bytes": peak, "time_ratio": ratio})
        result["bound_bytes"] = bound
        result["met"] = any(c["time_ratio"] is not None and c["time_ratio"] <= target["time_ratio"]
                            for c in result["candidates"])  # fmt: skip
        out.append(result)
    return out


def target_lines(record: dict[str, Any]) -> list[str]:
    """One line per target: met or missed, with the forms within the memory bound and their time ratios."""
    lines = []
    for result in judge(record):
        memory = (
            f"<= {result['memory_ratio']:g}x `{result['memory_of']}`'s peak"
            if "memory_of" in result
            else f"< `{result['memory_below']}`'s"
            + (f" ({study.mib(result['bound_bytes'])} MiB)" if result.get("bound_bytes") else "")
        )
        head = f"T = {result['T']:,}: memory {memory} at <= {result['time_ratio']:g}x `{result['time_of']}`'s time"
        if result["met"] is None:
            lines.append(f"- {head}: not judged ({result['why']})")
            continue
        forms = "; ".join(
            f"`{c['method']}` {study.mib(c['peak_bytes'])} MiB at {c['time_ratio']:.2f}x" for c in result["candidates"]
        )
        if result["met"]:
            lines.append(f"- {head}: **met** ({forms})")
        elif result["candidates"]:
            best = min(c["time_ratio"] for c in result["candidates"] if c["time_ratio"] is not None)
            lines.append(
                f"- {head}: **missed**, by {100 * (best - result['time_ratio']) / result['time_ratio']:.0f}% of "
                f"the time bound at best (within the memory bound: {forms})"
            )
        else:
            lines.append(f"- {head}: **missed** (no form of ours within the memory bound)")
    return lines


def markdown(record: dict[str, Any]) -> str:
    p = record["problem"]
    lines = [
        "# The horizon CNN: seconds of one hypergradient, exact methods side by side",
        "",
        f"The CNN of `python -m studies.horizon cnn` ({p['characters']} classes, {p['size']} x {p['size']} images, "
        f"width {p['width']}, mini-batches of {p['batch']}, SGD momentum {p['momentum']}; {p['data']} data), "
        f"float32, {record['threads']} torch thread. T = {', '.join(f'{t:,}' for t in record['steps'])}; "
        f"{record['rounds']} interleaved rounds per T after a warm-up call, order rotated per round; median [IQR] "
        "over the rounds; ratios paired round by round (< 1: faster). Peak memory from the scale study's records"
        + (f" (`{record['memory_from']}`)" if record["memory_from"] else " (none found: `-`)")
        + "; MiB = 2^20 bytes.",
        "",
        f"Machine: {record['machine']}. /proc/loadavg before: `{record['loadavg']['before']}`, after: "
        f"`{record['loadavg']['after']}`.",
        "",
        *table(record),
        "",
        "## The issue's targets",
        "",
        *target_lines(record),
    ]
    if record["missing_peers"]:
        lines += ["", "Left out: " + "; ".join(record["missing_peers"].values()) + "."]
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace) -> int:
    return report_from_record(Path(args.out) / "timing.json", markdown, f"{PROG} run")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    require_positive(parser, args, "steps", "rounds", "characters", "width", "batch", "threads")
    for needed in ("rmd", SQRT):
        if needed not in args.methods:
            parser.error(f"--methods must include {needed} (the ratios are to it)")
    if len(set(args.methods)) != len(args.methods):
        parser.error("--methods names a method twice")
    if args.action == "report":
        return report(args)
    try:
        with run_alone(args.out, ".timing.lock"):
            return run(args)
    except KeyboardInterrupt:
        log("interrupted before the record was written: nothing kept; run the command again")
        return 130


if __name__ == "__main__":
    sys.exit(main())
