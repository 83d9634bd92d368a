"""``mixed_rmd``: the exact hypergradient by a reverse sweep of forward-over-reverse products, without a second-order
graph, against exact RMD (itself tested against closed forms and finite differences) in float64."""

from __future__ import annotations

import pytest
import torch
from lightning_cases import random_meta_batch
from test_finite_difference import OPTIMIZERS, ridge_problem, tanh_problem

import lightning_hypergrad as lh
from lightning_hypergrad.estimators import mixed_mode

SPECS = [
    "mixed_rmd",
    "mixed_rmd(checkpoint_every=2)",
    "mixed_rmd(checkpoint_every='sqrt')",
    "mixed_rmd(product='double_backward')",
    "mixed_rmd(checkpoint_every=2, product='double_backward')",
]


pytestmark = pytest.mark.usefixtures("float64_default")


def relative(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / max(float(y.abs().max()) for y in b)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("make", [ridge_problem, tanh_problem], ids=["quadratic", "nonlinear"])
def test_equal_to_rmd(make, optimizer, spec):
    problem = make(OPTIMIZERS[optimizer](), steps=5)
    assert relative(lh.get_estimator(spec)(problem).hypergrads, lh.RMD()(problem).hypergrads) < 1e-12


def test_a_learned_learning_rate_and_momentum_are_exact():
    problem = ridge_problem(None, learned_lr=True)
    assert relative(lh.get_estimator("mixed_rmd")(problem).hypergrads, lh.RMD()(problem).hypergrads) < 1e-12


def test_per_step_losses_are_replayed_at_their_step():
    base = tanh_problem(lh.SGD(lr=0.2, momentum=0.5), steps=4)
    weights = torch.linspace(0.5, 1.5, 4)

    def step_loss(w, h, t):
        return weights[t - 1] * base.inner_loss(w, h)

    problem = lh.BilevelProblem(
        base.inner_loss, base.outer_loss, base.hyperparameters, base.init_params, base.optimizer, 4,
        inner_step_loss=step_loss,
    )  # fmt: skip
    for spec in SPECS:
        assert relative(lh.get_estimator(spec)(problem).hypergrads, lh.RMD()(problem).hypergrads) < 1e-12


@pytest.mark.parametrize("kind", ["maml", "features", "anil"])
def test_equal_to_rmd_through_the_few_shot_modules(kind):
    torch.manual_seed(0)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in random_meta_batch(tasks=2).items()}
    if kind == "maml":  # the whole network (with batch norm) inside, its initialization learned
        model = lh.MAML(ways=3, image_shape=(1, 8, 8), inner_steps=3)
    else:  # the backbone's features as h; ANIL: the head's initialization learned too
        model = lh.FewShotClassifier(
            ways=3, image_shape=(1, 8, 8), inner_steps=3, head_init="learned" if kind == "anil" else None
        )
    model = model.double()
    tasks = model.split_tasks(batch)
    exact = model.meta_gradient(tasks, lh.RMD()).hypergrads
    mixed = model.meta_gradient(tasks, lh.get_estimator("mixed_rmd(checkpoint_every='sqrt')")).hypergrads
    assert relative(mixed, exact) < 1e-12


def break_adjoint_step(monkeypatch, how: str) -> None:
    """Replace the sweep's step by one that drops step 2's term of ``h`` (``step``) or zeroes the state's adjoint."""
    real = mixed_mode.adjoint_step

    def broken(problem, t, *args, **kwargs):
        a_w, a_s, term = real(problem, t, *args, **kwargs)
        if how == "state":
            a_s = [torch.zeros_like(x) for x in a_s]
        elif how == "step" and t == 2:
            term = [None for _ in term]
        return a_w, a_s, term

    monkeypatch.setattr(mixed_mode, "adjoint_step", broken)


@pytest.mark.parametrize("product", ["jvp", "double_backward"])
@pytest.mark.parametrize("how", ["state", "step"])
def test_the_equality_fails_when_a_steps_adjoint_or_the_states_is_dropped(monkeypatch, how, product):
    problem = tanh_problem(lh.SGD(lr=0.2, momentum=0.9), steps=4)
    exact = lh.RMD()(problem).hypergrads
    break_adjoint_step(monkeypatch, how)
    assert relative(lh.MixedRMD(product=product)(problem).hypergrads, exact) > 1e-4


@pytest.mark.parametrize("part", ["hessian", "mixed"])
def test_the_double_backward_products_are_each_needed(monkeypatch, part):
    # ridge_problem's h enters the training loss (the mixed term) and its w-curvature carries the adjoint back
    problem = ridge_problem(lh.SGD(lr=0.1, momentum=0.5), steps=4)
    exact = lh.RMD()(problem).hypergrads
    real = mixed_mode._second_order_products

    def broken(d, direction, w, h):
        hessian_a, mixed_a = real(d, direction, w, h)
        if part == "hessian":
            return [torch.zeros_like(x) for x in hessian_a], mixed_a
        return hessian_a, [None for _ in mixed_a]

    monkeypatch.setattr(mixed_mode, "_second_order_products", broken)
    assert relative(lh.MixedRMD(product="double_backward")(problem).hypergrads, exact) > 1e-4


def test_the_settings_are_checked():
    with pytest.raises(ValueError, match="MixedRMD checkpoint_every must be"):
        lh.get_estimator("mixed_rmd(checkpoint_every=0)")
    with pytest.raises(ValueError, match="MixedRMD product must be one of 'jvp', 'double_backward', got 'hvp'"):
        lh.get_estimator("mixed_rmd(product='hvp')")


@pytest.mark.parametrize("name", ["mse_loss", "huber_loss"])
@pytest.mark.parametrize("spec", ["mixed_rmd", "mixed_rmd(checkpoint_every=2)", "mixed_rmd(product='double_backward')"])
def test_losses_forward_ad_cannot_pass_fall_back_to_one_steps_double_backward(name, spec):
    # F.mse_loss's backward writes into a constant's zero tangent and F.huber_loss's has no forward derivative:
    # torch.func.jvp over their gradients raises; those steps' products come from double backward instead
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(10, 3, generator=g), torch.randn(10, generator=g)
    log_wd = torch.tensor([0.1, -0.2, 0.3], requires_grad=True)
    fn = getattr(torch.nn.functional, name)

    def make() -> lh.BilevelProblem:
        return lh.BilevelProblem(
            lambda w, h: fn(x @ w[0], y) + (h[0].exp() * w[0] ** 2).sum(),
            lambda w, h: fn(x @ w[0] + 1, y),
            [log_wd],
            [torch.zeros(3)],
            lh.SGD(lr=0.1, momentum=0.9),
            4,
        )

    exact = lh.get_estimator("rmd")(make()).hypergrads
    assert relative(lh.get_estimator(spec)(make()).hypergrads, exact) < 1e-12
