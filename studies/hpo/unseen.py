"""Every HPO claim on seeds that chose no setting: the learned learning rate against a grid of fixed rates, the
learned weight decay against none and against a grid of fixed decays, and hypercleaning's AUC.

    python -m studies.hpo.unseen                                  # seeds 10-19 -> studies/hpo/results/unseen.*
    python -m studies.hpo.unseen --seeds 0 1 2 --name tuning      # the seeds the settings were chosen on
    python -m studies.hpo.unseen --report                         # only rewrite OUT/NAME.md from OUT/NAME.json

Every run is a config of ``configs/hpo/`` as shipped, through Lightning (``lightning-hypergrad fit``; without W&B,
checkpoints or callbacks), with the seed of the data split, the corruption and the initial network set to the seed.
The settings of the configs were chosen on seeds 0, 1 and 2 only (``python -m studies.hpo.tuning``); nothing here
is chosen on the seeds it reports.

- ``lr_schedule``: the learned learning rate (the config) against each fixed rate of a grid, each run for the same
  inner steps from the same network, in the same harness (the config with the FO estimator, whose hypergradient of
  the learning rate is zero, so the rate stays where it starts) and as plain ``torch.optim.SGD`` loops. The best
  grid rate is chosen per seed by its final validation loss, which favours the grid (a user would not know it).
  Times: the learned run's ``fit`` against the sum of the grid's, run one after the other in this process. Rows
  with one setting changed (``outer_lr_x0.3`` ...) measure how much the result depends on it; ``adam_*`` rows are
  the previous rule (Adam on the log learning rates, outer learning rate 0.15 in the earlier config).
- ``weight_decay``: the learned decays (the config, starting at 1e-3) against no decay (a plain torch loop: the
  log-parametrized tuner cannot hold exactly 0) and against each fixed decay of a grid (the config with FO).
- ``hypercleaning``: the AUC of the learned sample weights for telling clean from corrupted examples, and the test
  accuracy against no cleaning (FO: every weight stays 0.5).

Paired differences are per seed, ``learned / reference - 1`` of the final validation (or test) loss; reported as
the median with a distribution-free 95% interval (order statistics of the sign test: ``[x_(2), x_(9)]`` of 10,
coverage 97.9%) and as the mean with a t interval.

Before any work: an ``--out`` that cannot be written is refused, and a run (not ``--report``) holds
``OUT/.NAME.lock`` while it works (:func:`studies.common.run_alone`): a second run of the same ``--name`` on the same
``--out`` is refused while the first lives.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_hypergrad.callbacks import StepTimer
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
from studies.hpo.comparison import GRID, build, evaluate, final_hyperparameters, plain_grid_run, plain_sgd, shipped
from studies.stats import mean_interval, median_interval

EXAMPLES = ("lr_schedule", "weight_decay", "hypercleaning")
SEEDS = tuple(range(10, 20))
TUNING_SEEDS = (0, 1, 2)
DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)
ADAM_PREVIOUS = 0.15
"""The outer learning rate of Adam in the previous lr_schedule config."""


def lr_variants() -> dict[str, list[str]]:
    """The lr_schedule runs with one setting changed, by name: the overrides of each (from the shipped values)."""
    model = shipped("lr_schedule")
    outer_lr, max_step, init_lr = model["outer_lr"], model["max_outer_step"], model["init_lr"]

    def number(value: float) -> str:
        return f"{value:.6g}"

    return {
        "outer_lr_x0.3": ["--model.outer_lr", number(outer_lr * 0.3)],
        "outer_lr_x3": ["--model.outer_lr", number(outer_lr * 3)],
        "max_outer_step_x0.5": ["--model.max_outer_step", number(max_step * 0.5)],
        "max_outer_step_x2": ["--model.max_outer_step", number(max_step * 2)],
        "init_lr_x0.33": ["--model.init_lr", number(init_lr / 3)],
        "init_lr_x3": ["--model.init_lr", number(init_lr * 3)],
        "learn_momentum": ["--model.learn_momentum", "true"],
        **{
            f"adam_{number(lr)}": ["--model.outer_optimizer", "adam", "--model.outer_lr", number(lr)]
            for lr in (ADAM_PREVIOUS * 0.3, ADAM_PREVIOUS, ADAM_PREVIOUS * 3)
        },
    }


# ---------------------------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------------------------


def fit(example: str, seed: int, variant: str, extra: Sequence[str] = ()) -> dict:
    """One ``fit`` of ``example``'s config with the overrides ``extra``: final validation and test metrics, times,
    the final hyperparameters."""
    built = build(example, seed, list(extra))
    model, data, trainer = built.model, built.datamodule, built.trainer
    timer = StepTimer()
    trainer.callbacks.append(timer)
    start = time.perf_counter()
    trainer.fit(model, data)
    wall = time.perf_counter() - start
    record = {
        "example": example,
        "seed": seed,
        "variant": variant,
        "overrides": list(extra),
        "estimator": str(model.estimator),
        "outer_steps": trainer.global_step,
        "inner_steps": model.inner_steps,
        "val": evaluate(model, data, "val"),
        "test": evaluate(model, data, "test"),
        "fit_seconds": wall,
        "seconds_per_step": statistics.median(timer.durations[1:]) if len(timer.durations) > 1 else None,
        "skipped_steps": model.skipped_steps,
    }
    return record | final_hyperparameters(model)


def plain_no_decay(seed: int, steps: Sequence[str]) -> dict:
    """weight_decay's network trained with ``torch.optim.SGD`` (the config's inner settings) and no penalty."""
    built = build("weight_decay", seed, ["--model.estimator", "fo", *steps])
    model, data = built.model, built.datamodule
    data.setup()
    inner = model.inner_optimizer
    total = built.trainer.max_steps * model.inner_steps
    sgd = dict(lr=inner.lr, momentum=inner.momentum, dampening=inner.dampening, nesterov=inner.nesterov)
    out, wall = plain_sgd(model, data, total, **sgd)
    return {"example": "weight_decay", "seed": seed, "variant": "plain_no_decay", "fit_seconds": wall} | out


def measure(args: argparse.Namespace) -> list[dict]:
    """All runs of ``args``, seed by seed (the learned run and its grid one after the other); the records."""
    steps = [] if args.steps is None else ["--trainer.max_steps", str(args.steps)]
    variants = lr_variants()
    unknown = set(args.lr_variants) - set(variants)
    if unknown:
        raise SystemExit(f"--lr-variants: unknown {sorted(unknown)}; choose from {', '.join(variants)}")
    records: list[dict] = []
    per_seed = {
        "lr_schedule": 1 + 2 * len(args.grid) + len(args.lr_variants),
        "weight_decay": 2 + len(args.decays),
        "hypercleaning": 2,
    }
    progress = Progress(len(args.seeds) * sum(n for example, n in per_seed.items() if example in args.examples))

    def add(record: dict) -> None:
        records.append(record)
        print(json.dumps(record), flush=True)
        progress.step(f"{record['example']} {record['variant']} seed {record['seed']}")

    with quiet():
        fit("lr_schedule", args.seeds[0], "warm-up", ["--trainer.max_steps", "2"])  # not recorded: first-fit costs
        for seed in args.seeds:
            if "lr_schedule" in args.examples:
                add(fit("lr_schedule", seed, "config", steps))
                for lr in args.grid:
                    add(fit("lr_schedule", seed, f"fixed_lr{lr}", ["--model.estimator", "fo", "--model.init_lr",
                                                                   str(lr), *steps]))  # fmt: skip
                for lr in args.grid:
                    add(plain_grid_run("lr_schedule", lr, seed, steps))
                for name in args.lr_variants:
                    add(fit("lr_schedule", seed, name, [*variants[name], *steps]))
            if "weight_decay" in args.examples:
                add(fit("weight_decay", seed, "config", steps))
                for decay in args.decays:
                    extra = ["--model.estimator", "fo", "--model.init_weight_decay", str(decay), *steps]
                    add(fit("weight_decay", seed, f"fixed_decay{decay}", extra))
                add(plain_no_decay(seed, steps))
            if "hypercleaning" in args.examples:
                add(fit("hypercleaning", seed, "config", steps))
                add(fit("hypercleaning", seed, "no_cleaning", ["--model.estimator", "fo", *steps]))
    return records


# ---------------------------------------------------------------------------------------------------------------------
# statistics (the intervals: studies.stats)
# ---------------------------------------------------------------------------------------------------------------------


def paired(learned: Sequence[float], reference: Sequence[float]) -> dict:
    """Per-seed relative differences ``learned / reference - 1`` and their summaries."""
    diffs = [a / b - 1 for a, b in zip(learned, reference)]
    return {
        "diffs": diffs,
        "wins": sum(a <= b for a, b in zip(learned, reference)),
        "n": len(diffs),
        "median": statistics.median(diffs),
        "median_interval": median_interval(diffs),
        "mean": statistics.mean(diffs),
        "mean_interval": mean_interval(diffs),
    }


def seconds(records: list[dict], seed: int, prefix: str) -> float:
    """The total fit time of ``seed``'s runs whose variant starts with ``prefix`` (a grid)."""
    return sum(r["fit_seconds"] for r in records if r["seed"] == seed and r["variant"].startswith(prefix))


