"""First-order (FO) hypergradient: the direct term only."""

from __future__ import annotations

from lightning_hypergrad.estimators.base import AdjointEstimator, Estimate, outer_grads
from lightning_hypergrad.estimators.registry import Capabilities, register_estimator
from lightning_hypergrad.inner_loop import StepMode, unroll
from lightning_hypergrad.problem import BilevelProblem


@register_estimator
class FO(AdjointEstimator):
    """First-order hypergradient ``grad_alpha L_val(w_T, alpha)``: ``w_T`` is treated as a constant.

    Costs the inner loop and one outer gradient. Identically zero for hyperparameters that the outer loss
    does not use directly (weight decay, learning rate).

    With a learned initialization ``w_0(alpha)`` (MAML), FO adds ``g_T dw_0/dalpha`` (``g_T = grad_w L_val(w_T)``):
    the Jacobians ``A_t`` of every step taken as the identity, which is first-order MAML (Finn et al., 2017).
    """

    name = "fo"
    capabilities = Capabilities(
        computes="`grad_alpha L_val(w_T)`; with a learned initialization, first-order MAML",
        cost="none",
        memory="O(P+H)",
        example="fo",
        learned_init=True,
        double_backward=False,
    )

    def products(self, inner_steps: int | None) -> int | None:
        return 0

    def _estimate(self, problem: BilevelProblem, h):
        trajectory = unroll(problem, h, lambda t: StepMode.CONSTANT)
        loss, g_w, g_h = outer_grads(problem, trajectory.params, h)
        return Estimate(g_h, trajectory, loss, init_adjoint=g_w)
