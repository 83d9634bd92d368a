"""The IFT estimators (Neumann series, conjugate gradient) against the implicit-function closed form."""

from __future__ import annotations

import pytest
import torch
from bilevel_cases import MLPTask, Ridge

import lightning_hypergrad as lh

CONVERGED_STEPS = 3000  # plain gradient descent on the ridge problem reaches its optimum to machine precision


def relative_error(got: torch.Tensor, expected: float) -> float:
    return abs(float(got) - expected) / abs(expected)


def test_neumann_converges_to_the_implicit_closed_form():
    ridge = Ridge()
    expected = ridge.implicit_hypergrad()
    got = lh.Neumann(iterations=600, scale=0.5)(ridge.problem(CONVERGED_STEPS, lr=0.5)).hypergrads[0]
    assert relative_error(got, expected) < 1e-6


def test_neumann_error_shrinks_with_more_terms():
    ridge = Ridge()
    expected = ridge.implicit_hypergrad()
    problem = ridge.problem(CONVERGED_STEPS, lr=0.5)
    errors = [relative_error(lh.Neumann(iterations=k, scale=0.5)(problem).hypergrads[0], expected) for k in (2, 10, 50)]
    assert errors[0] > errors[1] > errors[2]


def test_conjugate_gradient_converges_to_the_implicit_closed_form():
    ridge = Ridge()
    expected = ridge.implicit_hypergrad()
    got = lh.ConjugateGradient(iterations=ridge.d)(ridge.problem(CONVERGED_STEPS, lr=0.5)).hypergrads[0]
    assert relative_error(got, expected) < 1e-6


def test_implicit_estimators_use_the_optimizers_weight_decay():
    """SGD's weight decay is part of the stationary condition: ridge with the penalty in the optimizer."""
    ridge = Ridge(log_ridge=-3.0)
    wd = 0.2

    def inner(w, h):
        return 0.5 * ((ridge.X @ w[0] - ridge.y) ** 2).mean() + 0.5 * h[0].exp() * (w[0] ** 2).sum()

    problem = lh.BilevelProblem(
        inner, ridge.outer_loss, [ridge.a], [ridge.w0], lh.SGD(lr=0.5, weight_decay=wd), CONVERGED_STEPS
    )
    # closed form with ridge strength exp(a) + wd
    H = ridge.X.T @ ridge.X / ridge.n + (ridge.a.detach().exp() + wd) * torch.eye(ridge.d, dtype=torch.float64)
    w_star = torch.linalg.solve(H, ridge.X.T @ ridge.y / ridge.n)
    expected = float(-ridge._val_grad(w_star) @ torch.linalg.solve(H, ridge.a.detach().exp() * w_star))
    got = lh.ConjugateGradient(iterations=ridge.d)(problem).hypergrads[0]
    assert relative_error(got, expected) < 1e-6


@pytest.mark.parametrize("estimator", [lh.Neumann(scale=0.1), lh.ConjugateGradient()])
def test_implicit_estimators_refuse_optimizer_hyperparameters(estimator):
    task = MLPTask()
    problem = task.problem(3, lh.SGD(lr=lambda h: h[2].exp()), hyperparameters=[task.log_wd, task.temp, task.log_lr])
    with pytest.raises(ValueError, match="inner optimizer's own settings.*lr"):
        estimator(problem)


def test_implicit_estimators_refuse_adamw_weight_decay():
    task = MLPTask()
    with pytest.raises(ValueError, match="AdamW"):
        lh.ConjugateGradient()(task.problem(3, lh.AdamW(lr=0.01, weight_decay=0.1)))
