"""First-order (FO) hypergradient: the direct term only."""

from __future__ import annotations

from lightning_hypergrad.estimators.base import Estimate, HypergradEstimator, outer_grads
from lightning_hypergrad.inner_loop import StepMode, unroll
from lightning_hypergrad.problem import BilevelProblem


class FO(HypergradEstimator):
    """First-order hypergradient ``grad_alpha L_val(w_T, alpha)``: ``w_T`` is treated as a constant.

    Costs the inner loop and one outer gradient. Identically zero for hyperparameters that the outer loss
    does not use directly (weight decay, learning rate).
    """

    name = "fo"

    def _estimate(self, problem: BilevelProblem, h):
        trajectory = unroll(problem, h, lambda t: StepMode.CONSTANT)
        loss, _, g_h = outer_grads(problem, trajectory.params, h)
        return Estimate(g_h, trajectory, loss)
