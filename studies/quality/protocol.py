"""What both quality measurements share (:mod:`studies.quality.quality` and :mod:`studies.quality.variants`): the
few-shot tasks, the model, its meta-training to the checkpoints and the settings measured at each checkpoint.

Tasks are 5-way Omniglot when its files are found, else scikit-learn's 8x8 digits (:func:`choose_data`). The model is
:class:`lightning_hypergrad.FewShotClassifier` (a conv backbone of 3 blocks of width 32, the hyperparameters; a linear
head trained for T inner steps of SGD with learning rate 0.1), meta-trained with Greedy(0.99), T = 10, inner momentum
0.9, Adam (lr 1e-3) and 10 tasks per meta-batch (:func:`train`). At each checkpoint both measurements use inner
momentum 0.9 and 0.0 (:data:`MOMENTA`) and T in {5, 10, 20, 50} (:data:`T_VALUES`).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported; --threads sets torch's own count

import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import lightning_hypergrad as lh  # noqa: E402
from lightning_hypergrad.module import split_meta_batch  # noqa: E402
from studies.common import log, omniglot_root  # noqa: E402

T_VALUES = (5, 10, 20, 50)
QUICK_T_VALUES = (5, 10)
MOMENTA = (0.9, 0.0)
DEFAULT_TRAIN_STEPS = (50, 200)

INNER_LR = 0.1
TRAIN_T = 10
TRAIN_GAMMA = 0.99
TRAIN_MOMENTUM = 0.9
OUTER_LR = 1e-3
META_BATCH = 10
WAYS = 5
OMNIGLOT_FILE = "images_background.npz"


# ------------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class DataChoice:
    """The dataset the benchmark runs on and how its tasks are shaped."""

    dataset: str
    root: str | None
    shots: int
    queries: int

    def describe(self) -> str:
        """The dataset and the task shape in words."""
        where = f" from {self.root}" if self.root else " (bundled with scikit-learn)"
        return f"{self.dataset}{where}: {WAYS}-way {self.shots}-shot, {self.queries} queries per class"


def choose_data(
    dataset: str = "auto", root: str | None = None, shots: int | None = None, queries: int | None = None
) -> DataChoice:
    """Omniglot (5-way 10-shot) when its files are there (or ``dataset="omniglot"``), else the 8x8 digits (5-way
    5-shot), 10 queries per class; ``shots`` and ``queries`` replace the dataset's defaults where given. The
    Omniglot folder is kept as given (:func:`studies.common.omniglot_root`), relative or not.

    Raises:
        SystemExit: ``dataset="omniglot"`` and its files are not in the folder.
    """
    root = omniglot_root(root)
    found = (Path(root).expanduser() / OMNIGLOT_FILE).is_file()
    if dataset == "omniglot" and not found:
        raise SystemExit(f"--dataset omniglot: no {OMNIGLOT_FILE} in {root}; give its folder with --root")
    if found and dataset != "digits":
        return DataChoice("omniglot", root, shots=shots or 10, queries=queries or 10)
    return DataChoice("digits", None, shots=shots or 5, queries=queries or 10)


def make_datamodule(choice: DataChoice, tasks: int, train_batches: int, seed: int) -> lh.FewShotDataModule:
    """The data module, set up for fitting (train and meta-validation splits)."""
    datamodule = lh.FewShotDataModule(
        dataset=choice.dataset,
        root=choice.root,
        ways=WAYS,
        shots=choice.shots,
        queries=choice.queries,
        meta_batch_size=META_BATCH,
        train_batches=max(train_batches, 1),
        val_tasks=tasks,
        seed=seed,
    )
    datamodule.setup("fit")
    return datamodule


def to_device(task: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The task with its tensors moved to ``device``."""
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in task.items()}


def heldout_tasks(datamodule: lh.FewShotDataModule, count: int, device: torch.device) -> list[dict[str, Any]]:
    """The first ``count`` fixed meta-validation tasks."""
    tasks: list[dict[str, Any]] = []
    for batch in datamodule.val_dataloader():
        tasks += [to_device(task, device) for task in split_meta_batch(batch)]
        if len(tasks) >= count:
            break
    return tasks[:count]


# -------------------------------------------------------------------------------------------------- training


def build_model(image_shape: tuple[int, int, int], seed: int, device: torch.device) -> lh.FewShotClassifier:
    """The few-shot classifier as initialized from ``seed``, in training mode."""
    torch.manual_seed(seed)
    model = lh.FewShotClassifier(
        ways=WAYS,
        image_shape=image_shape,
        depth=3,
        width=32,
        estimator=lh.Greedy(TRAIN_GAMMA),
        inner_optimizer=lh.SGD(lr=INNER_LR, momentum=TRAIN_MOMENTUM),
        inner_steps=TRAIN_T,
    )
    return model.to(device).train()


def snapshot(model: torch.nn.Module) -> dict[str, Tensor]:
    """A copy of the model's parameters and buffers."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore_buffers(model: torch.nn.Module, before: dict[str, Tensor]) -> None:
    """Put back the buffers of :func:`snapshot` (batch norm's statistics); raise if a parameter changed too."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(before[name])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        raise RuntimeError(f"measuring changed the model's {', '.join(changed)}")


def train(
    model: lh.FewShotClassifier,
    datamodule: lh.FewShotDataModule,
    checkpoints: Sequence[int],
    device: torch.device,
) -> Iterator[tuple[int, dict[str, Tensor], dict[str, float]]]:
    """Meta-train with Greedy(0.99) and Adam; yield ``(step, state, metrics)`` at each checkpoint step.

    ``metrics`` are the mean outer loss and query accuracy of the training meta-batches since the previous
    checkpoint (empty at step 0).
    """
    wanted = sorted(set(checkpoints))
    if 0 in wanted:
        yield 0, snapshot(model), {}
    last = wanted[-1] if wanted else 0
    if last == 0:
        return
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=OUTER_LR)
    estimator = lh.Greedy(TRAIN_GAMMA)
    window: list[dict[str, float]] = []
    elapsed, start = 0.0, time.perf_counter()  # time spent training (not while the caller measures a checkpoint)
    for step, batch in enumerate(datamodule.train_dataloader(), start=1):
        tasks = [to_device(task, device) for task in split_meta_batch(batch)]
        result = model.meta_gradient(tasks, estimator)  # a MetaGradient: hypergrads, metrics (0-dim tensors), ...
        hypergrads = result.hypergrads
        metrics = {key: float(value) for key, value in result.metrics.items()}
        optimizer.zero_grad(set_to_none=True)
        if all(bool(torch.isfinite(g).all()) for g in hypergrads):
            for parameter, grad in zip(model.hyperparameters(), hypergrads):
                parameter.grad = grad
            optimizer.step()
        else:
            log(f"step {step}: non-finite hypergradient, outer step skipped")
        window.append(metrics)
        if step in wanted:
            means = {key: statistics.fmean(m[key] for m in window) for key in window[0]}
            elapsed += time.perf_counter() - start
            log(
                f"trained {step} steps ({elapsed:.0f} s of training): outer loss {means['outer_loss']:.3f}, "
                f"query acc {means.get('acc', float('nan')):.3f} (mean since the previous checkpoint)"
            )
            window = []
            yield step, snapshot(model), means
            start = time.perf_counter()
        if step >= last:
            return
    raise RuntimeError(f"the training dataloader ended before step {last}")
