"""An ``nn.Module`` as the inner model, and learned initializations, against independent computations (float64).

- the module path (``InnerModel``) equals the flat-list path to rtol 1e-12 for every estimator;
- a learned ``w_0`` (MAML): the exact estimators equal a hand-written unrolled loop differentiated by autograd; FO,
  T1-T2 and Greedy equal their stated definition (first-order MAML's ``g_T dw_0/dalpha`` plus the greedy terms,
  computed step by step here); ``truncated_rmd(K)`` equals the adjoint of ``w_{T-K}`` taken to ``w_0``; the others
  refuse before the inner loop runs;
- hyperparameters addressed by name; batch norm in the inner model uses batch statistics and leaves the buffers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_hypergrad as lh
from lightning_hypergrad.inner_model import InnerModel

D = torch.float64
SPECS = [
    "fo",
    "t1t2",
    "greedy(0.9)",
    "rmd",
    "rmd(checkpoint_every=2)",
    "truncated_rmd(2)",
    "neumann(5, scale='lr')",
    "cg(5, damping=0.5)",
    "fmd(max_entries=200)",
    "momentum_greedy(0.9)",
    "greedy_tail(0.9, tail=2)",
    "auto_greedy(0.9)",
]


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, xv = torch.randn(16, 4, generator=g, dtype=D), torch.randn(12, 4, generator=g, dtype=D)
    y, yv = torch.randint(0, 3, (16,), generator=g), torch.randint(0, 3, (12,), generator=g)
    return x, y, xv, yv


def _mlp(seed: int = 0, batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 5), *([nn.BatchNorm1d(5)] if batch_norm else []), nn.Tanh(), nn.Linear(5, 3)]
    return nn.Sequential(*layers).to(D)


# ---------------------------------------------------------------------------------------- module path = flat list
def _flat_mlp(w, x):
    """The same MLP written on positional tensors, as the flat-list API has it."""
    return F.linear(torch.tanh(F.linear(x, w[0], w[1])), w[2], w[3])


@pytest.mark.parametrize("spec", SPECS)
def test_module_path_equals_flat_list_for_every_estimator(spec):
    """Per-layer weight decay of an MLP (log, one per parameter, given by name): module and flat path agree."""
    x, y, xv, yv = _data()
    inner = InnerModel(_mlp())
    log_wd = torch.tensor([-3.0, -4.0, -2.0, -5.0], dtype=D, requires_grad=True)
    temp = torch.tensor(0.3, dtype=D, requires_grad=True)  # a direct outer-loss hyperparameter too
    wd_by_name = {"0.weight": 0, "0.bias": 1, "2.weight": 2, "2.bias": 3}

    def module_problem():
        def inner_loss(w, h):
            decay = inner.select({k: h[0][i].exp() for k, i in wd_by_name.items()})
            return F.cross_entropy(inner(w, x), y) + sum(0.5 * d * (p**2).sum() for d, p in zip(decay, w))

        return lh.BilevelProblem(
            inner_loss,
            lambda w, h: F.cross_entropy(inner(w, xv) * h[1].exp(), yv),
            [log_wd, temp],
            inner.init_params([log_wd, temp]),
            lh.SGD(lr=0.2, momentum=0.5),
            steps=4,
        )

    w0 = [p.detach() for p in _mlp().parameters()]  # the same draws (seed 0), as positional tensors

    def flat_problem():
        def inner_loss(w, h):
            return F.cross_entropy(_flat_mlp(w, x), y) + sum(
                0.5 * h[0][i].exp() * (p**2).sum() for i, p in enumerate(w)
            )

        return lh.BilevelProblem(
            inner_loss,
            lambda w, h: F.cross_entropy(_flat_mlp(w, xv) * h[1].exp(), yv),
            [log_wd, temp],
            w0,
            lh.SGD(lr=0.2, momentum=0.5),
            steps=4,
        )

    a = lh.get_estimator(spec)(module_problem())
    b = lh.get_estimator(spec)(flat_problem())
    for ga, gb in zip(a.hypergrads, b.hypergrads):
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-15)
    assert any(float(g.abs().max()) > 1e-6 for g in a.hypergrads)
    for pa, pb in zip(a.params, b.params):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-15)


def test_select_addresses_parameters_by_name_and_rejects_typos():
    inner = InnerModel(_mlp())
    assert inner.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert inner.select({"*.bias": 0.0, "0.*": 1.0, "2.weight": 2.0}) == [1.0, 0.0, 2.0, 0.0]
    assert inner.select({"0.weight": 5}, default=1) == [5, 1, 1, 1]
    with pytest.raises(ValueError, match="'3.weight' matches no inner parameter"):
        inner.select({"3.weight": 1.0}, default=0.0)
    with pytest.raises(ValueError, match="no value for '0.bias'"):
        inner.select({"0.weight": 1.0})
    with pytest.raises(ValueError, match="matches no parameter of the module"):
        InnerModel(_mlp(), params=["head.*"])


def test_non_inner_parameters_that_require_grad_are_refused():
    with pytest.raises(ValueError, match="0.weight, 0.bias are not inner parameters but require grad"):
        InnerModel(_mlp(), params=["2.*"])
    net = _mlp()
    net[0].requires_grad_(False)
    inner = InnerModel(net, params=["2.*"])  # frozen first layer: used as it is
    assert inner.names == ("2.weight", "2.bias")


# ---------------------------------------------------------------------------------------- learned initialization
class MetaSGDProblem:
    """MAML on an MLP (w_0 learned) with a learned log learning rate (Meta-SGD's scalar form); plain SGD."""

    T, LR0 = 4, 0.3

    def __init__(self, batch_norm: bool = False) -> None:
        self.x, self.y, self.xv, self.yv = _data(1)
        self.net = _mlp(1, batch_norm)
        self.inner = InnerModel(self.net, init="learned")
        self.log_lr = torch.tensor(self.LR0, dtype=D).log().requires_grad_()
        self.alpha = [*self.inner.parameter_tensors(), self.log_lr]
        self.calls = 0

    def problem(self, steps: int | None = None) -> lh.BilevelProblem:
        def inner_loss(w, h):
            self.calls += 1
            return F.cross_entropy(self.inner(w, self.x), self.y)

        return lh.BilevelProblem(
            inner_loss,
            lambda w, h: F.cross_entropy(self.inner(w, self.xv), self.yv),
            self.alpha,
            self.inner.init_params(self.alpha),
            lh.SGD(lr=lambda h: h[-1].exp()),
            steps or self.T,
        )

    # independent computations: a hand-written loop on the module, differentiated by autograd
    def _call(self, w, x):
        return torch.func.functional_call(self.net, dict(zip(self.inner.names, w)), (x,))

    def _losses(self, w):
        return F.cross_entropy(self._call(w, self.x), self.y), F.cross_entropy(self._call(w, self.xv), self.yv)

    def exact(self) -> list[torch.Tensor]:
        w = list(self.alpha[:-1])
        for _ in range(self.T):
            g = torch.autograd.grad(self._losses(w)[0], w, create_graph=True)
            w = [p - self.log_lr.exp() * gi for p, gi in zip(w, g)]
        return list(torch.autograd.grad(self._losses(w)[1], self.alpha))

    def weighted(self, weight) -> list[torch.Tensor]:
        """``g_T dw_0/dalpha + sum_t weight(t) g_t B_t``, each term from one step alone (w_{t-1} held constant)."""
        w = [p.detach() for p in self.alpha[:-1]]
        total = [torch.zeros_like(a) for a in self.alpha]
        for t in range(1, self.T + 1):
            w_in = [p.requires_grad_() for p in w]
            g = torch.autograd.grad(self._losses(w_in)[0], w_in)
            w_new = [p.detach() - self.log_lr.exp() * gi for p, gi in zip(w_in, g)]  # B_t: through the lr only
            c = weight(t)
            if c:
                term = torch.autograd.grad(self._losses(w_new)[1], self.log_lr)[0]
                total[-1] = total[-1] + c * term
            w = [p.detach() for p in w_new]
        w_T = [p.requires_grad_() for p in w]
        g_T = torch.autograd.grad(self._losses(w_T)[1], w_T)  # first-order MAML: dw_T/dw_0 taken as I
        return [tot + g for tot, g in zip(total[:-1], g_T)] + [total[-1]]

    def truncated(self, k: int) -> list[torch.Tensor]:
        """Exact through the last k steps; the adjoint of w_{T-k} taken to w_0 (the earlier steps as I)."""
        w = [p.detach() for p in self.alpha[:-1]]
        lr = self.log_lr.detach().exp()
        for _ in range(self.T - k):
            w_in = [p.requires_grad_() for p in w]
            g = torch.autograd.grad(self._losses(w_in)[0], w_in)
            w = [(p - lr * gi).detach() for p, gi in zip(w_in, g)]
        start = [p.requires_grad_() for p in w]
        w = start
        for _ in range(k):
            g = torch.autograd.grad(self._losses(w)[0], w, create_graph=True)
            w = [p - self.log_lr.exp() * gi for p, gi in zip(w, g)]
        found = torch.autograd.grad(self._losses(w)[1], [*start, self.log_lr])
        return [*found[:-1], found[-1]]


def _close(got, want):
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    "spec",
    ["rmd", "rmd(checkpoint_every=2)", "rmd(checkpoint_every='sqrt')", "fmd(max_entries=100)", "truncated_rmd(4)"],
)
def test_exact_estimators_differentiate_a_learned_initialization(spec):
    case = MetaSGDProblem()
    got = lh.get_estimator(spec)(case.problem()).hypergrads
    want = case.exact()
    _close(got, want)
    # the initialization's part is not negligible: FO-MAML's is a different vector
    assert float((got[0] - case.weighted(lambda t: 0.0)[0]).abs().max()) > 1e-4


