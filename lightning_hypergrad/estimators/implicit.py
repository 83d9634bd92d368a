"""The shared part of the implicit-function-theorem (IFT) estimators."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_hypergrad.estimators.base import Estimate, HypergradEstimator, check_positive_int, outer_grads
from lightning_hypergrad.inner_loop import StepMode, leaves, unroll
from lightning_hypergrad.problem import BilevelProblem

Vector = list[Tensor]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


class ImplicitEstimator(HypergradEstimator):
    """``grad_alpha L_val - (d^2 L_train / d alpha d w) H^-1 g_T`` at the end of the inner loop.

    ``H`` is the Hessian of the inner objective in ``w`` at ``w_T`` (the inner loss plus the optimizer's L2
    weight decay), ``g_T = grad_w L_val(w_T)``. Exact only where ``w_T`` is a stationary point of the inner
    objective; the inner loop runs without a graph, so the memory does not grow with T. Subclasses choose how
    ``H^-1 g_T`` is approximated with Hessian-vector products.

    The optimizer's own settings cannot be hyperparameters here: the stationary point does not depend on them.
    """

    supports_optimizer_settings = False

    def __init__(self, iterations: int = 10, nonfinite: str = "warn") -> None:
        super().__init__(nonfinite)
        self.iterations = check_positive_int(type(self).__name__, "iterations (K)", iterations)

    def validate(self, problem: BilevelProblem) -> None:
        super().validate(problem)
        try:
            problem.optimizer.stationary_l2()
        except ValueError as error:
            raise ValueError(f"{type(self).__name__} cannot be used with this inner optimizer: {error}") from None

    @abstractmethod
    def solve(self, hvp: Callable[[Vector], Vector], rhs: Vector, problem: BilevelProblem) -> Vector:
        """Approximately solve ``H x = rhs`` given ``hvp(v) = H v``."""

    def _estimate(self, problem: BilevelProblem, h):
        trajectory = unroll(problem, h, lambda t: StepMode.CONSTANT)
        loss, g_w, g_h = outer_grads(problem, trajectory.params, h)
        l2 = problem.optimizer.stationary_l2()
        w = leaves(trajectory.params)
        inner_grad = torch.autograd.grad(problem.inner_loss(w, h), w, create_graph=True, materialize_grads=True)

        def hvp(v: Vector) -> Vector:
            hv = torch.autograd.grad(inner_grad, w, v, retain_graph=True, materialize_grads=True)
            return [x + l2 * y for x, y in zip(hv, v)] if l2 else list(hv)

        x = [v.detach() for v in self.solve(hvp, g_w, problem)]
        mixed = torch.autograd.grad(inner_grad, h, x, allow_unused=True)
        grads = []
        for direct, m in zip(g_h, mixed):
            if m is None:
                grads.append(direct)
            else:
                grads.append(-m if direct is None else direct - m)
        return Estimate(grads, trajectory, loss)
