"""The differentiable inner optimizers against torch.optim, with nothing differentiated."""

from __future__ import annotations

import itertools

import pytest
import torch

import lightning_hypergrad as lh


def run_torch(optimizer_cls, kwargs, params, grads_per_step):
    ps = [p.clone().requires_grad_() for p in params]
    opt = optimizer_cls(ps, **kwargs)
    for grads in grads_per_step:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps]


def run_ours(optimizer, params, grads_per_step):
    ps = [p.clone() for p in params]
    state = optimizer.init(ps)
    for grads in grads_per_step:
        ps, state = optimizer.update(ps, grads, state, [])
    return ps


def random_case(steps=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(7, 3, generator=g, dtype=dtype), torch.randn(5, generator=g, dtype=dtype)]
    grads = [[torch.randn(p.shape, generator=g, dtype=dtype) for p in params] for _ in range(steps)]
    grads[2][1][0] = 0.0  # an exactly-zero gradient entry
    return params, grads


SGD_SETTINGS = [
    dict(lr=lr, momentum=mom, dampening=damp, weight_decay=wd, nesterov=nest)
    for lr, mom, damp, wd, nest in itertools.product([0.1, 0.03], [0.0, 0.9], [0.0, 0.3], [0.0, 1e-2], [False, True])
    if not (nest and (mom == 0 or damp != 0))
]


@pytest.mark.parametrize("settings", SGD_SETTINGS, ids=str)
def test_sgd_reproduces_torch_sgd_bit_for_bit(settings):
    params, grads = random_case()
    expected = run_torch(torch.optim.SGD, settings | {"foreach": False}, params, grads)
    got = run_ours(lh.SGD(**settings), params, grads)
    for a, b in zip(got, expected):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("cls,ours", [(torch.optim.Adam, lh.Adam), (torch.optim.AdamW, lh.AdamW)])
def test_adam_and_adamw_reproduce_torch_to_1e_6(cls, ours, weight_decay):
    params, grads = random_case(steps=20)
    settings = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=weight_decay)
    expected = run_torch(cls, settings | {"foreach": False}, params, grads)
    got = run_ours(ours(**settings), params, grads)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_adam_step_has_a_finite_derivative_where_a_gradient_entry_is_zero():
    log_lr = torch.tensor(-3.0, requires_grad=True)
    w = [torch.tensor([1.0, 2.0], requires_grad=True)]
    grads = torch.autograd.grad((w[0][0] ** 2), w, create_graph=True)  # the second entry's gradient is exactly 0
    opt = lh.Adam(lr=lambda h: h[0].exp())
    new, _ = opt.update(w, grads, opt.init(w), [log_lr])
    d_lr, d_w = torch.autograd.grad(new[0].sum(), [log_lr, w[0]])
    assert torch.isfinite(d_lr).all() and torch.isfinite(d_w).all()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lh.SGD(lr=-0.1), "SGD lr=-0.1"),
        (lambda: lh.SGD(momentum=1.5), "SGD momentum=1.5"),
        (lambda: lh.SGD(lr=0.1, nesterov=True), "nesterov"),
        (lambda: lh.SGD(weight_decay=-1.0), "SGD weight_decay"),
        (lambda: lh.Adam(betas=(0.9, 1.0)), r"Adam betas\[1\]"),
        (lambda: lh.AdamW(eps=-1.0), "AdamW eps"),
    ],
)
def test_invalid_optimizer_settings_are_refused_with_the_settings_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_per_parameter_learning_rates_from_a_hyperparameter():
    log_lrs = torch.tensor([-1.0, -2.0], requires_grad=True)
    opt = lh.SGD(lr=lambda h: list(h[0].exp()))
    w = [torch.ones(2), torch.ones(3)]
    new, _ = opt.update(w, [torch.ones(2), torch.ones(3)], opt.init(w), [log_lrs])
    torch.testing.assert_close(new[0], 1 - torch.full((2,), torch.e**-1.0))
    torch.testing.assert_close(new[1], 1 - torch.full((3,), torch.e**-2.0))
    with pytest.raises(ValueError, match="one per inner parameter"):
        opt.update([torch.ones(1)], [torch.ones(1)], opt.init([torch.ones(1)]), [log_lrs])
