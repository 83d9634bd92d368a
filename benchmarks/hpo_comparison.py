"""The three hyperparameter-optimization examples with every estimator, side by side, at equal outer steps.

    python benchmarks/hpo_comparison.py                                   # all three examples, seed 0
    python benchmarks/hpo_comparison.py --examples lr_schedule --seeds 0 1 2 --json results/hpo/lr.json

Each run is the example's config (``configs/hpo/<example>.yaml``) with only the estimator changed (and without
W&B, checkpoints or the RMD callback). Reported per run: the final validation loss and accuracy (the validation
set is the outer objective's), the test loss and accuracy (held out from everything), the AUC of the sample weights
(hypercleaning), the median seconds per training step (Lightning's batch hooks, first step excluded), the peak
memory of one hypergradient computation (CPU: peak of live tensor bytes, torch.profiler's memory events, measured
after training on the trained state) and the wall time of the whole ``fit``.

For ``lr_schedule`` a grid of five fixed learning rates is run as well, each for the same number of inner steps
(outer steps x T) from the same initial network, twice: in the same Lightning harness (FO, whose hypergradient of
the learning rate is zero, so the rate stays fixed) and as a plain ``torch.optim.SGD`` loop (the cheapest way to run
the grid). The total time of each grid is compared with the time of the learned run.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import AllocatorPeak, device_name

import lightning_hypergrad as lh
from lightning_hypergrad.callbacks import StepTimer
from lightning_hypergrad.cli import cli
from lightning_hypergrad.hpo import HyperCleaner

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("weight_decay", "lr_schedule", "hypercleaning")
ESTIMATORS = ("fo", "t1t2", "greedy0.5", "greedy0.9", "greedy0.99", "rmd", "fmd", "neumann", "cg")
FMD_MAX_HPARAMS = 50  # forward mode costs one Jacobian-vector product per hyperparameter and inner step
GRID = (0.003, 0.01, 0.03, 0.1, 0.3)


def estimator_args(name: str) -> list[str]:
    if name.startswith("greedy"):
        return ["--model.estimator", "lightning_hypergrad.Greedy", "--model.estimator.gamma", name[len("greedy") :]]
    cls = type(lh.get_estimator(name)).__name__
    return ["--model.estimator", f"lightning_hypergrad.{cls}"]


@functools.cache
def scratch() -> str:
    """Where Lightning would write (the saved run configs only), one folder for the whole comparison."""
    return tempfile.mkdtemp(prefix="hpo-comparison-")


def build(example: str, seed: int, extra: list[str]):
    args = [
        "--trainer.default_root_dir", scratch(),
        "--config", str(ROOT / "configs" / "hpo" / f"{example}.yaml"),
        "--seed_everything", str(seed),
        "--data.seed", str(seed),
        "--model.init_seed", str(seed),
        "--trainer.logger", "false",
        "--trainer.callbacks", "[]",
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
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
    built = build(example, seed, [*estimator_args(estimator), *(extra or [])])
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
    if hasattr(model, "learning_rates"):
        record["final_lr"] = model.learning_rates().tolist()
    if hasattr(model, "weight_decays"):
        record["final_weight_decay"] = [float(d.mean()) for d in model.weight_decays()]
    return record


def plain_grid_run(example: str, lr: float, seed: int) -> dict:
    """One fixed learning rate with ``torch.optim.SGD``: the same network, data and number of inner steps."""
    built = build(example, seed, ["--model.estimator", "lightning_hypergrad.FO"])
    model, data = built.model, built.datamodule
    data.setup()
    task = data.task("train")
    total = built.trainer.max_steps * model.inner_steps
    momentum = built.config["model"]["init_args"]["momentum"]
    start = time.perf_counter()
    w = [p.clone().requires_grad_() for p in model.init_params(task)]
    opt = torch.optim.SGD(w, lr=lr, momentum=momentum)
    for _ in range(total):
        opt.zero_grad()
        F.cross_entropy(model.logits(w, task["x_train"]), task["y_train"]).backward()
        opt.step()
    wall = time.perf_counter() - start
    out = {}
    for stage in ("val", "test"):
        t = data.task(stage)
        with torch.no_grad():
            logits = model.logits(w, t["x_val"])
            out[stage] = {
                "loss": float(F.cross_entropy(logits, t["y_val"])),
                "acc": float((logits.argmax(-1) == t["y_val"]).float().mean()),
            }
    return {"example": example, "estimator": f"plain_sgd_lr{lr}", "seed": seed, "fit_seconds": wall, **out}


def _mean_sd(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(records: list[dict]) -> str:
    """Markdown tables: per example and estimator, mean ± sd over the seeds; for lr_schedule, the grid per seed."""
    lines = []
    for example in EXAMPLES:
        rows = [r for r in records if r["example"] == example and not r["estimator"].startswith(("fixed", "plain"))]
        if not rows:
            continue
        seeds = sorted({r["seed"] for r in rows})
        auc = example == "hypercleaning"
        lines += [f"### {example} ({len(seeds)} seeds: {', '.join(map(str, seeds))})", ""]
        head = "| estimator | val loss | val acc | test loss | test acc |" + (" AUC |" if auc else "")
        head += " s / step | peak MiB |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for name in dict.fromkeys(r["estimator"] for r in rows):
            mine = [r for r in rows if r["estimator"] == name]
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
        if example == "lr_schedule":
            lines += [
                "Grid of fixed learning rates against the learned one (validation loss after the same inner steps; "
                "times: the whole fit of the learned run against the sum over the grid, in the Lightning harness "
                "and as plain torch.optim loops):",
                "",
                "| seed | Greedy 0.9 (config: start 0.03, outer lr 0.15) | val loss | best of grid | its val loss | "
                "learned <= best | learned s | "
                "grid s (harness) | grid s (plain) |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for seed in seeds:
                grid = [r for r in records if r["example"] == example and r["seed"] == seed]
                harness = [r for r in grid if r["estimator"].startswith("fixed_lr")]
                plain = [r for r in grid if r["estimator"].startswith("plain")]
                best = min(plain, key=lambda r: r["val"]["loss"])
                for r in grid:
                    if not (r["estimator"] == "greedy0.9" or r["estimator"].startswith("greedy0.9_")):
                        continue
                    start = r["estimator"].removeprefix("greedy0.9").removeprefix("_") or "config"
                    lines.append(
                        f"| {seed} | {start} | {r['val']['loss']:.4f} | "
                        f"{best['estimator'].removeprefix('plain_sgd_lr')} | {best['val']['loss']:.4f} | "
                        f"{'yes' if r['val']['loss'] <= best['val']['loss'] else 'no'} | {r['fit_seconds']:.2f} | "
                        f"{sum(x['fit_seconds'] for x in harness):.2f} | {sum(x['fit_seconds'] for x in plain):.2f} |"
                    )
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", nargs="+", default=list(EXAMPLES), choices=EXAMPLES)
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr-starts", nargs="*", type=float, default=[0.01, 0.1], help="lr_schedule: other starts")
    parser.add_argument(
        "--lr-outer-lrs", nargs="*", type=float, default=[0.05, 0.1, 0.2, 0.3], help="lr_schedule: other outer lrs"
    )
    parser.add_argument("--json", default=None, help="write all records here")
    parser.add_argument("--report", default=None, help="print the markdown tables of this JSON file and stop")
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    print(f"machine: {device_name(torch.device('cpu'))}, torch {torch.__version__}, {args.threads} thread(s)")
    records = []
    for example in args.examples:
        for seed in args.seeds:
            for name in args.estimators:
                record = run(example, name, seed)
                records.append(record)
                print(json.dumps(record), flush=True)
            if example == "lr_schedule":
                for start in args.lr_starts:  # the config starts at 0.03; other starting rates
                    record = run(example, "greedy0.9", seed, ["--model.init_lr", str(start)])
                    records.append(record | {"estimator": f"greedy0.9_start{start}"})
                    print(json.dumps(records[-1]), flush=True)
                for outer_lr in args.lr_outer_lrs:  # the config's outer learning rate is 0.15; others
                    record = run(example, "greedy0.9", seed, ["--model.outer_lr", str(outer_lr)])
                    records.append(record | {"estimator": f"greedy0.9_outerlr{outer_lr}"})
                    print(json.dumps(records[-1]), flush=True)
                for lr in GRID:
                    fixed = ["--model.init_lr", str(lr)]
                    record = run(example, "fo", seed, fixed) | {"estimator": f"fixed_lr{lr}"}
                    records.append(record)
                    print(json.dumps(record), flush=True)
                    record = plain_grid_run(example, lr, seed)
                    records.append(record)
                    print(json.dumps(record), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records, indent=1))
    print(report(records))


if __name__ == "__main__":
    main()
