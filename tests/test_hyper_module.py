"""A module as a hyperparameter (``HyperModule``), against independent computations (float64).

The problem: a weighted least squares whose per-example weights come from a tiny reweighting network
``sigmoid(Linear(x))``, a ``HyperModule`` the inner loss calls as ``meta(h)(x)``, and a log weight decay; the outer
loss is the validation squared error. The hyperparameters are ``[log_wd, weight, bias]`` (``log_wd`` and the bias
both of shape ``(1,)``, so that a wrong binding has the right shapes and is caught by the numbers alone).

- RMD and FMD equal the exact hypergradient computed here by autograd through a hand-written unrolled heavy-ball loop
  that calls the network with ``torch.func.functional_call`` on copies of its parameters; Greedy(0.9) (streamed and
  fused) equals eq. 6 written out for T = 3; the same test with the entries of ``h`` permuted differs;
- with ``features``, the network called inside ``features`` gives the same hypergradient, and a HyperModule in the
  losses there is refused with a message that says so;
- the refusal of a loss that calls the module directly names the parameters and says how to call it with ``h``;
- ``attach`` and the call refuse what would bind wrongly: parameters missing from the list, a call before attach,
  data instead of ``h``;
- buffers (batch norm) are used as they are; tied weights bind through ``functional_call``.
"""

from __future__ import annotations

import re
from copy import deepcopy
from dataclasses import replace

import pytest
import torch
from torch import nn

import lightning_hypergrad as lh
from lightning_hypergrad.hyper_module import HyperModule

D = torch.float64
LR, MOMENTUM = 0.1, 0.5


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, xv = torch.randn(12, 3, generator=g, dtype=D), torch.randn(10, 3, generator=g, dtype=D)
    y, yv = torch.randn(12, generator=g, dtype=D), torch.randn(10, generator=g, dtype=D)
    w0 = 0.1 * torch.randn(3, generator=g, dtype=D)
    return x, y, xv, yv, w0


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 1), nn.Sigmoid()).to(D)


def _setup(seed: int = 0):
    """The data, the HyperModule (attached) and the hyperparameters ``[log_wd, weight, bias]``."""
    meta = HyperModule(_net(seed))
    log_wd = torch.tensor([-1.0], dtype=D, requires_grad=True)
    hyperparameters = [log_wd, *meta.parameters()]
    meta.attach(hyperparameters)
    return _data(seed), meta, hyperparameters


def _inner(weights: torch.Tensor, log_wd: torch.Tensor, w: torch.Tensor, x, y) -> torch.Tensor:
    """Weighted least squares plus weight decay: ``mean(weights * (x w - y)^2) + exp(log_wd) |w|^2 / 2``."""
    return (weights.squeeze(-1) * (x @ w - y) ** 2).mean() + 0.5 * log_wd.exp().squeeze() * (w**2).sum()


def _outer(w: torch.Tensor, xv, yv) -> torch.Tensor:
    return ((xv @ w - yv) ** 2).mean()


def _problem(data, meta, hyperparameters, steps, permute=False):
    x, y, xv, yv, w0 = data

    def inner_loss(w, h):
        h = [h[2], h[1], h[0]] if permute else h  # a wrong binding: log_wd and the bias swapped
        return _inner(meta(h)(x), h[0], w[0], x, y)

    return lh.BilevelProblem(
        inner_loss,
        lambda w, h: _outer(w[0], xv, yv),
        hyperparameters,
        [w0],
        lh.SGD(lr=LR, momentum=MOMENTUM),
        steps,
    )


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _copies(meta: HyperModule, hyperparameters):
    """Independent leaves: ``log_wd`` and the network's parameters by name."""
    log_wd = hyperparameters[0].detach().clone().requires_grad_()
    named = {n: p.detach().clone().requires_grad_() for n, p in meta.module.named_parameters()}
    return log_wd, named


