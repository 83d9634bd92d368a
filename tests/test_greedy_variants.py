"""MomentumGreedy and GreedyTail against their formulas assembled from explicit step Jacobians, and their limits.

The reference builds, for a hand-written torch SGD step on the state ``z = (w, b)`` (parameters and momentum
buffer), the full step Jacobians ``A_t = dz_t/dz_(t-1)`` and ``B_t = dz_t/dalpha`` with
``torch.autograd.functional.jacobian`` along a trajectory run by ``torch.optim.SGD``, and assembles each
estimator's formula by hand from them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from bilevel_cases import MLPTask, flat, unflat
from torch.autograd.functional import jacobian

import lightning_hypergrad as lh

STEPS = 6
DT = torch.float64


Setting = float | Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass
class Config:
    """An SGD configuration; a setting is a number or a function of the hyperparameters."""

    lr: Setting
    mu: Setting
    dampening: float = 0.0
    nesterov: bool = False
    extra: float | None = None  # a third (scalar) hyperparameter, which lr or mu uses

    def hyperparameters(self, task) -> list[torch.Tensor]:
        alpha = [task.log_wd, task.temp]
        if self.extra is not None:
            alpha.append(torch.tensor(self.extra, dtype=DT, requires_grad=True))
        return alpha

    def value(self, setting: Setting, h):
        return setting(h) if callable(setting) else setting


CONFIGS = {
    "heavy_ball": Config(0.3, 0.9),
    "nesterov": Config(0.3, 0.9, nesterov=True),
    "dampening": Config(0.3, 0.8, dampening=0.3),
    "lr_hyperparameter": Config(lambda a: a[2].exp(), 0.9, extra=-1.2),
    "momentum_hyperparameter": Config(0.3, lambda a: torch.sigmoid(a[2]), extra=1.0),
    "nesterov_momentum_hyperparameter": Config(0.2, lambda a: torch.sigmoid(a[2]), nesterov=True, extra=0.5),
}


def library_problem(task, config: Config, alpha=None, steps: int = STEPS) -> lh.BilevelProblem:
    optimizer = lh.SGD(lr=config.lr, momentum=config.mu, dampening=config.dampening, nesterov=config.nesterov)
    alpha = alpha if alpha is not None else config.hyperparameters(task)
    return lh.BilevelProblem(task.inner_loss, task.outer_loss, alpha, task.w0, optimizer, steps)


@dataclass
class Terms:
    """The pieces of the formulas, each a row vector over the flattened hyperparameters."""

    direct: torch.Tensor
    exact: list[torch.Tensor]  # g_T (prod_{k>t} A_k) B_t, t = 1..T
    greedy: list[torch.Tensor]  # g_t B_t
    propagated: list[torch.Tensor]  # g_t (prod_{k>t} A0_k) B_t, A0 = A with the gradient held constant


def brute_force_terms(task, config: Config, alpha_list=None, steps: int = STEPS) -> Terms:
    """The terms for the hyperparameters ``alpha_list``: a tensor, then scalars (those lr and mu may use)."""
    alpha_list = alpha_list if alpha_list is not None else config.hyperparameters(task)
    sizes = [a.numel() for a in alpha_list]
    alpha = torch.cat([a.detach().reshape(-1) for a in alpha_list])

    def split(a):
        parts = list(torch.split(a, sizes))
        return [parts[0], parts[1].reshape(()), *[p.reshape(()) for p in parts[2:]]]

    lr_value = float(config.value(config.lr, split(alpha)))
    mu_value = float(config.value(config.mu, split(alpha)))
    P = sum(p.numel() for p in task.w0)

    # the trajectory, by torch.optim.SGD
    w = [p.clone().requires_grad_() for p in task.w0]
    opt = torch.optim.SGD(w, lr=lr_value, momentum=mu_value, dampening=config.dampening, nesterov=config.nesterov)
    states = [torch.cat([flat(w).detach(), torch.zeros(P, dtype=DT)])]
    for _ in range(steps):
        opt.zero_grad()
        task.inner_loss(w, split(alpha)).backward()
        opt.step()
        bufs = [opt.state[p].get("momentum_buffer") for p in w]
        b = torch.zeros(P, dtype=DT) if bufs[0] is None else flat(bufs)
        states.append(torch.cat([flat(w).detach(), b.detach().clone()]))

    def step(z, a, first, direction=None):
        """One torch SGD step on z = (w, b); with ``direction``, the gradient is that constant."""
        w_flat, b = z[:P], z[P:]
        h = split(a)
        if direction is None:
            if not w_flat.requires_grad:
                w_flat = w_flat.detach().requires_grad_()
            d = torch.autograd.grad(task.inner_loss(unflat(w_flat, task.w0), h), w_flat, create_graph=True)[0]
        else:
            d = direction
        lr, mu = config.value(config.lr, h), config.value(config.mu, h)
        b_new = d if first else mu * b + (1 - config.dampening) * d
        update = d + mu * b_new if config.nesterov else b_new
        return torch.cat([w_flat - lr * update, b_new])

    A, B, D = [], [], []
    for t in range(1, steps + 1):
        z_prev = states[t - 1]
        new = step(z_prev, alpha, t == 1)
        # the hand-written step reproduces torch's trajectory
        torch.testing.assert_close(new[:P].detach(), states[t][:P], rtol=1e-12, atol=1e-14)
        A_t, B_t = jacobian(lambda z, a, t=t: step(z, a, t == 1), (z_prev, alpha))
        A.append(A_t)
        B.append(B_t)
        w_prev = z_prev[:P].clone().requires_grad_()
        d_t = torch.autograd.grad(task.inner_loss(unflat(w_prev, task.w0), split(alpha)), w_prev)[0]
        D.append(jacobian(lambda z, d_t=d_t, t=t: step(z, alpha, t == 1, direction=d_t), z_prev))

    def g_state(t):
        after = states[t][:P]
        g = jacobian(lambda v: task.outer_loss(unflat(v, task.w0), split(alpha)), after)
        return torch.cat([g, torch.zeros(P, dtype=DT)])

    direct = jacobian(lambda a: task.outer_loss(unflat(states[-1][:P], task.w0), split(a)), alpha)
    g_T = g_state(steps)
    exact, lam = [None] * steps, g_T
    for t in range(steps, 0, -1):
        exact[t - 1] = lam @ B[t - 1]
        lam = lam @ A[t - 1]
    greedy, propagated = [], []
    for t in range(1, steps + 1):
        g_t = g_state(t)
        greedy.append(g_t @ B[t - 1])
        product = torch.eye(2 * P, dtype=DT)
        for k in range(t + 1, steps + 1):
            product = D[k - 1] @ product  # A0_k ... A0_(t+1)
        propagated.append(g_t @ product @ B[t - 1])
    return Terms(direct, exact, greedy, propagated)


def hypergrad(estimator, problem) -> torch.Tensor:
    return flat(estimator(problem).hypergrads)


def assemble(terms: Terms, gamma: float, steps: int, kind: str, tail: int = 0) -> torch.Tensor:
    total = terms.direct.clone()
    for t in range(1, steps + 1):
        if kind == "rmd" or (kind == "tail" and t > steps - tail):
            total = total + terms.exact[t - 1]
        elif kind in ("greedy", "tail"):
            total = total + gamma ** (steps - t) * terms.greedy[t - 1]
        elif kind == "momentum":
            total = total + gamma ** (steps - t) * terms.propagated[t - 1]
    return total


def assert_close(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-13)


# ---------------------------------------------------------------------------------------------- MomentumGreedy


@pytest.mark.parametrize("gamma", [0.6, 1.0])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_momentum_greedy_equals_state_propagation_with_explicit_jacobians(name, gamma):
    task, config = MLPTask(), CONFIGS[name]
    terms = brute_force_terms(task, config)
    expected = assemble(terms, gamma, STEPS, "momentum")
    assert_close(hypergrad(lh.MomentumGreedy(gamma), library_problem(task, config)), expected)
    # and it is a different estimator from Greedy
    assert not torch.allclose(expected, assemble(terms, gamma, STEPS, "greedy"), rtol=1e-3)


@pytest.mark.parametrize("name, exponent", [("heavy_ball", 1), ("nesterov", 2)])
def test_momentum_weight_of_a_loss_hyperparameter_is_the_closed_form(name, exponent):
    """With the gradient held constant, the term of log_wd is Greedy's times (1 - mu^(n+p)) / (1 - mu^p)."""
    task, config = MLPTask(), CONFIGS[name]
    terms = brute_force_terms(task, config)
    mu, n_wd = 0.9, task.log_wd.numel()
    for t in range(1, STEPS + 1):
        n = STEPS - t
        factor = (1 - mu ** (n + exponent)) / (1 - mu**exponent)
        assert_close(terms.propagated[t - 1][:n_wd], factor * terms.greedy[t - 1][:n_wd])


