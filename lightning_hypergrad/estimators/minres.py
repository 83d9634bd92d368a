"""IFT with MINRES for the inverse-Hessian-vector product: a Krylov solver for symmetric indefinite systems."""

from __future__ import annotations

import torch

from lightning_hypergrad.estimators._linalg import Vector, dot
from lightning_hypergrad.estimators.implicit import ImplicitEstimator, check_tolerance
from lightning_hypergrad.estimators.registry import Capabilities, register_estimator


@register_estimator
class MINRES(ImplicitEstimator):
    """IFT hypergradient with ``(H + damping I)^-1 g_T`` from at most ``K`` MINRES steps started at zero.

    MINRES (Paige and Saunders, 1975) minimizes the residual ``|g_T - H x|`` over the Krylov space of ``H`` and
    ``g_T``: one Hessian-vector product a step, like CG, and unlike CG it needs ``H`` symmetric only, not positive
    definite. An inner loop stopped short of a minimum (a Hessian with negative eigenvalues) is therefore no reason
    to stop: the residual falls monotonically whatever the signs, and the solution is exact after at most P steps (in
    exact arithmetic) where ``H`` is nonsingular. Stops early once ``|g_T - H x| <= tol |g_T|``, or where the Krylov
    space is exhausted (the solution, or the least-squares solution of a singular system, is reached).

    **Cost** per problem: at most ``K`` Hessian-vector products and one mixed second-derivative product;
    :attr:`last_stats` holds the products used and the final relative residual. Spec string: ``minres(10)``.

    Args:
        iterations: ``K``, the most MINRES steps (one Hessian-vector product each).
        tol: relative residual at which to stop.
        damping: Tikhonov damping, as for :class:`~lightning_hypergrad.ConjugateGradient`.

    Raises:
        ValueError: ``iterations`` < 1, ``tol`` < 0 or ``damping`` < 0.
    """

    name = "minres"
    spec_args = ("iterations",)
    spec_options = ("tol", "damping", "nonfinite")
    capabilities = Capabilities(
        computes="IFT, `(H + damping I)^-1 g_T` by K MINRES steps (symmetric indefinite `H`)",
        cost="K HVPs + 1",
        memory="O(P+H)",
        example="minres(10)",
        learned_init_refusal=ImplicitEstimator.LEARNED_INIT_REFUSAL,
        optimizer_settings=False,
        batchable=False,  # its coefficients are inner products over the whole problem
    )

    def __init__(
        self, iterations: int = 10, tol: float = 1e-12, damping: float | str = 0.0, nonfinite: str = "warn"
    ) -> None:
        super().__init__(iterations, damping, nonfinite)
        self.tol = check_tolerance("MINRES", tol)

    def solve(self, hvp, rhs: Vector, problem) -> Vector:
        """Lanczos on ``(H, rhs)`` with the tridiagonal system's QR factorization updated by Givens rotations."""
        x = [torch.zeros_like(r) for r in rhs]
        beta1 = dot(rhs, rhs).sqrt()
        if float(beta1) == 0.0:
            self._record(hvp, residual=0.0)
            return x
        tiny = torch.finfo(rhs[0].dtype).tiny
        v_old = [torch.zeros_like(r) for r in rhs]
        v = [r / beta1 for r in rhs]
        beta = torch.zeros_like(beta1)  # beta_k, the Lanczos coupling of v_old and v
        eta = beta1  # the residual norm, with its sign
        cos_old, cos, sin_old, sin = 1.0, 1.0, 0.0, 0.0  # the last two Givens rotations
        w_old2 = [torch.zeros_like(r) for r in rhs]
        w_old = [torch.zeros_like(r) for r in rhs]
        stop = self.tol * float(beta1)
        for _ in range(self.iterations):
            hv = hvp(v)
            alpha = dot(v, hv)
            u = [a - alpha * b - beta * c for a, b, c in zip(hv, v, v_old)]
            beta_new = dot(u, u).sqrt()
            # the new column of the tridiagonal matrix, rotated by the previous two rotations
            delta = cos * alpha - cos_old * sin * beta
            rho2 = sin * alpha + cos_old * cos * beta
            rho3 = sin_old * beta
            rho1 = torch.sqrt(delta**2 + beta_new**2).clamp_min(tiny)
            cos_new, sin_new = delta / rho1, beta_new / rho1
            w_new = [(a - rho3 * b - rho2 * c) / rho1 for a, b, c in zip(v, w_old2, w_old)]
            x = [a + (cos_new * eta) * b for a, b in zip(x, w_new)]
            eta = -sin_new * eta
            if float(beta_new) <= float(tiny) or abs(float(eta)) <= stop:
                break
            v_old, v = v, [a / beta_new for a in u]
            beta = beta_new
            w_old2, w_old = w_old, w_new
            cos_old, cos, sin_old, sin = cos, cos_new, sin, sin_new
        residual = abs(float(eta)) / float(beta1)
        self._record(hvp, residual=residual)
        return x
