"""The outer learning-rate schedulers of a :class:`~lightning_hypergrad.BilevelModule`, stepped by Lightning's rule.

Manual optimization leaves the schedulers to the module. It steps them as Lightning does under automatic
optimization: a scheduler of ``interval="step"`` after the training batch whose index ``i`` (from 0, within the
epoch) has ``(i + 1) % frequency == 0``, one of ``interval="epoch"`` at the end of the epoch ``e`` with
``(e + 1) % frequency == 0``; ``ReduceLROnPlateau`` is given the value of its ``monitor`` from the logged metrics
(a missing one stops the run with the names that are there, or, with ``strict=False``, warns and skips the update).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn


def step_schedulers(module: L.LightningModule, interval: str, index: int) -> None:
    """Step ``module``'s schedulers of ``interval`` (``"step"`` or ``"epoch"``) after batch or epoch ``index``.

    Raises:
        ValueError: a ``ReduceLROnPlateau`` whose ``monitor`` is not among the logged metrics (``strict=True``).
    """
    if module._trainer is None:
        return
    trainer = module.trainer
    for config in trainer.lr_scheduler_configs:
        if config.interval != interval or (index + 1) % config.frequency != 0:
            continue
        value = None
        if config.reduce_on_plateau:
            value = trainer.callback_metrics.get(config.monitor)
            if value is None:
                message = (
                    f"ReduceLROnPlateau monitors {config.monitor!r}, which has not been logged; logged now: "
                    f"{', '.join(sorted(trainer.callback_metrics)) or 'nothing'}. Set the scheduler's monitor to one "
                    "of them (e.g. 'val/outer_loss' with interval 'epoch' and validation every epoch)"
                )
                if config.strict:
                    raise ValueError(message)
                rank_zero_warn(f"{message}; strict=False: the update is skipped", category=RuntimeWarning)
                continue
        module.lr_scheduler_step(config.scheduler, value)
