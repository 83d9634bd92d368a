"""BilevelModule and FewShotClassifier inside a Lightning Trainer."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning_cases import loader, quiet_trainer, random_meta_batch

import lightning_hypergrad as lh
from lightning_hypergrad import FewShotClassifier, HypergradCallback
from lightning_hypergrad.callbacks import StepTimer


class PlainSGDOuter(FewShotClassifier):
    """Outer SGD with lr 1, so that one training step moves the hyperparameters by exactly -hypergradient."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def engine_hypergradient(model: FewShotClassifier, task: dict, estimator) -> list[torch.Tensor]:
    """The core engine's hypergradient for one task, with the problem written out by hand."""
    n_support = task["support_x"].shape[0]

    def features():
        out = model.backbone(torch.cat([task["support_x"], task["query_x"]]))
        return [out[:n_support], out[n_support:]]

    problem = lh.BilevelProblem(
        inner_loss=lambda w, h: F.cross_entropy(h[0] @ w[0].T + w[1], task["support_y"]),
        outer_loss=lambda w, h: F.cross_entropy(h[1] @ w[0].T + w[1], task["query_y"]),
        hyperparameters=list(model.parameters()),
        init_params=[torch.zeros(3, model.backbone.out_features), torch.zeros(3)],
        optimizer=lh.SGD(lr=0.1, momentum=0.9),
        steps=5,
        features=features,
    )
    return estimator(problem).hypergrads


@pytest.mark.parametrize("estimator", [lh.Greedy(0.9), lh.RMD()], ids=["greedy", "rmd"])
def test_training_step_applies_the_engines_hypergradient_for_one_task(estimator):
    torch.manual_seed(0)
    model = PlainSGDOuter(ways=3, image_shape=(1, 8, 8), estimator=estimator, inner_steps=5)
    batch = random_meta_batch(tasks=1)
    task = {k: v[0] for k, v in batch.items()}
    expected = engine_hypergradient(model, task, estimator)
    before = [p.detach().clone() for p in model.parameters()]
    quiet_trainer(max_steps=1).fit(model, loader(batch))
    for b, a, g in zip(before, model.parameters(), expected):
        torch.testing.assert_close(b - a.detach(), g, rtol=1e-4, atol=1e-6)
    assert sum(float(g.abs().sum()) for g in expected) > 0


def logged_cosine(estimator) -> tuple[float, float]:
    torch.manual_seed(0)
    model = FewShotClassifier(ways=3, image_shape=(1, 8, 8), estimator=estimator, inner_steps=6)
    trainer = quiet_trainer(max_steps=1, callbacks=[HypergradCallback(every_n_steps=1)])
    trainer.fit(model, loader(random_meta_batch(tasks=2)))
    return float(trainer.logged_metrics["hypergrad/cosine"]), float(trainer.logged_metrics["hypergrad/norm_ratio"])


def test_callback_logs_a_cosine_of_one_for_rmd():
    cosine, ratio = logged_cosine(lh.RMD())
    assert cosine == pytest.approx(1.0, abs=1e-6)
    assert ratio == pytest.approx(1.0, abs=1e-5)


def test_callback_logs_a_cosine_below_one_for_greedy():
    cosine, _ = logged_cosine(lh.Greedy(0.99))
    assert -1.0 <= cosine <= 1.0
    assert cosine < 1.0 - 1e-4


def test_callback_compares_other_estimators_side_by_side():
    torch.manual_seed(0)
    model = FewShotClassifier(ways=3, image_shape=(1, 8, 8), estimator=lh.Greedy(0.99), inner_steps=4)
    damped = lh.get_estimator("cg(3, damping='1/lr')")
    callback = HypergradCallback(every_n_steps=2, compare=[lh.T1T2(), lh.RMD(), damped])
    trainer = quiet_trainer(max_steps=3, callbacks=[callback])
    trainer.fit(model, loader(*[random_meta_batch(seed=s) for s in range(3)]))
    logged = trainer.logged_metrics
    assert float(logged["hypergrad/rmd/cosine"]) == pytest.approx(1.0, abs=1e-6)
    assert -1.0 <= float(logged["hypergrad/t1t2/cosine"]) <= 1.0
    assert -1.0 <= float(logged["hypergrad/cg(3, damping='1%2Flr')/cosine"]) <= 1.0  # one key group per estimator