def _step(meta, log_wd, named, w, buf, x, y, create_graph):
    """One heavy-ball step as ``torch.optim.SGD`` does it (the buffer starts at the first gradient)."""
    weights = torch.func.functional_call(meta.module, named, (x,))
    (g,) = torch.autograd.grad(_inner(weights, log_wd, w, x, y), w, create_graph=create_graph)
    buf = g if buf is None else MOMENTUM * buf + g
    return w - LR * buf, buf


def _unrolled_hypergrad(data, meta, hyperparameters, steps) -> torch.Tensor:
    """The exact hypergradient: autograd through the whole hand-written loop."""
    x, y, xv, yv, w0 = data
    log_wd, named = _copies(meta, hyperparameters)
    w, buf = w0.clone().requires_grad_(), None
    for _ in range(steps):
        w, buf = _step(meta, log_wd, named, w, buf, x, y, create_graph=True)
    alphas = [log_wd, *named.values()]
    return _flat(torch.autograd.grad(_outer(w, xv, yv), alphas))


def _eq6(data, meta, hyperparameters, steps, gamma) -> torch.Tensor:
    """Eq. 6: ``grad_alpha L_val(w_T) + sum_t gamma^(T-t) g_t B_t``, each ``g_t B_t`` one VJP of the step from the
    recorded (constant) ``w_{t-1}`` and buffer; the direct term is zero here (``L_val`` does not use alpha)."""
    x, y, xv, yv, w0 = data
    log_wd, named = _copies(meta, hyperparameters)
    alphas = [log_wd, *named.values()]
    w, buf, total = w0.clone(), None, torch.zeros(sum(a.numel() for a in alphas), dtype=D)
    for t in range(1, steps + 1):
        w_prev = w.detach().requires_grad_()
        buf_prev = None if buf is None else buf.detach()
        w_t, buf_t = _step(meta, log_wd, named, w_prev, buf_prev, x, y, create_graph=True)
        w_const = w_t.detach().requires_grad_()
        (g_t,) = torch.autograd.grad(_outer(w_const, xv, yv), w_const)
        total += gamma ** (steps - t) * _flat(torch.autograd.grad((g_t * w_t).sum(), alphas))
        w, buf = w_t.detach(), buf_t.detach()
    return total


# ---------------------------------------------------------------------------------------- the numbers
@pytest.mark.parametrize("spec", ["rmd", "fmd"])
def test_exact_hypergradient_through_a_reweighting_hyper_module_equals_unrolled_autograd(spec):
    data, meta, hyperparameters = _setup()
    steps = 5
    expected = _unrolled_hypergrad(data, meta, hyperparameters, steps)
    got = lh.get_estimator(spec)(_problem(data, meta, hyperparameters, steps)).hypergrads
    assert expected.abs().max() > 1e-3  # every hyperparameter matters
    torch.testing.assert_close(_flat(got), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True])
def test_greedy_through_a_hyper_module_equals_eq6_written_out(fused):
    data, meta, hyperparameters = _setup(seed=1)
    steps, gamma = 3, 0.9
    expected = _eq6(data, meta, hyperparameters, steps, gamma)
    estimator = lh.Greedy(gamma, fused=fused)
    got = estimator(_problem(data, meta, hyperparameters, steps)).hypergrads
    assert estimator.fuses(_problem(data, meta, hyperparameters, steps)) is fused
    torch.testing.assert_close(_flat(got), expected, rtol=1e-10, atol=1e-12)
    # and eq. 6 is not the exact hypergradient here, so the two references check different things
    assert not torch.allclose(expected, _unrolled_hypergrad(data, meta, hyperparameters, steps), rtol=1e-3)


