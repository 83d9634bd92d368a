"""ANIL and whole-network MAML through the library equal learn2learn's ``MAML`` wrapper on the same tasks (float64).

learn2learn is the peer meta-learning users compare with: ``MAML(module, lr, first_order)`` clones the module,
adapts the clone by plain SGD steps and backpropagates the query loss to the initialization. Second order is the
library's ``rmd`` (also ``fmd`` on the smallest case), first order its ``fo``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lightning_hypergrad as lh
from lightning_hypergrad.fewshot import MAML, FewShotClassifier
from lightning_hypergrad.nets import MLPHead

l2l = pytest.importorskip("learn2learn", reason="learn2learn (the few-shot extra) is not installed")

WAYS, SHOTS, QUERIES, T, LR = 3, 2, 3, 3, 0.4


def _small(**kwargs) -> dict:
    """The settings of a tiny few-shot model, float64 by the caller; plain SGD as learn2learn's MAML steps."""
    return (
        dict(ways=WAYS, image_shape=(1, 8, 8), depth=2, width=4, inner_optimizer=lh.SGD(lr=LR), inner_steps=T) | kwargs
    )


def _task(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "support_x": torch.randn(WAYS * SHOTS, 1, 8, 8, generator=g, dtype=torch.float64),
        "support_y": torch.arange(WAYS).repeat_interleave(SHOTS),
        "query_x": torch.randn(WAYS * QUERIES, 1, 8, 8, generator=g, dtype=torch.float64),
        "query_y": torch.arange(WAYS).repeat_interleave(QUERIES),
    }


def _adapted_loss(maml, support, support_y, query, query_y):
    learner = maml.clone()
    for _ in range(T):
        learner.adapt(F.cross_entropy(learner(support), support_y))
    return F.cross_entropy(learner(query), query_y)


def _library(model, task):
    model.double().train()
    return model.meta_gradient([task]).hypergrads


@pytest.mark.parametrize("head", [None, MLPHead], ids=["linear-head", "mlp-head"])
@pytest.mark.parametrize("spec, first_order", [("rmd", False), ("fo", True)])
def test_anil_equals_learn2learn_maml_on_the_head(spec, first_order, head):
    torch.manual_seed(0)
    factory = None if head is None else (lambda i, o: MLPHead(i, o, hidden=[5], batch_norm=True))
    model = FewShotClassifier(**_small(head=factory, head_init="learned", estimator=spec)).double()
    backbone, maml = (
        copy.deepcopy(model.backbone),
        l2l.algorithms.MAML(copy.deepcopy(model.inner_model.module), lr=LR, first_order=first_order),
    )
    task = _task()
    got = _library(model, task)

    features = backbone(torch.cat([task["support_x"], task["query_x"]]))
    n = task["support_x"].shape[0]
    loss = _adapted_loss(maml, features[:n], task["support_y"], features[n:], task["query_y"])
    want = torch.autograd.grad(loss, [*backbone.parameters(), *maml.parameters()])
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    assert all(float(w.abs().max()) > 0 for w in want)


@pytest.mark.parametrize("spec, first_order", [("rmd", False), ("rmd(checkpoint_every=2)", False), ("fo", True)])
def test_whole_network_maml_equals_learn2learn_maml(spec, first_order):
    torch.manual_seed(1)
    model = MAML(**_small(estimator=spec)).double()
    maml = l2l.algorithms.MAML(copy.deepcopy(model.inner_model.module), lr=LR, first_order=first_order)
    task = _task(1)
    got = _library(model, task)
    loss = _adapted_loss(maml, task["support_x"], task["support_y"], task["query_x"], task["query_y"])
    want = torch.autograd.grad(loss, list(maml.parameters()))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
