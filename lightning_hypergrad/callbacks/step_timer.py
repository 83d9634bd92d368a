"""``StepTimer``: the wall time of each training step, logged and kept for benchmarks."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class StepTimer(L.Callback):
    """Records the seconds of each training step, from ``on_train_batch_start`` to ``on_train_batch_end``.

    A step of a :class:`~lightning_hypergrad.BilevelModule` holds the inner loops, the hypergradient and the outer
    step; loading the batch (before ``on_train_batch_start``) is not counted. The times are in ``durations`` and
    logged as ``train/seconds_per_step``. A :class:`~lightning_hypergrad.BilevelModule` adds one to its trainer
    unless the trainer has one already, so this is the one step timer of a run.

    GPU kernels run asynchronously: a step's hooks return once its kernels are queued, not done. On a CUDA device
    the timer therefore waits for the device (``torch.cuda.synchronize``) at the start and at the end of each timed
    step, so that a duration holds the step's kernels and not those of the step before. The cost is one extra wait
    for the device per step (the wait at a step's start finds little queued since the previous step's end), on CUDA
    only: on other devices nothing changes.

    Example::

        >>> import statistics
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> timer = StepTimer()
        >>> trainer = L.Trainer(callbacks=[timer], max_steps=3, accelerator="cpu", logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(BoringModel())
        >>> len(timer.durations)
        3
        >>> statistics.median(timer.durations[1:]) > 0  # without the first step, which warms up
        True
    """

    def __init__(self) -> None:
        super().__init__()
        self.durations: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        _wait_for_device(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._start is not None:
            _wait_for_device(pl_module)
            self.durations.append(time.perf_counter() - self._start)
            self._start = None
            pl_module.log("train/seconds_per_step", self.durations[-1], batch_size=1)


def _wait_for_device(pl_module: L.LightningModule) -> None:
    """Waits for the module's CUDA device to finish its queued kernels; nothing on other devices."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)
