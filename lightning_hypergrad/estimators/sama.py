"""SAMA (Choe et al., NeurIPS 2023): the implicit hypergradient with the base Jacobian taken as the identity.

At the end of the inner loop ``w_T`` is taken as a fixed point of the inner optimizer's step
``Phi(w, s, h) = w - u(d(w, h), s, h)`` (``d``: the gradient of the training objective, ``u``: the update the
optimizer makes of it). Implicit differentiation of ``w = Phi(w, s, h)`` gives
``dw_T/dh = (I - dPhi/dw)^{-1} dPhi/dh``, and ``I - dPhi/dw = (du/dd) H`` (the "base Jacobian" ``H``, the training
loss's Hessian, times the optimizer's "algorithmic adaptation" ``du/dd``). SAMA takes ``H`` as the identity but
keeps ``du/dd``, so that::

    dL_val/dh  ~  grad_h L_val(w_T)  +  g_T dPhi(w_T, s_T, h)/dh      (g_T = grad_w L_val(w_T), w_T held)

    g_T dPhi/dh = g_T dPhi/dh|_d  -  d/dh <(du/dd)^T g_T, grad_w L_train(w_T, h)>

The second term is a mixed second derivative; it is taken by the central difference of ``grad_h L_train`` along
``v = (dPhi/dd)^T g_T`` (one first-order vector-Jacobian product through the optimizer's update at ``s_T``: ``-lr g_T``
for SGD, Adam's own derivative at its moments for Adam), ``eps = radius / |v|``. So no gradient in the path is
of second order: the estimator runs where double backward does not (``torch.compile``'s backward, functions marked
``once_differentiable``).

The learning rate stays inside ``v`` (as in :class:`~lightning_hypergrad.T1T2FD`), so the estimate is in the units of
the other estimators: SAMA is T1-T2's one-step term taken at the end point ``(w_T, s_T)``, on the training
objective (``inner_loss``, not a step's mini-batch), instead of at the last step's start ``(w_{T-1}, s_{T-1})``.
The update is the optimizer's step T + 1 (from the state ``s_T``, e.g. Adam's bias correction at T + 1), so an
optimizer whose settings follow a schedule must define them one step past its end. A learned initialization gets
first-order MAML's term ``g_T dw_0/dh``, as :class:`~lightning_hypergrad.FO`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_hypergrad.estimators.base import AdjointEstimator, Estimate, add_grads, outer_grads
from lightning_hypergrad.estimators.finite_difference import check_radius, difference_term
from lightning_hypergrad.estimators.registry import Capabilities, register_estimator
from lightning_hypergrad.inner_loop import StepMode, unroll
from lightning_hypergrad.problem import BilevelProblem, leaves


@register_estimator
class SAMA(AdjointEstimator):
    """SAMA: ``grad_h L_val(w_T) + g_T dPhi(w_T, s_T, h)/dh``, the mixed derivative by a central difference along
    ``(dPhi/dd)^T g_T`` (see the module). No double backward. Spec string: ``sama``.

    Args:
        radius: the norm of the finite difference's step in ``w`` (> 0; 0.01 as DARTS').

    Raises:
        ValueError: ``radius`` not > 0.
    """

    name = "sama"
    spec_options = ("radius", "nonfinite")
    capabilities = Capabilities(
        computes="SAMA: implicit with the base Jacobian as the identity, `du/dd` kept; the mixed term by a central "
        "difference along `(dPhi/dd)^T g_T` at `(w_T, s_T)`",
        cost="1 training gradient + 2 training-loss gradients, first order",
        memory="O(P+H)",
        example="sama",
        learned_init=True,
        double_backward=False,
    )

    def __init__(self, radius: float = 0.01, nonfinite: str = "warn") -> None:
        super().__init__(nonfinite)
        self.radius = check_radius("SAMA", radius)

    def products(self, inner_steps: int | None) -> int | None:
        return 2

    def _estimate(self, problem: BilevelProblem, h: list[Tensor]) -> Estimate:
        trajectory = unroll(problem, h, lambda t: StepMode.CONSTANT)
        loss, g_w, g_h = outer_grads(problem, trajectory.params, h)
        w = [x.detach() for x in trajectory.params]
        h_const = [x.detach() for x in h]
        with torch.enable_grad():
            at = leaves(w)
            d = torch.autograd.grad(problem.inner_loss(at, h_const), at, materialize_grads=True)
        total: list[Tensor | None] = list(g_h)
        term = difference_term(
            problem, w, trajectory.state.detached(), list(d), problem.inner_loss, h, g_w, self.radius
        )
        add_grads(total, term)
        return Estimate(total, trajectory, loss, init_adjoint=g_w)