def summarize(records: list[dict]) -> dict:
    """The paired comparisons of the records (what the tables and docs state)."""
    summary: dict = {}
    lr = [r for r in records if r["example"] == "lr_schedule"]
    seeds = sorted({r["seed"] for r in lr})
    if seeds:
        by = {(r["seed"], r["variant"]): r for r in lr}
        best = {}
        for seed in seeds:
            grid = [r for r in lr if r["seed"] == seed and r["variant"].startswith("fixed_lr")]
            best[seed] = min(grid, key=lambda r: r["val"]["loss"])
        config = [by[seed, "config"] for seed in seeds]
        harness = [seconds(lr, s, "fixed_lr") for s in seeds]
        plain = [seconds(lr, s, "plain") for s in seeds]
        ratios = [c["fit_seconds"] / h for c, h in zip(config, harness)]
        summary["lr_schedule"] = {
            "seeds": seeds,
            "best_grid_lr": [float(best[s]["variant"].removeprefix("fixed_lr")) for s in seeds],
            "val": paired([r["val"]["loss"] for r in config], [best[s]["val"]["loss"] for s in seeds]),
            "test": paired([r["test"]["loss"] for r in config], [best[s]["test"]["loss"] for s in seeds]),
            "time_ratio_per_seed": ratios,
            "time_ratio_total": sum(c["fit_seconds"] for c in config) / sum(harness),
            "time_ratio_plain_total": sum(c["fit_seconds"] for c in config) / sum(plain),
            "variants": {},
        }
        for name in dict.fromkeys(r["variant"] for r in lr):
            if name in ("config",) or name.startswith(("fixed_lr", "plain")):
                continue
            rows = [by[s, name] for s in seeds if (s, name) in by]
            if len(rows) != len(seeds):
                continue
            summary["lr_schedule"]["variants"][name] = {
                "val": paired([r["val"]["loss"] for r in rows], [best[s]["val"]["loss"] for s in seeds]),
                "test": paired([r["test"]["loss"] for r in rows], [best[s]["test"]["loss"] for s in seeds]),
                "against_config": paired([r["val"]["loss"] for r in rows], [r["val"]["loss"] for r in config]),
            }
    wd = [r for r in records if r["example"] == "weight_decay"]
    seeds = sorted({r["seed"] for r in wd})
    if seeds:
        by = {(r["seed"], r["variant"]): r for r in wd}
        config = [by[s, "config"] for s in seeds]
        none = [by[s, "plain_no_decay"] for s in seeds]
        best = [min((r for r in wd if r["seed"] == s and r["variant"].startswith("fixed_decay")),
                    key=lambda r: r["val"]["loss"]) for s in seeds]  # fmt: skip
        summary["weight_decay"] = {
            "seeds": seeds,
            "best_fixed_decay": [float(r["variant"].removeprefix("fixed_decay")) for r in best],
            "against_none": {
                stage: paired([r[stage]["loss"] for r in config], [r[stage]["loss"] for r in none])
                for stage in ("val", "test")
            },
            "against_best_fixed": {
                stage: paired([r[stage]["loss"] for r in config], [r[stage]["loss"] for r in best])
                for stage in ("val", "test")
            },
        }
    hc = [r for r in records if r["example"] == "hypercleaning"]
    seeds = sorted({r["seed"] for r in hc})
    if seeds:
        by = {(r["seed"], r["variant"]): r for r in hc}
        aucs = [by[s, "config"]["val"]["auc"] for s in seeds]
        gain = [by[s, "config"]["test"]["acc"] - by[s, "no_cleaning"]["test"]["acc"] for s in seeds]
        summary["hypercleaning"] = {
            "seeds": seeds,
            "auc": aucs,
            "auc_at_least_0.9": sum(a >= 0.9 for a in aucs),
            "auc_median": statistics.median(aucs),
            "auc_median_interval": median_interval(aucs),
            "auc_mean": statistics.mean(aucs),
            "auc_mean_interval": mean_interval(aucs),
            "test_acc_gain": gain,
            "test_acc_gain_median": statistics.median(gain),
            "test_acc_gain_median_interval": median_interval(gain),
        }
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------