def test_a_wrong_binding_of_h_fails_the_comparison():
    """The comparison above can fail: with log_wd and the bias swapped in what the module is bound to (same
    shapes), the hypergradient differs from the reference by far more than the tolerance."""
    data, meta, hyperparameters = _setup()
    steps = 5
    expected = _unrolled_hypergrad(data, meta, hyperparameters, steps)
    right = _flat(lh.RMD()(_problem(data, meta, hyperparameters, steps)).hypergrads)
    wrong = _flat(lh.RMD()(_problem(data, meta, hyperparameters, steps, permute=True)).hypergrads)
    torch.testing.assert_close(right, expected, rtol=1e-10, atol=1e-12)
    assert (wrong - expected).abs().max() > 1e-3


def test_with_features_the_module_is_called_inside_features_with_the_same_hypergradient():
    """With ``features`` the losses receive the features as h: the network runs inside ``features`` (directly, on
    the real hyperparameters) and the losses take its output; the hypergradient is the HyperModule path's."""
    data, meta, hyperparameters = _setup()
    x, y, xv, yv, w0 = data
    steps = 5
    problem = lh.BilevelProblem(
        lambda w, h: _inner(h[0], h[1], w[0], x, y),
        lambda w, h: _outer(w[0], xv, yv),
        hyperparameters,
        [w0],
        lh.SGD(lr=LR, momentum=MOMENTUM),
        steps,
        features=lambda: [meta.module(x), hyperparameters[0]],
    )
    got = _flat(lh.RMD()(problem).hypergrads)
    torch.testing.assert_close(got, _unrolled_hypergrad(data, meta, hyperparameters, steps), rtol=1e-10, atol=1e-12)

    # or features passes the module's parameters through, and the HyperModule is attached to their positions there
    # (for a module that the losses must call on what depends on w, which features cannot compute)
    problem = replace(
        problem,
        inner_loss=lambda w, h: _inner(meta(h)(x), h[1], w[0], x, y),
        features=lambda: [meta.module(x), hyperparameters[0], *meta.parameters()],
    )
    meta.attach([torch.empty(0), *hyperparameters])
    got = _flat(lh.RMD()(problem).hypergrads)
    torch.testing.assert_close(got, _unrolled_hypergrad(data, meta, hyperparameters, steps), rtol=1e-10, atol=1e-12)
    meta.attach(hyperparameters)

    # a HyperModule attached to the hyperparameters, in the losses of a problem with features, gets the features:
    # refused by shape
    with pytest.raises(ValueError, match=re.escape("h[1] should be its parameter '0.weight' of shape (1, 3)")):
        lh.RMD()(problem)
    with pytest.raises(ValueError, match="with `features`, the losses receive the features: call the module inside"):
        lh.RMD()(problem)


# ---------------------------------------------------------------------------------------- the refusals
NAMES = ["log_wd", "meta_net.module.0.weight", "meta_net.module.0.bias"]


def _capturing_problem(data, net, hyperparameters, names=NAMES, features=None):
    """A problem whose inner loss calls the network ``net`` directly (capturing its parameters)."""
    x, y, xv, yv, w0 = data
    return lh.BilevelProblem(
        lambda w, h: _inner(net(x), h[0] if features is None else h[1], w[0], x, y),
        lambda w, h: _outer(w[0], xv, yv),
        hyperparameters,
        [w0],
        lh.SGD(lr=LR),
        2,
        features=features,
        hyperparameter_names=names,
    )


def test_a_loss_calling_the_wrapped_module_directly_is_refused_naming_its_parameters_and_the_fix():
    data, meta, hyperparameters = _setup()
    for net in (meta.module, meta.module[0]):  # the wrapped module, or a part of it
        problem = _capturing_problem(data, net, hyperparameters)
        named = re.escape("use 'meta_net.module.0.weight', 'meta_net.module.0.bias' directly instead of the `h`")
        hint = re.escape(
            "a module hyperparameter is called with h through lightning_hypergrad.HyperModule: meta_net(h)(x)"
        )
        with pytest.raises(ValueError, match=f"{named}.*{hint}"):
            lh.RMD()(problem)
    # without names, by index, and the hint stays
    problem = _capturing_problem(data, meta.module, hyperparameters, names=None)
    with pytest.raises(ValueError, match=r"use hyperparameters\[1, 2\] directly.*HyperModule: meta_net\(h\)\(x\)"):
        lh.RMD()(problem)