@pytest.mark.parametrize(
    "spec, weight",
    [
        ("fo", lambda t: 0.0),
        ("t1t2", lambda t: 1.0 if t == MetaSGDProblem.T else 0.0),
        ("greedy(0.8)", lambda t: 0.8 ** (MetaSGDProblem.T - t)),
    ],
)
def test_first_order_and_greedy_terms_of_a_learned_initialization(spec, weight):
    case = MetaSGDProblem()
    _close(lh.get_estimator(spec)(case.problem()).hypergrads, case.weighted(weight))


def test_truncated_rmd_takes_the_adjoint_of_w_T_minus_K_to_the_initialization():
    case = MetaSGDProblem()
    got = lh.get_estimator("truncated_rmd(2)")(case.problem()).hypergrads
    _close(got, case.truncated(2))
    assert float((got[0] - case.exact()[0]).abs().max()) > 1e-6  # not the exact one


@pytest.mark.parametrize(
    "spec", ["neumann(5)", "cg(5)", "momentum_greedy(0.9)", "greedy_tail(0.9, tail=2)", "auto_greedy(0.9)"]
)
def test_estimators_without_an_initialization_term_refuse_before_any_work(spec):
    case = MetaSGDProblem()
    case.alpha = case.alpha[:-1]  # the initialization alone (no optimizer setting to refuse for)
    problem = case.problem()
    problem.optimizer = lh.SGD(lr=0.3)
    with pytest.raises(ValueError, match="cannot differentiate a learned initialization"):
        lh.get_estimator(spec)(problem)
    assert case.calls == 0


