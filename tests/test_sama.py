"""SAMA against its formula written out by hand: the inner loop, the optimizer's derivative and the mixed second
derivative computed here independently (a hand-written SGD and Adam loop, Adam's derivative in closed form, the
mixed derivative by exact double backward), float64.

On a training loss quadratic in ``w`` the central difference is exact, so SAMA equals the hand formula to rounding;
on a nonlinear loss its error falls as radius^2. It runs through a function without a second derivative.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_finite_difference import ridge_problem, tanh_problem
from torch.autograd.function import once_differentiable

import lightning_hypergrad as lh

pytestmark = pytest.mark.usefixtures("float64_default")


def _run(problem: lh.BilevelProblem, spec: str) -> list[torch.Tensor]:
    return [g.clone() for g in lh.get_estimator(spec)(problem).hypergrads]


def _final_sgd(problem, lr: float, momentum: float = 0.0) -> list[torch.Tensor]:
    """``w_T`` by a hand-written heavy-ball loop on the problem's training loss."""
    h = [x.detach() for x in problem.hyperparameters]
    w, buf = problem.init_params[0].clone(), None
    for _ in range(problem.steps):
        x = w.detach().requires_grad_()
        (d,) = torch.autograd.grad(problem.inner_loss([x], h), [x])
        buf = d if buf is None else momentum * buf + d
        w = w - lr * buf
    return [w]


def _mixed(problem, w: list[torch.Tensor], v: list[torch.Tensor]) -> list[torch.Tensor]:
    """``d/dh <v, grad_w L_train(w, h)>`` by exact double backward."""
    h = list(problem.hyperparameters)
    x = [t.detach().requires_grad_() for t in w]
    grads = torch.autograd.grad(problem.inner_loss(x, h), x, create_graph=True)
    inner = sum((a * b).sum() for a, b in zip(grads, v))
    return [
        torch.zeros_like(t) if g is None else g for t, g in zip(h, torch.autograd.grad(inner, h, allow_unused=True))
    ]


def _direct_and_g(problem, w):
    h = list(problem.hyperparameters)
    x = [t.detach().requires_grad_() for t in w]
    found = torch.autograd.grad(problem.outer_loss(x, h), [*x, *h], allow_unused=True)
    direct = [torch.zeros_like(t) if g is None else g for t, g in zip(h, found[len(x) :])]
    return direct, list(found[: len(x)])


def _close(a, b) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-300)) for x, y in zip(a, b))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sama_with_sgd_is_the_direct_term_minus_lr_times_the_mixed_derivative_along_g(momentum):
    lr = 0.3
    problem = ridge_problem(lh.SGD(lr=lr, momentum=momentum), steps=5)
    w = _final_sgd(problem, lr, momentum)
    direct, g = _direct_and_g(problem, w)
    mixed = _mixed(problem, w, g)
    expected = [a - lr * b for a, b in zip(direct, mixed)]
    assert _close(_run(problem, "sama"), expected) < 1e-9


def _adam_derivative(d, m0, v0, step, lr, betas=(0.9, 0.999), eps=1e-8):
    """``du/dd`` of Adam's update ``u = lr/bc1 m/(sqrt(v)/sqrt(bc2) + eps)``, elementwise (it is diagonal)."""
    b1, b2 = betas
    bc1, bc2s = 1 - b1**step, math.sqrt(1 - b2**step)
    m = b1 * m0 + (1 - b1) * d
    v = b2 * v0 + (1 - b2) * d * d
    den = v.sqrt() / bc2s + eps
    return lr / bc1 * ((1 - b1) / den - m * (1 - b2) * d / (v.sqrt() * bc2s * den**2))


