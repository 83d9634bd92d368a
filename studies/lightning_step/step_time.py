"""Seconds per training step of ``FewShotClassifier`` through Lightning, for several estimators side by side.

    python -m studies.lightning_step                                  # Omniglot if found, else digits
    python -m studies.lightning_step --dataset digits --estimators fo "greedy(0.99)" t1t2 rmd
    python -m studies.lightning_step --inner-steps 10 50 --tasks both  # the meta-batch's tasks together / one by one

Each configuration (an estimator's spec string, see :func:`lightning_hypergrad.get_estimator`, a number of inner
steps T, and the tasks run together (``batch_tasks``) or one by one) trains a fresh model (same seed) for ``--steps``
steps, in ``--rounds`` interleaved rounds (all configurations, then all again), so that a busy phase of a shared
machine hits them alike. The time of each training step is taken from Lightning's batch hooks (data loading
excluded) and the median over all rounds is reported, with its ratio to FO's (same T and tasks) and, with
``--tasks both``, the one-by-one time over the batched one. The paper's setting: 5-way 10-shot, meta-batch 10,
T = 10, inner SGD 0.1 with momentum 0.9, a 3 x 32 conv backbone.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
from collections.abc import Sequence

import torch

import lightning_hypergrad as lh
from lightning_hypergrad.callbacks import StepTimer
from studies.common import (
    Progress,
    estimator_spec,
    machine_description,
    omniglot_root,
    quiet,
    quiet_trainer,
    require_positive,
    tasks_label,
)

Config = tuple[str, int, bool]
"""A timed configuration: ``(estimator spec, T, tasks batched)``."""


def time_configs(
    data: lh.FewShotDataModule,
    configs: Sequence[Config],
    steps: int,
    rounds: int,
    device: torch.device | None = None,
) -> tuple[dict[Config, list[float]], dict[Config, int | None]]:
    """Train a fresh ``FewShotClassifier`` (same seed) per configuration for ``steps + 1`` steps, in ``rounds``
    interleaved rounds: the timed steps of each (the first of each fit excluded) and its peak CUDA memory in bytes
    (``None`` off CUDA)."""
    cuda = device is not None and device.type == "cuda"
    times: dict[Config, list[float]] = {config: [] for config in configs}
    peaks: dict[Config, int | None] = {config: None for config in configs}
    progress = Progress(rounds * len(configs), work=rounds * sum(t for _, t, _ in configs))  # a fit's work: its T
    for round_ in range(rounds):
        for config in configs:
            name, inner_steps, batched = config
            gc.collect()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            torch.manual_seed(0)
            model = lh.FewShotClassifier(estimator=name, inner_steps=inner_steps, batch_tasks=batched)
            timer = StepTimer()
            trainer = quiet_trainer(
                accelerator="gpu" if cuda else "cpu", max_steps=steps + 1, limit_val_batches=0, callbacks=[timer]
            )
            trainer.fit(model, data)
            if cuda:
                torch.cuda.synchronize(device)
                peaks[config] = max(torch.cuda.max_memory_allocated(device), peaks[config] or 0)
            times[config] += timer.durations[1:]  # the first step warms up
            progress.step(f"round {round_ + 1}/{rounds}: {name}, T = {inner_steps}, {tasks_label(batched)}: "
                          f"{statistics.median(timer.durations[1:]):.4f} s/step", inner_steps)  # fmt: skip
            del model, trainer, timer
    return times, peaks


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Times the estimators, prints the table and returns the median seconds per step of each."""
    parser = argparse.ArgumentParser(
        prog="python -m studies.lightning_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", choices=("omniglot", "digits"), default=None, help="default: omniglot if found")
    parser.add_argument("--root", default=None, help="the Omniglot folder (default: $OMNIGLOT_ROOT, else the usual)")
    parser.add_argument(
        "--estimators", nargs="+", type=estimator_spec, default=["fo", "t1t2", "greedy(0.99)"], metavar="SPEC"
    )
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[10], metavar="T", help="default: 10")
    parser.add_argument(
        "--tasks", choices=("batched", "one-by-one", "both"), default="batched",
        help="the meta-batch's tasks together (batch_tasks=True), one by one (the default), or both (default: batched)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    require_positive(parser, args, "steps", "rounds", "inner_steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    root = omniglot_root(args.root)
    found = os.path.exists(os.path.join(os.path.expanduser(root), "images_background.npz"))
    dataset = args.dataset or ("omniglot" if found else "digits")
    shots = 10 if dataset != "digits" else 5
    estimators = list(dict.fromkeys(args.estimators))
    modes = {"batched": [True], "one-by-one": [False], "both": [True, False]}[args.tasks]
    configs = [(name, t, batched) for t in dict.fromkeys(args.inner_steps) for batched in modes for name in estimators]
    with quiet():
        data = lh.FewShotDataModule(
            dataset=dataset, root=root if dataset == "omniglot" else None, ways=5, shots=shots, queries=shots,
            meta_batch_size=10, train_batches=args.steps + 1, val_tasks=1,
        )  # fmt: skip
        data.setup("fit")
        times, _ = time_configs(data, configs, args.steps, args.rounds)
    medians = {config: statistics.median(seconds) for config, seconds in times.items()}
    print(f"\n{dataset}, 5-way {shots}-shot, meta-batch 10; {machine_description()}; "
          f"median of {args.rounds} x {args.steps} steps\n")  # fmt: skip
    both = len(modes) == 2
    print("| estimator | T | tasks | s/step | ratio to FO |" + (" one by one / batched |" if both else ""))
    print("|---|---:|---|---:|---:|" + ("---:|" if both else ""))
    for (name, steps, batched), median in medians.items():
        fo = medians.get(("fo", steps, batched))
        row = f"| {name} | {steps} | {tasks_label(batched)} | {median:.4f} | "
        row += f"{median / fo:.2f} |" if fo else " |"
        if both:
            row += f" {medians[(name, steps, False)] / medians[(name, steps, True)]:.2f} |" if batched else " |"
        print(row)
    return {f"{n} T={t} {'batched' if b else 'one-by-one'}": m for (n, t, b), m in medians.items()}
