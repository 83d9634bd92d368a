"""Non-finite numbers in validation, test and training: counted, logged as NaN, warned once, never a crash."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning_cases import loader, quiet_trainer, random_meta_batch
from torch import nn

import lightning_hypergrad as lh


class Scaled(lh.BilevelModule):
    """One hyperparameter; each task's outer loss is multiplied by the task's ``scale`` (NaN makes it non-finite)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(inner_steps=2, inner_optimizer=lh.SGD(lr=0.1), **kwargs)
        self.a = nn.Parameter(torch.zeros(1))

    def init_params(self, task):
        return [torch.zeros(1)]

    def inner_loss(self, params, h, task):
        return ((params[0] - h[0]) ** 2).sum()

    def outer_loss(self, params, h, task):
        return ((params[0] - 1.0) ** 2).sum() * task["scale"]

    def task_metrics(self, params, h, task):
        return {"w": params[0].sum()}


def tasks(*scales: float) -> list[dict]:
    return [{"scale": torch.tensor(s)} for s in scales]


def test_some_nonfinite_validation_tasks_give_a_nan_mean_and_their_count():
    model = Scaled()
    with pytest.warns(RuntimeWarning, match="1 of the 3 meta-validation tasks have NaN or infinite numbers"):
        metrics = quiet_trainer().validate(model, loader(tasks(1.0, float("nan"), 2.0)))[0]
    assert math.isnan(metrics["val/outer_loss"]) and math.isnan(metrics["val/outer_loss_ci95"])
    assert metrics["val/nonfinite_tasks"] == 1
    assert math.isfinite(metrics["val/w"])  # a metric that stayed finite keeps its mean


def test_finite_validation_tasks_log_a_zero_count_and_the_plain_mean():
    metrics = quiet_trainer().validate(Scaled(), loader(tasks(1.0, 2.0)))[0]
    assert metrics["val/nonfinite_tasks"] == 0
    # w stays at w_0 = 0 (the inner loss's gradient 2 (w - a) is 0 at a = 0): the outer losses are the scales
    assert metrics["val/outer_loss"] == pytest.approx(1.5) and metrics["val/w"] == 0


def test_all_nonfinite_test_tasks_do_not_crash_and_raise_when_asked():
    metrics = quiet_trainer().test(Scaled(), loader(tasks(float("nan"), float("inf"))))[0]
    assert math.isnan(metrics["test/outer_loss"]) and metrics["test/nonfinite_tasks"] == 2
    with pytest.raises(FloatingPointError, match="2 of the 2 meta-test tasks.*nonfinite='raise'"):
        quiet_trainer().test(Scaled(nonfinite="raise"), loader(tasks(float("nan"), float("inf"))))


def test_a_diverging_inner_loop_in_validation_keeps_training_and_writes_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = lh.FewShotClassifier(ways=3, image_shape=(1, 8, 8), inner_steps=3, inner_optimizer=lh.SGD(lr=1e38))
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path, enable_checkpointing=True, num_sanity_val_steps=1)
    batches = loader(random_meta_batch(), random_meta_batch(seed=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, batches, loader(random_meta_batch(tasks=3, seed=2)))
    assert trainer.global_step == 2 and model.skipped_steps == 2
    assert not math.isfinite(float(trainer.callback_metrics["val/outer_loss"]))
    assert float(trainer.callback_metrics["val/nonfinite_tasks"]) == 3
    assert list(tmp_path.rglob("*.ckpt"))
    skipped = [w for w in caught if "the outer step is skipped" in str(w.message)]
    assert len(skipped) == 1  # one console warning, however many steps are skipped
