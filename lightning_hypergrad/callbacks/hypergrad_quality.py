"""``HypergradCallback``: how close the active estimator is to the exact hypergradient, logged during training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_hypergrad._checks import check_int
from lightning_hypergrad.estimators import RMD, AutoGreedy, HypergradEstimator, get_estimator
from lightning_hypergrad.inner_loop import cuda_devices, random_state, set_random_state


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
    ``hypergrad/cosine`` and ``hypergrad/norm_ratio`` of the hypergradient that the module's ``training_step``
    returns (``outputs["hypergrad"]``). With ``compare``, it also logs ``hypergrad/<spec>/cosine`` and
    ``hypergrad/<spec>/norm_ratio`` for each of those estimators side by side, ``<spec>`` being the estimator's
    spec string (``greedy(0.9)``; a ``/`` in it written ``%2F``). When the module's estimator is an
    :class:`~lightning_hypergrad.AutoGreedy`, the same reference chooses its discount (``hypergrad/auto_gamma``).
    The cost (one reference computation, plus one per compared estimator) is paid only on the steps it runs;
    batch-norm running statistics and the random state are restored afterwards, so the extra computations leave no
    trace: each one, and the module's own step, starts from the same random state (a model with dropout sees the same
    draws in each, and an exact estimator gives the reference's hypergradient). With an implicit
    estimator (``cg``, ``minres``, ``neumann``), every training step also logs what its solve saw for the step's last
    task: ``hypergrad/solver_residual`` (``|g_T - H x| / |g_T|``, where the solver reports one) and
    ``hypergrad/solver_hvps`` (the Hessian-vector products it used).

    Args:
        every_n_steps: run on the steps whose ``global_step`` is a multiple of this.
        reference: the estimator taken as exact (default ``RMD()``), or its spec string.
        compare: further estimators (or spec strings such as ``"t1t2"``) to measure against the reference.

    Raises:
        ValueError: ``every_n_steps`` < 1.

    Example::

        >>> from lightning_hypergrad import T1T2
        >>> callback = HypergradCallback(every_n_steps=50, compare=[T1T2(), "greedy(0.9)"])
        >>> [str(e) for e in (callback.reference, *callback.compare)]
        ['rmd', 't1t2', 'greedy(0.9)']
        >>> trainer = L.Trainer(callbacks=[callback], accelerator="cpu", logger=False)
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        reference: HypergradEstimator | str | None = None,
        compare: list[HypergradEstimator | str] | None = None,
    ) -> None:
        check_int("every_n_steps", every_n_steps, owner="HypergradCallback")
        self.every_n_steps = every_n_steps
        self.reference = get_estimator(reference) if reference is not None else RMD()
        if isinstance(compare, (str, HypergradEstimator)):  # one estimator, not a list of them
            compare = [compare]
        self.compare = [get_estimator(e) for e in compare or []]
        self._reference: list[Tensor] | None = None
        self._compared: dict[str, tuple[float, float]] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        """Check, before the first step, that the reference and every compared estimator can run on the module's
        problems (``truncated_rmd(50)`` with T = 10, ``fmd`` with too many hyperparameter entries, an estimator
        without a term for a learned initialization): otherwise they would fail at their first reference step."""
        if not hasattr(pl_module, "problem_outline"):
            return
        shape = pl_module.problem_outline()
        for role, estimator in [("reference", self.reference), *(("compare", e) for e in self.compare)]:
            try:
                estimator.validate(shape)
            except ValueError as error:
                raise ValueError(f"HypergradCallback {role}={estimator}: {error}") from None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self._reference = None
        if trainer.global_step % self.every_n_steps != 0:
            return
        buffers = {k: v.clone() for k, v in pl_module.named_buffers()}
        devices = cuda_devices(list(pl_module.parameters()))
        start = random_state(devices)
        try:
            tasks = pl_module.split_tasks(batch)
            self._reference = pl_module.meta_gradient(tasks, self.reference).hypergrads
            self._compared = {}
            for estimator in self.compare:
                set_random_state(start, devices)
                hypergrad = pl_module.meta_gradient(tasks, estimator).hypergrads
                label = str(estimator).replace("/", "%2F")  # a '/' would split the key's group
                self._compared[label] = cosine_and_norm_ratio(hypergrad, self._reference)
        finally:
            set_random_state(start, devices)
            with torch.no_grad():
                for name, buffer in pl_module.named_buffers():
                    buffer.copy_(buffers[name])
        if isinstance(pl_module.estimator, AutoGreedy):
            pl_module.estimator.start_grid()  # the module's step accumulates the grid's hypergradients

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        stats = getattr(pl_module.estimator, "last_stats", None)
        if stats is not None:  # an implicit estimator's solve of the step's last task
            if stats.residual is not None:
                pl_module.log("hypergrad/solver_residual", float(stats.residual))
            pl_module.log("hypergrad/solver_hvps", float(stats.hvps))
        if self._reference is None:
            return
        estimate = outputs["hypergrad"] if isinstance(outputs, dict) and "hypergrad" in outputs else None
        if estimate is None:
            raise RuntimeError(
                f"HypergradCallback needs the step's hypergradient: {type(pl_module).__name__}.training_step must "
                "return BilevelModule.training_step's dict (with its 'hypergrad' entry)"
            )
        if isinstance(pl_module.estimator, AutoGreedy):
            self._fit_gamma(trainer, pl_module, pl_module.estimator)
        cosine, ratio = cosine_and_norm_ratio(estimate, self._reference)
        pl_module.log("hypergrad/cosine", cosine)
        pl_module.log("hypergrad/norm_ratio", ratio)
        for label, (c, r) in self._compared.items():
            pl_module.log(f"hypergrad/{label}/cosine", c)
            pl_module.log(f"hypergrad/{label}/norm_ratio", r)
        self._reference = None

    def _fit_gamma(self, trainer: L.Trainer, pl_module, estimator: AutoGreedy) -> None:
        """Sets the estimator's discount to the one of its grid closest (cosine) to this step's reference."""
        grid = estimator.finish_grid()
        if grid is None:
            return
        cosines = torch.tensor([cosine_and_norm_ratio(g, self._reference)[0] for g in grid], dtype=torch.float64)
        if trainer.world_size > 1:  # every process must choose the same discount
            cosines = trainer.strategy.reduce(cosines.to(pl_module.device), reduce_op="mean").cpu()
        estimator.gamma = estimator.grid[int(torch.argmax(cosines))]
        pl_module.log("hypergrad/auto_gamma", estimator.gamma)
        for gamma, cosine in zip(estimator.grid, cosines.tolist()):
            pl_module.log(f"hypergrad/auto_gamma/{gamma:g}/cosine", cosine)
