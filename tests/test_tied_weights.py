"""Tied (shared) parameters in an ``InnerModel``: one inner parameter per shared tensor, the tie kept, in every
``init`` mode; the hypergradient against a hand-written unrolled loop of the tied model (plain SGD, float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_hypergrad as lh
from lightning_hypergrad.inner_model import InnerModel

D = torch.float64
LR, STEPS = 0.3, 4
SPECS = ["rmd", "rmd(checkpoint_every=2)", "mixed_rmd", "fmd(max_entries=100)"]


class Tied(nn.Module):
    """``a(x) + b(tanh(a(x)))`` with ``b.weight`` the same tensor as ``a.weight`` (an encoder tied to a decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        z = self.a(x)
        return z + self.b(torch.tanh(z))


def tied_formula(w, x):
    """The same model written out: ``w = [W, a.bias, b.bias]``, ``W`` used twice."""
    weight, bias_a, bias_b = w
    z = x @ weight.T + bias_a
    return z + torch.tanh(z) @ weight.T + bias_b


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(10, 3, generator=g, dtype=D) for _ in range(4)]


def _problem(inner: InnerModel, hyper: list[torch.Tensor], x, y, xv, yv) -> lh.BilevelProblem:
    def inner_loss(w, h):
        decay = sum(0.5 * h[0][i].exp() * (p**2).sum() for i, p in enumerate(w))
        return ((inner(w, x) - y) ** 2).mean() + decay

    return lh.BilevelProblem(
        inner_loss,
        lambda w, h: ((inner(w, xv) - yv) ** 2).mean(),
        hyper,
        inner.init_params(hyper),
        lh.SGD(lr=LR),
        STEPS,
    )


def hand_written(w0, log_decay, x, y, xv, yv, learned: bool):
    """The unrolled loop of the tied model by the explicit formula, differentiated by autograd."""
    log_decay = log_decay.detach().requires_grad_()
    w0 = [p.detach().requires_grad_() for p in w0]
    w = list(w0)
    for _ in range(STEPS):
        decay = sum(0.5 * log_decay[i].exp() * (p**2).sum() for i, p in enumerate(w))
        loss = ((tied_formula(w, x) - y) ** 2).mean() + decay
        grads = torch.autograd.grad(loss, w, create_graph=True)
        w = [p - LR * g for p, g in zip(w, grads)]
    outer = ((tied_formula(w, xv) - yv) ** 2).mean()
    return torch.autograd.grad(outer, [log_decay, *w0] if learned else [log_decay])


@pytest.mark.parametrize("init", ["fixed", "zeros", "learned"])
def test_tied_weights_give_the_hand_written_hypergradient(init):
    torch.manual_seed(1)
    module = Tied().to(D)
    inner = InnerModel(module, init=init)
    assert inner.names == ("a.weight", "a.bias", "b.bias")  # one inner parameter for the shared tensor
    assert inner.aliases["a.weight"] == ("a.weight", "b.weight")
    trainable = [n for n, _ in inner.named_parameters()]
    # nothing tied stays a trainable hyperparameter by mistake: constants are buffers, a learned w_0 is one tensor
    assert trainable == ([] if init != "learned" else ["module.a.weight", "module.a.bias", "module.b.bias"])
    x, y, xv, yv = _data()
    log_decay = torch.tensor([-2.0, -1.5, -1.0], dtype=D, requires_grad=True)
    hyper = [log_decay, *inner.parameter_tensors()] if init == "learned" else [log_decay]
    w0 = [p.detach().clone() for p in inner.parameter_tensors()] if init != "zeros" else inner.initial()
    expected = hand_written(w0, log_decay, x, y, xv, yv, learned=init == "learned")
    assert float(expected[0].abs().max()) > 1e-4  # not trivially zero
    for spec in SPECS:
        got = lh.get_estimator(spec)(_problem(inner, hyper, x, y, xv, yv)).hypergrads
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14, msg=lambda m, s=spec: f"{s}, init={init}: {m}")


def test_a_call_moves_every_use_of_the_tied_tensor():
    torch.manual_seed(2)
    inner = InnerModel(Tied().to(D))
    x = _data()[0]
    w = [torch.randn(3, 3, dtype=D), torch.randn(3, dtype=D), torch.randn(3, dtype=D)]
    torch.testing.assert_close(inner(w, x), tied_formula(w, x), rtol=1e-14, atol=1e-14)
    inner.float().double()  # conversions replace each buffer on its own: the tie is kept by name, not by identity
    torch.testing.assert_close(inner(w, x), tied_formula(w, x), rtol=1e-14, atol=1e-14)
    bound = inner.bind(w)
    assert bound["b.weight"] is w[0]  # an alias addresses the shared tensor
    assert inner.select({"b.weight": 1.0}, default=0.0) == [1.0, 0.0, 0.0]


def test_params_may_name_the_tensor_by_any_of_its_names():
    torch.manual_seed(3)
    module = Tied().to(D)
    inner = InnerModel(module, params=["b.weight", "*bias"])
    assert inner.names == ("a.weight", "a.bias", "b.bias")
    assert list(inner.parameters()) == []
    frozen = Tied().to(D)
    frozen.a.bias.requires_grad_(False)
    frozen.b.bias.requires_grad_(False)
    only = InnerModel(frozen, params=["b.weight"])
    assert only.names == ("a.weight",)
    x = _data()[0]
    w = [torch.randn(3, 3, dtype=D)]
    expected = tied_formula([w[0], frozen.a.bias.detach(), frozen.b.bias.detach()], x)
    torch.testing.assert_close(only(w, x), expected, rtol=1e-14, atol=1e-14)
