"""Memory of the estimators against T, measured deterministically as the peak of bytes saved for backward."""

from __future__ import annotations

import pytest
from bilevel_cases import MLPTask

import lightning_hypergrad as lh
from studies.common import SavedTensorsPeak


def peak_saved_bytes(estimator: lh.HypergradEstimator, steps: int) -> int:
    task = MLPTask(features=6, hidden=16, n=32)
    problem = task.problem(steps, lh.SGD(lr=0.1, momentum=0.9))
    return SavedTensorsPeak().measure(lambda: estimator(problem))


@pytest.mark.parametrize(
    "estimator",
    [
        lh.FO(),
        lh.T1T2(),
        lh.Greedy(0.99, fused=False),
        lh.Neumann(iterations=5),
        lh.ConjugateGradient(iterations=5),
        lh.FMD(),
    ],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.filterwarnings("ignore:ConjugateGradient met non-positive curvature")
def test_memory_does_not_grow_with_the_number_of_inner_steps(estimator):
    short, long = peak_saved_bytes(estimator, 10), peak_saved_bytes(estimator, 100)
    assert short > 0
    assert long <= 1.1 * short


def test_fused_greedy_memory_grows_with_t_up_to_its_budget(monkeypatch):
    """Fused, Greedy stores the trajectory and batches the steps' graphs: it grows with T (as the docs say) until the
    batch's graph reaches ``FUSE_MAX_SAVED_BYTES``; past it the steps go in chunks and the graphs stop growing."""
    from lightning_hypergrad.estimators import greedy as greedy_module

    short, long = peak_saved_bytes(lh.Greedy(0.99), 10), peak_saved_bytes(lh.Greedy(0.99), 100)
    assert long >= 5 * short
    one_step = peak_saved_bytes(lh.Greedy(0.99), 2) // 2
    monkeypatch.setattr(greedy_module, "FUSE_MAX_SAVED_BYTES", 4 * one_step)
    at_100, at_400 = peak_saved_bytes(lh.Greedy(0.99), 100), peak_saved_bytes(lh.Greedy(0.99), 400)
    assert at_400 <= 1.1 * at_100


def test_rmd_memory_grows_with_the_number_of_inner_steps():
    short, long = peak_saved_bytes(lh.RMD(), 10), peak_saved_bytes(lh.RMD(), 100)
    assert long >= 5 * short


def test_truncated_rmd_memory_follows_k_not_t():
    at_10 = peak_saved_bytes(lh.TruncatedRMD(truncate=5), 10)
    at_100 = peak_saved_bytes(lh.TruncatedRMD(truncate=5), 100)
    assert at_100 <= 1.1 * at_10
