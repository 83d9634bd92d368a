"""The exact estimators (RMD, truncated RMD with K = T, FMD) against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
from bilevel_cases import MLPTask, Ridge, central_difference, features_problem_factory

import lightning_hypergrad as lh


def simulate_outer_loss(
    task: MLPTask, steps: int, log_wd, temp, lr: float = 0.3, momentum: float = 0.9, optimizer=None
) -> float:
    """``L_val(w_T)`` with the inner loop run by ``torch.optim`` itself (independent of the library).

    ``optimizer(params)`` builds the torch optimizer; by default ``torch.optim.SGD(lr, momentum)``.
    """
    w = [p.clone().requires_grad_() for p in task.w0]
    opt = optimizer(w) if optimizer is not None else torch.optim.SGD(w, lr=lr, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        task.inner_loss(w, [log_wd]).backward()
        opt.step()
    with torch.no_grad():
        return float(task.outer_loss(w, [log_wd, temp]))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("steps", [1, 7, 40])
def test_rmd_equals_closed_form_of_unrolled_descent_on_ridge(steps, momentum):
    ridge = Ridge()
    expected = ridge.unrolled_hypergrad(steps, lr=0.1, momentum=momentum)
    got = lh.RMD()(ridge.problem(steps, lr=0.1, momentum=momentum)).hypergrads[0]
    assert float(got) == pytest.approx(expected, rel=1e-8, abs=1e-14)
    assert expected != 0.0


def test_rmd_equals_finite_differences_for_a_loss_hyperparameter():
    task, steps = MLPTask(), 12
    result = lh.RMD()(task.problem(steps, lh.SGD(lr=0.3, momentum=0.9)))
    lw, tp = task.log_wd.detach(), task.temp.detach()
    fd_wd = central_difference(lambda x: simulate_outer_loss(task, steps, x, tp, 0.3), lw)
    fd_temp = central_difference(lambda x: simulate_outer_loss(task, steps, lw, x, 0.3), tp)
    torch.testing.assert_close(result.hypergrads[0], fd_wd, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(result.hypergrads[1], fd_temp, rtol=1e-5, atol=1e-9)
    assert fd_wd.abs().min() > 1e-6


def test_rmd_equals_finite_differences_for_the_inner_learning_rate():
    task, steps = MLPTask(), 12
    log_lr = task.log_lr
    optimizer = lh.SGD(lr=lambda h: h[2].exp(), momentum=0.9)
    problem = task.problem(steps, optimizer, hyperparameters=[task.log_wd, task.temp, log_lr])
    got = lh.RMD()(problem).hypergrads[2]
    lw, tp = task.log_wd.detach(), task.temp.detach()
    fd = central_difference(lambda x: simulate_outer_loss(task, steps, lw, tp, math.exp(float(x))), log_lr.detach())
    torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-10)
    assert abs(float(fd)) > 1e-6


def test_rmd_through_adam_equals_finite_differences():
    task, steps = MLPTask(seed=1), 8
    lw, tp = task.log_wd.detach(), task.temp.detach()

    def simulate(log_lr: torch.Tensor) -> float:
        return simulate_outer_loss(task, steps, lw, tp, optimizer=lambda w: torch.optim.Adam(w, lr=math.exp(log_lr)))

    alpha = [task.log_wd, task.temp, task.log_lr]
    problem = task.problem(steps, lh.Adam(lr=lambda h: h[2].exp()), hyperparameters=alpha)
    got = lh.RMD()(problem).hypergrads[2]
    fd = central_difference(simulate, task.log_lr.detach())
    torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-10)


def test_rmd_through_features_equals_finite_differences():
    """With ``features``, the hyperparameters reach the losses through tensors computed once per problem."""
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    task, steps = MLPTask(), 6
    x_raw, xv_raw = task.x.clone(), task.xv.clone()

    def make_loss(base):
        def loss(w, h, base=base):
            task.x, task.xv = h[0], h[1]
            try:
                return base(w, [task.log_wd.detach()])
            finally:
                task.x, task.xv = x_raw, xv_raw

        return loss

    problem = lh.BilevelProblem(
        make_loss(task.inner_loss),
        make_loss(task.outer_loss),
        [proj],
        task.w0,
        lh.SGD(lr=0.3, momentum=0.9),
        steps,
        features=lambda: [torch.tanh(x_raw @ proj), torch.tanh(xv_raw @ proj)],
    )
    got = lh.RMD()(problem).hypergrads[0]

    def simulate(p: torch.Tensor) -> float:
        task.x, task.xv = torch.tanh(x_raw @ p), torch.tanh(xv_raw @ p)
        try:
            return simulate_outer_loss(task, steps, task.log_wd.detach(), None, 0.3)
        finally:
            task.x, task.xv = x_raw, xv_raw

    task_outer = task.outer_loss
    task.outer_loss = lambda w, h: task_outer(w, h[:1])
    try:
        fd = central_difference(simulate, proj.detach())
    finally:
        task.outer_loss = task_outer
    torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-9)


def test_truncated_rmd_with_k_equal_to_t_is_rmd():
    task, steps = MLPTask(), 9
    exact = lh.RMD()(task.problem(steps)).hypergrads
    truncated = lh.TruncatedRMD(truncate=steps)(task.problem(steps)).hypergrads
    for a, b in zip(truncated, exact):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fmd_equals_rmd_for_up_to_ten_entries(optimizer):
    task = MLPTask(features=8)
    steps = 10
    if optimizer == "sgd":
        opt = lh.SGD(lr=lambda h: h[2].exp(), momentum=0.9, nesterov=True)
    else:
        opt = lh.Adam(lr=lambda h: h[2].exp() * 0.1)
    hyperparameters = [task.log_wd, task.temp, task.log_lr]  # 8 + 1 + 1 = 10 entries
    forward = lh.FMD()(task.problem(steps, opt, hyperparameters)).hypergrads
    reverse = lh.RMD()(task.problem(steps, opt, hyperparameters)).hypergrads
    for f, r in zip(forward, reverse):
        torch.testing.assert_close(f, r, rtol=1e-8, atol=1e-14)
    assert all(float(r.abs().max()) > 0 for r in reverse)


def test_fmd_through_features_equals_rmd():
    problem, _ = features_problem_factory(5)
    torch.testing.assert_close(lh.FMD()(problem()).hypergrads[0], lh.RMD()(problem()).hypergrads[0], rtol=1e-8, atol=0)


def test_rmd_and_fmd_equal_finite_differences_for_a_logit_momentum():
    task, steps = MLPTask(seed=2), 8
    logit = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    lw, tp = task.log_wd.detach(), task.temp.detach()

    def simulate(x: torch.Tensor) -> float:
        momentum = float(torch.sigmoid(x))
        return simulate_outer_loss(
            task, steps, lw, tp, optimizer=lambda w: torch.optim.SGD(w, lr=0.3, momentum=momentum)
        )

    optimizer = lh.SGD(lr=0.3, momentum=lambda h: torch.sigmoid(h[2]))
    hyperparameters = [task.log_wd, task.temp, logit]
    fd = central_difference(simulate, logit.detach())
    for estimator in (lh.RMD(), lh.FMD()):
        got = estimator(task.problem(steps, optimizer, hyperparameters=hyperparameters)).hypergrads[2]
        torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-10)
    assert abs(float(fd)) > 1e-6
