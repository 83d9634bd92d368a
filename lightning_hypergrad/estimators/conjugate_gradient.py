"""IFT with conjugate gradient for the inverse-Hessian-vector product (Pedregosa 2016; Rajeswaran et al. 2019)."""

from __future__ import annotations

import warnings

import torch

from lightning_hypergrad.estimators.implicit import ImplicitEstimator, Vector, check_tolerance, dot
from lightning_hypergrad.estimators.registry import Capabilities, register_estimator


@register_estimator
class ConjugateGradient(ImplicitEstimator):
    """IFT hypergradient with ``(H + damping I)^-1 g_T`` from at most ``K`` conjugate-gradient steps started at zero.

    Exact after P steps (in exact arithmetic) when ``H + damping I`` is positive definite. Stops early once the
    residual is small relative to the right-hand side: ``|g_T - (H + damping I) x| <= tol |g_T|`` (the residual
    that CG updates; ``tol`` is relative, so scaling the outer loss does not change when it stops). Stops, with a
    warning, on non-positive curvature ``p . (H + damping I) p <= 0`` (the inner loop is not at a minimum):
    ``damping`` above the magnitude of the most negative eigenvalue prevents that, at the price of a bias.

    **Normal equations** (``normal=True``): CG on ``H^2 x = H g_T`` instead, whose matrix is positive semi-definite
    whatever the signs of ``H``'s eigenvalues, so it never meets negative curvature (TorchOpt's iMAML solves this
    way); it converges more slowly (the condition number squared) and costs two products a step. Where ``H`` is
    singular along ``g_T`` it returns the least-squares solution. The residual reported is ``|g_T - H x| / |g_T|``
    of the original system.

    **Cost** per problem: at most ``K`` Hessian-vector products (one per step; ``2K + 1`` with ``normal=True``) and one
    mixed second-derivative product (:attr:`jvps`); :attr:`last_stats` holds the products used and the final
    relative residual.

    Args:
        iterations: ``K``, the most conjugate-gradient steps (one Hessian-vector product each).
        tol: relative residual at which to stop (``0``: run all K steps unless the residual vanishes).
        damping: Tikhonov damping: CG solves ``(H + damping I) x = g_T``; a number >= 0, or ``"1/lr"`` for ``1 /``
            the inner SGD's learning rate (see :class:`ImplicitEstimator`).
        normal: solve the normal equations ``H^2 x = H g_T`` (no breakdown on an indefinite ``H``).

    Raises:
        ValueError: ``iterations`` < 1, ``tol`` < 0 or ``damping`` < 0 (or a string other than ``"1/lr"``);
            ``damping="1/lr"`` with no numeric SGD learning rate, when a problem is checked.
    """

    name = "cg"
    capabilities = Capabilities(
        computes="IFT, `(H + damping I)^-1 g_T` by K CG steps; `normal=True`: CG on `H^2 x = H g_T` (indefinite `H`)",
        cost="K HVPs + 1 (`normal=True`: 2K + 2)",
        memory="O(P+H)",
        example="cg(10)",
        learned_init_refusal=ImplicitEstimator.LEARNED_INIT_REFUSAL,
        optimizer_settings=False,
        batchable=False,  # its step sizes are inner products over the whole problem: the tasks run one by one
    )
    spec_args = ("iterations",)
    spec_options = ("tol", "damping", "normal", "nonfinite")

    def __init__(
        self,
        iterations: int = 10,
        tol: float = 1e-12,
        damping: float | str = 0.0,
        normal: bool = False,
        nonfinite: str = "warn",
    ) -> None:
        super().__init__(iterations, damping, nonfinite)
        if not isinstance(normal, bool):
            raise ValueError(f"ConjugateGradient normal must be true or false, got {normal!r}")
        self.tol = check_tolerance("ConjugateGradient", tol)
        self.normal = normal

    @property
    def jvps(self) -> int:
        """Second-order products per problem: the solve's HVPs (at most; two a step with ``normal``) plus one."""
        return 2 * self.iterations + 2 if self.normal else self.iterations + 1

    def solve(self, hvp, rhs: Vector, problem) -> Vector:
        if self.normal:
            return self._solve_normal(hvp, rhs)
        x = [torch.zeros_like(r) for r in rhs]
        r = list(rhs)
        p = list(rhs)
        rr = rr0 = dot(r, r)
        stop = (self.tol**2) * rr
        for _ in range(self.iterations):
            if rr <= stop or rr == 0:
                break
            hp = hvp(p)
            curvature = dot(p, hp)
            if curvature <= 0:
                warnings.warn(
                    "ConjugateGradient met non-positive curvature: the inner Hessian is not positive definite at "
                    "w_T (the inner loop has not reached a minimum); the solve stopped early. Set damping above the "
                    "magnitude of its most negative eigenvalue to make it positive definite",
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
        residual = float((rr / rr0).sqrt()) if rr0 > 0 else 0.0
        self._record(hvp, residual=residual)
        return x

    def _solve_normal(self, hvp, rhs: Vector) -> Vector:
        """CG on ``H^2 x = H b`` (CGNR for a symmetric ``H``), tracking the residual ``s = b - H x`` itself."""
        x = [torch.zeros_like(r) for r in rhs]
        s = list(rhs)  # b - H x
        r = hvp(s)  # H (b - H x): the normal equations' residual
        p = list(r)
        bb = dot(rhs, rhs)
        rr = dot(r, r)
        stop = (self.tol**2) * bb
        for _ in range(self.iterations):
            if dot(s, s) <= stop or rr == 0:
                break
            hp = hvp(p)
            curvature = dot(hp, hp)  # p . H^2 p >= 0
            if curvature == 0:
                break
            step = rr / curvature
            x = [a + step * b for a, b in zip(x, p)]
            s = [a - step * b for a, b in zip(s, hp)]
            r = hvp(s)
            rr_new = dot(r, r)
            p = [a + (rr_new / rr) * b for a, b in zip(r, p)]
            rr = rr_new
        residual = float((dot(s, s) / bb).sqrt()) if bb > 0 else 0.0
        self._record(hvp, residual=residual)
        return x
