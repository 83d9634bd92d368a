"""``python -m studies.maml_omniglot timing``: seconds per iteration of the runner beside learn2learn's own loop.

learn2learn's ``examples/vision/maml_omniglot.py`` loop, written again here from the example:
``l2l.algorithms.MAML(model, lr=0.5, first_order=False)`` on learn2learn's ``OmniglotFC`` (given the runner's
initial weights), and per task ``learner = maml.clone()``, ``learner.adapt(loss)`` per adaptation step, the query
loss and accuracy, ``loss.backward()``; then every gradient times ``1 / meta_batch`` and one Adam step. Each round,
one thread, measures in turn (the order of the two steps alternating between rounds):

- ``ours_sampling``: the runner's sampling of an iteration's tasks (:class:`studies.maml_omniglot.experiment.Tasks`);
- ``ours_step`` and ``l2l_step``: one iteration of each, on those same tasks (the runner's ``lh.MAML`` step, and
  learn2learn's loop above); both start from the same weights and take the same steps, so the largest difference of
  their parameters after the rounds is recorded as a check that they compute the same thing;
- ``l2l_sampling``: the same number of tasks from learn2learn's own ``get_tasksets("omniglot", num_tasks=20000)``
  pipeline, run on the same prepared images (its ``FullOmniglot`` stood in for by them) after ``random.seed(42)``;
- ``l2l_example_iteration``: the example's whole iteration as written, with its own sampling and the 32 validation
  tasks it adapts at every iteration (the runner validates every ``--val-every`` iterations instead), on a copy.

Record: ``<out>/timing.json`` (every round's seconds; the report takes the medians). Before any work: an ``--out``
that cannot be written is refused, and the measurement holds ``<out>/.timing.lock`` while it works
(:func:`studies.common.run_alone`; the training run's lock is another): a second timing on the same ``--out`` is
refused while the first lives.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_hypergrad.data._learn2learn import import_learn2learn
from lightning_hypergrad.data.datasets.omniglot import OMNIGLOT_CHARACTERS
from studies.common import log, machine_description, run_alone, writable_folder, write_json
from studies.maml_omniglot.experiment import (
    OUT,
    Setting,
    Tasks,
    add_setting_arguments,
    build_model,
    check_setting_arguments,
    data_module,
    train_step,
)
from studies.maml_omniglot.records import TIMING

LOCK = ".timing.lock"
"""The timing's lock in ``--out``, beside the training run's (:data:`studies.maml_omniglot.records.LOCK`)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setting_arguments(parser)
    parser.add_argument(
        "--out", type=writable_folder, default=OUT, help=f"results folder (default {OUT}): writes <out>/{TIMING}"
    )
    parser.add_argument("--rounds", type=int, default=20, help="measured rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds before the measured ones (default 2)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Setting:
    setting = check_setting_arguments(parser, args)
    if args.rounds < 1 or args.warmup < 0:
        parser.error(f"--rounds must be >= 1 and --warmup >= 0, got {args.rounds} and {args.warmup}")
    if setting.queries != setting.shots:
        parser.error(
            f"--queries {setting.queries} differs from --shots {setting.shots}: learn2learn's example draws 2 * shots "
            "drawings a class and adapts on half of them; set --queries to --shots"
        )
    return setting


class PreparedOmniglot(Dataset):
    """learn2learn's ``FullOmniglot`` (background then evaluation characters, labels 0 .. 1622) on images already
    prepared as its transform prepares them: drawing ``i`` is character ``i // drawings``."""

    def __init__(self, images: torch.Tensor, drawings: int) -> None:
        self.images, self.drawings = images, drawings

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], index // self.drawings


@contextlib.contextmanager
def _full_omniglot(dataset: Dataset) -> Iterator[None]:
    """learn2learn's Omniglot benchmark builds ``FullOmniglot(root=..., transform=..., download=True)``: within the
    block it gets ``dataset`` instead (the same images, no download)."""
    from learn2learn.vision.benchmarks import omniglot_benchmark

    datasets = omniglot_benchmark.l2l.vision.datasets
    saved = datasets.FullOmniglot
    datasets.FullOmniglot = lambda *args, **kwargs: dataset
    try:
        yield
    finally:
        datasets.FullOmniglot = saved


def l2l_tasksets(dataset: Dataset, setting: Setting) -> Any:
    """learn2learn's ``get_tasksets("omniglot", ...)`` as ``maml_omniglot.py`` calls it, after ``random.seed``."""
    l2l = import_learn2learn()
    random.seed(setting.split_seed)
    with _full_omniglot(dataset):
        return l2l.vision.benchmarks.get_tasksets(
            "omniglot",
            train_ways=setting.ways,
            train_samples=2 * setting.shots,
            test_ways=setting.ways,
            test_samples=2 * setting.shots,
            num_tasks=setting.task_pool or -1,
            root="unused",
        )


def l2l_network(model, setting: Setting) -> torch.nn.Module:
    """learn2learn's ``OmniglotFC`` with the weights of the runner's network."""
    l2l = import_learn2learn()
    theirs = l2l.vision.models.OmniglotFC(setting.image_size**2, setting.ways, sizes=list(setting.sizes))
    with torch.no_grad():
        for mine, their in _pairs(model, theirs):
            their.copy_(mine)
    return theirs


