"""The noisy quadratic model (NQM) of Wu et al. (2018), its expected loss in closed form, and its bilevel problem.

The model, coordinate by coordinate (``i = 1 ... n``)::

    L(w) = 0.5 * sum_i h_i (w_i - c_i)^2,           h_i = 1 / i (the largest curvature is 1)
    g_t = H (w_{t-1} - c) + xi_t,                   xi_t ~ N(0, s H), independent across steps

The stochastic gradient is the gradient of the sampled quadratic ``0.5 * sum_i h_i (w_i - c_i - e_i)^2`` with
``e_i ~ N(0, s / h_i)`` (a mini-batch's optimum; ``s`` plays 1 / batch size): its noise has a covariance
proportional to the curvature, as in Wu et al.'s model. The inner optimizer is SGD with a per-step learning rate
``lr_t`` and an optional fixed heavy-ball momentum ``mu`` (``torch.optim.SGD``'s form: ``v_t = mu v_{t-1} + g_t``,
``w_t = w_{t-1} - lr_t v_t``), from the deterministic ``w_0 = c + 1`` (every coordinate one unit away).

The learning-rate schedule is the hyperparameter: log learning rates at ``K`` knots spread evenly over steps 1 to T,
linearly interpolated in log space between them (``K = T``: one log learning rate per step).

**Closed form.** Per coordinate, ``z_t = (w_t - c, v_t)`` evolves linearly, ``z_t = A_t z_{t-1} + b_t xi_t``, with
``A_t = [[1 - lr_t h, -lr_t mu], [h, mu]]`` and ``b_t = (-lr_t, 1)``, so its mean ``m_t = A_t m_{t-1}`` and
covariance ``C_t = A_t C_{t-1} A_t^T + s h b_t b_t^T`` follow exactly; the expected loss after step t is
``0.5 * sum_i h_i (m_{t,x}^2 + C_{t,xx})``. :func:`expected_loss` computes it in torch, differentiable with respect
to the schedule, so that :func:`optimal_schedule` finds the schedule of least expected final loss by L-BFGS on
it, and every schedule's expected final loss is known without sampling.

**The bilevel problem** (:func:`sampled_problem`): one inner trajectory with a fresh draw of the noise; the inner
loss is the noiseless quadratic and the optimizer (:class:`ScheduledSGD`) adds the step's sampled noise ``xi_t``
to its gradient (it could as well be a per-step loss, ``BilevelProblem.inner_step_loss``; the noise
does not depend on ``w``, so the gradient and every Jacobian are those of the sampled quadratic). The outer loss is
the deterministic ``L(w_T)``. Its exact hypergradient (RMD) is an unbiased estimate of the gradient of the expected
final loss.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lightning_hypergrad import SGD, BilevelProblem

DTYPE = torch.float64


@dataclass(frozen=True)
class NQM:
    """One noisy quadratic model and its inner loop.

    Attributes:
        dims: the number of coordinates n (curvatures ``h_i = 1 / i``).
        steps: the number of inner SGD steps T.
        noise: ``s``, the scale of the gradient noise's covariance ``s H``.
        momentum: the inner SGD's heavy-ball momentum (fixed, not learned).
        knots: the number of knots ``K`` of the log learning-rate schedule (2 to T; T: one per step).
    """

    dims: int = 1000
    steps: int = 1000
    noise: float = 1.0
    momentum: float = 0.0
    knots: int = 1000

    def __post_init__(self) -> None:
        if self.dims < 1 or self.steps < 1:
            raise ValueError(f"dims and steps must be >= 1, got {self.dims} and {self.steps}")
        if not 1 <= self.knots <= self.steps or (self.knots == 1 and self.steps > 1):
            raise ValueError(f"knots must be in [2, steps={self.steps}] (or 1 with one step), got {self.knots}")
        if self.noise < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"noise must be >= 0 and momentum in [0, 1), got {self.noise} and {self.momentum}")

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def curvatures(self) -> Tensor:
        return 1.0 / torch.arange(1, self.dims + 1, dtype=DTYPE)

    @property
    def center(self) -> Tensor:
        """``c``, the minimizer of the loss (a fixed vector; the expected loss does not depend on it)."""
        return torch.linspace(-1.0, 1.0, self.dims, dtype=DTYPE)

    @property
    def start(self) -> Tensor:
        """``w_0 = c + 1``."""
        return self.center + 1.0

    def interpolation(self) -> Tensor:
        """The ``(T, K)`` matrix that maps the knots' log learning rates to each step's (linear interpolation)."""
        return _interpolation(self.steps, self.knots)

    def log_rates(self, log_knots: Tensor) -> Tensor:
        """Each step's log learning rate (shape ``(T,)``) from the knots'."""
        return log_knots if self.knots == self.steps else self.interpolation() @ log_knots

    def log_rate(self, log_knots: Tensor, index: int) -> Tensor:
        """The log learning rate of step ``index + 1`` from the knots'."""
        return log_knots[index] if self.knots == self.steps else self.interpolation()[index] @ log_knots

    def loss(self, w: Tensor) -> Tensor:
        """The deterministic loss ``L(w)`` (the outer loss); ``w`` may have leading batch dimensions."""
        return 0.5 * (self.curvatures * (w - self.center) ** 2).sum(-1)

    def sample_noise(self, generator: torch.Generator, batch: Sequence[int] = ()) -> Tensor:
        """The gradient noise ``xi_t`` of T steps, shape ``(T, *batch, n)``."""
        shape = (self.steps, *batch, self.dims)
        return torch.randn(shape, generator=generator, dtype=DTYPE) * (self.noise * self.curvatures).sqrt()


