"""Greedy(gamma) and T1-T2 against eq. 6 of the paper, evaluated by brute force, and their limits."""

from __future__ import annotations

import pytest
import torch
from bilevel_cases import MLPTask, Ridge, flat, unflat
from torch.autograd.functional import jacobian

import lightning_hypergrad as lh

LR, MOMENTUM = 0.3, 0.9


def eq6_brute_force(task: MLPTask, steps: int, gamma: float) -> torch.Tensor:
    """Eq. 6 with explicit Jacobians: ``grad_a L_val(w_T) + sum_t gamma^(T-t) g_t B_t``, a = (log_wd, temp).

    The trajectory comes from ``torch.optim.SGD``; ``B_t`` is the Jacobian (by
    ``torch.autograd.functional.jacobian``) of a hand-written heavy-ball step from the recorded ``w_{t-1}`` and
    momentum buffer ``s_{t-1}``; ``g_t`` is the Jacobian of ``L_val`` at the recorded ``w_t``.
    """
    n_wd = task.log_wd.numel()
    alpha = torch.cat([task.log_wd.detach(), task.temp.detach().reshape(1)])

    def split(a):
        return [a[:n_wd], a[n_wd]]

    w = [p.clone().requires_grad_() for p in task.w0]
    opt = torch.optim.SGD(w, lr=LR, momentum=MOMENTUM)
    record = []
    for _ in range(steps):
        before = [p.detach().clone() for p in w]
        bufs = [opt.state[p]["momentum_buffer"].clone() if p in opt.state else None for p in w]
        opt.zero_grad()
        task.inner_loss(w, split(alpha)).backward()
        opt.step()
        record.append((before, bufs, [p.detach().clone() for p in w]))

    total = jacobian(lambda a: task.outer_loss(record[-1][2], split(a)), alpha)
    for t, (before, bufs, after) in enumerate(record, start=1):

        def step(a, before=before, bufs=bufs):
            w_prev = [p.clone().requires_grad_() for p in before]
            grads = torch.autograd.grad(task.inner_loss(w_prev, split(a)), w_prev, create_graph=True)
            new = []
            for p, g, buf in zip(w_prev, grads, bufs):
                v = g if buf is None else MOMENTUM * buf + g
                new.append(p - LR * v)
            return flat(new)

        B_t = jacobian(step, alpha)  # (P, H)
        g_t = jacobian(lambda v, after=after: task.outer_loss(unflat(v, after), split(alpha)), flat(after))  # (P,)
        total = total + gamma ** (steps - t) * (g_t @ B_t)
    return total


@pytest.mark.parametrize("gamma", [0.5, 0.99, 1.0])
def test_greedy_equals_eq6_from_explicit_jacobians(gamma):
    task, steps = MLPTask(), 8
    expected = eq6_brute_force(task, steps, gamma)
    got = lh.Greedy(gamma)(task.problem(steps, lh.SGD(lr=LR, momentum=MOMENTUM))).hypergrads
    torch.testing.assert_close(flat(got), expected, rtol=1e-8, atol=1e-13)


def test_greedy_tends_to_t1t2_as_gamma_vanishes():
    task, steps = MLPTask(), 8
    greedy = lh.Greedy(1e-12)(task.problem(steps)).hypergrads
    t1t2 = lh.T1T2()(task.problem(steps)).hypergrads
    for a, b in zip(greedy, t1t2):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=0)
    # and T1-T2 is eq. 6 keeping only the last term
    torch.testing.assert_close(flat(t1t2), eq6_brute_force(task, steps, 1e-300), rtol=1e-8, atol=1e-13)


def test_t1t2_is_rmd_when_there_is_one_step():
    task = MLPTask()
    t1t2 = lh.T1T2()(task.problem(1)).hypergrads
    rmd = lh.RMD()(task.problem(1)).hypergrads
    for a, b in zip(t1t2, rmd):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


def test_truncated_rmd_with_one_step_is_t1t2():
    task, steps = MLPTask(), 9
    truncated = lh.TruncatedRMD(truncate=1)(task.problem(steps)).hypergrads
    t1t2 = lh.T1T2()(task.problem(steps)).hypergrads
    for a, b in zip(truncated, t1t2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


def test_greedy_differs_from_rmd_and_from_t1t2_on_a_long_horizon():
    """A sanity check that the three are different estimators, on the ridge problem's closed forms."""
    ridge = Ridge()
    steps = 30
    exact = ridge.unrolled_hypergrad(steps, lr=0.1)
    greedy = float(lh.Greedy(0.9)(ridge.problem(steps)).hypergrads[0])
    t1t2 = float(lh.T1T2()(ridge.problem(steps)).hypergrads[0])
    assert greedy != pytest.approx(exact, rel=1e-3)
    assert greedy != pytest.approx(t1t2, rel=1e-3)


def test_greedy_through_the_inner_learning_rate_equals_eq6():
    """With the learning rate as a hyperparameter, B_t = -dPhi/d log_lr = -lr * v_t (plain SGD, checked by hand)."""
    ridge = Ridge()
    steps, gamma = 6, 0.8
    log_lr = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    problem = lh.BilevelProblem(
        ridge.inner_loss, ridge.outer_loss, [ridge.a, log_lr], [ridge.w0], lh.SGD(lr=lambda h: h[1].exp()), steps
    )
    got = lh.Greedy(gamma)(problem).hypergrads[1]
    lr = float(log_lr.detach().exp())
    H, b = ridge._hessian(), ridge.X.T @ ridge.y / ridge.n
    w, expected = ridge.w0.clone(), 0.0
    for t in range(1, steps + 1):
        g = H @ w - b
        w = w - lr * g
        expected += gamma ** (steps - t) * float(ridge._val_grad(w) @ (-lr * g))
    assert float(got) == pytest.approx(expected, rel=1e-10)
