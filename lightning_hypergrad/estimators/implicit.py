"""The shared part of the implicit-function-theorem (IFT) estimators."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_hypergrad.estimators._linalg import (  # noqa: F401 (Vector, dot, power_iteration: imported from here)
    Vector,
    dot,
    negative_curvature_tolerance,
    power_iteration,
)
from lightning_hypergrad.estimators.base import AdjointEstimator, Estimate, check_positive_int, outer_grads
from lightning_hypergrad.inner_loop import StepMode, leaves, unroll
from lightning_hypergrad.optim.sgd import SGD
from lightning_hypergrad.problem import BilevelProblem

DAMPING_ONE_OVER_LR = "1/lr"
"""The ``damping`` value that stands for ``1 /`` the inner SGD's learning rate."""


def check_tolerance(owner: str, tol: object) -> float:
    """``tol`` checked as a solver's relative residual tolerance: a finite number >= 0."""
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
        raise ValueError(f"{owner} tol must be a finite number >= 0, got {tol!r}")
    return float(tol)


def sgd_rate(problem: BilevelProblem) -> float | None:
    """The inner optimizer's learning rate where it is an SGD with a fixed number for it, else ``None``."""
    opt = problem.optimizer
    if isinstance(opt, SGD) and not callable(opt.lr):
        return float(opt.lr)
    return None


@dataclass
class SolveStats:
    """What the inverse-Hessian solve of the last problem saw, for a callback to log (``dataclasses.asdict``).

    ``H`` is the damped inner Hessian ``H + damping I`` that the solve inverts.

    Attributes:
        hvps: the Hessian-vector products the solve used (power iterations and series terms, or CG steps).
        lambda_max: the largest ``|H v| / |v|`` over the vectors the solve multiplied: a lower bound of the
            spectral radius of ``H`` (``lambda_max`` where ``H`` is positive semi-definite). With Neumann's
            ``scale="auto"`` it is at least the power-iteration estimate that set the scale.
        min_curvature: the smallest Rayleigh quotient ``v . H v / |v|^2`` over those vectors; negative: ``H`` has
            a negative eigenvalue at ``w_T`` (its smallest eigenvalue is at most this).
        scale: the Neumann series' scale (``None`` for CG).
        residual: CG's final residual ``|g_T - H x| / |g_T|`` (``None`` for Neumann).
    """

    hvps: int
    lambda_max: float
    min_curvature: float
    scale: float | None = None
    residual: float | None = None


class _Monitor:
    """Wraps ``hvp``: counts the products and tracks the extremes of ``|Hv| / |v|`` and ``v . Hv / |v|^2``."""

    def __init__(self, hvp: Callable[[Vector], Vector]) -> None:
        self.hvp = hvp
        self.count = 0
        self.max_gain: Tensor | None = None
        self.min_curvature: Tensor | None = None

    def __call__(self, v: Vector) -> Vector:
        hv = self.hvp(v)
        self.count += 1
        vv = dot(v, v).clamp_min(torch.finfo(v[0].dtype).tiny)
        gain = (dot(hv, hv) / vv).sqrt()
        curvature = dot(v, hv) / vv
        if self.max_gain is None or self.min_curvature is None:
            self.max_gain, self.min_curvature = gain, curvature
        else:
            self.max_gain = torch.maximum(self.max_gain, gain)
            self.min_curvature = torch.minimum(self.min_curvature, curvature)
        return hv

    def extremes(self) -> tuple[float, float]:
        """``(max |Hv|/|v|, min v.Hv/|v|^2)`` as numbers (one host sync); zeros before any product."""
        if self.max_gain is None or self.min_curvature is None:
            return 0.0, 0.0
        gain, curvature = torch.stack([self.max_gain, self.min_curvature]).tolist()
        return gain, curvature


