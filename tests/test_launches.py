"""Launch counts (dispatched ATen operations) of one outer step: batched at most a quarter of one by one.

Counts are deterministic, so the bound is asserted; times are measured by ``python -m studies.cost.launches``.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from studies.cost.estimators import make_fewshot_batched_step, make_fewshot_step
from studies.cost.launches import OpCounter, count_ops, main


@pytest.mark.parametrize("spec", ["fo", "t1t2", "greedy(0.99)", "rmd"])
def test_batched_meta_batch_of_ten_dispatches_at_most_a_quarter(spec):
    cpu = torch.device("cpu")
    one = count_ops(partial(make_fewshot_step, spec, 10, 10, cpu))
    batched = count_ops(partial(make_fewshot_batched_step, spec, 10, 10, cpu, batch_backbone=True))
    assert batched[0] <= one[0] / 4, (spec, one, batched)
    assert batched[1] <= one[1] / 4 * 1.2, (spec, one, batched)  # compute ops: within a fifth of the same bound
    assert (
        count_ops(partial(make_fewshot_batched_step, spec, 10, 10, cpu, batch_backbone=True)) == batched
    )  # deterministic


def test_the_counter_counts_views_apart():
    x = torch.ones(3, 4)
    counter = OpCounter()
    with counter:
        (x.view(12) + 1).sum()
    assert counter.ops == 3 and counter.compute_ops == 2


def test_the_tiny_study_writes_its_table(tmp_path):
    assert (
        main(["--steps", "2", "--meta-batch", "2", "--rounds", "1", "--estimators", "fo", "--out", str(tmp_path)]) == 0
    )
    text = (tmp_path / "launches.md").read_text()
    assert "| `fo` | 2 | batched |" in text and (tmp_path / "launches.json").exists()
