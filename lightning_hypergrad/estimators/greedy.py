"""The generalized greedy hypergradient (eq. 6 of the paper) and T1-T2, its limit as gamma -> 0."""

from __future__ import annotations

import torch

from lightning_hypergrad.estimators.base import Estimate, HypergradEstimator, add_grads
from lightning_hypergrad.inner_loop import InnerStep, StepMode, unroll
from lightning_hypergrad.problem import BilevelProblem


class _WeightedGreedy(HypergradEstimator):
    """``grad_alpha L_val(w_T) + sum_t c_t g_t B_t`` for step weights ``c_t`` given by :meth:`weight`.

    ``g_t = grad_w L_val(w_t, alpha)`` and ``B_t = dPhi(w_{t-1}, s_{t-1}, alpha) / d alpha`` with ``w_{t-1}`` and
    ``s_{t-1}`` held constant, so ``g_t B_t`` is one vector-Jacobian product of the step alone: no graph lives
    from one inner step to the next and the memory does not grow with T.

    A learned initialization ``w_0(alpha)`` (MAML) adds ``g_T B_0`` with ``B_0 = dw_0 / d alpha``. The exact
    hypergradient holds it as ``g_T A_T ... A_1 B_0``; eq. 6 is FO's direct term plus one term per step of ``Phi``,
    and ``w_0`` is not a step, so it keeps FO's reading of that term (every ``A_t`` taken as the identity: first-order
    MAML) rather than the greedy one ``gamma^T g_0 B_0``, which would judge the initialization by the validation loss
    at ``w_0`` itself. With ``alpha`` entering through ``w_0`` alone, every member of the family is first-order MAML.
    """

    supports_learned_init = True

    def weight(self, t: int, steps: int) -> float:
        raise NotImplementedError

    def _estimate(self, problem: BilevelProblem, h):
        steps = problem.steps
        total: list = [None] * len(h)
        h_const = [x.detach() for x in h]
        final: dict = {}

        def on_step(step: InnerStep) -> None:
            if step.mode is StepMode.CONSTANT:
                return
            # One backward of L_val(Phi(w_{t-1}, s_{t-1}, h)) gives g_t B_t by the chain rule (and, at t = T, the
            # direct term too): the outer gradient and the vector-Jacobian product in a single pass.
            last = step.t == steps
            loss = problem.outer_loss(step.params, h if last else h_const)
            c = self.weight(step.t, steps)
            wrt = [*h, *step.params] if last and problem.learned_init else h
            found = torch.autograd.grad(loss if c == 1 else c * loss, wrt, allow_unused=True)
            add_grads(total, found[: len(h)])
            if last:
                final["loss"] = loss.detach()
                if problem.learned_init:  # g_T, for the initialization's term (c = 1 at t = T)
                    final["g_T"] = [
                        torch.zeros_like(w) if g is None else g for w, g in zip(step.params, found[len(h) :])
                    ]

        def mode(t: int) -> StepMode:
            return StepMode.LOCAL if self.weight(t, steps) != 0 else StepMode.CONSTANT

        trajectory = unroll(problem, h, mode, on_step)
        return Estimate(total, trajectory, final["loss"], init_adjoint=final.get("g_T"))


class Greedy(_WeightedGreedy):
    """The generalized greedy hypergradient of the paper, eq. 6::

        d_alpha L_val(w_T, alpha; gamma) = grad_alpha L_val(w_T, alpha) + sum_{t=1}^T gamma^(T-t) g_t B_t

    with ``g_t = grad_{w_t} L_val(w_t, alpha)`` and ``B_t = dPhi(w_{t-1}, alpha) / d alpha``. It replaces the
    product of Jacobians ``prod_{k>t} A_k`` of the exact hypergradient by ``gamma^(T-t)`` and ``g_T`` by ``g_t``.
    Cost: the inner loop plus T vector-Jacobian products and T outer gradients; memory O(P + H).

    Args:
        gamma: the discount, in (0, 1]. ``gamma = 1`` weights every step equally; ``gamma -> 0`` gives T1-T2
            (Proposition 4.1). The paper found 0.99 best.

    Raises:
        ValueError: ``gamma`` outside (0, 1].

    Example::

        >>> Greedy(gamma=0.99)
        Greedy(gamma=0.99)
    """

    name = "greedy"
    spec_args = ("gamma",)

    def __init__(self, gamma: float = 0.99, nonfinite: str = "warn") -> None:
        super().__init__(nonfinite)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
            raise ValueError(
                f"Greedy gamma must be in (0, 1], got {gamma!r}: gamma = 1 weights every inner step equally and "
                "gamma -> 0 recovers T1-T2 (use the T1T2 estimator for that)"
            )
        self.gamma = float(gamma)

    def weight(self, t: int, steps: int) -> float:
        return self.gamma ** (steps - t)


class T1T2(_WeightedGreedy):
    """T1-T2 (Luketina et al., 2016): the greedy term of the last step only::

        grad_alpha L_val(w_T, alpha) + g_T B_T

    Cost: the inner loop plus one vector-Jacobian product; memory O(P + H).
    """

    name = "t1t2"

    def weight(self, t: int, steps: int) -> float:
        return 1.0 if t == steps else 0.0