def pct(value: float) -> str:
    return f"{100 * value:+.1f}%"


def interval(bounds: Sequence[float] | None) -> str:
    return "n/a (too few seeds)" if bounds is None else f"[{pct(bounds[0])}, {pct(bounds[1])}]"


def describe(p: dict) -> str:
    """``wins``, median [interval], mean [interval] of a paired comparison, as table cells."""
    return (
        f"{p['wins']}/{p['n']} | {pct(p['median'])} {interval(p['median_interval'])} | "
        f"{pct(p['mean'])} {interval(p['mean_interval'])}"
    )


def report(records: list[dict], summary: dict, machine: str) -> str:
    lines = [f"Machine: {machine}", ""]
    if "lr_schedule" in summary:
        s = summary["lr_schedule"]
        lr = [r for r in records if r["example"] == "lr_schedule"]
        by = {(r["seed"], r["variant"]): r for r in lr}
        lines += [
            f"### lr_schedule: the learned learning rate against the per-seed best of the grid {list_of(lr)} "
            f"(seeds {', '.join(map(str, s['seeds']))})",
            "",
            "| seed | learned val loss | test loss | final lr | best grid lr | its val loss | test loss | val diff | "
            "learned s | grid s (harness) | ratio | grid s (plain torch) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, seed in enumerate(s["seeds"]):
            c = by[seed, "config"]
            b = by[seed, f"fixed_lr{s['best_grid_lr'][i]}"]
            harness, plain = seconds(lr, seed, "fixed_lr"), seconds(lr, seed, "plain")
            lines.append(
                f"| {seed} | {c['val']['loss']:.4f} | {c['test']['loss']:.4f} | "
                f"{'/'.join(f'{x:.2f}' for x in c['final_lr'])} | {s['best_grid_lr'][i]:g} | {b['val']['loss']:.4f} | "
                f"{b['test']['loss']:.4f} | {pct(s['val']['diffs'][i])} | {c['fit_seconds']:.2f} | {harness:.2f} | "
                f"{s['time_ratio_per_seed'][i]:.2f} | {plain:.2f} |"
            )
        lines += [
            "",
            "| learned (config) against the best grid rate | wins (<=) | median diff [95% interval] | "
            "mean diff [95% t interval] |",
            "|---|---|---|---|",
            f"| validation loss | {describe(s['val'])} |",
            f"| test loss | {describe(s['test'])} |",
            "",
            f"Time: the learned run took {s['time_ratio_total']:.2f}x the grid's total time in the same harness "
            f"(per seed {min(s['time_ratio_per_seed']):.2f}-{max(s['time_ratio_per_seed']):.2f}x) and "
            f"{s['time_ratio_plain_total']:.2f}x the grid as plain torch loops.",
            "",
        ]
        if s["variants"]:
            c = s["val"]
            lines += [
                "One setting changed (val diff: against the per-seed best grid rate; shift: the median's change from "
                "the config's; in: inside the config's 95% interval of the median):",
                "",
                "| run | wins | median val diff [95% interval] | mean val diff [95% t interval] | shift | in | "
                "median test diff | against the config: median [95% interval] |",
                "|---|---|---|---|---|---|---|---|",
                f"| config | {describe(c)} | | | {pct(s['test']['median'])} | |",
            ]
            for name, v in s["variants"].items():
                bounds = c["median_interval"]
                inside = "n/a" if bounds is None else ("yes" if bounds[0] <= v["val"]["median"] <= bounds[1] else "no")
                lines.append(
                    f"| {name} | {describe(v['val'])} | {pct(v['val']['median'] - c['median'])} | {inside} | "
                    f"{pct(v['test']['median'])} | {pct(v['against_config']['median'])} "
                    f"{interval(v['against_config']['median_interval'])} |"
                )
            overrides = {r["variant"]: " ".join(r["overrides"]) for r in lr if r["variant"] in s["variants"]}
            lines += ["", "Overrides: " + "; ".join(f"`{k}`: `{v}`" for k, v in overrides.items()), ""]
    if "weight_decay" in summary:
        s = summary["weight_decay"]
        wd = [r for r in records if r["example"] == "weight_decay"]
        by = {(r["seed"], r["variant"]): r for r in wd}
        decays = sorted({float(r["variant"].removeprefix("fixed_decay")) for r in wd if "fixed_decay" in r["variant"]})
        lines += [
            f"### weight_decay: learned against no decay and the per-seed best fixed decay of {decays} "
            f"(seeds {', '.join(map(str, s['seeds']))})",
            "",
            "| seed | learned val loss | test loss | final decays | no decay: val | test | best fixed | its val | "
            "test |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for i, seed in enumerate(s["seeds"]):
            c, n = by[seed, "config"], by[seed, "plain_no_decay"]
            b = by[seed, f"fixed_decay{s['best_fixed_decay'][i]}"]
            lines.append(
                f"| {seed} | {c['val']['loss']:.4f} | {c['test']['loss']:.4f} | "
                f"{'/'.join(f'{d:.1e}' for d in c['final_weight_decay'])} | {n['val']['loss']:.4f} | "
                f"{n['test']['loss']:.4f} | {s['best_fixed_decay'][i]:g} | {b['val']['loss']:.4f} | "
                f"{b['test']['loss']:.4f} |"
            )
        lines += [
            "",
            "| learned against | loss | wins (<=) | median diff [95% interval] | mean diff [95% t interval] |",
            "|---|---|---|---|---|",
        ]
        for key, label in (("against_none", "no decay"), ("against_best_fixed", "best fixed decay")):
            for stage in ("val", "test"):
                lines.append(f"| {label} | {stage} | {describe(s[key][stage])} |")
        lines.append("")
    if "hypercleaning" in summary:
        s = summary["hypercleaning"]
        hc = [r for r in records if r["example"] == "hypercleaning"]
        by = {(r["seed"], r["variant"]): r for r in hc}
        lines += [
            f"### hypercleaning (seeds {', '.join(map(str, s['seeds']))})",
            "",
            "| seed | AUC | val loss | test loss | test acc | no cleaning: test acc | gain |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, seed in enumerate(s["seeds"]):
            c, n = by[seed, "config"], by[seed, "no_cleaning"]
            lines.append(
                f"| {seed} | {s['auc'][i]:.3f} | {c['val']['loss']:.4f} | {c['test']['loss']:.4f} | "
                f"{c['test']['acc']:.3f} | {n['test']['acc']:.3f} | {100 * s['test_acc_gain'][i]:+.1f} pts |"
            )
        mi = s["auc_median_interval"]
        ti = s["auc_mean_interval"]
        gi = s["test_acc_gain_median_interval"]
        lines += [
            "",
            f"AUC: at least 0.9 on {s['auc_at_least_0.9']}/{len(s['auc'])} seeds; min {min(s['auc']):.3f}, median "
            f"{s['auc_median']:.3f} {'' if mi is None else f'[{mi[0]:.3f}, {mi[1]:.3f}]'}, mean {s['auc_mean']:.3f} "
            f"{'' if ti is None else f'[{ti[0]:.3f}, {ti[1]:.3f}]'}. Test accuracy gain over no cleaning: median "
            f"{100 * s['test_acc_gain_median']:+.1f} pts"
            f"{'' if gi is None else f' [{100 * gi[0]:+.1f}, {100 * gi[1]:+.1f}]'}.",
            "",
        ]
    return "\n".join(lines)


def list_of(lr_records: list[dict]) -> str:
    rates = sorted({float(r["variant"].removeprefix("fixed_lr")) for r in lr_records if "fixed_lr" in r["variant"]})
    return "(" + ", ".join(f"{x:g}" for x in rates) + ")"


def write(out: Path, name: str, records: list[dict], machine: str) -> str:
    summary = summarize(records)
    write_json(out / f"{name}.json", {"machine": machine, "summary": summary, "records": records}, indent=1)
    text = report(records, summary, machine)
    write_text(out / f"{name}.md", text + "\n")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StudyParser(
        prog="python -m studies.hpo.unseen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", nargs="+", default=list(EXAMPLES), choices=EXAMPLES)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--grid", nargs="+", type=float, default=list(GRID), help="lr_schedule: the fixed rates")
    parser.add_argument("--decays", nargs="+", type=float, default=list(DECAYS), help="weight_decay: fixed decays")
    parser.add_argument(
        "--lr-variants", nargs="*", default=None, metavar="NAME", help="lr_schedule: the one-setting changes (all)"
    )
    parser.add_argument("--steps", type=int, default=None, help="outer steps of every run (default: the configs')")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", type=writable_folder, default="studies/hpo/results", help="results folder (checked before any work)"
    )
    parser.add_argument("--name", default="unseen", help="writes OUT/NAME.json and OUT/NAME.md")
    parser.add_argument("--report", action="store_true", help="only rewrite OUT/NAME.md from OUT/NAME.json")
    args = parser.parse_args(argv)
    if args.lr_variants is None:
        args.lr_variants = list(lr_variants())
    if args.steps is not None and args.steps < 2:
        parser.error(f"--steps must be >= 2 (the first step warms up and is not timed), got {args.steps}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the study (or, with ``--report``, only its tables); returns the summary."""
    args = parse_args(argv)
    out = Path(args.out)
    if args.report:
        path = out / f"{args.name}.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"--report: cannot read {path} ({error}); run the study first") from None
        print(write(out, args.name, saved["records"], saved["machine"]))
        return summarize(saved["records"])
    with run_alone(out, f".{args.name}.lock"):  # a second run of the same --name would do the same runs
        torch.set_num_threads(args.threads)
        machine = machine_description("cpu")
        print(machine)
        records = measure(args)
        print(write(out, args.name, records, machine))
    return summarize(records)


if __name__ == "__main__":
    main()
