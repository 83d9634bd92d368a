"""Mini-batch inner losses (``BilevelProblem.inner_step_loss``): every estimator sees step t's batch at step t.

The references are a hand-written heavy-ball loop over the same batches, differentiated by plain autograd
(exact hypergradient) and step by step (eq. 6 of the Greedy hypergradient), without the library's inner loop.
"""

from __future__ import annotations

import pytest
import torch

import lightning_hypergrad as lh

STEPS, LR, MOMENTUM, BATCH = 9, 0.2, 0.8, 4


class Batches:
    """Least squares on 12 rows, each step on 4 of them (a fixed draw per step); float64.

    Hyperparameters: ``h[0]`` the log weight decay of each coordinate (in the loss), ``h[1]`` the log learning rate.
    """

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(12, 3, generator=g, dtype=torch.float64)
        self.y = torch.randn(12, generator=g, dtype=torch.float64)
        self.Xv = torch.randn(8, 3, generator=g, dtype=torch.float64)
        self.yv = torch.randn(8, generator=g, dtype=torch.float64)
        self.w0 = 0.3 * torch.randn(3, generator=g, dtype=torch.float64)
        self.rows = [torch.randperm(12, generator=g)[:BATCH] for _ in range(STEPS)]
        self.alpha = [
            torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True),
            torch.tensor(LR, dtype=torch.float64).log().requires_grad_(),
        ]

    def batch_loss(self, w, log_wd, t):
        rows = self.rows[t - 1]
        fit = 0.5 * ((self.X[rows] @ w - self.y[rows]) ** 2).mean()
        return fit + 0.5 * (log_wd.exp() * w**2).sum()

    def outer(self, w):
        return 0.5 * ((self.Xv @ w - self.yv) ** 2).mean()

    def problem(self, steps: int = STEPS) -> lh.BilevelProblem:
        return lh.BilevelProblem(
            inner_loss=lambda w, h: 0.5 * ((self.X @ w[0] - self.y) ** 2).mean(),  # the whole set: not what steps use
            outer_loss=lambda w, h: self.outer(w[0]),
            hyperparameters=self.alpha,
            init_params=[self.w0],
            optimizer=lh.SGD(lr=lambda h: h[1].exp(), momentum=MOMENTUM),
            steps=steps,
            inner_step_loss=lambda w, h, t: self.batch_loss(w[0], h[0], t),
        )

    def step(self, w, v, t, log_wd, log_lr):
        """One heavy-ball step by hand, as torch.optim.SGD computes it (v_1 = g_1)."""
        w = w.detach().requires_grad_() if not w.requires_grad else w
        (g,) = torch.autograd.grad(self.batch_loss(w, log_wd, t), w, create_graph=True)
        v = g if v is None else MOMENTUM * v + g
        return w - log_lr.exp() * v, v

    def exact(self):
        """d L_val(w_T) / d alpha, by autograd through the whole hand-written loop."""
        log_wd, log_lr = (a.detach().clone().requires_grad_() for a in self.alpha)
        w, v = self.w0.clone().requires_grad_(), None
        for t in range(1, STEPS + 1):
            w, v = self.step(w, v, t, log_wd, log_lr)
        return torch.autograd.grad(self.outer(w), [log_wd, log_lr])

    def eq6(self, gamma: float):
        """``sum_t gamma^(T-t) g_t B_t``: each step's Jacobian from the recorded, fixed ``w_{t-1}`` and buffer."""
        log_wd, log_lr = (a.detach().clone().requires_grad_() for a in self.alpha)
        w, v = self.w0.clone(), None
        total = [torch.zeros_like(log_wd), torch.zeros_like(log_lr)]
        for t in range(1, STEPS + 1):
            w_new, v_new = self.step(w.detach(), None if v is None else v.detach(), t, log_wd, log_lr)
            point = w_new.detach().requires_grad_()
            (g_t,) = torch.autograd.grad(self.outer(point), point)
            terms = torch.autograd.grad(w_new, [log_wd, log_lr], grad_outputs=g_t)
            total = [acc + gamma ** (STEPS - t) * term for acc, term in zip(total, terms)]
            w, v = w_new.detach(), v_new.detach()
        return total


def _close(got, expected):
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "spec", ["rmd", "rmd(checkpoint_every=2)", "rmd(checkpoint_every='sqrt')", f"truncated_rmd({STEPS})", "fmd"]
)
def test_exact_estimators_equal_autograd_through_the_mini_batch_loop(spec):
    case = Batches()
    _close(lh.get_estimator(spec)(case.problem()).hypergrads, case.exact())


@pytest.mark.parametrize("gamma", [0.5, 0.9, 1.0])
def test_greedy_equals_eq6_with_each_step_on_its_own_batch(gamma):
    case = Batches()
    _close(lh.Greedy(gamma)(case.problem()).hypergrads, case.eq6(gamma))


def test_t1t2_is_the_last_steps_term_on_the_last_batch():
    case = Batches()
    _close(lh.T1T2()(case.problem()).hypergrads, case.eq6(1e-300))


def test_truncated_rmd_replays_the_last_batches_not_the_first():
    """Truncated reverse mode over K steps is exact RMD of the last K steps, which start from the trajectory's
    w_{T-K}: a reference that reruns the loop by hand and differentiates the last K steps only."""
    case, K = Batches(), 3
    log_wd, log_lr = (a.detach().clone().requires_grad_() for a in case.alpha)
    w, v = case.w0.clone(), None
    for t in range(1, STEPS - K + 1):
        w, v = (x.detach() for x in case.step(w.detach(), v, t, log_wd.detach(), log_lr.detach()))
    w = w.requires_grad_()
    for t in range(STEPS - K + 1, STEPS + 1):
        w, v = case.step(w, v, t, log_wd, log_lr)
    expected = torch.autograd.grad(case.outer(w), [log_wd, log_lr])
    _close(lh.get_estimator(f"truncated_rmd({K})")(case.problem()).hypergrads, expected)


def test_the_step_losses_are_what_the_steps_descend():
    """The inner losses the trajectory reports are those of each step's batch, not the whole set's."""
    case = Batches()
    trajectory_losses = lh.RMD()(case.problem()).inner_losses
    w, v = case.w0.clone(), None
    expected = []
    for t in range(1, STEPS + 1):
        expected.append(case.batch_loss(w, case.alpha[0].detach(), t).detach())
        w, v = (x.detach() for x in case.step(w, v, t, case.alpha[0].detach(), case.alpha[1].detach()))
    torch.testing.assert_close(trajectory_losses, torch.stack(expected), rtol=1e-12, atol=0)


def test_a_step_loss_that_is_not_a_function_is_refused():
    case = Batches()
    with pytest.raises(TypeError, match="inner_step_loss must be a function loss"):
        lh.BilevelProblem(
            case.problem().inner_loss,
            case.problem().outer_loss,
            case.alpha,
            [case.w0],
            lh.SGD(),
            3,
            inner_step_loss=1.0,
        )


def test_a_step_loss_that_returns_no_scalar_names_the_step():
    case = Batches()
    problem = case.problem()
    problem.inner_step_loss = lambda w, h, t: w[0] * t
    with pytest.raises(TypeError, match=r"inner_step_loss \(step 1\) must return a scalar tensor"):
        lh.RMD()(problem)
