"""AutoGreedy: the grid of discounts accumulated in one inner loop, and the discount fitted by HypergradCallback."""

from __future__ import annotations

import copy

import pytest
import torch
from bilevel_cases import MLPTask
from lightning_cases import loader, quiet_trainer, random_meta_batch

import lightning_hypergrad as lh
from lightning_hypergrad.callbacks.hypergrad_quality import cosine_and_norm_ratio


def close(a, b, rtol=1e-10):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-14)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_grid_recorded_in_one_inner_loop_equals_greedy_for_each_discount(momentum):
    task = MLPTask()
    grid = (0.3, 0.9, 1.0)
    estimator = lh.AutoGreedy(gamma=0.5, grid=grid)
    estimator.start_grid()
    used = estimator(task.problem(8, lh.SGD(lr=0.3, momentum=momentum))).hypergrads
    recorded = estimator.finish_grid()
    for gamma, hypergrad in zip(grid, recorded):
        close(hypergrad, lh.Greedy(gamma)(task.problem(8, lh.SGD(lr=0.3, momentum=momentum))).hypergrads)
    close(used, lh.Greedy(0.5)(task.problem(8, lh.SGD(lr=0.3, momentum=momentum))).hypergrads)
    assert estimator.finish_grid() is None  # recording stopped


def test_without_a_reference_step_it_is_greedy_bit_for_bit():
    task = MLPTask(seed=1)
    a = lh.AutoGreedy(0.9)(task.problem(6)).hypergrads
    b = lh.Greedy(0.9)(task.problem(6)).hypergrads
    close(a, b, rtol=0)


def test_the_grid_averages_the_tasks_of_a_meta_batch():
    tasks = [MLPTask(seed=s) for s in range(3)]
    estimator = lh.AutoGreedy(grid=(0.7,))
    estimator.start_grid()
    for task in tasks:
        estimator(task.problem(5))
    (mean,) = estimator.finish_grid()
    each = [lh.Greedy(0.7)(task.problem(5)).hypergrads for task in tasks]
    close(mean, [sum(parts) / 3 for parts in zip(*each)])


def test_the_callback_sets_the_discount_closest_to_rmd_and_logs_it():
    torch.manual_seed(0)
    grid = (0.2, 0.6, 0.999)
    model = lh.FewShotClassifier(ways=3, image_shape=(1, 8, 8), inner_steps=6, estimator=lh.AutoGreedy(0.6, grid))
    batch = random_meta_batch(tasks=2)
    # what the callback must find, computed independently on a copy of the untrained module
    twin = copy.deepcopy(model)
    tasks = twin.split_tasks(batch)
    reference = twin.meta_gradient(tasks, lh.RMD()).hypergrads
    cosines = [cosine_and_norm_ratio(twin.meta_gradient(tasks, lh.Greedy(g)).hypergrads, reference)[0] for g in grid]
    expected = grid[max(range(len(grid)), key=cosines.__getitem__)]
    trainer = quiet_trainer(max_steps=1, callbacks=[lh.HypergradCallback(every_n_steps=1)])
    trainer.fit(model, loader(batch))
    assert model.estimator.gamma == expected
    assert float(trainer.logged_metrics["hypergrad/auto_gamma"]) == pytest.approx(expected)
    for gamma, cosine in zip(grid, cosines):
        logged = float(trainer.logged_metrics[f"hypergrad/auto_gamma/{gamma:g}/cosine"])
        assert logged == pytest.approx(cosine, abs=1e-4)


def test_no_reference_step_keeps_the_configured_discount_and_a_checkpoint_keeps_the_fitted_one(tmp_path):
    model = lh.FewShotClassifier(ways=3, image_shape=(1, 8, 8), inner_steps=2, estimator="auto_greedy(0.9)")
    quiet_trainer(max_steps=2).fit(model, loader(random_meta_batch(), random_meta_batch(seed=1)))
    assert model.estimator.gamma == 0.9
    model.estimator.gamma = 0.5  # as fitted
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    fresh = lh.FewShotClassifier(ways=3, image_shape=(1, 8, 8), inner_steps=2, estimator="auto_greedy(0.9)")
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.estimator.gamma == 0.5


@pytest.mark.parametrize("grid", [(), (0.5, 1.5), (0.0,)])
def test_a_bad_grid_is_refused(grid):
    with pytest.raises(ValueError, match="AutoGreedy grid"):
        lh.AutoGreedy(grid=grid)
