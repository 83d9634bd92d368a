"""IFT with conjugate gradient for the inverse-Hessian-vector product (Pedregosa 2016; Rajeswaran et al. 2019)."""

from __future__ import annotations

import warnings

import torch

from lightning_hypergrad.estimators.implicit import ImplicitEstimator, Vector, dot


class ConjugateGradient(ImplicitEstimator):
    """IFT hypergradient with ``H^-1 g_T`` from ``K`` conjugate-gradient steps started at zero.

    Exact after P steps (in exact arithmetic) when ``H`` is positive definite; stops early once the residual
    falls below ``tol`` times the norm of ``g_T``.

    Args:
        iterations: ``K``, the most conjugate-gradient steps (one Hessian-vector product each).
        tol: relative residual at which to stop.

    Raises:
        ValueError: ``iterations`` < 1 or ``tol`` < 0.
    """

    name = "cg"
    spec_args = ("iterations",)
    spec_options = ("tol", "nonfinite")

    def __init__(self, iterations: int = 10, tol: float = 1e-12, nonfinite: str = "warn") -> None:
        super().__init__(iterations, nonfinite)
        if not isinstance(tol, (int, float)) or tol < 0:
            raise ValueError(f"ConjugateGradient tol must be a number >= 0, got {tol!r}")
        self.tol = float(tol)

    def solve(self, hvp, rhs: Vector, problem) -> Vector:
        x = [torch.zeros_like(r) for r in rhs]
        r = list(rhs)
        p = list(rhs)
        rr = dot(r, r)
        stop = (self.tol**2) * rr
        for _ in range(self.iterations):
            if rr <= stop or rr == 0:
                break
            hp = hvp(p)
            curvature = dot(p, hp)
            if curvature <= 0:
                warnings.warn(
                    "ConjugateGradient met non-positive curvature: the inner Hessian is not positive definite at "
                    "w_T (the inner loop has not reached a minimum); the solve stopped early",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            step = rr / curvature
            x = [a + step * b for a, b in zip(x, p)]
            r = [a - step * b for a, b in zip(r, hp)]
            rr_new = dot(r, r)
            p = [a + (rr_new / rr) * b for a, b in zip(r, p)]
            rr = rr_new
        return x
