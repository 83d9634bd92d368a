"""T1-T2 and Greedy without double backward: each step's term ``g_t B_t`` by a central finite difference.

The term of step t is ``g_t B_t`` with ``B_t = dPhi(w_{t-1}, s_{t-1}, h) / dh`` (``w_{t-1}``, ``s_{t-1}`` held
constant). The step reads ``h`` through the gradient ``d = grad_w L_train(w_{t-1}, h)`` and, where the optimizer's
settings are hyperparameters, directly; so, with ``u = (dPhi/dd)^T g_t`` (one first-order vector-Jacobian product
through the optimizer's update: ``-lr g_t`` for plain SGD, Adam's own derivative for Adam)::

    g_t B_t = g_t dPhi/dh|_d  +  d/dh <u, grad_w L_train(w_{t-1}, h)>
            ~ g_t dPhi/dh|_d  +  (grad_h L_train(w_{t-1} + eps u, h) - grad_h L_train(w_{t-1} - eps u, h)) / (2 eps)

with ``eps = radius / |u|``: the perturbation of ``w`` has the norm ``radius``. That is DARTS' second-order
approximation (Liu et al., ICLR 2019) with the learning-rate factor where it belongs (inside ``u``). Every gradient
is first order: no ``create_graph`` anywhere, so the estimators run through operations without a second derivative.
The error of the central difference is O(eps^2) (the third derivative of ``L_train``); in float32, rounding bounds
``radius`` from below (the default 0.01 is DARTS').
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_hypergrad.estimators.base import AdjointEstimator, Estimate, add_grads, check_gamma
from lightning_hypergrad.estimators.registry import Capabilities, register_estimator
from lightning_hypergrad.inner_loop import InnerStep, StepMode, unroll
from lightning_hypergrad.optim.base import OptimizerState
from lightning_hypergrad.problem import BilevelProblem, leaves


def check_radius(owner: str, radius: object) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not 0 < radius < math.inf:
        raise ValueError(
            f"{owner} radius must be a finite number > 0 (the norm of the finite difference's step in w; DARTS "
            f"uses 0.01), got {radius!r}"
        )
    return float(radius)


def step_term(problem: BilevelProblem, step: InnerStep, h: list[Tensor], g: list[Tensor], radius: float) -> list:
    """``g B_t`` of one inner step, by a central difference along ``u = (dPhi/dd)^T g`` (see the module)."""
    w = [x.detach() for x in step.params_before]
    return difference_term(
        problem, w, step.state_before.detached(), leaves(step.grads), problem.step_loss(step.t), h, g, radius
    )


def difference_term(
    problem: BilevelProblem,
    w: list[Tensor],
    state: OptimizerState,
    d: list[Tensor],
    loss: Callable[[list[Tensor], list[Tensor]], Tensor],
    h: list[Tensor],
    g: list[Tensor],
    radius: float,
) -> list:
    """``g dPhi(w, state, h)/dh`` for the step from ``w`` that takes the gradient ``d`` of ``loss``, ``w`` and
    ``state`` held constant: the settings' own term plus the central difference of ``grad_h loss`` along
    ``u = (dPhi/dd)^T g``, ``eps = radius / |u|`` (see the module)."""
    with torch.enable_grad():
        d = leaves(d)
        stepped, _ = problem.optimizer.update(w, d, state, h)
        pairs = [(y, gi) for y, gi in zip(stepped, g) if y.requires_grad]
        found = torch.autograd.grad([y for y, _ in pairs], [*d, *h], [gi for _, gi in pairs], allow_unused=True)
    u = [torch.zeros_like(x) if ui is None else ui for x, ui in zip(w, found[: len(d)])]
    total: list[Tensor | None] = list(found[len(d) :])  # the settings' own term, g dPhi/dh with d held
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in u]))
    if float(norm) == 0.0:
        return total
    eps = radius / norm
    with torch.enable_grad():
        above, below = loss([x + eps * y for x, y in zip(w, u)], h), loss([x - eps * y for x, y in zip(w, u)], h)
        if not above.requires_grad:  # the training loss does not read h (h enters through w_0 or the settings)
            return total
        plus = torch.autograd.grad(above, h, allow_unused=True)
        minus = torch.autograd.grad(below, h, allow_unused=True)
    difference = [None if p is None else (p - m) / (2 * eps) for p, m in zip(plus, minus)]
    add_grads(total, difference)
    return total


class _FiniteDifferenceGreedy(AdjointEstimator):
    """``grad_alpha L_val(w_T) + sum_t c_t g_t B_t`` with each term by :func:`step_term`; weights from :meth:`weight`.

    The loop runs without graphs; each weighted step costs one outer gradient, one VJP through the optimizer's
    update and two gradients of the training loss. A learned initialization gets FO's term ``g_T dw_0/dalpha``
    (first-order MAML), as :class:`~lightning_hypergrad.Greedy` reads it.
    """

    radius: float

    def weight(self, t: int, steps: int) -> float:
        raise NotImplementedError

    def _estimate(self, problem: BilevelProblem, h: list[Tensor]) -> Estimate:
        steps = problem.steps
        total: list[Tensor | None] = [None] * len(h)
        h_const = [x.detach() for x in h]
        final: dict = {}

        def on_step(step: InnerStep) -> None:
            c = self.weight(step.t, steps)
            last = step.t == steps
            if c == 0 and not last:
                return
            w_t = leaves(step.params)
            with torch.enable_grad():
                loss = problem.outer_loss(w_t, h if last else h_const)
                found = torch.autograd.grad(loss, [*w_t, *h] if last else w_t, allow_unused=True)
            g = [torch.zeros_like(w) if x is None else x for w, x in zip(w_t, found[: len(w_t)])]
            if last:  # the direct term, and g_T for a learned initialization
                add_grads(total, found[len(w_t) :])
                final["loss"], final["g_T"] = loss.detach(), g
            if c != 0:
                add_grads(total, step_term(problem, step, h, [c * x for x in g], self.radius))

        trajectory = unroll(problem, h, lambda t: StepMode.CONSTANT, on_step)
        return Estimate(total, trajectory, final["loss"], init_adjoint=final["g_T"])


@register_estimator
class GreedyFD(_FiniteDifferenceGreedy):
    """Greedy (eq. 6) with each step's term by a central finite difference: no double backward::

        grad_alpha L_val(w_T) + sum_{t=1}^T gamma^(T-t) g_t B_t,   g_t B_t by a central difference

    Equal to :class:`~lightning_hypergrad.Greedy` up to O(radius^2). Spec string: ``greedy_fd(0.99)``.

    Args:
        gamma: the discount, in (0, 1].
        radius: the norm of the finite difference's step in ``w`` (> 0).

    Raises:
        ValueError: ``gamma`` outside (0, 1] or ``radius`` not > 0.
    """

    name = "greedy_fd"
    spec_args = ("gamma",)
    spec_options = ("radius", "nonfinite")
    capabilities = Capabilities(
        computes="Greedy (eq. 6), each `g_t B_t` by a central difference of `grad_alpha L_train` along "
        "`(dPhi/dd)^T g_t`",
        cost="T outer gradients + 2T training-loss gradients, all first order",
        memory="O(P+H)",
        example="greedy_fd(0.99)",
        learned_init=True,
        double_backward=False,
    )

    def __init__(self, gamma: float = 0.99, radius: float = 0.01, nonfinite: str = "warn") -> None:
        super().__init__(nonfinite)
        self.gamma = check_gamma("GreedyFD", gamma)
        self.radius = check_radius("GreedyFD", radius)

    def weight(self, t: int, steps: int) -> float:
        return self.gamma ** (steps - t)

    def products(self, inner_steps: int | None) -> int | None:
        return None if inner_steps is None else 2 * inner_steps


@register_estimator
class T1T2FD(_FiniteDifferenceGreedy):
    """T1-T2 with its term ``g_T B_T`` by a central finite difference (DARTS' second-order approximation, with the
    learning-rate factor): no double backward. Equal to :class:`~lightning_hypergrad.T1T2` up to O(radius^2).
    Spec string: ``t1t2_fd``.

    Args:
        radius: the norm of the finite difference's step in ``w`` (> 0).

    Raises:
        ValueError: ``radius`` not > 0.
    """

    name = "t1t2_fd"
    spec_options = ("radius", "nonfinite")
    capabilities = Capabilities(
        computes="T1-T2, `g_T B_T` by a central difference (DARTS' form, the learning rate inside)",
        cost="2 training-loss gradients, first order",
        memory="O(P+H)",
        example="t1t2_fd",
        learned_init=True,
        double_backward=False,
    )

    def __init__(self, radius: float = 0.01, nonfinite: str = "warn") -> None:
        super().__init__(nonfinite)
        self.radius = check_radius("T1T2FD", radius)

    def weight(self, t: int, steps: int) -> float:
        return 1.0 if t == steps else 0.0

    def products(self, inner_steps: int | None) -> int | None:
        return 2