class ImplicitEstimator(AdjointEstimator):
    """``grad_alpha L_val - (d^2 L_train / d alpha d w) (H + damping I)^-1 g_T`` at the end of the inner loop.

    ``H`` is the Hessian of the inner objective in ``w`` at ``w_T`` (the inner loss plus the optimizer's L2
    weight decay), ``g_T = grad_w L_val(w_T)``. Exact only where ``w_T`` is a stationary point of the inner
    objective (and ``damping = 0``); the inner loop runs without a graph, so the memory does not grow with T.
    Subclasses choose how the inverse-Hessian-vector product is approximated with Hessian-vector products (HVPs).

    Besides the HVPs of the solve, one problem costs one gradient of the inner loss with a graph, one gradient
    of the outer loss, and one mixed second-derivative product ``(d^2 L_train / d alpha d w) x``.

    ``damping`` (Tikhonov) adds ``damping I`` to ``H``: it makes a Hessian with small negative eigenvalues (a
    non-convex inner loss away from a minimum) positive definite and bounds the inverse, at the price of a bias.
    ``damping="1/lr"`` takes ``1 /`` the inner SGD's learning rate: it bounds the inverse's norm by the learning
    rate, the size of one plain (momentum-free) inner step, so that the implicit correction weighs about as much as
    T1-T2's (what makes IFT train on Omniglot 10-shot, where the head fits the support set and ``H`` is nearly zero;
    docs/results.md).

    After each call, :attr:`last_stats` (:class:`SolveStats`) holds what the solve of that problem saw (the
    number of HVPs, a lower bound of ``lambda_max``, the smallest curvature met, and the Neumann scale or the CG
    residual), for a callback to log. With a meta-batch it describes the last problem.

    The optimizer's own settings cannot be hyperparameters here: the stationary point does not depend on them.
    """

    #: completes the refusal of a learned initialization (each implicit estimator's capabilities quote it)
    LEARNED_INIT_REFUSAL = (
        "the implicit function theorem takes w_T as an inner optimum, which does not depend on where the inner loop "
        "started, so the initialization's hypergradient is zero by construction"
    )

    def __init__(self, iterations: int = 10, damping: float | str = 0.0, nonfinite: str = "warn") -> None:
        super().__init__(nonfinite)
        owner = type(self).__name__
        self.iterations = check_positive_int(owner, "iterations (K)", iterations)
        if damping != DAMPING_ONE_OVER_LR and (
            isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < math.inf
        ):
            raise ValueError(
                f"{owner} damping must be a finite number >= 0 or {DAMPING_ONE_OVER_LR!r}, got {damping!r}"
            )
        self.damping: float | str = damping if isinstance(damping, str) else float(damping)
        #: what the solve of the last problem saw (``None`` before the first)
        self.last_stats: SolveStats | None = None

    def damping_value(self, problem: BilevelProblem) -> float:
        """The damping added to ``problem``'s Hessian: the number given, or ``1 /`` the inner SGD's learning rate.

        Raises:
            ValueError: ``damping="1/lr"`` and the inner optimizer is not an SGD with a numeric learning rate > 0.
        """
        if not isinstance(self.damping, str):
            return self.damping
        lr = sgd_rate(problem)
        if lr is not None and lr > 0:
            return 1.0 / lr
        raise ValueError(
            f"{type(self).__name__} damping='1/lr' takes 1 / the inner SGD's learning rate, but the inner optimizer "
            f"is {type(problem.optimizer).__name__} (lr={getattr(problem.optimizer, 'lr', None)!r}); give damping as "
            f"a number"
        )

    @property
    def jvps(self) -> int:
        """Second-order products per problem (the paper's JVP count): the solve's HVPs (at most) plus the mixed one."""
        return self.iterations + 1

    def products(self, inner_steps: int | None) -> int | None:
        return self.jvps

    def validate(self, problem: BilevelProblem) -> None:
        super().validate(problem)
        try:
            problem.optimizer.stationary_l2()
        except ValueError as error:
            raise ValueError(f"{type(self).__name__} cannot be used with this inner optimizer: {error}") from None
        self.damping_value(problem)

    @abstractmethod
    def solve(self, hvp: Callable[[Vector], Vector], rhs: Vector, problem: BilevelProblem) -> Vector:
        """Approximately solve ``H x = rhs`` given ``hvp(v) = H v`` (``H`` already damped)."""

    def _record(self, hvp: Callable[[Vector], Vector], **extra: float | None) -> SolveStats | None:
        """Store in :attr:`last_stats` and return what ``hvp`` saw; subclasses call it at the end of :meth:`solve`.

        ``None`` (and nothing stored) where ``hvp`` is not the counting wrapper that :meth:`_estimate` passes,
        e.g. when :meth:`solve` is called directly.
        """
        if not isinstance(hvp, _Monitor):
            return None
        gain, curvature = hvp.extremes()
        self.last_stats = SolveStats(hvps=hvp.count, lambda_max=gain, min_curvature=curvature, **extra)
        return self.last_stats

    def _estimate(self, problem: BilevelProblem, h):
        self.last_stats = None
        trajectory = unroll(problem, h, lambda t: StepMode.CONSTANT)
        loss, g_w, g_h = outer_grads(problem, trajectory.params, h)
        shift = problem.optimizer.stationary_l2() + self.damping_value(problem)
        w = leaves(trajectory.params)
        inner_grad = torch.autograd.grad(problem.inner_loss(w, h), w, create_graph=True, materialize_grads=True)

        def hvp(v: Vector) -> Vector:
            hv = torch.autograd.grad(inner_grad, w, v, retain_graph=True, materialize_grads=True)
            return [x + shift * y for x, y in zip(hv, v)] if shift else list(hv)

        x = [v.detach() for v in self.solve(_Monitor(hvp), g_w, problem)]
        mixed = torch.autograd.grad(inner_grad, h, x, allow_unused=True)
        grads = []
        for direct, m in zip(g_h, mixed):
            if m is None:
                grads.append(direct)
            else:
                grads.append(-m if direct is None else direct - m)
        return Estimate(grads, trajectory, loss)