def test_a_loss_calling_an_unwrapped_module_is_refused_with_the_hint_to_wrap_it():
    data, _, _ = _setup()
    net = _net()
    log_wd = torch.tensor([-1.0], dtype=D, requires_grad=True)
    problem = _capturing_problem(
        data, net, [log_wd, *net.parameters()], names=["log_wd", "meta_net.0.weight", "meta_net.0.bias"]
    )
    with pytest.raises(ValueError, match=r"'meta_net.0.weight', 'meta_net.0.bias' directly.*HyperModule\(net\)"):
        lh.RMD()(problem)
    # a plain tensor captured: no module hint
    x, y, xv, yv, w0 = data
    plain = lh.BilevelProblem(
        lambda w, h: _inner(torch.ones(12, dtype=D), log_wd, w[0], x, y),
        lambda w, h: _outer(w[0], xv, yv),
        [log_wd],
        [w0],
        lh.SGD(lr=LR),
        2,
        hyperparameter_names=["log_wd"],
    )
    with pytest.raises(ValueError, match="use 'log_wd' directly") as raised:
        lh.RMD()(plain)
    assert "HyperModule" not in str(raised.value)


def test_with_features_a_captured_module_is_refused_with_the_hint_to_call_it_in_features():
    data, meta, hyperparameters = _setup()
    problem = _capturing_problem(
        data, meta.module, hyperparameters, features=lambda: [hyperparameters[0] * 1, hyperparameters[0] * 1]
    )
    with pytest.raises(
        ValueError, match=r"with `features`, .*call a module of the hyperparameters inside features\(\)"
    ):
        lh.RMD()(problem)


def test_attach_names_the_parameters_missing_from_the_hyperparameters():
    meta = HyperModule(_net())
    log_wd = torch.tensor([-1.0], dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match=r"the parameters 0\.bias are not among the 2 hyperparameter tensors"):
        meta.attach([log_wd, meta.module[0].weight])
    with pytest.raises(ValueError, match=r"the parameters 0\.weight, 0\.bias are not among"):
        meta.attach([log_wd])
    assert meta.positions is None  # nothing recorded by a refused attach
    # a frozen parameter is a constant: it need not be in the list, and is used as it is
    meta.module[0].bias.requires_grad_(False)
    meta.attach([log_wd, meta.module[0].weight])
    assert meta.names == ("0.weight",) and meta.positions == (1,)
    x = torch.randn(4, 3, dtype=D)
    weight = torch.randn(1, 3, dtype=D)
    expected = torch.sigmoid(x @ weight.T + meta.module[0].bias)
    torch.testing.assert_close(meta([log_wd, weight])(x), expected, rtol=1e-14, atol=0)


def test_attach_again_rebinds_to_the_new_positions_and_a_copy_binds_its_own_module():
    """A BilevelModule attaches every time it builds its problems: each attach replaces the positions."""
    data, meta, (log_wd, weight, bias) = _setup()
    x = data[0]
    meta.attach([bias, log_wd, weight])
    assert meta.positions == (2, 0)
    h = [torch.randn(1, dtype=D), torch.randn(1, dtype=D), torch.randn(1, 3, dtype=D)]
    expected = torch.sigmoid(x @ h[2].T + h[0])
    torch.testing.assert_close(meta(h)(x), expected, rtol=1e-14, atol=0)
    copy = deepcopy(meta)
    torch.testing.assert_close(copy(h)(x), expected, rtol=1e-14, atol=0)
    assert copy.module[0].weight is not weight and meta.module[0].weight is weight


def test_calling_before_attach_says_to_attach():
    meta = HyperModule(_net())
    with pytest.raises(
        ValueError, match=r"called before attach: call meta_net\.attach\(hyperparameters\).*BilevelModule"
    ):
        meta(list(meta.parameters()))