def test_validation_logs_accuracy_with_a_confidence_interval():
    torch.manual_seed(0)
    model = FewShotClassifier(ways=3, image_shape=(1, 8, 8), inner_steps=3)
    metrics = quiet_trainer().validate(model, loader(random_meta_batch(tasks=4), random_meta_batch(tasks=4, seed=1)))[0]
    assert 0.0 <= metrics["val/acc"] <= 1.0
    assert metrics["val/acc_ci95"] > 0.0


def test_gradient_clipping_goes_through_lightning():
    torch.manual_seed(0)
    model = PlainSGDOuter(ways=3, image_shape=(1, 8, 8), inner_steps=3, gradient_clip_val=1e-3)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    quiet_trainer(max_steps=1).fit(model, loader(random_meta_batch()))
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert float(torch.linalg.vector_norm(before - after)) == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(inner_steps=0), "inner_steps"),
        (dict(outer_lr=-1.0), "outer_lr"),
        (dict(depth=0), "depth"),
        (dict(gradient_clip_algorithm="l3"), "gradient_clip_algorithm"),
        (dict(meta_batch_size=0), "meta_batch_size"),
    ],
)
def test_invalid_module_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FewShotClassifier(ways=3, image_shape=(1, 8, 8), **kwargs)


class _WithScheduler(FewShotClassifier):
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_a_step_interval_scheduler_is_stepped_once_per_training_step():
    torch.manual_seed(0)
    model = _WithScheduler(ways=3, image_shape=(1, 8, 8), inner_steps=2)
    trainer = quiet_trainer(max_steps=5)
    trainer.fit(model, loader(*[random_meta_batch(seed=s) for s in range(5)]))
    # StepLR(step_size=2, gamma=0.1) after 5 steps: 1e-2 * 0.1 ** (5 // 2)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)


class _Outputs(L.Callback):
    def __init__(self) -> None:
        self.hypergrads: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.hypergrads.append(outputs["hypergrad"])


def test_callbacks_receive_the_hypergradient_that_reaches_grad_as_the_steps_output():
    torch.manual_seed(0)
    model = PlainSGDOuter(ways=3, image_shape=(1, 8, 8), estimator=lh.Greedy(0.9), inner_steps=3)
    seen = _Outputs()
    before = [p.detach().clone() for p in model.parameters()]
    quiet_trainer(max_steps=1, callbacks=[seen]).fit(model, loader(random_meta_batch(tasks=2)))
    (hypergrad,) = seen.hypergrads
    for b, a, g in zip(before, model.parameters(), hypergrad):
        torch.testing.assert_close(b - a.detach(), g, rtol=1e-4, atol=1e-6)  # outer SGD, lr 1: the step is -g


def test_one_step_timer_logs_the_seconds_per_step():
    model = FewShotClassifier(ways=3, image_shape=(1, 8, 8), inner_steps=2)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(model, loader(random_meta_batch(), random_meta_batch(seed=1)))
    timers = [c for c in trainer.callbacks if isinstance(c, StepTimer)]
    assert len(timers) == 1 and len(timers[0].durations) == 2
    assert float(trainer.callback_metrics["train/seconds_per_step"]) == pytest.approx(timers[0].durations[-1])
    own = StepTimer()  # a timer of the user's is the one used, not replaced
    trainer = quiet_trainer(max_steps=1, callbacks=[own])
    trainer.fit(model, loader(random_meta_batch()))
    assert [c for c in trainer.callbacks if isinstance(c, StepTimer)] == [own] and len(own.durations) == 1


def test_the_meta_batch_size_is_shared_with_the_data_module():
    data = lh.FewShotDataModule("digits", ways=3, shots=1, queries=2, meta_batch_size=4, train_batches=1, val_tasks=2)
    model = FewShotClassifier(inner_steps=1, width=4)
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(model, data)
    assert model.meta_batch_size == 4 and model.hparams["meta_batch_size"] == 4 and model.hparams["ways"] == 3
    with pytest.raises(ValueError, match="meta_batch_size=2 disagrees with the data module's meta_batch_size=4"):
        quiet_trainer(max_steps=1).fit(FewShotClassifier(inner_steps=1, width=4, meta_batch_size=2), data)
