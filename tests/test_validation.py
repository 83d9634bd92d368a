"""Bad arguments give clear errors or warnings that name the setting; meta-batches accumulate."""

from __future__ import annotations

import math

import pytest
import torch
from bilevel_cases import MLPTask, Ridge

import lightning_hypergrad as lh


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.5, math.nan, math.inf, "0.9"])
def test_greedy_gamma_outside_unit_interval_is_refused(gamma):
    with pytest.raises(ValueError, match=r"Greedy gamma must be in \(0, 1\]"):
        lh.Greedy(gamma)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_fewer_than_one_inner_step_is_refused(steps):
    ridge = Ridge()
    with pytest.raises(ValueError, match="steps .T, the number of inner steps. must be an integer >= 1"):
        lh.BilevelProblem(ridge.inner_loss, ridge.outer_loss, [ridge.a], [ridge.w0], lh.SGD(), steps)


@pytest.mark.parametrize(
    "make, setting",
    [
        (lambda: lh.TruncatedRMD(truncate=0), "truncate"),
        (lambda: lh.Neumann(iterations=0), "iterations"),
        (lambda: lh.ConjugateGradient(iterations=-1), "iterations"),
        (lambda: lh.FMD(max_entries=0), "max_entries"),
        (lambda: lh.Neumann(scale=-1.0), "scale"),
    ],
)
def test_k_below_one_is_refused(make, setting):
    with pytest.raises(ValueError, match=setting):
        make()


def test_truncation_longer_than_the_loop_is_refused():
    with pytest.raises(ValueError, match=r"truncate \(K=20\) exceeds the number of inner steps \(T=5\)"):
        lh.TruncatedRMD(truncate=20)(Ridge().problem(5))


def test_a_hyperparameter_that_no_loss_depends_on_is_refused():
    ridge = Ridge()
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    problem = lh.BilevelProblem(ridge.inner_loss, ridge.outer_loss, [ridge.a, unused], [ridge.w0], lh.SGD(), 3)
    with pytest.raises(ValueError, match=r"hyperparameters\[1\] affect neither the inner loss"):
        lh.Greedy()(problem)


def test_a_loss_that_captures_a_hyperparameter_is_refused():
    ridge = Ridge()
    problem = lh.BilevelProblem(
        lambda w, h: ridge.inner_loss(w, [ridge.a]), ridge.outer_loss, [ridge.a], [ridge.w0], lh.SGD(), 3
    )
    with pytest.raises(ValueError, match=r"use hyperparameters\[0\] directly"):
        lh.RMD()(problem)


def test_a_non_finite_hypergradient_warns_and_is_not_accumulated():
    ridge = Ridge()
    problem = ridge.problem(300, lr=50.0)  # diverges
    with pytest.warns(RuntimeWarning, match="NaN or infinite.*lower the inner optimizer's learning rate"):
        lh.RMD()(problem, accumulate=True)
    assert ridge.a.grad is None
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        lh.RMD(nonfinite="raise")(ridge.problem(300, lr=50.0))


def test_torch_optimizers_are_refused_as_inner_optimizers():
    ridge = Ridge()
    with pytest.raises(TypeError, match="differentiable inner optimizer"):
        lh.BilevelProblem(ridge.inner_loss, ridge.outer_loss, [ridge.a], [ridge.w0], torch.optim.SGD, 3)


def test_hyperparameters_must_require_grad():
    ridge = Ridge()
    with pytest.raises(ValueError, match=r"hyperparameters\[0\] must be a tensor that requires grad"):
        lh.BilevelProblem(ridge.inner_loss, ridge.outer_loss, [ridge.a.detach()], [ridge.w0], lh.SGD(), 3)


def test_fmd_refuses_many_hyperparameter_entries():
    task = MLPTask(features=8)
    with pytest.raises(ValueError, match="9 entries > max_entries=4"):
        lh.FMD(max_entries=4)(task.problem(2))


def test_unknown_estimator_names_list_the_known_ones():
    with pytest.raises(ValueError, match="choose one of auto_greedy, cg, fmd, fo, greedy"):
        lh.get_estimator("adam")
    assert isinstance(lh.get_estimator("Greedy", gamma=0.5), lh.Greedy)


def test_accumulate_sums_the_hypergradients_of_a_meta_batch():
    """Two tasks sharing one hyperparameter: .grad is the sum of their closed-form hypergradients."""
    shared = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    tasks = [Ridge(seed=1), Ridge(seed=2)]
    expected = 0.0
    for ridge in tasks:
        ridge.a = shared
        expected += ridge.unrolled_hypergrad(6, lr=0.1)
        lh.RMD()(ridge.problem(6), accumulate=True)
    assert float(shared.grad) == pytest.approx(expected, rel=1e-10)


def test_result_reports_the_trajectory_and_losses():
    ridge = Ridge()
    result = lh.FO()(ridge.problem(4))
    assert len(result.inner_losses) == 4 and result.inner_losses[-1] < result.inner_losses[0]
    w = ridge.w0.clone()
    H, b = ridge._hessian(), ridge.X.T @ ridge.y / ridge.n
    for _ in range(4):
        w = w - 0.1 * (H @ w - b)
    torch.testing.assert_close(result.params[0], w, rtol=1e-12, atol=1e-14)
    assert result.outer_loss == pytest.approx(float(0.5 * ((ridge.Xv @ w - ridge.yv) ** 2).mean()), rel=1e-12)


@pytest.mark.parametrize(
    "which, bad, message",
    [
        (
            "inner",
            lambda w, h: (w[0] - h[0]) ** 2,
            r"inner_loss must return a scalar tensor, but it returned a tensor "
            r"of shape \(3,\): reduce it",
        ),
        ("outer", lambda w, h: 0.5, r"outer_loss must return a scalar tensor, but it returned float 0.5: compute it"),
        ("outer", lambda w, h: None, r"outer_loss must return a scalar tensor, but it returned NoneType None"),
    ],
)
def test_a_loss_that_is_not_a_scalar_tensor_is_named(which, bad, message):
    a = torch.zeros(3, requires_grad=True)
    good = lambda w, h: ((w[0] - h[0]) ** 2).sum()  # noqa: E731
    inner, outer = (bad, good) if which == "inner" else (good, bad)
    problem = lh.BilevelProblem(
        inner, outer, hyperparameters=[a], init_params=[torch.ones(3)], optimizer=lh.SGD(lr=0.1), steps=2
    )
    for estimator in (lh.T1T2(), lh.RMD()):
        with pytest.raises(TypeError, match=message):
            estimator(problem)