def test_calling_with_the_data_instead_of_h_says_to_call_meta_net_h_x():
    data, meta, hyperparameters = _setup()
    x = data[0]
    with pytest.raises(
        TypeError, match=r"write meta_net\(h\)\(x\), not meta_net\(x\) \(got a tensor of shape \(12, 3\)\)"
    ):
        meta(x)
    with pytest.raises(TypeError, match=r"write meta_net\(h\)\(x\), not meta_net\(h, \.\.\.\)"):
        meta(hyperparameters, x)
    with pytest.raises(TypeError, match=r"not meta_net\(x\)"):
        meta.bind({"0.weight": hyperparameters[1]})
    with pytest.raises(
        ValueError, match=r"h\[1\] should be its parameter '0\.weight' of shape \(1, 3\), but h has shape \(12, 3\)"
    ):
        meta([x, x])
    with pytest.raises(TypeError, match="HyperModule takes an nn.Module"):
        HyperModule(lambda v: v)


def test_the_call_is_the_module_with_the_values_of_h_and_leaves_its_parameters_in_place():
    data, meta, hyperparameters = _setup()
    x = data[0]
    h = [torch.randn(1, dtype=D), torch.randn(1, 3, dtype=D), torch.randn(1, dtype=D)]
    torch.testing.assert_close(meta(h)(x), torch.sigmoid(x @ h[1].T + h[2]), rtol=1e-14, atol=0)
    assert meta.module[0].weight is hyperparameters[1] and meta.module[0].bias is hyperparameters[2]
    assert all(isinstance(p, nn.Parameter) for p in meta.module.parameters())
    assert [p for p in meta.parameters()] == hyperparameters[1:]  # a wrapper's own parameters


def test_buffers_are_used_as_they_are():
    """Batch norm in eval mode normalizes with its running statistics; in training mode it updates them as a direct
    call does."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).to(D)
    reference = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).to(D)
    reference.load_state_dict(net.state_dict())
    meta = HyperModule(net)
    hyperparameters = list(meta.parameters())
    meta.attach(hyperparameters)
    x = torch.randn(8, 3, dtype=D)
    with torch.no_grad():
        net[1].running_mean.fill_(0.3)
        net[1].running_var.fill_(2.0)
        reference[1].running_mean.fill_(0.3)
        reference[1].running_var.fill_(2.0)
    h = [p.detach() + 0.1 for p in hyperparameters]
    with torch.no_grad():
        for p, v in zip(reference.parameters(), h):
            p.copy_(v)
    for mode in ("eval", "train"):
        getattr(net, mode)(), getattr(reference, mode)()
        torch.testing.assert_close(meta(h)(x), reference(x), rtol=1e-14, atol=0)
        torch.testing.assert_close(net[1].running_mean, reference[1].running_mean, rtol=0, atol=0)
        torch.testing.assert_close(net[1].running_var, reference[1].running_var, rtol=0, atol=0)
    assert not torch.equal(net[1].running_mean, torch.full((2,), 0.3, dtype=D))  # training mode updated them


def test_tied_weights_bind_through_functional_call():
    torch.manual_seed(0)
    first, second = nn.Linear(2, 2).to(D), nn.Linear(2, 2).to(D)
    second.weight = first.weight
    meta = HyperModule(nn.Sequential(first, second))
    hyperparameters = list(meta.parameters())
    meta.attach(hyperparameters)
    assert meta.names == ("0.weight", "0.bias", "1.bias")
    h = [torch.randn(2, 2, dtype=D), torch.randn(2, dtype=D), torch.randn(2, dtype=D)]
    x = torch.randn(5, 2, dtype=D)
    expected = (x @ h[0].T + h[1]) @ h[0].T + h[2]
    torch.testing.assert_close(meta(h)(x), expected, rtol=1e-14, atol=0)
