"""The three hyperparameter-optimization examples with every estimator, side by side, at equal outer steps.

    python -m studies.hpo                                    # all three examples, seed 0, into studies/hpo/results
    python -m studies.hpo --examples lr_schedule --seeds 0 1 2 --out OUT
    python -m studies.hpo --report                           # only rewrite OUT/comparison.md from OUT/comparison.json

Each run is the example's config (``configs/hpo/<example>.yaml``) with only the estimator changed, given by its spec
string (``--model.estimator "greedy(0.9)"``; and without W&B, checkpoints or the RMD callback). Reported per run: the
final validation loss and accuracy (the validation set is the outer objective's), the test loss and accuracy (held
out from everything), the AUC of the sample weights (hypercleaning), the median seconds per training step
(Lightning's batch hooks, first step excluded), the peak memory of one hypergradient computation (CPU: peak of live
tensor bytes, torch.profiler's memory events, measured after training on the trained state) and the wall time of the
whole ``fit``.

For ``lr_schedule`` a grid of five fixed learning rates is run as well, each for the same number of inner steps
(outer steps x T) from the same initial network, twice: in the same Lightning harness (FO, whose hypergradient of
the learning rate is zero, so the rate stays fixed) and as a plain ``torch.optim.SGD`` loop (the cheapest way to run
the grid). The total time of each grid is compared with the time of the learned run, ``greedy(0.9)`` with the
config's settings and with other starting rates and outer learning rates (``--lr-starts``, ``--lr-outer-lrs``).

Records (``OUT/comparison.json``): one per run, with ``example``, ``estimator`` (the spec string; ``null`` for the
plain ``torch.optim`` grid), ``variant`` (absent for the config's settings; ``start0.01``, ``outerlr0.05``,
``fixed_lr0.003``, ``plain_sgd_lr0.003``), ``seed`` and the measurements; ``OUT/comparison.md`` holds the tables.

The claims of the examples (the learned rate against the grid with paired differences, weight decay against none
and a grid, hypercleaning's AUC) on seeds that chose no setting are :mod:`studies.hpo.unseen`'s.

Before any work: an ``--out`` that cannot be written is refused, and a run (not ``--report``) holds
``OUT/.comparison.lock`` while it works (:func:`studies.common.run_alone`): a second run on the same ``--out`` is
refused while the first lives.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from lightning_hypergrad.callbacks import StepTimer
from lightning_hypergrad.cli import cli
from lightning_hypergrad.hpo import HyperCleaner
from studies.common import (
    REPOSITORY,
    AllocatorPeak,
    Progress,
    StudyParser,
    estimator_spec,
    machine_description,
    quiet,
    quiet_trainer_args,
    run_alone,
    writable_folder,
    write_json,
    write_text,
)

EXAMPLES = ("weight_decay", "lr_schedule", "hypercleaning")
LOCK = ".comparison.lock"
ESTIMATORS = (
    "fo", "t1t2", "greedy(0.5)", "greedy(0.9)", "greedy(0.99)", "rmd", "fmd", "neumann(10, scale='lr')", "cg(10)"
)  # fmt: skip
"""The estimators compared, as spec strings (``scale='lr'``: Neumann's scale is the inner SGD's learning rate)."""
LR_ESTIMATOR = "greedy(0.9)"
"""The estimator of the learning-rate sensitivity rows and of the comparison with the grid (the config's)."""
FMD_MAX_HPARAMS = 50  # forward mode costs one Jacobian-vector product per hyperparameter and inner step
GRID = (0.003, 0.01, 0.03, 0.1, 0.3)


def shipped(example: str) -> dict:
    """The model's ``init_args`` of ``configs/hpo/<example>.yaml``."""
    config = yaml.safe_load((REPOSITORY / "configs" / "hpo" / f"{example}.yaml").read_text())
    return config["model"]["init_args"]


@functools.cache
def scratch() -> str:
    """Where Lightning would write (the saved run configs only), one folder for the whole comparison."""
    return tempfile.mkdtemp(prefix="hpo-comparison-")


def build(example: str, seed: int, extra: list[str]):
    args = [
        "--trainer.default_root_dir", scratch(),
        "--config", str(REPOSITORY / "configs" / "hpo" / f"{example}.yaml"),
        "--seed_everything", str(seed),
        "--data.seed", str(seed),
        "--model.init_seed", str(seed),
        *quiet_trainer_args(),
        "--trainer.callbacks", "[]",
        *extra,
    ]  # fmt: skip
    return cli(args, run=False)


def peak_hypergrad_bytes(model, data) -> int:
    task = data.task("train")
    return AllocatorPeak().measure(lambda: model.estimator(model.make_problem(task)))


def evaluate(model, data, stage: str) -> dict[str, float]:
    metrics = model.evaluate_task(data.task(stage))
    return {"loss" if k == "outer_loss" else k: float(v) for k, v in metrics.items()}


def run(example: str, estimator: str, seed: int, extra: list[str] | None = None) -> dict:
    """One fit of ``example`` with the estimator of spec ``estimator`` (and the config overrides ``extra``)."""
    built = build(example, seed, ["--model.estimator", estimator, *(extra or [])])
    model, data, trainer = built.model, built.datamodule, built.trainer
    if estimator == "fmd":
        count = sum(p.numel() for p in model.hyperparameters())
        if isinstance(model, HyperCleaner) and model.sample_logits is None:  # created in setup, one per example
            count += data.train_size
        if count > FMD_MAX_HPARAMS:
            reason = f"not run: {count} hyperparameters, one forward-mode product each per inner step"
            return {"example": example, "estimator": estimator, "seed": seed, "refused": reason}
    timer = StepTimer()
    trainer.callbacks.append(timer)
    start = time.perf_counter()
    try:
        trainer.fit(model, data)
    except ValueError as error:  # IFT refusing the learning rate is recorded as such; anything else is a failure
        if "inner optimizer's own settings" not in str(error):
            raise
        refused = "refused: " + str(error).split("\n")[0]
        return {"example": example, "estimator": estimator, "seed": seed, "refused": refused}
    wall = time.perf_counter() - start
    record = {
        "example": example,
        "estimator": estimator,
        "seed": seed,
        "outer_steps": trainer.global_step,
        "inner_steps": model.inner_steps,
        "val": evaluate(model, data, "val"),
        "test": evaluate(model, data, "test"),
        "seconds_per_step": statistics.median(timer.durations[1:]),
        "fit_seconds": wall,
        "peak_hypergrad_bytes": peak_hypergrad_bytes(model, data),
        "skipped_steps": model.skipped_steps,
    }
    return record | final_hyperparameters(model)


def final_hyperparameters(model) -> dict:
    """The learned hyperparameters at the end of a fit: learning rates (and momentum, when learned), weight decays."""
    found = {}
    if hasattr(model, "learning_rates"):
        found["final_lr"] = model.learning_rates().tolist()
        if getattr(model, "learn_momentum", False):
            found["final_momentum"] = float(torch.sigmoid(model.logit_momentum.detach()))
    if hasattr(model, "weight_decays"):
        found["final_weight_decay"] = [float(d.mean()) for d in model.weight_decays()]
    return found


def plain_sgd(model, data, total: int, **sgd) -> tuple[dict[str, dict[str, float]], float]:
    """``total`` steps of ``torch.optim.SGD(**sgd)`` on the training cross-entropy alone, from ``model``'s initial
    parameters: the final validation and test metrics (``{"val": {"loss", "acc"}, "test": ...}``) and the seconds
    the training took."""
    task = data.task("train")
    start = time.perf_counter()
    w = [p.clone().requires_grad_() for p in model.inner_model.initial()]  # the network's parameters, as a list
    opt = torch.optim.SGD(w, **sgd)
    for _ in range(total):
        opt.zero_grad()
        F.cross_entropy(model.inner_model(w, task["x_train"]), task["y_train"]).backward()
        opt.step()
    wall = time.perf_counter() - start
    out = {}
    for stage in ("val", "test"):
        t = data.task(stage)
        with torch.no_grad():
            logits = model.inner_model(w, t["x_val"])
            out[stage] = {
                "loss": float(F.cross_entropy(logits, t["y_val"])),
                "acc": float((logits.argmax(-1) == t["y_val"]).float().mean()),
            }
    return out, wall


def plain_grid_run(example: str, lr: float, seed: int, extra: list[str] | None = None) -> dict:
    """One fixed learning rate with ``torch.optim.SGD``: the same network, data and number of inner steps."""
    built = build(example, seed, ["--model.estimator", "fo", *(extra or [])])
    model, data = built.model, built.datamodule
    data.setup()
    total = built.trainer.max_steps * model.inner_steps
    momentum = built.config["model"]["init_args"]["momentum"]
    out, wall = plain_sgd(model, data, total, lr=lr, momentum=momentum)
    return {
        "example": example,
        "estimator": None,
        "variant": f"plain_sgd_lr{lr}",
        "seed": seed,
        "fit_seconds": wall,
    } | out


def _mean_sd(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def with_variant(record: dict, variant: str) -> dict:
    """``record`` marked as a variant of the config (``start0.01``, ``fixed_lr0.1``)."""
    head = {key: record[key] for key in ("example", "estimator")}
    return head | {"variant": variant} | {k: v for k, v in record.items() if k not in head}


def row_label(record: dict) -> str:
    """The row of ``record`` in the tables: its estimator's spec, then any variant (``greedy(0.9) start0.01``)."""
    return " ".join(part for part in (record["estimator"], record.get("variant")) if part)


def _learned(record: dict) -> bool:
    """Whether ``record`` is a run of the learned learning rate: the config's or a sensitivity variant."""
    return record.get("variant") is None or record["variant"].startswith(("start", "outerlr"))


def report(records: list[dict]) -> str:
    """Markdown tables: per example and estimator, mean ± sd over the seeds; for lr_schedule, the grid per seed."""
    lines = []
    for example in EXAMPLES:
        rows = [r for r in records if r["example"] == example and _learned(r)]
        if not rows:
            continue
        seeds = sorted({r["seed"] for r in rows})
        auc = example == "hypercleaning"
        lines += [f"### {example} ({len(seeds)} seeds: {', '.join(map(str, seeds))})", ""]
        head = "| estimator | val loss | val acc | test loss | test acc |" + (" AUC |" if auc else "")
        head += " s / step | peak MiB |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for name in dict.fromkeys(row_label(r) for r in rows):
            mine = [r for r in rows if row_label(r) == name]
            if any("refused" in r for r in mine):
                lines.append(f"| {name} | {mine[0]['refused'][:100]}... |")
                continue
            cells = [
                _mean_sd([r["val"]["loss"] for r in mine], 4),
                _mean_sd([r["val"]["acc"] for r in mine], 3),
                _mean_sd([r["test"]["loss"] for r in mine], 4),
                _mean_sd([r["test"]["acc"] for r in mine], 3),
            ]
            if auc:
                cells.append(_mean_sd([r["val"]["auc"] for r in mine], 3))
            cells.append(f"{statistics.median(r['seconds_per_step'] for r in mine):.4f}")
            cells.append(f"{max(r['peak_hypergrad_bytes'] for r in mine) / 2**20:.2f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        grid_records = [r for r in records if r["example"] == example and r.get("variant", "").startswith("plain")]
        if example == "lr_schedule" and grid_records:
            config = shipped(example)
            settings = f"start {config['init_lr']:g}, {config['outer_optimizer']} outer lr {config['outer_lr']:g}"
            lines += [
                "Grid of fixed learning rates against the learned one (validation loss after the same inner steps; "
                "times: the whole fit of the learned run against the sum over the grid, in the Lightning harness "
                "and as plain torch.optim loops):",
                "",
                f"| seed | {LR_ESTIMATOR} (config: {settings}) | val loss | best of grid | "
                "its val loss | learned <= best | learned s | grid s (harness) | grid s (plain) |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for seed in seeds:
                grid = [r for r in records if r["example"] == example and r["seed"] == seed]
                harness = [r for r in grid if r.get("variant", "").startswith("fixed_lr")]
                plain = [r for r in grid if r.get("variant", "").startswith("plain")]
                best = min(plain, key=lambda r: r["val"]["loss"])
                for r in grid:
                    if r["estimator"] != LR_ESTIMATOR or not _learned(r):
                        continue
                    start = r.get("variant") or "config"
                    lines.append(
                        f"| {seed} | {start} | {r['val']['loss']:.4f} | "
                        f"{best['variant'].removeprefix('plain_sgd_lr')} | {best['val']['loss']:.4f} | "
                        f"{'yes' if r['val']['loss'] <= best['val']['loss'] else 'no'} | {r['fit_seconds']:.2f} | "
                        f"{sum(x['fit_seconds'] for x in harness):.2f} | {sum(x['fit_seconds'] for x in plain):.2f} |"
                    )
            lines.append("")
    return "\n".join(lines)


def write_report(out: Path, records: list[dict]) -> str:
    """Writes ``out/comparison.md`` (the tables of ``records``) and returns its text."""
    text = report(records)
    write_text(out / "comparison.md", text + "\n")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StudyParser(
        prog="python -m studies.hpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", nargs="+", default=list(EXAMPLES), choices=EXAMPLES)
    parser.add_argument(
        "--estimators",
        nargs="+",
        type=estimator_spec,
        default=list(ESTIMATORS),
        metavar="SPEC",
        help=f"estimator spec strings (default: {' '.join(ESTIMATORS)})",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr-starts", nargs="*", type=float, default=[0.01, 0.1], help="lr_schedule: other starts")
    parser.add_argument(
        "--lr-outer-lrs", nargs="*", type=float, default=[0.009, 0.09], help="lr_schedule: other outer lrs"
    )
    parser.add_argument(
        "--grid", nargs="*", type=float, default=list(GRID), help="lr_schedule: the fixed learning rates compared"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="outer steps of every run (default: each config's trainer.max_steps)"
    )
    parser.add_argument(
        "--out",
        type=writable_folder,
        default="studies/hpo/results",
        help="writes OUT/comparison.json and OUT/comparison.md (checked before any work)",
    )
    parser.add_argument(
        "--report", action="store_true", help="only rewrite OUT/comparison.md from OUT/comparison.json and print it"
    )
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        parser.error(f"--steps must be >= 2 (the first step warms up and is not timed), got {args.steps}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the comparison (or, with ``--report``, only its tables); returns the records."""
    args = parse_args(argv)
    out = Path(args.out)
    if args.report:
        try:
            records = json.loads((out / "comparison.json").read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(
                f"--report: cannot read {out / 'comparison.json'} ({error}); run the study first"
            ) from None
        print(write_report(out, records))
        return records
    with run_alone(out, LOCK):  # a second run on the same --out would do the same runs
        return compare(args, out)


def compare(args: argparse.Namespace, out: Path) -> list[dict]:
    """Every run of the comparison; writes the records and the tables and returns the records."""
    torch.set_num_threads(args.threads)
    print(machine_description("cpu"))
    steps = [] if args.steps is None else ["--trainer.max_steps", str(args.steps)]
    records = []
    extra = len(args.lr_starts) + len(args.lr_outer_lrs) + 2 * len(args.grid)  # lr_schedule's further runs
    per_seed = {example: len(args.estimators) + (extra if example == "lr_schedule" else 0) for example in args.examples}
    progress = Progress(len(args.seeds) * sum(per_seed.values()))

    def add(record: dict) -> None:
        records.append(record)
        print(json.dumps(record), flush=True)
        progress.step(f"{record['example']} {row_label(record)} seed {record['seed']}")

    with quiet():
        for example in args.examples:
            for seed in args.seeds:
                for name in args.estimators:
                    add(run(example, name, seed, steps))
                if example == "lr_schedule":
                    for start in args.lr_starts:  # the config starts at 0.03; other starting rates
                        record = run(example, LR_ESTIMATOR, seed, [*steps, "--model.init_lr", str(start)])
                        add(with_variant(record, f"start{start}"))
                    for outer_lr in args.lr_outer_lrs:  # the config's first Rprop step is 0.03; others
                        record = run(example, LR_ESTIMATOR, seed, [*steps, "--model.outer_lr", str(outer_lr)])
                        add(with_variant(record, f"outerlr{outer_lr}"))
                    for lr in args.grid:
                        record = run(example, "fo", seed, [*steps, "--model.init_lr", str(lr)])
                        add(with_variant(record, f"fixed_lr{lr}"))
                        add(plain_grid_run(example, lr, seed, steps))
    write_json(out / "comparison.json", records, indent=1)
    print(write_report(out, records))
    return records


if __name__ == "__main__":
    main()