def test_momentum_greedy_with_momentum_zero_is_greedy():
    task = MLPTask()
    config = Config(0.3, 0.0)
    problem = library_problem(task, config)
    for gamma in (0.5, 0.99, 1.0):
        got = lh.MomentumGreedy(gamma)(problem).hypergrads
        greedy = lh.Greedy(gamma, fused=False)(problem).hypergrads  # the streamed form: the same sums, bit for bit
        for a, b in zip(got, greedy):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert_close(flat(got), assemble(brute_force_terms(task, config), gamma, STEPS, "greedy"))


@pytest.mark.parametrize("optimizer", [lh.Adam(lr=0.01), lh.AdamW(lr=0.01)])
def test_momentum_greedy_refuses_adam_and_names_the_fix(optimizer):
    task = MLPTask()
    with pytest.raises(ValueError, match=r"SGD only.*Adam.*Use Greedy\(gamma\)"):
        lh.MomentumGreedy(0.9)(task.problem(3, optimizer))


class Quadratic:
    """Inner ``0.5 eps |w - M a|^2`` (Hessian eps I, so A ~ I for lr * eps << 1), outer ``0.5 |w - y|^2``.

    Hyperparameters: ``a`` (in the inner loss) and the log inner learning rate.
    """

    def __init__(self, eps: float = 1e-3, P: int = 6, H: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.M = torch.randn(P, H, generator=g, dtype=DT)
        self.y = torch.randn(P, generator=g, dtype=DT)
        self.w0 = [3 * torch.randn(P, generator=g, dtype=DT)]
        self.a = torch.randn(H, generator=g, dtype=DT).requires_grad_()
        self.log_lr = torch.tensor(-2.0, dtype=DT, requires_grad=True)
        self.eps = eps

    def inner_loss(self, w, h):
        return 0.5 * self.eps * ((w[0] - self.M @ h[0]) ** 2).sum()

    def outer_loss(self, w, h):
        return 0.5 * ((w[0] - self.y) ** 2).sum()


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_greedy_is_closer_to_the_exact_hypergradient_where_a_is_nearly_the_identity(nesterov):
    quad, steps, gamma = Quadratic(), 30, 1.0
    config = Config(lambda a: a[1].exp(), 0.9, nesterov=nesterov)
    alpha = [quad.a, quad.log_lr]
    exact = assemble(brute_force_terms(quad, config, alpha, steps), gamma, steps, "rmd")
    problem = library_problem(quad, config, alpha, steps)
    momentum = hypergrad(lh.MomentumGreedy(gamma), problem)
    greedy = hypergrad(lh.Greedy(gamma), problem)

    def error(x):
        return float((x - exact).norm() / exact.norm())

    def cosine(x):
        return float(x @ exact / (x.norm() * exact.norm()))

    assert error(momentum) < 0.2 * error(greedy)
    assert cosine(momentum) > cosine(greedy)


# ---------------------------------------------------------------------------------------------------- GreedyTail


@pytest.mark.parametrize("gamma", [0.5, 0.99])
@pytest.mark.parametrize("tail", [0, 1, 2, 4, STEPS])
@pytest.mark.parametrize("name", ["heavy_ball", "lr_hyperparameter"])
def test_greedy_tail_equals_its_formula_from_explicit_jacobians(name, tail, gamma):
    task, config = MLPTask(), CONFIGS[name]
    expected = assemble(brute_force_terms(task, config), gamma, STEPS, "tail", tail)
    assert_close(hypergrad(lh.GreedyTail(gamma, tail), library_problem(task, config)), expected)


def test_greedy_tail_limits_are_rmd_and_greedy_exactly():
    task = MLPTask()
    problem = task.problem(STEPS)
    for gamma in (0.5, 0.99):
        pairs = [
            (lh.GreedyTail(gamma, STEPS), lh.RMD(), 0),
            (lh.GreedyTail(gamma, 0), lh.Greedy(gamma, fused=False), 0),  # streamed: the same sums, bit for bit
            (lh.GreedyTail(gamma, 1), lh.Greedy(gamma), 1e-12),  # Greedy's last term is already exact
        ]
        for tail, other, rtol in pairs:
            for a, b in zip(tail(problem).hypergrads, other(problem).hypergrads):
                torch.testing.assert_close(a, b, rtol=rtol, atol=0)


@pytest.mark.parametrize("tail", [1, 3])
def test_greedy_tail_tends_to_truncated_rmd_as_gamma_vanishes(tail):
    task = MLPTask()
    problem = task.problem(STEPS)
    got = lh.GreedyTail(1e-12, tail)(problem).hypergrads
    expected = assemble(brute_force_terms(task, CONFIGS["heavy_ball"]), 1e-300, STEPS, "tail", tail)
    assert_close(flat(got), expected)
    reference = (lh.T1T2() if tail == 1 else lh.TruncatedRMD(tail))(problem).hypergrads
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=0)


