"""MAML, first-order MAML and iMAML side by side on Omniglot 5-way 1-shot: accuracy on unseen tasks, time per outer
step, and memory against the number of inner steps.

Every method trains the same network (the conv backbone 3 x 32 and a linear head, 28 x 28 images) from the same
initialization per seed, on the same training tasks, with the same inner SGD (lr 0.4, T steps) and outer Adam; it
is evaluated on tasks drawn from Omniglot's evaluation alphabets (classes no method saw). The methods differ only in
the hypergradient of the initialization:

- ``maml``: ``lh.MAML`` with ``rmd`` (second-order MAML, exact through the T steps);
- ``fomaml``: ``lh.MAML`` with ``fo`` (first-order MAML);
- ``imaml``: ``lh.IMAML`` (proximal term ``lambda/2 |w - phi|^2``, lambda 2, start at ``phi`` detached) with
  ``cg(5, normal=True)``.

``run`` writes one record per (method, seed) into ``--out`` and skips those already there (resumable; a run that
was interrupted leaves no record). ``memory`` measures one outer step's peak tensor memory at T = 5, 10, 20, 50.
``report`` writes ``results.md`` with each method's mean and paired 95% intervals against MAML.

Before any work: an ``--out`` that cannot be written is refused, and ``run`` and ``memory`` hold ``--out``'s
``.run.lock`` and ``.memory.lock`` while they work (:func:`studies.common.run_alone`): a second run of the same
command on the same ``--out`` is refused while the first lives.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

import lightning_hypergrad as lh
from lightning_hypergrad.callbacks import StepTimer
from studies.common import (
    AllocatorPeak,
    StudyParser,
    log,
    machine_description,
    omniglot_root,
    quiet,
    quiet_trainer,
    run_alone,
    writable_folder,
    write_json,
    write_text,
)
from studies.stats import compare, mean_ci95
from studies.table2.run import CachedFewShotDataModule

METHODS = {"maml": "rmd", "fomaml": "fo", "imaml": "cg(5, normal=True)"}
"""The methods: each one's estimator (``imaml`` uses :class:`lightning_hypergrad.IMAML`, the others ``MAML``)."""

PROXIMAL = 2.0
SETTINGS = {"ways": 5, "shots": 1, "queries": 5, "meta_batch": 8, "inner_steps": 5, "inner_lr": 0.4, "outer_lr": 3e-3}


def build(method: str, data: CachedFewShotDataModule, inner_steps: int) -> lh.MAML:
    """The model of ``method`` for ``data``'s images."""
    cls = lh.IMAML if method == "imaml" else lh.MAML
    kwargs: dict[str, Any] = {"proximal": PROXIMAL} if method == "imaml" else {}
    return cls(
        ways=SETTINGS["ways"],
        image_shape=data.image_shape,
        depth=3,
        width=32,
        estimator=METHODS[method],
        inner_optimizer=lh.SGD(lr=SETTINGS["inner_lr"]),
        inner_steps=inner_steps,
        meta_batch_size=SETTINGS["meta_batch"],
        outer_lr=SETTINGS["outer_lr"],
        **kwargs,
    )


def data_module(root: str | None, steps: int, eval_tasks: int, seed: int, dataset: str = "omniglot"):
    """The tasks of one seed (``dataset="digits"``: scikit-learn's bundled digits, for the tests)."""
    return CachedFewShotDataModule(
        dataset=dataset,
        root=root if dataset == "omniglot" else None,
        ways=SETTINGS["ways"],
        shots=SETTINGS["shots"],
        queries=SETTINGS["queries"],
        meta_batch_size=SETTINGS["meta_batch"],
        train_batches=steps,
        val_tasks=eval_tasks,
        test_tasks=eval_tasks,
        split_seed=0,
        seed=seed,
    )


def run_one(
    method: str, seed: int, root: str | None, steps: int, eval_tasks: int, out: Path, dataset: str = "omniglot"
) -> dict[str, Any]:
    """Train and evaluate one (method, seed); write its record (atomically) and return it."""
    with quiet():
        L.seed_everything(seed, verbose=False)
        data = data_module(root, steps, eval_tasks, seed, dataset)
        data.setup("fit")
        L.seed_everything(seed, verbose=False)  # the same initialization for every method of a seed
        model = build(method, data, SETTINGS["inner_steps"])
        timer = StepTimer()
        start = time.perf_counter()
        quiet_trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer]).fit(
            model, datamodule=data
        )
        train_seconds = time.perf_counter() - start
        test = quiet_trainer().test(model, datamodule=data, verbose=False)[0]
    record = {
        "method": method,
        "dataset": dataset,
        "estimator": str(model.estimator),
        "seed": seed,
        "test_acc": float(test["test/acc"]),
        "test_ci95": float(test["test/acc_ci95"]),
        "seconds_per_step_median": statistics.median(timer.durations) if timer.durations else None,
        "train_seconds": train_seconds,
        "steps": steps,
        "eval_tasks": eval_tasks,
        "proximal": PROXIMAL if method == "imaml" else None,
        **SETTINGS,
        "torch_threads": torch.get_num_threads(),
        "machine": machine_description(),
    }
    write_json(out / f"{method}_seed{seed}.json", record)
    return record


def measure_memory(root: str | None, t_values: list[int], dataset: str = "omniglot") -> dict[str, dict[int, int]]:
    """Peak tensor bytes of one outer step's meta-gradient, per method and T (one meta-batch, seed 0)."""
    found: dict[str, dict[int, int]] = {}
    with quiet():
        data = data_module(root, 1, 1, 0, dataset)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        for method in METHODS:
            found[method] = {}
            for steps in t_values:
                L.seed_everything(0, verbose=False)
                model = build(method, data, steps)
                tasks = model.split_tasks(batch)
                model.meta_gradient(tasks)  # warm: the dependence check runs once
                found[method][steps] = AllocatorPeak().measure(lambda m=model, t=tasks: m.meta_gradient(t))
    return found


