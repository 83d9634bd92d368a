"""Exact reverse-mode differentiation (RMD) through the unrolled inner loop, and its truncation."""

from __future__ import annotations

import torch

from lightning_hypergrad.estimators.base import Estimate, HypergradEstimator, check_positive_int
from lightning_hypergrad.inner_loop import StepMode, unroll
from lightning_hypergrad.problem import BilevelProblem


class _ReverseMode(HypergradEstimator):
    """Reverse mode through the inner steps from :meth:`_first_differentiated_step` to T."""

    def _first_differentiated_step(self, problem: BilevelProblem) -> int:
        raise NotImplementedError

    def validate(self, problem: BilevelProblem) -> None:
        super().validate(problem)
        self._first_differentiated_step(problem)

    def _estimate(self, problem: BilevelProblem, h):
        start = self._first_differentiated_step(problem)
        trajectory = unroll(problem, h, lambda t: StepMode.CHAIN if t >= start else StepMode.CONSTANT)
        loss = problem.outer_loss(trajectory.params, h)
        grads = torch.autograd.grad(loss, h, allow_unused=True)
        return Estimate(list(grads), trajectory, loss.detach())


class TruncatedRMD(_ReverseMode):
    """Reverse mode through the last ``K`` inner steps only (Shaban et al., 2019)::

        grad_alpha L_val(w_T) + sum_{t=T-K+1}^T g_T (prod_{k>t} A_k) B_t

    The first ``T - K`` steps run without a graph. Memory O(P K). ``K = T`` is exact RMD; ``K = 1`` is T1-T2.
    Spec string: ``truncated_rmd(K)``.

    Args:
        truncate: ``K``, the number of last steps differentiated (at most T).

    Raises:
        ValueError: ``truncate`` < 1, or larger than the problem's number of steps.
    """

    name = "truncated_rmd"
    spec_args = ("truncate",)

    def __init__(self, truncate: int = 1, nonfinite: str = "warn") -> None:
        super().__init__(nonfinite)
        self.truncate = check_positive_int("TruncatedRMD", "truncate (K)", truncate)

    def _first_differentiated_step(self, problem: BilevelProblem) -> int:
        if self.truncate > problem.steps:
            raise ValueError(
                f"TruncatedRMD truncate (K={self.truncate}) exceeds the number of inner steps (T={problem.steps}); "
                "use K <= T, or RMD for the whole trajectory"
            )
        return problem.steps - self.truncate + 1


class RMD(_ReverseMode):
    """The exact hypergradient (eq. 3-5) by reverse mode through all T inner steps (Franceschi et al., 2017)::

        d L_val / d alpha = grad_alpha L_val(w_T) + sum_{t=1}^T g_T (prod_{k=t+1}^T A_k) B_t

    Memory O(P T): the graph of every step is kept until the backward pass. About twice the cost of the loop.
    Spec string: ``rmd``.
    """

    name = "rmd"

    def _first_differentiated_step(self, problem: BilevelProblem) -> int:
        return 1
