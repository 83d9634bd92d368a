"""A model that draws random numbers (dropout): every step replayed with the random state it first ran with, so every
exact estimator gives one hypergradient for one seed, equal to a hand-written unrolled loop with the same draws."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning_cases import loader, quiet_trainer, random_meta_batch
from torch import nn

import lightning_hypergrad as lh
from lightning_hypergrad.cli.app import SETTING_ERRORS
from lightning_hypergrad.inner_model import InnerModel
from lightning_hypergrad.module import split_meta_batch

D = torch.float64
LR, MOMENTUM, STEPS, P = 0.3, 0.5, 6, 0.3
EXACT = [
    "rmd",
    "rmd(checkpoint_every=1)",
    "rmd(checkpoint_every=2)",
    "rmd(checkpoint_every='sqrt')",
    "rmd(checkpoint_every='auto')",
    f"truncated_rmd({STEPS})",
    "mixed_rmd",
    "mixed_rmd(checkpoint_every=2)",
    "mixed_rmd(checkpoint_every=2, product='double_backward')",
    "fmd(max_entries=200)",
]


def _data():
    g = torch.Generator().manual_seed(1)
    x, xv = torch.randn(16, 4, generator=g, dtype=D), torch.randn(12, 4, generator=g, dtype=D)
    return x, torch.randint(0, 3, (16,), generator=g), xv, torch.randint(0, 3, (12,), generator=g)


def _net(*layers: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), *layers, nn.Linear(8, 3)).to(D)


def _problem(inner: InnerModel, log_decay, data, steps: int = STEPS) -> lh.BilevelProblem:
    x, y, xv, yv = data
    hyper = [log_decay, *inner.parameter_tensors()] if inner.init == "learned" else [log_decay]

    def inner_loss(w, h):
        return F.cross_entropy(inner(w, x), y) + sum(0.5 * h[0][i].exp() * (p**2).sum() for i, p in enumerate(w))

    outer = lambda w, h: F.cross_entropy(inner(w, xv), yv)  # noqa: E731
    return lh.BilevelProblem(inner_loss, outer, hyper, inner.init_params(hyper), lh.SGD(LR, MOMENTUM), steps)


def hand_written(w0, log_decay, data, learned: bool):
    """The unrolled loop with dropout written out (SGD with momentum), differentiated by autograd: one draw per step
    and one for the outer loss, in that order."""
    x, y, xv, yv = data
    log_decay = log_decay.detach().requires_grad_()
    w0 = [p.detach().requires_grad_() for p in w0]

    def model(w, data_x):
        return F.linear(F.dropout(torch.tanh(F.linear(data_x, w[0], w[1])), P), w[2], w[3])

    w, v = list(w0), [torch.zeros_like(p) for p in w0]
    for _ in range(STEPS):
        decay = sum(0.5 * log_decay[i].exp() * (p**2).sum() for i, p in enumerate(w))
        g = torch.autograd.grad(F.cross_entropy(model(w, x), y) + decay, w, create_graph=True)
        v = [MOMENTUM * vi + gi for vi, gi in zip(v, g)]
        w = [p - LR * vi for p, vi in zip(w, v)]
    outer = F.cross_entropy(model(w, xv), yv)
    return torch.autograd.grad(outer, [log_decay, *w0] if learned else [log_decay])


@pytest.mark.parametrize("init", ["fixed", "learned"])
def test_every_exact_estimator_gives_the_hand_written_hypergradient_with_dropout(init):
    data = _data()
    inner = InnerModel(_net(nn.Dropout(P)), init=init)
    log_decay = torch.tensor([-2.0, -1.5, -1.0, -2.5], dtype=D, requires_grad=True)
    w0 = [p.detach().clone() for p in inner.parameter_tensors()]
    torch.manual_seed(5)
    expected = hand_written(w0, log_decay, data, learned=init == "learned")
    after = torch.get_rng_state()
    for spec in EXACT:
        torch.manual_seed(5)
        got = lh.get_estimator(spec)(_problem(inner, log_decay, data)).hypergrads
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=lambda m, s=spec: f"{s}, init={init}: {m}")
        assert torch.equal(torch.get_rng_state(), after), spec  # the random stream of one pass of the loop
    torch.manual_seed(6)
    other = lh.RMD()(_problem(inner, log_decay, data)).hypergrads[0]
    assert float((other - expected[0]).abs().max()) > 1e-4  # the draws matter: another seed, another hypergradient


def test_fused_greedy_streams_a_model_with_dropout_from_the_random_state_it_started_with():
    data, log_decay = _data(), torch.tensor([-2.0, -1.5, -1.0, -2.5], dtype=D, requires_grad=True)
    inner = InnerModel(_net(nn.Dropout(P)))
    results = []
    for spec in ["greedy(0.9)", "greedy(0.9, fused=False)"]:
        torch.manual_seed(5)
        results.append(lh.get_estimator(spec)(_problem(inner, log_decay, data)).hypergrads[0])
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match=r"fused=True recomputes the inner steps.*use fused='auto'") as error:
        lh.Greedy(0.9, fused=True)(_problem(inner, log_decay, data))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("form", ["parametrization", "hook"])
def test_spectral_norm_in_train_mode_is_a_pure_function_of_w(form):
    """Its power iteration would update u and v at every call, so replays would differ: it does not run in a call."""
    layer = nn.Linear(8, 8).to(D)
    if form == "parametrization":
        layer = torch.nn.utils.parametrizations.spectral_norm(layer)
        vectors = lambda: [layer.parametrizations.weight[0]._u, layer.parametrizations.weight[0]._v]  # noqa: E731
    else:
        layer = torch.nn.utils.spectral_norm(layer)
        vectors = lambda: [layer.weight_u, layer.weight_v]  # noqa: E731
    inner = InnerModel(_net(layer, nn.Tanh()).train())
    before = [v.clone() for v in vectors()]
    data, log_decay = _data(), torch.full((6,), -2.0, dtype=D, requires_grad=True)
    ref = lh.RMD()(_problem(inner, log_decay, data)).hypergrads[0]
    for spec in ["rmd(checkpoint_every=1)", "mixed_rmd"]:
        got = lh.get_estimator(spec)(_problem(inner, log_decay, data)).hypergrads[0]
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)
    assert all(torch.equal(a, b) for a, b in zip(vectors(), before))
    assert layer.training  # the mode is put back after each call


def _dropout_head(in_features: int, ways: int) -> nn.Module:
    return nn.Sequential(nn.Dropout(P), nn.Linear(in_features, ways))


def test_batch_tasks_refuse_a_model_with_dropout_in_one_line():
    torch.manual_seed(0)
    model = lh.FewShotClassifier(
        ways=3, image_shape=(1, 8, 8), depth=1, width=4, head=_dropout_head, head_init="fixed", batch_tasks=True
    )
    with pytest.raises(ValueError, match=r"draws random numbers .*set batch_tasks=False") as error:
        model.meta_gradient(split_meta_batch(random_meta_batch(tasks=2)))
    assert "\n" not in str(error.value)
    assert isinstance(error.value, SETTING_ERRORS)  # the command line prints its message alone, no traceback


def test_the_callback_reference_sees_the_draws_of_the_module_step():
    torch.manual_seed(0)
    model = lh.FewShotClassifier(
        ways=3, image_shape=(1, 8, 8), depth=1, width=4, head=_dropout_head, head_init="fixed", inner_steps=4,
        estimator="rmd(checkpoint_every=1)",
    )  # fmt: skip
    trainer = quiet_trainer(max_steps=1, callbacks=[lh.HypergradCallback(every_n_steps=1)])
    trainer.fit(model, loader(random_meta_batch(tasks=2)))
    assert float(trainer.logged_metrics["hypergrad/cosine"]) == pytest.approx(1.0, abs=1e-6)
    assert float(trainer.logged_metrics["hypergrad/norm_ratio"]) == pytest.approx(1.0, abs=1e-5)