def load(out: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The records in ``out``, by ``(method, seed)``."""
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*_seed*.json"))]
    return {(r["method"], r["seed"]): r for r in records}


def accuracy_table(out: Path) -> list[str]:
    """Each method's test accuracy over the seeds and its paired difference to MAML (seed by seed, the level rule of
    :func:`studies.stats.verdict`), with the median seconds per step."""
    by = load(out)
    seeds = sorted({seed for _, seed in by})
    lines = [
        "| method | seeds | test accuracy, mean [95%] | paired vs maml [95%] | seconds per step (median) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        rows = [by[(method, s)] for s in seeds if (method, s) in by]
        if not rows:
            continue
        mean, half = mean_ci95([r["test_acc"] for r in rows], t=True)
        paired = [s for s in seeds if (method, s) in by and ("maml", s) in by]
        vs = "-"
        if method != "maml" and len(paired) >= 2:
            found = compare(
                [by[(method, s)]["test_acc"] for s in paired],
                [by[("maml", s)]["test_acc"] for s in paired],
                higher_is_better=True,
            )
            vs = f"{found.text(2, scale=100)} ({found.verdict})"
        seconds = statistics.median(r["seconds_per_step_median"] for r in rows)
        interval = "" if half is None else f" [{100 * (mean - half):.2f}, {100 * (mean + half):.2f}]"
        lines.append(
            f"| `{method}` ({rows[0]['estimator']}) | {len(rows)} | {100 * mean:.2f}{interval} | {vs} | {seconds:.3f} |"
        )
    return lines


def memory_table(out: Path) -> list[str]:
    """Peak tensor memory of one outer step's meta-gradient (MiB) per method against T; empty without a record."""
    memory = out / "memory.json"
    if not memory.exists():
        return []
    found = json.loads(memory.read_text())
    t_values = sorted({int(t) for m in found.values() for t in m})
    lines = ["| method | " + " | ".join(f"T = {t}" for t in t_values) + " |", "|---" * (len(t_values) + 1) + "|"]
    for method, values in found.items():
        lines.append(f"| `{method}` | " + " | ".join(f"{values[str(t)] / 2**20:.1f}" for t in t_values) + " |")
    return lines


def report(out: Path) -> str:
    by = load(out)
    lines = ["# MAML, first-order MAML and iMAML on Omniglot 5-way 1-shot", ""]
    if by:
        first = next(iter(by.values()))
        lines += [
            f"{len(by)} records; {first['steps']} outer steps, meta-batch {first['meta_batch']}, T = "
            f"{first['inner_steps']}, inner SGD lr {first['inner_lr']}, outer Adam lr {first['outer_lr']}, iMAML "
            f"lambda {PROXIMAL}; accuracy on {first['eval_tasks']} tasks of the evaluation alphabets; machine: "
            f"{first['machine']}, {first['torch_threads']} thread(s). Paired differences: seed by seed; level where "
            "the 95% interval holds 0, better or worse where it excludes 0.",
            "",
            *accuracy_table(out),
        ]
    memory = memory_table(out)
    if memory:
        lines += ["", "Peak tensor memory of one outer step's meta-gradient (MiB), against T:", "", *memory]
    text = "\n".join(lines) + "\n"
    write_text(out / "results.md", text)
    return text


def out_folder(value: str) -> Path:
    """The ``type`` of ``--out``: :func:`studies.common.writable_folder`, as a ``Path``."""
    return Path(writable_folder(value))


def main(argv: list[str] | None = None) -> int:
    parser = StudyParser(prog="python -m studies.imaml", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate each (method, seed) not yet recorded")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    run.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    run.add_argument("--steps", type=int, default=150)
    run.add_argument("--eval-tasks", type=int, default=200)
    run.add_argument("--dataset", choices=["omniglot", "digits"], default="omniglot", help="digits: the tests' form")
    run.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    memory = sub.add_parser("memory", help="peak memory of one outer step against T")
    memory.add_argument("--t", type=int, nargs="+", default=[5, 10, 20, 50])
    memory.add_argument("--dataset", choices=["omniglot", "digits"], default="omniglot", help="digits: the tests' form")
    sub.add_parser("report", help="write results.md from the records")
    for p in (run, memory, sub.choices["report"]):
        p.add_argument("--out", type=out_folder, default="studies/imaml/results", help="checked before any work")
        p.add_argument("--root", default=None, help="the Omniglot folder (default: $OMNIGLOT_ROOT or the shared one)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "run":
        with run_alone(args.out, ".run.lock"):  # a second run would train the same (method, seed)
            torch.set_num_threads(args.threads)
            for seed in args.seeds:
                for method in args.methods:
                    if (args.out / f"{method}_seed{seed}.json").exists():
                        continue
                    log(f"imaml study: {method} seed {seed}")
                    root = omniglot_root(args.root)
                    record = run_one(method, seed, root, args.steps, args.eval_tasks, args.out, args.dataset)
                    seconds = record["seconds_per_step_median"]
                    log(f"  test accuracy {100 * record['test_acc']:.2f}, {seconds:.3f} s/step")
    elif args.command == "memory":
        with run_alone(args.out, ".memory.lock"):  # a second run would measure the same
            write_json(args.out / "memory.json", measure_memory(omniglot_root(args.root), args.t, args.dataset))
    print(report(args.out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
