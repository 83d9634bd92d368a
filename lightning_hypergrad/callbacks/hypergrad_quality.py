"""``HypergradCallback``: how close the active estimator is to the exact hypergradient, logged during training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_hypergrad.estimators import RMD, HypergradEstimator


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).double()


def cosine_and_norm_ratio(estimate: Sequence[Tensor], reference: Sequence[Tensor]) -> tuple[float, float]:
    """Cosine similarity and norm ratio ``|estimate| / |reference|`` of two hypergradients."""
    a, b = _flat(estimate), _flat(reference)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if float(na) == 0.0 or float(nb) == 0.0:
        return (1.0 if float(na) == float(nb) else 0.0), (float("nan") if float(nb) == 0 else float(na / nb))
    return float((a @ b) / (na * nb)), float(na / nb)


class HypergradCallback(L.Callback):
    """Logs the cosine similarity and the norm ratio of the module's hypergradient to the exact (RMD) one.

    Every ``every_n_steps`` training steps, before the module's own step, it computes the reference
    hypergradient for the same meta-batch of tasks and the same hyperparameters, and after the step logs
    ``hypergrad/cosine`` and ``hypergrad/norm_ratio``. With ``compare``, it also logs
    ``hypergrad/<name>/cosine`` and ``hypergrad/<name>/norm_ratio`` for each of those estimators side by side.
    The cost (one reference computation, plus one per compared estimator) is paid only on the steps it runs;
    batch-norm running statistics are restored afterwards, so the extra computations leave no trace.

    Args:
        every_n_steps: run on the steps whose ``global_step`` is a multiple of this.
        reference: the estimator taken as exact (default ``RMD()``).
        compare: further estimators to measure against the reference.

    Raises:
        ValueError: ``every_n_steps`` < 1.

    Example::

        trainer = L.Trainer(callbacks=[HypergradCallback(every_n_steps=50, compare=[T1T2(), FO()])])
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        reference: HypergradEstimator | None = None,
        compare: list[HypergradEstimator] | None = None,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"HypergradCallback every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.reference = reference if reference is not None else RMD()
        self.compare = list(compare or [])
        self._reference: list[Tensor] | None = None
        self._compared: dict[str, tuple[float, float]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self._reference = None
        if trainer.global_step % self.every_n_steps != 0:
            return
        buffers = {k: v.clone() for k, v in pl_module.named_buffers()}
        try:
            tasks = pl_module.split_tasks(batch)
            self._reference, _ = pl_module.meta_gradient(tasks, self.reference)
            self._compared = {}
            for estimator in self.compare:
                hypergrad, _ = pl_module.meta_gradient(tasks, estimator)
                self._compared[_label(estimator)] = cosine_and_norm_ratio(hypergrad, self._reference)
        finally:
            with torch.no_grad():
                for name, buffer in pl_module.named_buffers():
                    buffer.copy_(buffers[name])
        pl_module.capture_hypergrad = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._reference is None:
            return
        pl_module.capture_hypergrad = False
        estimate = pl_module.last_hypergrad
        pl_module.last_hypergrad = None
        cosine, ratio = cosine_and_norm_ratio(estimate, self._reference)
        pl_module.log("hypergrad/cosine", cosine)
        pl_module.log("hypergrad/norm_ratio", ratio)
        for label, (c, r) in self._compared.items():
            pl_module.log(f"hypergrad/{label}/cosine", c)
            pl_module.log(f"hypergrad/{label}/norm_ratio", r)
        self._reference = None


def _label(estimator: HypergradEstimator) -> str:
    gamma = getattr(estimator, "gamma", None)
    return f"{estimator.name}_{gamma}" if gamma is not None else estimator.name
