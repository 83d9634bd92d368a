"""T1-T2 and Greedy by central finite differences (``t1t2_fd``, ``greedy_fd``) against the exact autograd terms.

On a training loss quadratic in ``w`` the mixed derivative is constant along ``w``, so the central difference is
exact and the estimators equal T1T2 and Greedy to rounding; on a nonlinear loss their error falls as radius^2 (the
slope of a log-log fit). Through a function without a second derivative they run, and a second-order estimator
stops with one line.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.function import once_differentiable

import lightning_hypergrad as lh

pytestmark = pytest.mark.usefixtures("float64_default")


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randn(12, generator=g, dtype=torch.float64)
    xv = torch.randn(8, 4, generator=g, dtype=torch.float64)
    yv = torch.randn(8, generator=g, dtype=torch.float64)
    return x, y, xv, yv


def ridge_problem(optimizer, steps: int = 4, learned_lr: bool = False) -> lh.BilevelProblem:
    """Ridge regression: per-feature log weight decay and a feature scale as hyperparameters (quadratic in w)."""
    x, y, xv, yv = _data()
    log_wd = torch.tensor([-1.0, -2.0, -0.5, -1.5], requires_grad=True)
    scale = torch.tensor([1.0, 0.5, 2.0, 1.5], requires_grad=True)
    hyperparameters = [log_wd, scale]
    if learned_lr:
        hyperparameters.append(torch.tensor(math.log(0.1), requires_grad=True))
        optimizer = lh.SGD(lr=lambda h: h[2].exp(), momentum=0.5)

    def inner(w, h):
        return ((x * h[1]) @ w[0] - y).pow(2).mean() + 0.5 * (h[0].exp() * w[0] ** 2).sum()

    def outer(w, h):
        return ((xv * h[1]) @ w[0] - yv).pow(2).mean()

    return lh.BilevelProblem(inner, outer, hyperparameters, [torch.zeros(4)], optimizer, steps)


def tanh_problem(optimizer, steps: int = 3, activation=torch.tanh) -> lh.BilevelProblem:
    """A one-hidden-layer network whose first layer is the hyperparameter, its output weights squashed by the
    activation too (so that the training loss is neither polynomial in w nor in h)."""
    x, y, xv, yv = _data(1)
    first = torch.linspace(-0.6, 0.6, 12).reshape(4, 3).clone().requires_grad_()

    def inner(w, h):
        return (activation(x @ h[0]) @ activation(w[0]) - y).pow(2).mean() + 0.05 * (w[0] ** 2).sum()

    def outer(w, h):
        return (activation(xv @ h[0]) @ activation(w[0]) - yv).pow(2).mean()

    return lh.BilevelProblem(inner, outer, [first], [torch.full((3,), 0.3)], optimizer, steps)


OPTIMIZERS = {
    "sgd": lambda: lh.SGD(lr=0.3),
    "heavy_ball": lambda: lh.SGD(lr=0.2, momentum=0.9, weight_decay=0.01),
    "nesterov": lambda: lh.SGD(lr=0.2, momentum=0.8, nesterov=True),
    "adam": lambda: lh.Adam(lr=0.05),
}


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-300)) for x, y in zip(a, b))


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("spec, exact", [("t1t2_fd", "t1t2"), ("greedy_fd(0.9)", "greedy(0.9, fused=False)")])
def test_the_central_difference_is_exact_on_a_loss_quadratic_in_w(spec, exact, optimizer):
    problem = ridge_problem(OPTIMIZERS[optimizer]())
    got = lh.get_estimator(spec)(problem).hypergrads
    want = lh.get_estimator(exact)(problem).hypergrads
    assert _close(got, want) < 1e-9


def test_a_learned_learning_rate_gets_the_steps_own_term():
    problem = ridge_problem(None, learned_lr=True)
    got = lh.GreedyFD(0.8)(problem).hypergrads
    want = lh.Greedy(0.8, fused=False)(problem).hypergrads
    assert _close(got, want) < 1e-9 and float(want[2].abs()) > 1e-6


def test_the_learning_rate_factor_is_inside_the_term():
    # Betty's darts drops the inner learning rate; with it dropped, the term is 1/lr times too large
    problem = ridge_problem(lh.SGD(lr=0.3), steps=1)
    fo = lh.FO()(problem).hypergrads
    exact = lh.T1T2()(problem).hypergrads
    got = lh.T1T2FD()(problem).hypergrads
    for f, e, g in zip(fo, exact, got):
        assert torch.allclose(g - f, e - f, rtol=1e-9, atol=1e-12)
    assert max(float((e - f).abs().max()) for f, e in zip(fo, exact)) > 1e-4


@pytest.mark.parametrize("optimizer", ["heavy_ball", "adam"])
@pytest.mark.parametrize("spec, exact", [("t1t2_fd", "t1t2"), ("greedy_fd(0.9)", "greedy(0.9, fused=False)")])
def test_the_error_falls_as_the_radius_squared_on_a_nonlinear_loss(spec, exact, optimizer):
    problem = tanh_problem(OPTIMIZERS[optimizer]())
    want = lh.get_estimator(exact)(problem).hypergrads
    radii = [0.2, 0.1, 0.05, 0.025]
    errors = []
    for radius in radii:
        got = lh.get_estimator(spec, radius=radius)(problem).hypergrads
        errors.append(float(torch.linalg.vector_norm(torch.cat([(g - w).flatten() for g, w in zip(got, want)]))))
    logs = torch.tensor([[math.log(r), 1.0] for r in radii])
    slope = torch.linalg.lstsq(logs, torch.tensor([math.log(e) for e in errors]).unsqueeze(1)).solution[0, 0]
    assert 1.8 < float(slope) < 2.2, (errors, float(slope))


class _OnceTanh(torch.autograd.Function):
    """tanh with a backward that cannot itself be differentiated (as a fused kernel's)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


@pytest.mark.parametrize("spec", ["t1t2_fd", "greedy_fd(0.9)"])
def test_the_finite_difference_estimators_run_through_a_once_differentiable_function(spec):
    once = lh.get_estimator(spec)(tanh_problem(lh.SGD(lr=0.2), activation=_OnceTanh.apply)).hypergrads
    smooth = lh.get_estimator(spec)(tanh_problem(lh.SGD(lr=0.2))).hypergrads
    assert _close(once, smooth) < 1e-12


@pytest.mark.parametrize("spec", ["rmd", "greedy(0.9)", "t1t2"])
def test_a_second_order_estimator_stops_with_one_line_naming_the_alternatives(spec):
    problem = tanh_problem(lh.SGD(lr=0.2), activation=_OnceTanh.apply)
    with pytest.raises(RuntimeError, match=r"double backward.*use an estimator without double backward: fo, ") as e:
        lh.get_estimator(spec)(problem)
    assert "greedy_fd(gamma)" in str(e.value) and "\n" not in str(e.value)


def test_a_learned_initialization_gets_first_order_mamls_term():
    x, y, xv, yv = _data(2)
    w0 = torch.tensor([0.1, -0.2, 0.3, 0.0], requires_grad=True)
    problem = lh.BilevelProblem(
        lambda w, h: (x @ w[0] - y).pow(2).mean(),
        lambda w, h: (xv @ w[0] - yv).pow(2).mean(),
        [w0],
        lambda h: [h[0]],
        lh.SGD(lr=0.1),
        3,
    )
    got = lh.GreedyFD(0.9)(problem).hypergrads
    want = lh.Greedy(0.9, fused=False)(problem).hypergrads
    assert _close(got, want) < 1e-9


def test_the_radius_is_checked():
    with pytest.raises(ValueError, match="GreedyFD radius must be a finite number > 0"):
        lh.GreedyFD(0.9, radius=0)
