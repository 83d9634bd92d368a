"""Greedy's fused per-step terms (one batched call after the loop) against the streamed form and eq. 6 by brute force,
and when ``fused="auto"`` chooses each."""

from __future__ import annotations

import pytest
import torch
from bilevel_cases import MLPTask, features_problem_factory, flat
from test_greedy import LR, MOMENTUM, eq6_brute_force

import lightning_hypergrad as lh
from lightning_hypergrad.estimators import greedy as greedy_module


def _both(make, gamma: float = 0.9):
    streamed = lh.Greedy(gamma, fused=False)(make())
    fused_estimator = lh.Greedy(gamma, fused=True)
    assert fused_estimator.fuses(make())
    fused = fused_estimator(make())
    return streamed, fused


def _equal(a, b, rtol: float = 1e-12):
    for x, y in zip(a.hypergrads, b.hypergrads):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-15)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    for x, y in zip(a.params, b.params):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("gamma", [0.5, 0.99, 1.0])
def test_fused_equals_eq6_from_explicit_jacobians(gamma):
    task, steps = MLPTask(), 8
    got = lh.Greedy(gamma, fused=True)(task.problem(steps, lh.SGD(lr=LR, momentum=MOMENTUM))).hypergrads
    torch.testing.assert_close(flat(got), eq6_brute_force(task, steps, gamma), rtol=1e-8, atol=1e-13)


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: lh.SGD(lr=0.3),
        lambda: lh.SGD(lr=0.3, momentum=0.9),
        lambda: lh.SGD(lr=0.3, momentum=0.9, nesterov=True),
        lambda: lh.SGD(lr=0.3, momentum=0.8, dampening=0.3, weight_decay=0.01),
    ],
    ids=["plain", "momentum", "nesterov", "dampening"],
)
@pytest.mark.parametrize("steps", [2, 9])
def test_fused_equals_streamed_for_loss_hyperparameters(optimizer, steps):
    task = MLPTask()
    _equal(*_both(lambda: task.problem(steps, optimizer())))


@pytest.mark.parametrize(("budget", "largest"), [(1, 1), (60_000, 3), (2**26, 8)])
def test_fused_in_chunks_equals_streamed(monkeypatch, budget, largest):
    """Chunks of one step (a budget of 1 byte), of a few steps (about 19 kB saved per step here) or all the steps
    after the first of each group give the same sum."""
    chunks = []
    fused_terms = greedy_module._fused_terms

    def spy(problem, h, entries, state):
        chunks.append(len(entries))
        return fused_terms(problem, h, entries, state)

    monkeypatch.setattr(greedy_module, "FUSE_MAX_SAVED_BYTES", budget)
    monkeypatch.setattr(greedy_module, "_fused_terms", spy)
    task = MLPTask()
    _equal(*_both(lambda: task.problem(10, lh.SGD(lr=0.3, momentum=0.9))))
    assert sum(chunks) == 10 and max(chunks) == largest  # steps 1 and 2 measured alone, then chunks of steps 3-10


def test_fused_equals_streamed_for_learned_optimizer_settings():
    """The learning rate, momentum and weight decay as hyperparameters (callables of h)."""
    task = MLPTask()
    logit_mu = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    log_wd = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)

    def make():
        opt = lh.SGD(lr=lambda h: h[1].exp(), momentum=lambda h: torch.sigmoid(h[2]), weight_decay=lambda h: h[3].exp())
        return task.problem(7, opt, hyperparameters=[task.log_wd, task.log_lr, logit_mu, log_wd])

    _equal(*_both(make))


def test_fused_equals_streamed_through_features():
    make, _ = features_problem_factory(6)
    _equal(*_both(make, gamma=0.99))


def test_fused_equals_streamed_from_a_carried_state():
    """Online mode: the first step starts from a state of step > 0 (the momentum buffer carried over)."""
    task = MLPTask()
    state = lh.OptimizerState(5, {"momentum_buffer": [0.1 * torch.ones_like(w) for w in task.w0]})

    def make():
        problem = task.problem(5)
        problem.init_state = state
        return problem

    _equal(*_both(make))


def test_fused_equals_streamed_for_a_learned_initialization():
    task = MLPTask()
    w0 = [w.clone().requires_grad_() for w in task.w0]

    def make():
        return lh.BilevelProblem(
            task.inner_loss,
            task.outer_loss,
            [task.log_wd, task.temp, *w0],
            lambda h: h[2:],
            lh.SGD(lr=0.3, momentum=0.9),
            6,
        )

    _equal(*_both(make))


def test_auto_fuses_small_problems_and_streams_the_others(monkeypatch):
    task = MLPTask()
    greedy = lh.Greedy(0.99)
    assert greedy.fuses(task.problem(10))
    assert not greedy.fuses(task.problem(10, lh.Adam(lr=0.01)))  # Adam's step depends on t

    class Scheduled(lh.SGD):
        pass

    assert not greedy.fuses(task.problem(10, Scheduled(lr=0.1)))  # a subclass may depend on the step
    with_batches = task.problem(10)
    with_batches.inner_step_loss = lambda w, h, t: task.inner_loss(w, h)
    assert not greedy.fuses(with_batches)
    assert not lh.Greedy(0.99, fused=False).fuses(task.problem(10))
    assert not lh.T1T2().fuses(task.problem(10))  # one weighted step: nothing to fuse
    entries = sum(w.numel() for w in task.w0) * 3 * 10  # T (2 P + S) with momentum
    monkeypatch.setattr(greedy_module, "FUSE_MAX_ENTRIES", entries)
    assert greedy.fuses(task.problem(10))
    assert not greedy.fuses(task.problem(11))


def test_auto_streams_when_vmap_cannot_batch_the_loss():
    task = MLPTask()

    def outer(w, h):  # .item() cannot be batched by vmap
        return task.outer_loss(w, h) * (1.0 if w[0].sum().item() < 1e9 else 2.0)

    greedy = lh.Greedy(0.9)
    got = greedy(task.problem(6, outer_loss=outer))
    assert greedy._fusing_failed
    expected = lh.Greedy(0.9, fused=False)(task.problem(6, outer_loss=outer))
    _equal(got, expected, rtol=0)
    with pytest.raises(RuntimeError):
        lh.Greedy(0.9, fused=True)(task.problem(6, outer_loss=outer))


def test_the_spec_string_names_the_override():
    assert str(lh.Greedy(0.99)) == "greedy(0.99)"
    assert str(lh.get_estimator("greedy(0.99, fused=False)")) == "greedy(0.99, fused=False)"
    assert lh.get_estimator("greedy(0.5, fused=True)").fused is True
    with pytest.raises(ValueError, match="fused must be True, False or 'auto'"):
        lh.Greedy(0.9, fused="yes")