def _pairs(model, theirs: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each parameter of the runner's network with its counterpart in learn2learn's ``OmniglotFC``."""
    backbone, head = model.inner_model.module
    pairs = [(head.weight, theirs.classifier.weight), (head.bias, theirs.classifier.bias)]
    for k, block in enumerate(theirs.features[1]):  # our layers 3k + 1 (linear), 3k + 2 (batch norm)
        for mine, their in ((backbone[3 * k + 1], block.linear), (backbone[3 * k + 2], block.normalize)):
            pairs += [(mine.weight, their.weight), (mine.bias, their.bias)]
    return pairs


def _fast_adapt(learner, support_x, support_y, query_x, query_y, steps: int):
    """learn2learn's example's ``fast_adapt`` after its split: adapt on the support, the query loss and accuracy."""
    for _ in range(steps):
        learner.adapt(F.cross_entropy(learner(support_x), support_y))
    predictions = learner(query_x)
    return F.cross_entropy(predictions, query_y), (predictions.argmax(dim=1) == query_y).float().mean()


def _split(batch, setting: Setting):
    """The example's split of a sampled task: even positions adapt, odd ones evaluate."""
    data, labels = batch
    adaptation = np.zeros(data.size(0), dtype=bool)
    adaptation[np.arange(setting.shots * setting.ways) * 2] = True
    a, e = torch.from_numpy(adaptation), torch.from_numpy(~adaptation)
    return data[a], labels[a], data[e], labels[e]


def l2l_step(maml, optimizer, tasks: list[dict], setting: Setting) -> None:
    """One iteration of the example's loop on given tasks (its training half)."""
    optimizer.zero_grad()
    for task in tasks:
        loss, acc = _fast_adapt(maml.clone(), *(task[k] for k in ("support_x", "support_y", "query_x", "query_y")),
                                setting.adaptation_steps)  # fmt: skip
        loss.backward()
        loss.item(), acc.item()
    for p in maml.parameters():
        p.grad.data.mul_(1.0 / len(tasks))
    optimizer.step()


def l2l_example_iteration(maml, optimizer, tasksets, setting: Setting) -> None:
    """One iteration of the example as written: its sampling, its training tasks and its validation tasks."""
    optimizer.zero_grad()
    for _ in range(setting.meta_batch):
        loss, acc = _fast_adapt(maml.clone(), *_split(tasksets.train.sample(), setting), setting.adaptation_steps)
        loss.backward()
        loss.item(), acc.item()
        loss, acc = _fast_adapt(maml.clone(), *_split(tasksets.validation.sample(), setting), setting.adaptation_steps)
        loss.item(), acc.item()
    for p in maml.parameters():
        p.grad.data.mul_(1.0 / setting.meta_batch)
    optimizer.step()


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timing(args: argparse.Namespace, setting: Setting) -> int:
    """Measures the rounds and writes ``<out>/timing.json``, holding ``<out>/.timing.lock`` meanwhile."""
    with run_alone(args.out, LOCK):  # a second timing on the same --out would measure the same
        return measure(args, setting)


def measure(args: argparse.Namespace, setting: Setting) -> int:
    l2l = import_learn2learn()
    torch.set_num_threads(args.threads)
    data = data_module(setting, args.root)
    log(f"loading Omniglot (learn2learn's preparation) from {args.root}")
    tasks = Tasks(setting, data)
    ours = build_model(setting)
    optimizer = torch.optim.Adam(ours.parameters(), lr=setting.meta_lr)
    network = l2l_network(ours, setting)
    maml = l2l.algorithms.MAML(network, lr=setting.fast_lr, first_order=setting.first_order)
    l2l_optimizer = torch.optim.Adam(maml.parameters(), lr=setting.meta_lr)
    example = l2l.algorithms.MAML(copy.deepcopy(network), lr=setting.fast_lr, first_order=setting.first_order)
    example_optimizer = torch.optim.Adam(example.parameters(), lr=setting.meta_lr)
    shared = data.splits["train"].dataset
    drawings = len(shared.images) // sum(OMNIGLOT_CHARACTERS)  # every drawing, in character order
    tasksets = l2l_tasksets(PreparedOmniglot(shared.images, drawings), setting)
    columns = ("ours_sampling", "ours_step", "l2l_step", "l2l_sampling", "l2l_example_iteration")
    seconds: dict[str, list[float]] = {c: [] for c in columns}
    load_average = [_load_average()]
    for r in range(args.warmup + args.rounds):
        start = time.perf_counter()
        batch = tasks.train(r)
        measured = {"ours_sampling": time.perf_counter() - start}
        steps = {
            "ours_step": lambda batch=batch: train_step(ours, optimizer, batch),
            "l2l_step": lambda batch=batch: l2l_step(maml, l2l_optimizer, batch, setting),
        }
        for name in sorted(steps, reverse=r % 2 == 1):  # ours first in even rounds, learn2learn's in odd ones
            measured[name] = _seconds(steps[name])
        measured["l2l_sampling"] = _seconds(lambda: [tasksets.train.sample() for _ in range(setting.meta_batch)])
        measured["l2l_example_iteration"] = _seconds(
            lambda: l2l_example_iteration(example, example_optimizer, tasksets, setting)
        )
        if r >= args.warmup:
            for name, value in measured.items():
                seconds[name].append(value)
        log(f"round {r + 1}/{args.warmup + args.rounds}: " + ", ".join(f"{k} {v:.3f} s" for k, v in measured.items()))
    load_average.append(_load_average())
    difference = max(float((a - b).detach().abs().max()) for a, b in _pairs(ours, maml.module))
    record = {
        "study": "maml_omniglot",
        "setting": setting.as_record(),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "seconds": seconds,
        "max_parameter_difference": difference,
        "load_average": load_average,
        "machine": machine_description(),
    }
    write_json(Path(args.out) / TIMING, record)
    log(f"max parameter difference after {args.warmup + args.rounds} identical steps: {difference:.3g}")
    return 0


def _load_average() -> float | None:
    """The machine's 1-minute load average (other processes' work too), or ``None`` where there is none."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
