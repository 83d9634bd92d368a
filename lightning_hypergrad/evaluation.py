"""Validation and test of a :class:`~lightning_hypergrad.BilevelModule`: its hooks (:class:`EvaluationHooks`), and the
per-task numbers, their mean and interval (:class:`TaskMetrics`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics.aggregation import CatMetric


class TaskMetrics(torch.nn.Module):
    """Gathers one number per task and metric in each stage (``val``, ``test``), across processes.

    ``update`` takes the numbers of one task; ``summary`` returns, for each metric of a stage, the mean over the
    tasks and the half-width of its 95% confidence interval (``1.96 * std / sqrt(n)``; zero for one task), and
    starts the stage afresh. torchmetrics' ``CatMetric`` gathers the tasks of every process before the summary.
    Non-finite numbers (a diverged inner loop) are kept, not dropped: a metric with a NaN or infinite task has a
    NaN mean, never the mean of the finite tasks alone, and ``Summary.nonfinite_tasks`` counts the tasks with
    any non-finite number.
    """

    def __init__(self) -> None:
        super().__init__()
        self.metrics = torch.nn.ModuleDict()

    def update(self, stage: str, values: dict[str, Any], device: torch.device) -> None:
        for key, value in values.items():
            self._metric(stage, key, device).update(torch.as_tensor(value, dtype=torch.float32, device=device))

    def summary(self, stage: str) -> Summary:
        metrics: dict[str, tuple[Tensor, Tensor]] = {}
        nonfinite: Tensor | None = None
        for name, metric in list(self.metrics.items()):
            if not name.startswith(f"{stage}__"):
                continue
            if not metric.update_count:  # a stage that saw no task (e.g. zero validation batches)
                continue
            values = metric.compute().float().reshape(-1)
            metric.reset()
            bad = ~torch.isfinite(values)
            nonfinite = bad if nonfinite is None or nonfinite.shape != bad.shape else nonfinite | bad
            mean = values.mean()
            ci95 = 1.96 * values.std() / math.sqrt(values.numel()) if values.numel() > 1 else torch.zeros(())
            if bool(bad.any()):
                ci95 = torch.full((), float("nan"))
            metrics[name.split("__", 1)[1]] = (mean, ci95)
        count = 0 if nonfinite is None else int(nonfinite.sum())
        return Summary(metrics, count, 0 if nonfinite is None else nonfinite.numel())

    def _metric(self, stage: str, key: str, device: torch.device) -> CatMetric:
        name = f"{stage}__{key}"
        if name not in self.metrics:
            # "disable": keep NaN (the default drops them, and would average the finite tasks alone)
            self.metrics[name] = CatMetric(nan_strategy="disable").to(device)
        return self.metrics[name]


@dataclass
class Summary:
    """The numbers of one stage: ``metrics[key] = (mean, ci95)``, and how many of ``tasks`` had a non-finite one."""

    metrics: dict[str, tuple[Tensor, Tensor]]
    nonfinite_tasks: int
    tasks: int


def clone_task(task: Any) -> Any:
    """Normal tensors from inference-mode ones, so that the inner loop can be differentiated in evaluation."""
    if isinstance(task, Tensor):
        return task.clone()
    if isinstance(task, dict):
        return {k: clone_task(v) for k, v in task.items()}
    if isinstance(task, (list, tuple)):
        return type(task)(clone_task(v) for v in task)
    return task


_STAGE_NAMES = {"val": "meta-validation", "test": "meta-test"}


class EvaluationHooks:
    """The validation and test hooks of a :class:`~lightning_hypergrad.BilevelModule`, as a mixin.

    Each task of a validation or test batch is adapted (the inner loop without a hypergradient) and its
    ``outer_loss`` and task metrics gathered in :class:`TaskMetrics`; at the stage's end each metric's mean and 95%
    interval over the tasks are logged (``val/acc``, ``val/acc_ci95``), with ``val/nonfinite_tasks``.
    """

    def evaluate_task(self, task: Any) -> dict[str, Tensor]:
        """``outer_loss`` and the task metrics of ``task`` after ``adapt`` (the trained network, online)."""
        with torch.inference_mode(False), torch.enable_grad():
            task = clone_task(task)
            params, h = self.adapt(task)
            with torch.no_grad():
                family = self.task_family()
                return {"outer_loss": family.bound(self.outer_loss)(params, h, task), **family.metrics(params, h, task)}

    def _evaluate(self, batch: Any, stage: str) -> None:
        for task in self.split_tasks(batch):
            self.evaluation.update(stage, self.evaluate_task(task), self.device)

    def _log_evaluation(self, stage: str) -> None:
        summary = self.evaluation.summary(stage)
        for key, (mean, ci95) in summary.metrics.items():
            self.log(f"{stage}/{key}", mean, prog_bar=key == "acc")
            self.log(f"{stage}/{key}_ci95", ci95)
        if not summary.tasks:
            return
        self.log(f"{stage}/nonfinite_tasks", float(summary.nonfinite_tasks))
        if summary.nonfinite_tasks:
            message = (
                f"{summary.nonfinite_tasks} of the {summary.tasks} {_STAGE_NAMES.get(stage, stage)} tasks have NaN or "
                f"infinite numbers (their inner loop has probably diverged: lower the inner optimizer's learning rate "
                f"or inner_steps); {stage}/outer_loss is logged as NaN and the count as {stage}/nonfinite_tasks"
            )
            if self.nonfinite == "raise":
                raise FloatingPointError(f"{message}; nonfinite='raise' stops the run (nonfinite: skip goes on)")
            self._warn_once(f"nonfinite_{stage}", message)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")