@functools.lru_cache(maxsize=8)
def _interpolation(steps: int, knots: int) -> Tensor:
    """:meth:`NQM.interpolation`, built once per shape (never modified in place)."""
    if knots == steps:
        return torch.eye(steps, dtype=DTYPE)
    position = torch.arange(steps, dtype=DTYPE) * (knots - 1) / max(1, steps - 1)
    left = position.floor().long().clamp(max=knots - 2)
    frac = position - left
    matrix = torch.zeros(steps, knots, dtype=DTYPE)
    rows = torch.arange(steps)
    matrix[rows, left] = 1.0 - frac
    matrix[rows, left + 1] = frac
    return matrix


def expected_losses(nqm: NQM, rates: Tensor) -> Tensor:
    """The expected loss ``E[L(w_t)]`` after each step t = 0 ... T under the per-step learning rates ``rates``.

    Exact (the moment recursions of the module docstring), differentiable with respect to ``rates``.
    """
    h = nqm.curvatures
    mu, q = nqm.momentum, nqm.noise * h
    mx, mv = nqm.start - nqm.center, torch.zeros_like(h)  # means of w - c and of the momentum buffer
    cxx = cxv = cvv = torch.zeros_like(h)  # their (co)variances
    losses = [0.5 * (h * mx**2).sum()]
    for lr in rates.unbind(0):
        a, b = 1.0 - lr * h, -lr * mu  # the first row of A_t; its second row is (h, mu)
        mx, mv = a * mx + b * mv, h * mx + mu * mv
        cxx, cxv, cvv = (
            a * a * cxx + 2 * a * b * cxv + b * b * cvv + q * lr * lr,
            a * h * cxx + (a * mu + b * h) * cxv + b * mu * cvv - q * lr,
            h * h * cxx + 2 * h * mu * cxv + mu * mu * cvv + q,
        )
        losses.append(0.5 * (h * (mx**2 + cxx)).sum())
    return torch.stack(losses)


def expected_loss(nqm: NQM, rates: Tensor) -> Tensor:
    """The expected final loss ``E[L(w_T)]`` of the schedule ``rates`` (per step), in closed form."""
    return expected_losses(nqm, rates)[-1]


def schedule_rates(nqm: NQM, log_knots: Tensor) -> Tensor:
    """The per-step learning rates of the knots' log learning rates."""
    return nqm.log_rates(log_knots).exp()


def stable_rate(nqm: NQM) -> float:
    """``2 (1 + mu) / max h``: the largest learning rate at which SGD (heavy ball ``mu``) does not diverge."""
    return 2.0 * (1.0 + nqm.momentum)


def optimal_schedule(nqm: NQM, start_lr: float, iterations: int = 300) -> Tensor:
    """The knots' log learning rates of least expected final loss: L-BFGS on the closed form from a constant rate.

    It minimizes the logarithm of the expected final loss, each log learning rate clipped at the stability bound
    :func:`stable_rate` (so that no trial step of the line search overflows).

    Returns:
        the log learning rates at the knots (shape ``(K,)``).
    """
    ceiling = math.log(stable_rate(nqm))
    log_knots = torch.full((nqm.knots,), math.log(start_lr), dtype=DTYPE, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_knots],
        lr=1.0,
        max_iter=iterations,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = expected_loss(nqm, nqm.log_rates(log_knots.clamp(max=ceiling)).exp()).log()
        loss.backward()
        return loss

    optimizer.step(closure)
    return log_knots.detach().clamp(max=ceiling)


