"""One Table 2 run: a :class:`~lightning_hypergrad.FewShotClassifier` trained for one (setting, method, seed), then
evaluated on held-out meta-validation and meta-test tasks, and its record written."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_hypergrad.callbacks import StepTimer
from lightning_hypergrad.data.fewshot import FewShotDataModule
from lightning_hypergrad.data.sources import ClassSplit
from lightning_hypergrad.estimators import HypergradEstimator, get_estimator
from lightning_hypergrad.fewshot import FewShotClassifier
from lightning_hypergrad.optim import DifferentiableOptimizer
from studies.common import quiet, quiet_trainer, write_json
from studies.table2.settings import PaperSettings, greedy_gamma, jvps, record_name


@dataclass(frozen=True)
class RunConfig:
    """Everything one run (setting x method x seed) needs; picklable, so that it can go to a worker process."""

    dataset: str
    root: str | None
    ways: int
    shots: int
    queries: int
    method: str
    seed: int
    steps: int
    meta_batch: int
    eval_tasks: int
    paper: PaperSettings
    threads: int = 1

    @property
    def file_name(self) -> str:
        """The name of this run's record file."""
        return record_name(self.dataset, self.ways, self.method, self.seed)

    def describe(self) -> str:
        """A short description for progress lines."""
        return f"{self.dataset} {self.ways}-way {self.method} seed {self.seed}"


_SPLITS: dict[tuple[Any, ...], dict[str, ClassSplit]] = {}
"""The class splits loaded in this process, by ``(dataset, root, image_size, split_seed)``: every run of a worker
(any ways, method or seed) shares one copy of the images."""


class CachedFewShotDataModule(FewShotDataModule):
    """A :class:`FewShotDataModule` that loads each dataset once per process (see :data:`_SPLITS`)."""

    def _load(self) -> dict[str, ClassSplit]:
        key = (self.dataset, str(self._root), self.image_size, self.split_seed)
        if key not in _SPLITS:
            _SPLITS[key] = super()._load()
        return _SPLITS[key]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_data(
    dataset: str,
    root: str | None,
    *,
    ways: int,
    shots: int,
    queries: int,
    meta_batch: int,
    steps: int,
    eval_tasks: int,
    seed: int = 0,
) -> CachedFewShotDataModule:
    """The data of one run: ``steps`` training meta-batches and ``eval_tasks`` meta-validation and meta-test tasks
    drawn with ``seed`` from a fixed class split (``split_seed=0``). Building it checks the settings and the data
    folder (``ValueError``, ``FileNotFoundError``); the images load at ``setup``."""
    return CachedFewShotDataModule(
        dataset=dataset,
        root=root,
        ways=ways,
        shots=shots,
        queries=queries,
        meta_batch_size=meta_batch,
        train_batches=steps,
        val_tasks=eval_tasks,
        test_tasks=eval_tasks,
        split_seed=0,
        seed=seed,
    )


def paper_model(
    paper: PaperSettings,
    data: FewShotDataModule,
    *,
    ways: int,
    meta_batch: int,
    estimator: HypergradEstimator,
    inner_optimizer: DifferentiableOptimizer | None = None,
    **kwargs: Any,
) -> FewShotClassifier:
    """The paper's few-shot model for ``data``'s images (its backbone, inner steps and outer lr; the inner optimizer
    is the paper's unless one is given); ``kwargs`` go to :class:`FewShotClassifier`."""
    return FewShotClassifier(
        ways=ways,
        image_shape=data.image_shape,
        depth=paper.depth,
        width=paper.width,
        estimator=estimator,
        inner_optimizer=inner_optimizer if inner_optimizer is not None else paper.optimizer(),
        inner_steps=paper.inner_steps,
        meta_batch_size=meta_batch,
        outer_lr=paper.outer_lr,
        **kwargs,
    )


def run_one(config: RunConfig, runs_dir: str | Path) -> dict[str, Any]:
    """Trains and evaluates one (setting, method, seed), writes its record to ``runs_dir`` and returns it.

    The seed sets :func:`lightning.seed_everything` (the backbone's initialization) and the data module's ``seed``
    (the training, meta-validation and meta-test tasks); the class split stays fixed (``split_seed=0``).
    """
    torch.set_num_threads(config.threads)
    paper = config.paper
    estimator = get_estimator(config.method)
    start = time.perf_counter()
    with quiet():
        L.seed_everything(config.seed, verbose=False)  # the backbone's initialization; the tasks follow the data's seed
        data = run_data(
            config.dataset,
            config.root,
            ways=config.ways,
            shots=config.shots,
            queries=config.queries,
            meta_batch=config.meta_batch,
            steps=config.steps,
            eval_tasks=config.eval_tasks,
            seed=config.seed,
        )
        model = paper_model(paper, data, ways=config.ways, meta_batch=config.meta_batch, estimator=estimator)
        timer = StepTimer()
        fit = quiet_trainer(
            max_epochs=1, max_steps=config.steps, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer]
        )
        fit_start = time.perf_counter()
        fit.fit(model, datamodule=data)
        train_seconds = time.perf_counter() - fit_start
        evaluate = quiet_trainer()
        eval_start = time.perf_counter()
        val = evaluate.validate(model, datamodule=data, verbose=False)[0]
        test = evaluate.test(model, datamodule=data, verbose=False)[0]
        eval_seconds = time.perf_counter() - eval_start
    durations = timer.durations
    record = {
        "dataset": config.dataset,
        "root": config.root,
        "ways": config.ways,
        "shots": config.shots,
        "queries": config.queries,
        "method": str(estimator),
        "gamma": greedy_gamma(config.method),
        "jvps": jvps(estimator, paper.inner_steps),
        "seed": config.seed,
        "val_acc": float(val["val/acc"]),
        "val_ci95": float(val["val/acc_ci95"]),
        "test_acc": float(test["test/acc"]),
        "test_ci95": float(test["test/acc_ci95"]),
        "seconds_per_step": statistics.fmean(durations) if durations else None,
        "seconds_per_step_median": statistics.median(durations) if durations else None,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "wall_seconds": time.perf_counter() - start,
        "steps": config.steps,
        "steps_run": len(durations),
        "skipped_steps": model.skipped_steps,
        "meta_batch": config.meta_batch,
        "eval_tasks": config.eval_tasks,
        "config": paper.config,
        "inner_optimizer": paper.inner_optimizer[0].rpartition(".")[2],
        "inner_steps": paper.inner_steps,
        "inner_lr": paper.optimizer_setting("lr"),
        "inner_momentum": paper.optimizer_setting("momentum"),
        "outer_lr": paper.outer_lr,
        "backbone": f"{paper.depth}x{paper.width}",
        "split_seed": 0,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "timestamp": _now(),
    }
    write_json(Path(runs_dir) / config.file_name, record)
    return record
