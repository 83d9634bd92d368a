"""The outer learning-rate schedulers of a :class:`~lightning_hypergrad.BilevelModule`, stepped by Lightning's rule.

Manual optimization leaves the schedulers to the module. It steps them as Lightning does under automatic
optimization: a scheduler of ``interval="step"`` after the training batch whose index ``i`` (from 0, within the
epoch) has ``(i + 1) % frequency == 0``, also when the step was skipped for a non-finite hypergradient (the step
counter advances then too); one of ``interval="epoch"`` at the end of the epoch ``e`` with
``(e + 1) % frequency == 0``. ``ReduceLROnPlateau`` is refused before training starts: Lightning drops a scheduler's
``monitor`` under manual optimization, so there is no metric to step it with.
"""

from __future__ import annotations

import lightning as L
from torch.optim.lr_scheduler import ReduceLROnPlateau


def check_schedulers(module: L.LightningModule) -> None:
    """Raise ``ValueError`` for a scheduler that the module cannot step (``ReduceLROnPlateau``), before any step."""
    if module._trainer is None:
        return
    for config in module.trainer.lr_scheduler_configs:
        if isinstance(config.scheduler, ReduceLROnPlateau):
            raise ValueError(
                f"{type(module).__name__}.configure_optimizers returns a ReduceLROnPlateau, which BilevelModule "
                "cannot step: Lightning drops the scheduler's `monitor` under manual optimization, so no metric "
                "reaches it. Use a schedule without a metric (StepLR, CosineAnnealingLR, ...), or keep the plateau "
                "scheduler out of configure_optimizers and step it in on_validation_epoch_end with "
                "self.trainer.callback_metrics['val/outer_loss']"
            )


def step_schedulers(module: L.LightningModule, interval: str, index: int) -> None:
    """Step ``module``'s schedulers of ``interval`` (``"step"`` or ``"epoch"``) after batch or epoch ``index``."""
    if module._trainer is None:
        return
    for config in module.trainer.lr_scheduler_configs:
        if config.interval == interval and (index + 1) % config.frequency == 0:
            module.lr_scheduler_step(config.scheduler, None)