def test_sama_with_adam_takes_the_mixed_derivative_along_adams_own_derivative():
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-8
    problem = ridge_problem(lh.Adam(lr=lr), steps=6)
    h = [x.detach() for x in problem.hyperparameters]
    w = problem.init_params[0].clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for step in range(1, problem.steps + 1):  # a hand-written Adam loop
        x = w.detach().requires_grad_()
        (d,) = torch.autograd.grad(problem.inner_loss([x], h), [x])
        m, v = b1 * m + (1 - b1) * d, b2 * v + (1 - b2) * d * d
        w = w - lr / (1 - b1**step) * m / (v.sqrt() / math.sqrt(1 - b2**step) + eps)
    x = w.detach().requires_grad_()
    (d,) = torch.autograd.grad(problem.inner_loss([x], h), [x])
    direct, g = _direct_and_g(problem, [w])
    along = _adam_derivative(d, m, v, problem.steps + 1, lr) * g[0]
    expected = [a - b for a, b in zip(direct, _mixed(problem, [w], [along]))]
    assert _close(_run(problem, "sama"), expected) < 1e-8
    # Adam's derivative is not lr times the identity: the plain-SGD form of the direction is far off
    sgd_form = [a - lr * b for a, b in zip(direct, _mixed(problem, [w], g))]
    assert _close(sgd_form, expected) > 1e-2


@pytest.mark.parametrize("optimizer", [lambda: lh.SGD(lr=0.3, momentum=0.5), lambda: lh.Adam(lr=0.05)])
def test_the_error_of_sama_falls_as_the_radius_squared_on_a_nonlinear_loss(optimizer):
    problem = tanh_problem(optimizer())
    reference = _run(problem, "sama(radius=1e-4)")  # rounding ~1e-12 here, truncation ~1e-8 * third derivative
    radii = [0.4, 0.2, 0.1, 0.05]
    errors = [_close(_run(problem, f"sama(radius={r})"), reference) for r in radii]
    slope = (math.log(errors[0]) - math.log(errors[-1])) / (math.log(radii[0]) - math.log(radii[-1]))
    assert 1.8 < slope < 2.2, (errors, slope)


def test_sama_differs_from_t1t2_fd_which_takes_its_term_at_the_last_steps_start():
    problem = ridge_problem(lh.SGD(lr=0.3), steps=3)
    assert _close(_run(problem, "sama"), _run(problem, "t1t2_fd")) > 1e-3


def test_sama_runs_through_a_once_differentiable_function():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        @once_differentiable
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    scale = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)

    def inner(w, h):
        return Square.apply(x @ (h[0] * w[0]) - 1).mean()

    def outer(w, h):
        return (w[0] ** 2).sum()

    problem = lh.BilevelProblem(inner, outer, [scale], [torch.ones(3)], lh.SGD(lr=0.1), 3)
    (grad,) = _run(problem, "sama")
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the incoming gradient of Square's backward is a constant, so autograd itself would raise nothing and drop
    # Square's part of a second-order hypergradient: the estimators that need it refuse with one line
    for spec in ("t1t2", "rmd", "greedy(0.9)"):
        with pytest.raises(RuntimeError, match="once_differentiable; autograd would drop its part") as error:
            _run(problem, spec)
        assert "\n" not in str(error.value)


def test_with_a_learned_initialization_alone_sama_is_first_order_maml():
    w0 = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    target = torch.tensor([1.0, 2.0, 3.0])
    problem = lh.BilevelProblem(
        inner_loss=lambda w, h: ((w[0] - target) ** 2).sum(),
        outer_loss=lambda w, h: (w[0] ** 3).sum(),
        hyperparameters=[w0],
        init_params=lambda h: [h[0]],
        optimizer=lh.SGD(lr=0.1),
        steps=4,
    )
    w = w0.detach()
    for _ in range(4):  # first-order MAML: dL_val/dw_T applied to w_0, the steps' Jacobians taken as I
        w = w - 0.1 * 2 * (w - target)
    assert _close(_run(problem, "sama"), [3 * w**2]) < 1e-12


@pytest.mark.parametrize("radius", [0, -1.0, float("inf"), True, "0.1"])
def test_the_radius_is_checked(radius):
    with pytest.raises(ValueError, match="SAMA radius must be a finite number > 0"):
        lh.SAMA(radius=radius)
