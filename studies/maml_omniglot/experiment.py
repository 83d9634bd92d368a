"""The setting of learn2learn's ``maml_omniglot.py``, its data and its network, as the runner and the timing use them.

- Data: ``FewShotDataModule(dataset="omniglot-l2l", split_seed=42)``, learn2learn's Omniglot preparation (its class
  split under ``random.seed(42)``, 28x28 Lanczos-resized images, the four rotations as classes); tasks of 5 ways, 1
  support and 1 query drawing per class (learn2learn's ``train_samples = test_samples = 2 * shots``, split into
  adaptation and evaluation halves), sampled with learn2learn by :class:`~lightning_hypergrad.data.tasks.TaskSampler`.
- Training tasks come from a pool of 20,000 (``--task-pool``), as learn2learn's ``get_tasksets(..., num_tasks=20000)``:
  slot ``j`` of iteration ``i`` is pool task ``derive_seed(seed, "slot", i, j) % 20000``, drawn with replacement, as
  learn2learn's ``Taskset.sample()`` draws a random index of its 20,000 cached task descriptions. Validation and test
  tasks are fixed by the seed (``"val"``, ``"test"`` streams of the validation and test classes).
- Network: :class:`~lightning_hypergrad.nets.FCBackbone` with a :class:`~lightning_hypergrad.nets.TruncatedNormalLinear`
  head, learn2learn's ``OmniglotFC`` (784-256-128-64-64-5, batch norm on each batch's statistics).
- Training: ``lh.MAML`` (the whole network inside, its initialization learned) with plain SGD of learning rate 0.5
  for 1 step, exact second order (``rmd``; ``first_order`` takes ``fo``), the mean hypergradient of 32 tasks per
  iteration, Adam with learning rate 0.003 (``torch.optim.Adam``, as ``BilevelModule`` and learn2learn use).
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

import lightning_hypergrad as lh
from lightning_hypergrad.data.tasks import TaskSampler, derive_seed
from lightning_hypergrad.nets import FCBackbone, TruncatedNormalLinear
from studies.common import omniglot_root, require_positive

OUT = "studies/maml_omniglot/results"
PUBLISHED = {
    "learn2learn": {
        "acc": 0.889,
        "source": "learn2learn's examples/vision/README.md, MAML results table (Omniglot, FC, 5 ways, 1 shot)",
    },
    "paper": {
        "acc": 0.897,
        "ci95": 0.011,
        "source": "Finn, Abbeel and Levine (ICML 2017), Table 1: MAML (no conv), 5-way 1-shot Omniglot",
    },
}
"""The published numbers the run is set beside (accuracy on unseen tasks, fractions)."""


class StudyError(Exception):
    """A run that cannot start or resume; the message says why and what to do (printed as one line)."""


@dataclass(frozen=True)
class Setting:
    """Everything that decides the run's numbers (a resumed run must have the same; ``--iterations`` may differ)."""

    ways: int = 5
    shots: int = 1
    queries: int = 1
    fast_lr: float = 0.5
    meta_lr: float = 0.003
    meta_batch: int = 32
    adaptation_steps: int = 1
    total: int = 60000
    first_order: bool = False
    sizes: tuple[int, ...] = (256, 128, 64, 64)
    image_size: int = 28
    seed: int = 42
    split_seed: int = 42
    task_pool: int = 20000
    log_every: int = 100
    val_every: int = 1000
    val_tasks: int = 320
    test_tasks: int = 1000

    def as_record(self) -> dict[str, Any]:
        out = asdict(self)
        out["sizes"] = list(self.sizes)
        return out

    @property
    def estimator(self) -> str:
        return "fo" if self.first_order else "rmd"


