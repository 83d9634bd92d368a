"""``mixed_rmd`` on two more problem families, against exact RMD in float64 (rtol 1e-12):

- the horizon study's CNN (:mod:`studies.horizon.cnn`: two convolutions and a linear layer trained on mini-batches
  by SGD with heavy-ball momentum), its per-layer log learning rates (on a schedule of knots) and log weight decays
  the hyperparameters;
- Meta-SGD (Li et al., 2017): an MLP's initialization and one learned learning rate per entry of every parameter,
  plain SGD.

Each comparison is also shown to fail when one step's term of the hypergradient, or the optimizer state's adjoint,
is dropped from the sweep.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_mixed_mode import SPECS, break_adjoint_step, relative
from torch import nn

import lightning_hypergrad as lh
from lightning_hypergrad import InnerModel
from studies.horizon.cnn import CNNSettings, batch_order, synthetic_splits, training_problem

CNN = CNNSettings(characters=3, size=9, width=2, steps=6, batch=4, momentum=0.9, knots=2)


pytestmark = pytest.mark.usefixtures("float64_default")


# ------------------------------------------------------------------------------------------------ the problems
def cnn_problem() -> lh.BilevelProblem:
    """The horizon CNN on generated images, 6 steps; per-layer log rates (2 knots each) and log weight decays."""
    splits = synthetic_splits(CNN)
    order = batch_order(len(splits.train[1]), CNN, 2)
    g = torch.Generator().manual_seed(5)
    log_lr = (-2.0 + 0.5 * torch.rand(3, CNN.knots, generator=g)).requires_grad_()
    log_wd = (-3.0 + torch.rand(3, generator=g)).requires_grad_()
    return training_problem(splits, CNN, 4, order, [log_lr, log_wd])


def meta_sgd_problem(steps: int = 4) -> lh.BilevelProblem:
    """Meta-SGD on a small MLP: the initialization and one log learning rate per parameter entry, learned."""
    g = torch.Generator().manual_seed(7)
    x, xv = torch.randn(16, 4, generator=g), torch.randn(12, 4, generator=g)
    y, yv = torch.randint(0, 3, (16,), generator=g), torch.randint(0, 3, (12,), generator=g)
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    inner = InnerModel(net, init="learned")
    log_lrs = [(-1.0 + 0.2 * torch.randn_like(p)).requires_grad_() for p in net.parameters()]
    alpha = [*net.parameters(), *log_lrs]
    n = len(log_lrs)
    return lh.BilevelProblem(
        lambda w, h: F.cross_entropy(inner(w, x), y),
        lambda w, h: F.cross_entropy(inner(w, xv), yv),
        alpha,
        inner.init_params(alpha),
        lh.SGD(lr=lambda h: [v.exp() for v in h[-n:]]),
        steps=steps,
    )


FAMILIES = {"cnn": cnn_problem, "meta_sgd": meta_sgd_problem}


# ------------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("spec", SPECS)
def test_equal_to_rmd_on_the_horizon_cnn(spec):
    problem = cnn_problem()
    exact = lh.RMD()(problem).hypergrads
    got = lh.get_estimator(spec)(cnn_problem()).hypergrads
    assert [g.shape for g in got] == [torch.Size([3, CNN.knots]), torch.Size([3])]
    assert all(float(g.abs().max()) > 0 for g in exact)  # both hyperparameters reach the outer loss
    assert relative(got, exact) < 1e-12


@pytest.mark.parametrize("spec", SPECS)
def test_equal_to_rmd_on_meta_sgd(spec):
    exact = lh.RMD()(meta_sgd_problem()).hypergrads
    got = lh.get_estimator(spec)(meta_sgd_problem()).hypergrads
    assert len(got) == 8  # four initializations, four per-entry learning rates
    assert all(float(g.abs().max()) > 0 for g in exact)
    assert relative(got, exact) < 1e-12


# ------------------------------------------------------------------------------------------------ sensitivity
@pytest.mark.parametrize(
    "family, how", [("cnn", "step"), ("cnn", "state"), ("meta_sgd", "step")]
)  # Meta-SGD's plain SGD has no state
def test_the_equality_fails_when_a_steps_term_or_the_states_adjoint_is_dropped(monkeypatch, family, how):
    exact = lh.RMD()(FAMILIES[family]()).hypergrads
    break_adjoint_step(monkeypatch, how)
    for spec in SPECS:
        assert relative(lh.get_estimator(spec)(FAMILIES[family]()).hypergrads, exact) > 1e-6, spec
