"""RMD with checkpointing (``RMD(checkpoint_every=K)``): plain RMD's hypergradient, with memory O(P (T/K + K))."""

from __future__ import annotations

import math

import pytest
import torch
from bilevel_cases import MLPTask, Ridge, central_difference, features_problem_factory

import lightning_hypergrad as lh
from lightning_hypergrad.estimators.reverse import memory_optimal_segment
from lightning_hypergrad.optim.base import OptimizerState
from studies.common import AllocatorPeak, LiveTensorPeak, SavedTensorsPeak

STEPS = 10
SEGMENTS = [1, 2, 3, STEPS, STEPS + 5, "sqrt", "auto"]  # 3 does not divide T; T and T + 5 are one segment


def assert_same_result(got: lh.HypergradResult, expected: lh.HypergradResult) -> None:
    """Same hypergradient to rtol 1e-12, and the same trajectory (losses, w_T, s_T).

    The summation order differs (by segment), so an entry far smaller than its tensor's largest (a cancellation)
    is compared to 1e-12 of that largest entry.
    """
    for a, b in zip(got.hypergrads, expected.hypergrads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))
    assert any(float(b.abs().max()) > 0 for b in expected.hypergrads)
    assert torch.equal(got.inner_losses, expected.inner_losses)
    assert got.outer_loss == expected.outer_loss
    for a, b in zip(got.params, expected.params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert got.state.step == expected.state.step
    for a, b in zip(got.state.tensors(), expected.state.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def compare(make_problem, every) -> None:
    expected = lh.RMD()(make_problem())
    got = lh.RMD(checkpoint_every=every)(make_problem())
    assert_same_result(got, expected)


@pytest.mark.parametrize("every", SEGMENTS, ids=str)
@pytest.mark.parametrize("nesterov", [False, True])
def test_equals_rmd_through_sgd_with_momentum(every, nesterov):
    """Linear regression (ridge) and an MLP whose inner learning rate is a hyperparameter too."""
    ridge = Ridge()
    compare(lambda: ridge.problem(STEPS, lr=0.1, momentum=0.9), every)
    task = MLPTask()
    optimizer = lh.SGD(lr=lambda h: h[2].exp(), momentum=0.9, nesterov=nesterov)
    compare(lambda: task.problem(STEPS, optimizer, [task.log_wd, task.temp, task.log_lr]), every)


@pytest.mark.parametrize("every", SEGMENTS, ids=str)
def test_equals_rmd_through_adam(every):
    task = MLPTask(seed=1)
    optimizer = lh.Adam(lr=lambda h: 0.1 * h[2].exp())  # carries two moments and the step counter
    compare(lambda: task.problem(STEPS, optimizer, [task.log_wd, task.temp, task.log_lr]), every)


@pytest.mark.parametrize("every", SEGMENTS, ids=str)
def test_equals_rmd_through_features(every):
    problem, _ = features_problem_factory(STEPS)
    compare(problem, every)


@pytest.mark.parametrize("every", [2, 3])
def test_equals_rmd_from_a_carried_optimizer_state(every):
    """Online mode: the problem starts from momentum buffers and a step counter carried over."""
    task = MLPTask(seed=2)
    carried = lh.RMD()(task.problem(4, lh.Adam(lr=0.05))).state
    assert carried is not None and carried.step == 4

    def problem():
        p = task.problem(7, lh.Adam(lr=0.05))
        p.init_state = OptimizerState(carried.step, {k: list(v) for k, v in carried.buffers.items()})
        return p

    compare(problem, every)


@pytest.mark.parametrize("every", [1, 2, 3, 7, 9, "sqrt"], ids=str)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_equals_closed_form_of_unrolled_descent_on_ridge(every, momentum):
    ridge, steps = Ridge(), 7
    expected = ridge.unrolled_hypergrad(steps, lr=0.1, momentum=momentum)
    got = lh.RMD(checkpoint_every=every)(ridge.problem(steps, lr=0.1, momentum=momentum)).hypergrads[0]
    assert float(got) == pytest.approx(expected, rel=1e-10, abs=1e-14)
    assert expected != 0.0


def test_equals_finite_differences_through_adam():
    task, steps = MLPTask(seed=1), 8
    lw = task.log_wd.detach()

    def simulate(log_lr: torch.Tensor) -> float:
        w = [p.clone().requires_grad_() for p in task.w0]
        opt = torch.optim.Adam(w, lr=0.1 * math.exp(log_lr))
        for _ in range(steps):
            opt.zero_grad()
            task.inner_loss(w, [lw]).backward()
            opt.step()
        with torch.no_grad():
            return float(task.outer_loss(w, [lw, task.temp.detach()]))

    problem = task.problem(steps, lh.Adam(lr=lambda h: 0.1 * h[2].exp()), [task.log_wd, task.temp, task.log_lr])
    got = lh.RMD(checkpoint_every=3)(problem).hypergrads[2]
    fd = central_difference(simulate, task.log_lr.detach())
    torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-10)
    assert abs(float(fd)) > 1e-6


@pytest.mark.parametrize(
    "spec", ["rmd", "rmd(checkpoint_every=5)", "rmd(checkpoint_every='sqrt')", "rmd(checkpoint_every='auto')"]
)
def test_spec_string_round_trips(spec):
    estimator = lh.get_estimator(spec)
    assert type(estimator) is lh.RMD and str(estimator) == spec
    assert vars(lh.get_estimator(str(estimator))) == vars(estimator)


def test_spec_strings_of_the_constructor():
    assert str(lh.RMD()) == "rmd" and str(lh.RMD(checkpoint_every=None)) == "rmd"
    assert str(lh.RMD(checkpoint_every=5)) == "rmd(checkpoint_every=5)"
    assert str(lh.RMD(checkpoint_every="sqrt", nonfinite="raise")) == "rmd(checkpoint_every='sqrt', nonfinite='raise')"
    assert lh.get_estimator("rmd(checkpoint_every=5)").checkpoint_every == 5


@pytest.mark.parametrize("every", [0, -1, 2.5, "abc", True, "5"], ids=repr)
def test_invalid_segment_length_is_refused(every):
    with pytest.raises(ValueError, match="checkpoint_every"):
        lh.RMD(checkpoint_every=every)
    spec = f"rmd(checkpoint_every={every!r})"
    with pytest.raises(ValueError, match="checkpoint_every"):
        lh.get_estimator(spec)


@pytest.mark.parametrize("steps, expected", [(1, 1), (2, 2), (4, 2), (5, 3), (64, 8), (65, 9), (200, 15)])
def test_sqrt_is_the_ceiling_of_the_square_root_of_t(steps, expected):
    assert lh.RMD(checkpoint_every="sqrt").segment_length(steps) == expected
    assert lh.RMD(checkpoint_every=4).segment_length(steps) == 4 and lh.RMD().segment_length(steps) is None


def peak_saved_bytes(estimator: lh.HypergradEstimator, steps: int, meter=None) -> int:
    task = MLPTask(features=6, hidden=16, n=32)
    problem = task.problem(steps, lh.SGD(lr=0.1, momentum=0.9))
    return (meter or SavedTensorsPeak()).measure(lambda: estimator(problem))


def test_checkpointing_saves_far_fewer_bytes_than_rmd():
    """Peak bytes saved for backward (the stored checkpoints, T/K copies of (w, s), are not saved for backward)."""
    plain_16, plain_64 = peak_saved_bytes(lh.RMD(), 16), peak_saved_bytes(lh.RMD(), 64)
    checkpointed_64 = peak_saved_bytes(lh.RMD(checkpoint_every=8), 64)
    assert plain_64 >= 3 * plain_16  # plain RMD's grows with T
    assert 0 < checkpointed_64 < 0.4 * plain_64
    assert peak_saved_bytes(lh.RMD(checkpoint_every=8), 16) == pytest.approx(checkpointed_64, rel=0.1)  # O(K), not T
    assert peak_saved_bytes(lh.RMD(checkpoint_every=64), 64) == plain_64  # one segment: plain RMD


def test_checkpointing_allocates_far_fewer_bytes_than_rmd():
    """Peak of all live tensor bytes (torch.profiler), checkpoints included."""
    plain = peak_saved_bytes(lh.RMD(), 64, AllocatorPeak())
    checkpointed = peak_saved_bytes(lh.RMD(checkpoint_every=8), 64, AllocatorPeak())
    assert 0 < checkpointed < 0.4 * plain


def test_auto_is_the_segment_length_of_least_memory():
    """Every K from 1 to T measured (live tensor bytes): 'auto''s K costs at most 5% more than the least of them,
    and less than 'sqrt''s K (a step's graph here is 11x its (w, s): K = 2, not 5; measured 128 against 179 KB)."""
    steps = 25
    task = MLPTask(features=6, hidden=16, n=64)

    def peak(every) -> int:
        return LiveTensorPeak().measure(
            lambda: lh.RMD(checkpoint_every=every)(task.problem(steps, lh.SGD(lr=0.1, momentum=0.9)))
        )

    problem = task.problem(steps, lh.SGD(lr=0.1, momentum=0.9))
    chosen = memory_optimal_segment(problem, problem.hyperparameters)
    peaks = {k: peak(k) for k in range(1, steps + 1)}
    assert peaks[chosen] <= 1.05 * min(peaks.values())
    assert peaks[chosen] < 0.8 * peaks[math.isqrt(steps - 1) + 1]
    assert peak("auto") <= 1.05 * min(peaks.values())  # the measurement of step 1's graph included


def test_auto_measures_nothing_for_one_step(monkeypatch):
    """At T = 1 there is nothing to checkpoint: no step is built only to be measured (plain RMD's time)."""
    from lightning_hypergrad.estimators import reverse

    problem = MLPTask(features=6, hidden=16, n=64).problem(1, lh.SGD(lr=0.1, momentum=0.9))
    expected = lh.RMD()(problem)
    monkeypatch.setattr(reverse, "step_bytes", lambda *a: pytest.fail("step 1 was measured at T = 1"))
    assert_same_result(lh.RMD(checkpoint_every="auto")(problem), expected)
