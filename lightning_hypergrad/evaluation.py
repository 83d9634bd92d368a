"""Validation and test of a :class:`~lightning_hypergrad.BilevelModule`: per-task numbers, their mean and interval."""

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
    NaN mean, never the mean of the finite tasks alone, and :attr:`Summary.nonfinite_tasks` counts the tasks with
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