def best_constant_rate(nqm: NQM, points: int = 40, refinements: int = 40) -> float:
    """The constant learning rate of least expected final loss: a grid in log space, then golden-section search."""

    def value(log_rate: float) -> float:
        return float(expected_loss(nqm, torch.full((nqm.steps,), math.exp(log_rate), dtype=DTYPE)))

    with torch.no_grad():
        grid = [
            math.log(1e-4) + k * (math.log(stable_rate(nqm)) - math.log(1e-4)) / (points - 1) for k in range(points)
        ]
        values = [value(x) for x in grid]
        i = min(range(points), key=values.__getitem__)
        a, b = grid[max(0, i - 1)], grid[min(points - 1, i + 1)]
        ratio = (5**0.5 - 1) / 2
        for _ in range(refinements):
            c, d = b - ratio * (b - a), a + ratio * (b - a)
            if value(c) < value(d):
                b = d
            else:
                a = c
    return math.exp((a + b) / 2)


def greedy_schedule(nqm: NQM) -> Tensor:
    """The one-step greedy schedule of Wu et al.: each ``lr_t`` minimizes the expected loss right after step t.

    ``w_t - c = x_{t-1} - lr_t v_t`` with ``v_t`` independent of ``lr_t``, so the expected loss after step t is a
    quadratic in ``lr_t``, minimized at ``sum_i h_i E[x v_t] / sum_i h_i E[v_t^2]``.
    """
    h = nqm.curvatures
    mu, q = nqm.momentum, nqm.noise * h
    mx, mv = nqm.start - nqm.center, torch.zeros_like(h)
    cxx = cxv = cvv = torch.zeros_like(h)
    rates = []
    for _ in range(nqm.steps):
        # v_t = mu v + h x + xi: its mean, its variance and its covariance with x
        nv = mu * mv + h * mx
        vv = mu * mu * cvv + 2 * mu * h * cxv + h * h * cxx + q
        xv = mu * cxv + h * cxx
        lr = (h * (mx * nv + xv)).sum() / (h * (nv * nv + vv)).sum()
        rates.append(lr)
        a, b = 1.0 - lr * h, -lr * mu
        mx, mv = a * mx + b * mv, nv
        cxx, cxv, cvv = (
            a * a * cxx + 2 * a * b * cxv + b * b * cvv + q * lr * lr,
            a * h * cxx + (a * mu + b * h) * cxv + b * mu * cvv - q * lr,
            vv,
        )
    return torch.stack(rates)


class ScheduledSGD(SGD):
    """:class:`lightning_hypergrad.SGD` whose learning rate at step t is entry t of a schedule, plus gradient noise.

    Args:
        nqm: the model (its interpolation of the knots).
        noise: the gradient noise of each step, shape ``(T, ...)`` (added to the gradient of step t); ``None``: none.

    The learning rate of step t is ``exp(interpolation[t] @ h[0])`` with ``h[0]`` the knots' log learning rates;
    the step index is the optimizer state's (``state.step``), so the estimators that rerun a segment of the
    trajectory from a stored state (checkpointed RMD) see the same rates and the same noise.
    """

    def __init__(self, nqm: NQM, noise: Tensor | None) -> None:
        self.nqm = nqm
        super().__init__(lr=lambda h: nqm.log_rates(h[0]).exp(), momentum=nqm.momentum)
        self.noise = noise
        self._step = 0

    def update(self, params, grads, state, h):
        if self.noise is not None:
            grads = [g + self.noise[state.step] for g in grads]
        self._step = state.step
        return super().update(params, grads, state, h)

    def setting_values(self, name, h, n_params):
        if name == "lr":
            return [self.nqm.log_rate(h[0], self._step).exp()] * n_params
        return super().setting_values(name, h, n_params)


def sampled_problem(nqm: NQM, log_knots: Tensor, noise: Tensor) -> BilevelProblem:
    """The bilevel problem of one sampled trajectory: hyperparameters ``[log_knots]``, inner parameters ``[w]``.

    ``noise`` is the trajectory's gradient noise (:meth:`NQM.sample_noise`); with a batch shape, the rows are
    independent trajectories and the outer loss is their mean final loss.
    """
    start = nqm.start.expand(*noise.shape[1:]).clone()
    return BilevelProblem(
        inner_loss=lambda w, h: nqm.loss(w[0]).sum(),
        outer_loss=lambda w, h: nqm.loss(w[0]).mean(),
        hyperparameters=[log_knots],
        init_params=[start],
        optimizer=ScheduledSGD(nqm, noise),
        steps=nqm.steps,
    )
