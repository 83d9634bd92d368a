"""``MAML``'s query accuracy reuses the logits of the outer loss at ``w_T`` (one forward pass of the query set less per
task) only where they are what a fresh forward pass would give: the same inner parameters, query tensor, buffers
and mode, and no random draw.

Each test compares with the metric computed by a fresh forward pass (the memo switched off), and counts the
network's forward passes over the query set.
"""

from __future__ import annotations

import pytest
import torch
from lightning_cases import random_meta_batch
from torch import nn

import lightning_hypergrad as lh
from lightning_hypergrad.inner_model import InnerModel
from lightning_hypergrad.query_logits import QueryLogits

pytestmark = pytest.mark.usefixtures("float64_default")
QUERY = 6  # query images per task: 3 ways x 2 (the support set has 3 x 1)


def maml() -> tuple[lh.MAML, list]:
    torch.manual_seed(0)
    batch = random_meta_batch(tasks=3, ways=3, shots=1, queries=2)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    model = lh.MAML(ways=3, image_shape=(1, 8, 8), inner_steps=2).double()
    return model, model.split_tasks(batch)


def query_passes(model: lh.MAML) -> list[int]:
    """A list that counts the network's forward passes over a query set (by batch size)."""
    calls: list[int] = []
    model.inner_model.module.register_forward_pre_hook(
        lambda _, args: calls.append(1) if len(args[0]) == QUERY else None
    )
    return calls


@pytest.mark.parametrize("spec", ["rmd", "rmd(checkpoint_every=1)", "fo", "t1t2", "mixed_rmd", "greedy(0.9)"])
def test_the_accuracy_is_a_fresh_forward_passs_with_one_pass_less_per_task(monkeypatch, spec):
    model, tasks = maml()
    calls = query_passes(model)
    remembered = model.meta_gradient(tasks, lh.get_estimator(spec))
    with_memo = len(calls)
    monkeypatch.setattr(QueryLogits, "recall", lambda self, m, x: None)
    model2, tasks2 = maml()
    calls2 = query_passes(model2)
    fresh = model2.meta_gradient(tasks2, lh.get_estimator(spec))
    assert float(remembered.metrics["acc"]) == float(fresh.metrics["acc"])
    assert all(torch.equal(a, b) for a, b in zip(remembered.hypergrads, fresh.hypergrads))
    assert len(calls2) - with_memo == len(tasks)  # the metric's own pass, once per task, is gone


def small_model(dropout: bool) -> tuple[InnerModel, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(1)
    layers = [nn.Linear(4, 5), nn.Tanh(), *([nn.Dropout(0.5)] if dropout else []), nn.Linear(5, 3)]
    inner = InnerModel(nn.Sequential(*layers).double())
    return inner, inner.initial(), torch.randn(7, 4)


def remembered(memo: QueryLogits, model, x: torch.Tensor) -> torch.Tensor:
    token = memo.before(model, x)
    logits = model(x)
    memo.remember(token, model, x, logits)
    return logits


def test_recalled_only_for_what_they_were_computed_from():
    inner, w, x = small_model(dropout=False)
    memo = QueryLogits()
    logits = remembered(memo, inner.bind(w), x)
    assert torch.equal(memo.recall(inner.bind([p.detach() for p in w]), x), logits)  # views of w_T: recalled
    assert memo.recall(inner.bind(w), x) is None  # once
    remembered(memo, inner.bind(w), x)
    assert memo.recall(inner.bind(w), x.clone()) is None  # another query tensor
    remembered(memo, inner.bind(w), x)
    w[0].add_(1.0)  # the same tensor changed in place
    assert memo.recall(inner.bind(w), x) is None
    remembered(memo, inner.bind(w), x)
    inner.module.eval()
    assert memo.recall(inner.bind(w), x) is None  # another mode


def test_a_forward_pass_that_draws_random_numbers_is_not_remembered():
    inner, w, x = small_model(dropout=True)
    memo = QueryLogits()
    remembered(memo, inner.bind(w), x)
    assert memo.recall(inner.bind(w), x) is None


def test_not_remembered_under_vmap():
    inner, w, x = small_model(dropout=False)
    memo = QueryLogits()
    stacked = [p.unsqueeze(0).expand(2, *p.shape) for p in w]

    def per_task(*ws):
        remembered(memo, inner.bind(list(ws)), x)
        return torch.zeros(())

    torch.func.vmap(per_task)(*stacked)
    assert memo._last is None
