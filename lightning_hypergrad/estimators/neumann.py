"""IFT with a truncated Neumann series for the inverse Hessian (Lorraine et al., 2020), self-scaling by default."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Literal

import torch

from lightning_hypergrad.estimators.base import check_positive_int
from lightning_hypergrad.estimators.implicit import (
    ImplicitEstimator,
    SolveStats,
    Vector,
    dot,
    negative_curvature_tolerance,
    power_iteration,
    sgd_rate,
)
from lightning_hypergrad.estimators.registry import Capabilities, register_estimator

SCALE_CHOICES = ("auto", "lr")


@register_estimator
class Neumann(ImplicitEstimator):
    """IFT hypergradient with ``H^-1 ~ scale * sum_{k=0}^{K} (I - scale H)^k``.

    ``H`` is the inner Hessian at ``w_T`` plus ``damping I``. Along an eigenvector of ``H`` with eigenvalue
    ``lambda`` the truncated series gives ``(1 - (1 - scale lambda)^(K+1)) / lambda``: it converges to
    ``1 / lambda`` if and only if ``0 < scale lambda < 2``, so it needs ``H`` positive definite (the inner loop
    at a minimum) and ``scale < 2 / lambda_max``. A negative eigenvalue makes the series diverge whatever the
    scale; ``damping`` above its magnitude cures that, at the price of a bias.

    **Scale.** By default (``scale="auto"``) the scale is set per problem from the Hessian itself:
    ``power_iterations`` steps of power iteration (started from ``g_T``, the vector whose Krylov space the series
    explores) estimate ``lambda_max``, and the scale is ``1 / lambda_max``. Why not closer to ``2 / lambda_max``:
    the scale that makes the slowest mode (``lambda_min``) contract fastest is ``2 / (lambda_min + lambda_max)``,
    which tends to ``2 / lambda_max`` when ``lambda_min`` is unknown or tiny; there the top mode stops
    contracting (factor -1) and any underestimate of ``lambda_max`` diverges (the estimate ``|Hv| / |v|``
    never exceeds it). ``1 / lambda_max`` instead tolerates an estimate up to 2 times too low, removes the top
    mode in one term (with an exact estimate), and keeps every factor ``1 - scale lambda`` in ``[0, 1)``, so
    each mode approaches ``1 / lambda``
    from below without overshooting: the truncated series is then K + 1 gradient-descent steps with the classical
    step ``1 / L`` on ``x^T H x / 2 - g_T^T x`` from zero. The slow modes pay at most about twice as many terms as
    with the (unreachable) optimal scale, since ``1 - 2 lambda / lambda_max ~ (1 - lambda / lambda_max)^2``.
    The paper's fixed scale (its inner learning rate, 0.1) diverges where ``0.1 lambda_max > 2`` (the
    Omniglot head: 3 to 7); a number keeps that setting (``neumann(10, scale=0.1)``), and ``scale="lr"`` takes
    the inner SGD's learning rate. The default changed: before ``"auto"`` it was ``scale=None``, the inner SGD's
    learning rate, now spelled ``"lr"``; so ``neumann(10)`` in older records means ``neumann(10, scale='lr')``.

    **Checks.** The Hessian-vector products also measure ``|Hv| / |v|`` (a lower bound of ``lambda_max``) and
    the curvature ``v . Hv / |v|^2`` of every vector they multiply; a warning says when they prove that the
    series diverges: ``scale |Hv| / |v| >= 2``, or a curvature below ``-sqrt(eps) lambda_max`` (negative
    curvature: set ``damping``). :attr:`last_stats` holds them, with the scale used, for a callback to log.

    **Cost** per problem: ``power_iterations`` (with ``scale="auto"``) + ``K`` Hessian-vector products and one
    mixed second-derivative product: with the defaults (``K = 10``) 10 + 10 + 1 = 21 JVPs; with a fixed scale
    ``K + 1`` (the paper's 11). :attr:`jvps` gives the count.

    Args:
        iterations: ``K``, the number of Neumann terms after the first.
        scale: ``"auto"`` (``1 / lambda_max`` of the damped Hessian, estimated per problem), ``"lr"`` (the inner
            SGD's learning rate, which must be a number; ``None`` means the same), or a number > 0.
        power_iterations: the power-iteration steps (Hessian-vector products) of ``scale="auto"``.
        damping: Tikhonov damping, added to the Hessian: the series inverts ``H + damping I``; a number >= 0, or
            ``"1/lr"`` for ``1 /`` the inner SGD's learning rate (see :class:`ImplicitEstimator`).

    Raises:
        ValueError: ``iterations`` or ``power_iterations`` < 1, ``scale`` neither ``"auto"``, ``"lr"`` nor a
            number > 0, ``damping`` < 0 (or a string other than ``"1/lr"``), or ``scale="lr"`` (``damping="1/lr"``)
            with no numeric SGD learning rate.
    """

    name = "neumann"
    spec_args = ("iterations",)
    capabilities = Capabilities(
        computes="IFT, `(H + damping I)^-1` by K Neumann terms, scale 1/lambda_max from 10 power iterations "
        "(`scale='lr'` or a number: fixed); `damping='1/lr'` (1 / the inner SGD's lr) trains on 10-shot Omniglot, "
        "where 0 stalls",
        cost="10 + K HVPs + 1 (fixed scale: K + 1)",
        memory="O(P+H)",
        example="neumann(10)",
        learned_init_refusal=ImplicitEstimator.LEARNED_INIT_REFUSAL,
        optimizer_settings=False,
        batchable=False,  # with scale="auto" (one scale from the whole problem's Hessian); a fixed scale batches
    )
    spec_options = ("scale", "power_iterations", "damping", "nonfinite")

    def __init__(
        self,
        iterations: int = 10,
        scale: float | Literal["auto", "lr"] | None = "auto",
        power_iterations: int = 10,
        damping: float | str = 0.0,
        nonfinite: str = "warn",
    ) -> None:
        super().__init__(iterations, damping, nonfinite)
        if scale is None:
            scale = "lr"
        if isinstance(scale, str):
            if scale not in SCALE_CHOICES:
                raise ValueError(f"Neumann scale must be 'auto', 'lr' or a number > 0, got {scale!r}")
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
            raise ValueError(
                f"Neumann scale must be a number > 0 (below 2 / the largest Hessian eigenvalue), 'auto' or 'lr', "
                f"got {scale!r}"
            )
        else:
            scale = float(scale)
        self.scale: float | str = scale
        self.power_iterations = check_positive_int("Neumann", "power_iterations", power_iterations)
        # a fixed scale is linear in the problem, so the tasks of a meta-batch can run stacked
        self.capabilities = dataclasses.replace(Neumann.capabilities, batchable=self.scale != "auto")

    @property
    def jvps(self) -> int:
        """Second-order products per problem: power iterations (``scale="auto"``) + K series terms + 1 mixed."""
        return self.iterations + 1 + (self.power_iterations if self.scale == "auto" else 0)

    def _fixed_scale(self, problem) -> float:
        if not isinstance(self.scale, str):
            return self.scale
        lr = sgd_rate(problem)
        if lr is not None:
            return lr
        raise ValueError(
            "Neumann scale='lr' takes the inner SGD's learning rate, but the inner optimizer is "
            f"{type(problem.optimizer).__name__}; use scale='auto' or a number below 2 / the largest eigenvalue of the "
            "inner Hessian"
        )

    def validate(self, problem) -> None:
        super().validate(problem)
        if self.scale != "auto":
            self._fixed_scale(problem)

    def solve(self, hvp, rhs: Vector, problem) -> Vector:
        if self.scale == "auto":
            radius, _ = power_iteration(hvp, rhs, self.power_iterations)
            estimate = float(radius)
            if estimate == 0.0:
                return self._null(hvp, rhs)
            scale = 1.0 / estimate if math.isfinite(estimate) else math.nan
        else:
            scale = self._fixed_scale(problem)
        v = list(rhs)
        total = list(rhs)
        for _ in range(self.iterations):
            hv = hvp(v)
            v = [a - scale * b for a, b in zip(v, hv)]
            total = [a + b for a, b in zip(total, v)]
        stats = self._record(hvp, scale=scale)
        if stats is not None:
            self._warn_if_divergent(stats, rhs[0].dtype)
        return [scale * a for a in total]

    def _null(self, hvp, rhs: Vector) -> Vector:
        """The solve where ``H g_T = 0``: zero, with a warning unless ``g_T`` is zero too."""
        self._record(hvp, scale=math.nan)
        if float(dot(rhs, rhs)) > 0:
            warnings.warn(
                "Neumann: the inner Hessian vanishes along g_T (power iteration found H g_T = 0), so H x = g_T has "
                "no solution and the implicit term was left out; set damping > 0",
                RuntimeWarning,
                stacklevel=4,
            )
        return [torch.zeros_like(r) for r in rhs]

    def _warn_if_divergent(self, stats: SolveStats, dtype: torch.dtype) -> None:
        scale, gain = stats.scale, stats.lambda_max
        if scale is not None and scale * gain >= 2:
            fix = "raise power_iterations" if self.scale == "auto" else "use scale='auto'"
            warnings.warn(
                f"Neumann: scale x lambda_max >= {scale * gain:.3g} >= 2 (scale {scale:.3g}, a Hessian direction "
                f"with |Hv|/|v| = {gain:.3g}): the series diverges; {fix}",
                RuntimeWarning,
                stacklevel=4,
            )
        if stats.min_curvature < -negative_curvature_tolerance(dtype) * gain:
            warnings.warn(
                f"Neumann: the inner Hessian has negative curvature at w_T (v.Hv/|v|^2 = {stats.min_curvature:.3g}, "
                f"lambda_max >= {gain:.3g}): the series diverges along it whatever the scale; run the inner loop "
                f"closer to a minimum or set damping above {-stats.min_curvature:.3g} (at least)",
                RuntimeWarning,
                stacklevel=4,
            )