DEFAULTS = Setting()


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :class:`Setting` (defaults: learn2learn's ``maml_omniglot.py``), ``--root`` and ``--threads``."""
    d = DEFAULTS
    parser.add_argument("--root", default=None, help="Omniglot archives (default $OMNIGLOT_ROOT or ../shared/...)")
    parser.add_argument("--ways", type=int, default=d.ways, help=f"classes per task (default {d.ways})")
    parser.add_argument("--shots", type=int, default=d.shots, help=f"support drawings per class ({d.shots})")
    parser.add_argument("--queries", type=int, default=d.queries, help=f"query drawings per class ({d.queries})")
    parser.add_argument("--fast-lr", type=float, default=d.fast_lr, help=f"inner SGD learning rate ({d.fast_lr})")
    parser.add_argument("--meta-lr", type=float, default=d.meta_lr, help=f"Adam's learning rate ({d.meta_lr})")
    parser.add_argument("--meta-batch", type=int, default=d.meta_batch, help=f"tasks per iteration ({d.meta_batch})")
    parser.add_argument("--adaptation-steps", type=int, default=d.adaptation_steps, help="inner steps (default 1)")
    parser.add_argument("--total", type=int, default=d.total, help=f"iterations of the full run ({d.total})")
    parser.add_argument("--first-order", action="store_true", help="first-order MAML (fo) instead of rmd")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(d.sizes), help="hidden widths (256 128 64 64)")
    parser.add_argument("--image-size", type=int, default=d.image_size, help=f"image side ({d.image_size})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"initialization and task seed ({d.seed})")
    parser.add_argument("--split-seed", type=int, default=d.split_seed, help=f"class split seed ({d.split_seed})")
    parser.add_argument("--task-pool", type=int, default=d.task_pool, help="training tasks (20000; 0: no pool)")
    parser.add_argument("--log-every", type=int, default=d.log_every, help=f"curve point every N ({d.log_every})")
    parser.add_argument("--val-every", type=int, default=d.val_every, help=f"validation every N ({d.val_every})")
    parser.add_argument("--val-tasks", type=int, default=d.val_tasks, help=f"fixed validation tasks ({d.val_tasks})")
    parser.add_argument("--test-tasks", type=int, default=d.test_tasks, help=f"unseen test tasks ({d.test_tasks})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def check_setting_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Setting:
    """The :class:`Setting` of the options, or ``parser.error`` (one line naming the option) before any work."""
    require_positive(parser, args, "ways", "shots", "queries", "meta_batch", "adaptation_steps", "total", "sizes")
    require_positive(parser, args, "image_size", "log_every", "val_every", "val_tasks", "test_tasks", "threads")
    if args.ways < 2:
        parser.error(f"--ways must be >= 2, got {args.ways}")
    if not args.fast_lr > 0 or not args.meta_lr > 0:
        parser.error(f"--fast-lr and --meta-lr must be > 0, got {args.fast_lr} and {args.meta_lr}")
    if args.task_pool < 0:
        parser.error(f"--task-pool must be >= 0 (0: a fresh task every time), got {args.task_pool}")
    args.root = omniglot_root(args.root)
    names = {f.name for f in fields(Setting)}
    values = {name: getattr(args, name) for name in names}
    values["sizes"] = tuple(values["sizes"])
    return Setting(**values)


def build_model(setting: Setting) -> lh.MAML:
    """learn2learn's ``OmniglotFC`` as ``lh.MAML``, initialized from ``setting.seed``."""
    torch.manual_seed(setting.seed)
    model = lh.MAML(
        ways=setting.ways,
        image_shape=(1, setting.image_size, setting.image_size),
        backbone=functools.partial(FCBackbone, sizes=setting.sizes),
        head=TruncatedNormalLinear,
        estimator=setting.estimator,
        inner_optimizer=lh.SGD(lr=setting.fast_lr),
        inner_steps=setting.adaptation_steps,
        meta_batch_size=setting.meta_batch,
        outer_lr=setting.meta_lr,
    )
    model.check_inner_model()
    return model


def data_module(setting: Setting, root: str):
    """The data module of the setting, its files checked now (loaded by :class:`Tasks`); absent or damaged files
    raise :class:`StudyError` with the data module's message."""
    from lightning_hypergrad.data import FewShotDataModule

    try:
        return FewShotDataModule(
            "omniglot-l2l",
            root=root,
            ways=setting.ways,
            shots=setting.shots,
            queries=setting.queries,
            meta_batch_size=setting.meta_batch,
            image_size=setting.image_size,
            split_seed=setting.split_seed,
            seed=setting.seed,
        )
    except (FileNotFoundError, ValueError) as error:
        raise StudyError(str(error)) from None


class Tasks:
    """The tasks of a run: training slot ``j`` of iteration ``i``, and the fixed validation and test tasks."""

    def __init__(self, setting: Setting, data) -> None:
        data.setup()
        self.setting = setting
        self.samplers = {
            split: TaskSampler(data.splits[split], setting.ways, setting.shots, setting.queries)
            for split in ("train", "val", "test")
        }

    def train(self, iteration: int) -> list[dict[str, torch.Tensor]]:
        """The ``meta_batch`` tasks of iteration ``iteration`` (0-based)."""
        s = self.setting
        tasks = []
        for slot in range(s.meta_batch):
            task_id = derive_seed(s.seed, "slot", iteration, slot)
            if s.task_pool:
                task_id %= s.task_pool
            tasks.append(self.samplers["train"].sample(derive_seed(s.seed, "train", task_id)))
        return tasks

    def fixed(self, split: str, count: int) -> list[dict[str, torch.Tensor]]:
        """The first ``count`` tasks of the validation (``"val"``) or test (``"test"``) classes."""
        return [self.samplers[split].sample(derive_seed(self.setting.seed, split, t)) for t in range(count)]


def train_step(model: lh.MAML, optimizer: torch.optim.Optimizer, tasks: list[dict]) -> tuple[float, float]:
    """One iteration: the mean hypergradient of ``tasks`` into ``.grad``, one Adam step; the mean query loss and
    accuracy of the tasks (after adaptation, before the step)."""
    optimizer.zero_grad(set_to_none=True)
    step = model.meta_gradient(tasks)
    for parameter, gradient in zip(model.hyperparameters(), step.hypergrads):
        parameter.grad = gradient
    optimizer.step()
    return float(step.metrics["outer_loss"]), float(step.metrics["acc"])


def evaluate(model: lh.MAML, tasks: list[dict]) -> tuple[list[float], list[float]]:
    """Each task's query loss and accuracy after adaptation (batch norm on the batch's statistics, as learn2learn)."""
    losses, accuracies = [], []
    for task in tasks:
        numbers = model.evaluate_task(task)
        losses.append(float(numbers["outer_loss"]))
        accuracies.append(float(numbers["acc"]))
    return losses, accuracies