def test_greedy_tail_rejects_a_tail_longer_than_the_loop_or_negative():
    task = MLPTask()
    with pytest.raises(ValueError, match=r"tail \(K=7\) exceeds the number of inner steps \(T=6\)"):
        lh.GreedyTail(0.9, 7)(task.problem(6))
    with pytest.raises(ValueError, match=r"tail \(K\) must be an integer >= 0"):
        lh.GreedyTail(0.9, -1)
    with pytest.raises(ValueError, match="gamma must be in"):
        lh.get_estimator("greedy_tail(0, 2)")


# ---------------------------------------------------------------------------------------------------- spec strings

SPECS = {
    "momentum_greedy(0.99)": lh.MomentumGreedy(),
    "momentum_greedy(0.9)": lh.MomentumGreedy(0.9),
    "momentum_greedy(0.5, nonfinite='raise')": lh.MomentumGreedy(0.5, nonfinite="raise"),
    "greedy_tail(0.99, 5)": lh.GreedyTail(),
    "greedy_tail(0.9, 0)": lh.GreedyTail(0.9, 0),
    "greedy_tail(1.0, 3)": lh.GreedyTail(1, 3),
}


@pytest.mark.parametrize("spec", list(SPECS))
def test_spec_strings_round_trip(spec):
    estimator = SPECS[spec]
    assert str(estimator) == spec
    parsed = lh.get_estimator(str(estimator))
    assert type(parsed) is type(estimator) and vars(parsed) == vars(estimator)
    assert lh.ESTIMATORS[estimator.name] is type(estimator)


def test_spec_names_are_case_insensitive_with_dashes():
    parsed = lh.get_estimator("Greedy-Tail(0.9, tail=2)")
    assert isinstance(parsed, lh.GreedyTail) and (parsed.gamma, parsed.tail) == (0.9, 2)
    parsed = lh.get_estimator("MOMENTUM-GREEDY")
    assert isinstance(parsed, lh.MomentumGreedy) and parsed.gamma == 0.99
