"""``StepTimer``: the wall time of each training step, logged and kept for benchmarks."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class StepTimer(L.Callback):
    """Records the seconds of each training step, from ``on_train_batch_start`` to ``on_train_batch_end``.

    A step of a :class:`~lightning_hypergrad.BilevelModule` holds the inner loops, the hypergradient and the outer
    step; loading the batch (before ``on_train_batch_start``) is not counted. The times are in ``durations`` and
    logged as ``train/seconds_per_step``. A :class:`~lightning_hypergrad.BilevelModule` adds one to its trainer
    unless the trainer has one already, so this is the one step timer of a run.

    Example::

        timer = StepTimer()
        L.Trainer(callbacks=[timer]).fit(model, data)
        statistics.median(timer.durations[1:])  # without the first step, which warms up
    """

    def __init__(self) -> None:
        super().__init__()
        self.durations: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._start is not None:
            self.durations.append(time.perf_counter() - self._start)
            self._start = None
            pl_module.log("train/seconds_per_step", self.durations[-1], batch_size=1)