def test_learned_init_with_batch_norm_matches_the_independent_loop():
    case = MetaSGDProblem(batch_norm=True)
    before = {k: v.clone() for k, v in case.net.state_dict().items() if "running" in k or "num_batches" in k}
    case.net.eval()  # the inner model uses batch statistics in every mode
    got = lh.get_estimator("rmd")(case.problem()).hypergrads
    after = {k: v.clone() for k, v in case.net.state_dict().items() if k in before}
    assert case.net[1].training is False and case.net[1].track_running_stats is True  # restored after each call
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"
    case.net.train()
    _close(got, case.exact())  # the reference runs the module in train mode (batch statistics)


@pytest.mark.parametrize("spec", ["rmd", "rmd(checkpoint_every=2)", "fmd(max_entries=200)"])
def test_meta_sgd_per_parameter_learning_rates_and_initialization_are_exact(spec):
    """Meta-SGD (Li et al., 2017): w_0 and one learning rate per entry of every parameter, learned together."""
    x, y, xv, yv = _data(2)
    net = _mlp(2)
    inner = InnerModel(net, init="learned")
    log_lrs = [torch.full_like(p, -1.0).add_(0.1 * torch.randn_like(p)).requires_grad_() for p in net.parameters()]
    alpha = [*net.parameters(), *log_lrs]
    n = len(log_lrs)
    problem = lh.BilevelProblem(
        lambda w, h: F.cross_entropy(inner(w, x), y),
        lambda w, h: F.cross_entropy(inner(w, xv), yv),
        alpha,
        inner.init_params(alpha),
        lh.SGD(lr=lambda h: [v.exp() for v in h[-n:]]),
        steps=3,
    )
    got = lh.get_estimator(spec)(problem).hypergrads

    def call(w, data):
        return torch.func.functional_call(net, dict(zip(inner.names, w)), (data,))

    w = list(net.parameters())
    for _ in range(3):
        g = torch.autograd.grad(F.cross_entropy(call(w, x), y), w, create_graph=True)
        w = [p - lr.exp() * gi for p, lr, gi in zip(w, log_lrs, g)]
    want = torch.autograd.grad(F.cross_entropy(call(w, xv), yv), alpha)
    _close(got, want)


def test_tied_weights_go_through_functional_call_and_equal_the_flat_form():
    """A module that uses one layer twice (tied weights) is called through torch.func.functional_call."""
    x, y, xv, yv = _data(3)
    torch.manual_seed(3)
    layer = nn.Linear(4, 4).to(D)
    net = nn.Sequential(layer, nn.Tanh(), layer, nn.Tanh(), nn.Linear(4, 3).to(D))
    inner = InnerModel(net)
    assert inner.names == ("0.weight", "0.bias", "4.weight", "4.bias") and inner._call_plan()[0] is None
    w0 = [p.clone() for p in inner.initial()]

    def flat(w, data):
        hidden = torch.tanh(F.linear(torch.tanh(F.linear(data, w[0], w[1])), w[0], w[1]))
        return F.linear(hidden, w[2], w[3])

    lr = torch.tensor(-1.0, dtype=D, requires_grad=True)
    make = lambda call, init: lh.BilevelProblem(  # noqa: E731
        lambda w, h: F.cross_entropy(call(w, x), y), lambda w, h: F.cross_entropy(call(w, xv), yv), [lr], init,
        lh.SGD(lr=lambda h: h[0].exp()), steps=3,
    )  # fmt: skip
    _close(lh.RMD()(make(inner, inner.init_params([lr]))).hypergrads, lh.RMD()(make(flat, w0)).hypergrads)
