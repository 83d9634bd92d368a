"""How lr_schedule's outer rule was chosen, on seeds 0, 1 and 2 only: Adam and Rprop on the log learning rates,
for several window lengths T (the same 300 inner steps in all: 300 / T outer steps), largest steps and first steps,
each against the per-seed best of the grid of fixed rates (the same harness, the same inner steps).

    python -m studies.hpo.tuning                     # -> studies/hpo/results/tuning_rule.{json,md}
    python -m studies.hpo.tuning --report            # only rewrite the table from the records

Rprop's largest step is given per inner step (``--max-steps-per-inner 0.01``: ``max_outer_step = 0.01 T``) and its
first step as a fraction of the largest (``--first-steps 0.1``: ``outer_lr = 0.1 max_outer_step``). Everything
else is ``configs/hpo/lr_schedule.yaml``.

Before any work: an ``--out`` that cannot be written is refused, and a run (not ``--report``) holds
``OUT/.NAME.lock`` while it works (:func:`studies.common.run_alone`): a second run of the same ``--name`` on the same
``--out`` is refused while the first lives.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from studies.common import (
    Progress,
    StudyParser,
    machine_description,
    quiet,
    run_alone,
    writable_folder,
    write_json,
    write_text,
)
from studies.hpo.comparison import GRID
from studies.hpo.unseen import TUNING_SEEDS, fit

TOTAL_INNER_STEPS = 300


def window(T: int) -> list[str]:
    """Overrides for windows of ``T`` inner steps and the same total number of inner steps."""
    if TOTAL_INNER_STEPS % T:
        raise SystemExit(f"--windows: {T} does not divide the {TOTAL_INNER_STEPS} inner steps")
    steps = str(TOTAL_INNER_STEPS // T)
    return ["--model.inner_steps", str(T), "--trainer.max_steps", steps, "--data.steps_per_epoch", steps]


def candidates(args: argparse.Namespace) -> dict[str, list[str]]:
    """The rules compared, by name: their overrides."""
    rules = {}
    for T in args.windows:
        for lr in args.adam_lrs:
            rules[f"T{T} adam outer_lr={lr:g}"] = [*window(T), "--model.outer_optimizer", "adam", "--model.outer_lr",
                                                   f"{lr:g}"]  # fmt: skip
        for per_inner in args.max_steps_per_inner:
            largest = per_inner * T
            for fraction in args.first_steps:
                rules[f"T{T} rprop max={largest:.3g} first={fraction * largest:.3g}"] = [
                    *window(T),
                    "--model.outer_optimizer", "rprop",
                    "--model.max_outer_step", f"{largest:.6g}",
                    "--model.outer_lr", f"{fraction * largest:.6g}",
                ]  # fmt: skip
    return rules


def report(records: list[dict], machine: str) -> str:
    seeds = sorted({r["seed"] for r in records})
    best = {s: min((r for r in records if r["seed"] == s and r["variant"].startswith("fixed_lr")),
                   key=lambda r: r["val"]["loss"]) for s in seeds}  # fmt: skip
    lines = [
        f"Machine: {machine}",
        "",
        f"### lr_schedule's outer rule on the tuning seeds {', '.join(map(str, seeds))}: final validation loss "
        "against the per-seed best fixed rate (" + ", ".join(f"{best[s]['variant'][8:]}" for s in seeds) + ")",
        "",
        "| rule | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | final lr (seed " + str(seeds[0]) + ") |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for name in dict.fromkeys(r["variant"] for r in records):
        if name.startswith("fixed_lr"):
            continue
        rows = {r["seed"]: r for r in records if r["variant"] == name}
        diffs = [rows[s]["val"]["loss"] / best[s]["val"]["loss"] - 1 for s in seeds]
        lr = "/".join(f"{x:.2f}" for x in rows[seeds[0]]["final_lr"])
        cells = " | ".join(f"{100 * d:+.1f}%" for d in diffs)
        lines.append(f"| {name} | {cells} | {100 * statistics.mean(diffs):+.1f}% | {lr} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StudyParser(
        prog="python -m studies.hpo.tuning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=list(TUNING_SEEDS))
    parser.add_argument("--windows", nargs="+", type=int, default=[10, 20, 30], help="inner steps T per outer step")
    parser.add_argument("--adam-lrs", nargs="*", type=float, default=[0.05, 0.15, 0.45])
    parser.add_argument("--max-steps-per-inner", nargs="*", type=float, default=[0.005, 0.01, 0.02])
    parser.add_argument("--first-steps", nargs="*", type=float, default=[0.1, 0.3, 1.0])
    parser.add_argument("--grid", nargs="+", type=float, default=list(GRID))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", type=writable_folder, default="studies/hpo/results", help="results folder (checked before any work)"
    )
    parser.add_argument("--name", default="tuning_rule", help="writes OUT/NAME.json and OUT/NAME.md")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args(argv)
    if any(not 0 < f <= 1 for f in args.first_steps):
        parser.error("--first-steps are fractions of the largest step, in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report:
        saved = json.loads((out / f"{args.name}.json").read_text())
        text = report(saved["records"], saved["machine"])
        write_text(out / f"{args.name}.md", text + "\n")
        print(text)
        return saved["records"]
    with run_alone(out, f".{args.name}.lock"):  # a second run of the same --name would do the same runs
        return tune(args, out)


def tune(args: argparse.Namespace, out: Path) -> list[dict]:
    """Every rule and grid rate on every seed; writes the records and the table and returns the records."""
    torch.set_num_threads(args.threads)
    machine = machine_description("cpu")
    print(machine)
    rules = candidates(args)
    records = []
    progress = Progress(len(args.seeds) * (len(args.grid) + len(rules)))
    with quiet():
        for seed in args.seeds:
            for lr in args.grid:
                records.append(fit("lr_schedule", seed, f"fixed_lr{lr}", ["--model.estimator", "fo", "--model.init_lr",
                                                                          str(lr)]))  # fmt: skip
                progress.step(f"lr_schedule fixed_lr{lr} seed {seed}")
            for name, extra in rules.items():
                records.append(fit("lr_schedule", seed, name, extra))
                print(json.dumps(records[-1]), flush=True)
                progress.step(f"lr_schedule {name} seed {seed}")
    write_json(out / f"{args.name}.json", {"machine": machine, "records": records}, indent=1)
    text = report(records, machine)
    write_text(out / f"{args.name}.md", text + "\n")
    print(text)
    return records


if __name__ == "__main__":
    main()
