"""The defects that the seams of the old ``BilevelModule`` hid, each named after the property that failed, and the
meta-gradient's use from plain PyTorch."""

from __future__ import annotations

import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning_cases import loader, quiet_trainer, random_meta_batch

import lightning_hypergrad as lh
from lightning_hypergrad import FewShotClassifier
from lightning_hypergrad.meta_gradient import MetaGradient


class _Started(L.Callback):
    def __init__(self) -> None:
        self.started = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = True


class _Regression(lh.BilevelModule):
    """Linear regression tasks ``{"x", "y"}``; the linear model is the inner model (``init`` as given)."""

    def __init__(self, init: str, **kwargs) -> None:
        super().__init__(estimator="fo", inner_steps=2, **kwargs)
        self.inner_model = lh.InnerModel(torch.nn.Linear(4, 1), init=init)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def inner_loss(self, model, h, task):
        return ((model(task["x"]) * h[-1] - task["y"]) ** 2).mean()

    def outer_loss(self, model, h, task):
        return ((model(task["x"]) - task["y"]) ** 2).mean()


def _regression_batch(tasks: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(tasks, 5, 4, generator=g), "y": torch.randn(tasks, 5, 1, generator=g)}


def test_online_with_a_learned_initialization_is_refused_at_setup():
    # before: after the first step the carried parameters replaced w_0, so the initialization's hypergradient was
    # zero from then on, silently
    model = _Regression("learned", online=True, meta_batch_size=1)
    started = _Started()
    with pytest.raises(ValueError, match=r"online=True with a learned initialization"):
        quiet_trainer(max_steps=2, callbacks=[started]).fit(model, loader(_regression_batch(1)))
    assert not started.started


def test_online_with_several_tasks_is_refused_at_setup_before_training_starts():
    # before: refused only inside the first training step, after the logger had started
    model = _Regression("fixed", online=True, meta_batch_size=2)
    started = _Started()
    with pytest.raises(ValueError, match=r"online=True .* meta_batch_size is 2"):
        quiet_trainer(max_steps=1, callbacks=[started]).fit(model, loader(_regression_batch(2)))
    assert not started.started


def test_batch_tasks_says_once_why_the_tasks_run_one_by_one():
    # before: a learned initialization (and four other cases) fell back to one task at a time without a word
    torch.manual_seed(0)
    model = lh.MAML(ways=3, image_shape=(1, 8, 8), inner_steps=2, estimator="fo", batch_tasks=True)
    tasks = model.split_tasks(random_meta_batch(tasks=2))
    with pytest.warns(RuntimeWarning, match=r"batch_tasks=True: the tasks run one by one, since the initialization"):
        model.meta_gradient(tasks)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.meta_gradient(tasks)  # said once


def test_init_params_beside_an_inner_model_is_refused_rather_than_ignored():
    class Both(FewShotClassifier):
        def init_params(self, task):
            return [torch.ones(3)]

    model = Both(ways=3, image_shape=(1, 8, 8), inner_steps=2)
    with pytest.raises(ValueError, match=r"both an inner_model \(InnerModel\) and its own init_params"):
        quiet_trainer(max_steps=1).fit(model, loader(random_meta_batch()))


def test_a_captured_hyperparameter_is_named_by_its_module_name():
    # before: "use hyperparameters[0, 1, 2, 3] directly", naming tensors by index
    class Captures(FewShotClassifier):
        def outer_loss(self, model, h, task):
            return super().outer_loss(model, h, task) + 0 * sum(p.sum() for p in self.backbone.parameters())

    model = Captures(ways=3, image_shape=(1, 8, 8), inner_steps=2)
    with pytest.raises(ValueError, match=r"use 'backbone\.[\w.]+weight'"):
        quiet_trainer(max_steps=1).fit(model, loader(random_meta_batch()))


class _Scheduled(FewShotClassifier):
    def __init__(self, scheduler: dict, **kwargs) -> None:
        super().__init__(ways=3, image_shape=(1, 8, 8), inner_steps=2, **kwargs)
        self.scheduler = scheduler

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        config = dict(self.scheduler)
        config["scheduler"] = config["scheduler"](optimizer)
        return {"optimizer": optimizer, "lr_scheduler": config}


def _lr(trainer: L.Trainer) -> float:
    return trainer.optimizers[0].param_groups[0]["lr"]


def test_an_epoch_scheduler_follows_its_frequency():
    # before: a per-epoch scheduler was stepped every epoch whatever its frequency
    half = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    model = _Scheduled({"scheduler": half, "interval": "epoch", "frequency": 2})
    trainer = quiet_trainer(max_epochs=4)
    trainer.fit(model, loader(random_meta_batch()))
    assert _lr(trainer) == 0.25  # stepped after epochs 2 and 4 (Lightning's rule), not 4 times


def test_a_step_scheduler_follows_its_frequency_within_the_epoch():
    half = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    model = _Scheduled({"scheduler": half, "interval": "step", "frequency": 2})
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(model, loader(*[random_meta_batch(seed=s) for s in range(3)]))
    assert _lr(trainer) == 0.25  # batches 0-2 of each epoch: stepped after batch index 1 of each (as Lightning does)


def test_reduce_on_plateau_is_refused_before_the_first_step_with_the_reason():
    # before: ReduceLROnPlateau.step() was called without the metric, a TypeError in the first epoch's end
    plateau = lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt)  # noqa: E731
    model = _Scheduled({"scheduler": plateau, "interval": "epoch"})
    started = _Started()
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau, which BilevelModule cannot step: Lightning drops"):
        quiet_trainer(max_steps=1, callbacks=[started]).fit(model, loader(random_meta_batch()))
    assert not started.started


class _NaNFirst(_Scheduled):
    def meta_gradient(self, tasks, estimator=None) -> MetaGradient:
        step = super().meta_gradient(tasks, estimator)
        if self.global_step == 0:
            step.hypergrads = [torch.full_like(g, float("nan")) for g in step.hypergrads]
        return step


def test_a_skipped_step_steps_the_per_step_schedulers_as_it_counts_the_step():
    # before: a non-finite step advanced global_step but not the per-step schedulers
    half = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    model = _NaNFirst({"scheduler": half, "interval": "step"})
    trainer = quiet_trainer(max_steps=3)
    with pytest.warns(RuntimeWarning, match="skipped"):
        trainer.fit(model, loader(*[random_meta_batch(seed=s) for s in range(3)]))
    assert model.skipped_steps == 1 and trainer.global_step == 3
    assert _lr(trainer) == 0.125


def test_the_meta_gradient_module_imports_no_lightning():
    code = (
        "import sys; import lightning_hypergrad.meta_gradient, lightning_hypergrad.meta_batch; "
        "sys.exit(int(any(m == 'lightning' or m.startswith('lightning.') for m in sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_meta_gradient_from_plain_pytorch_is_the_mean_of_the_closed_form_hypergradients():
    # tasks c: L_train(w) = (w - a c)^2 / 2, one SGD step of lr 1 from 0 lands on w_1 = a c; L_val = (w - c)^2.
    # d/da (a c - c)^2 = 2 (a c - c) c; the mean over c in {2, 3} at a = 0.5.
    from lightning_hypergrad.meta_gradient import TaskFamily, meta_gradient

    a = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    family = TaskFamily(
        inner_loss=lambda w, h, c: 0.5 * ((w[0] - h[0] * c) ** 2).sum(),
        outer_loss=lambda w, h, c: ((w[0] - c) ** 2).sum(),
        hyperparameters=[a],
        optimizer=lh.SGD(lr=1.0),
        steps=1,
        init=lambda c: [torch.zeros(1, dtype=torch.float64)],
    )
    step = meta_gradient(family, [2.0, 3.0], lh.get_estimator("rmd"))
    expected = sum(2 * (0.5 * c - c) * c for c in (2.0, 3.0)) / 2
    assert float(step.hypergrads[0]) == pytest.approx(expected, rel=1e-12)
    assert float(step.metrics["outer_loss"]) == pytest.approx(sum((0.5 * c - c) ** 2 for c in (2.0, 3.0)) / 2)


class _Reweighted(lh.BilevelModule):
    """Regression whose per-example training weights come from a reweighting net, a HyperModule called with h."""

    def __init__(self) -> None:
        super().__init__(estimator="rmd", inner_optimizer=lh.SGD(lr=0.3), inner_steps=3)
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Sigmoid()).double()
        self.weights = lh.HyperModule(net)
        self.inner_model = lh.InnerModel(torch.nn.Linear(2, 1).double(), init="zeros")

    def inner_loss(self, model, h, task):
        per_example = ((model(task["x"]) - task["y"]) ** 2).squeeze(1)
        return (self.weights(h)(task["x"]).squeeze(1) * per_example).mean()

    def outer_loss(self, model, h, task):
        return ((model(task["x"]) - task["y"]) ** 2).mean()


def test_a_module_hyperparameter_called_with_h_gets_the_finite_difference_hypergradient():
    # before: a module called directly in a loss was refused, and BilevelModule had no way to call it with h
    model = _Reweighted()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 1, generator=g, dtype=torch.float64)
    task = {"x": x, "y": y}
    hypergrads = model.meta_gradient([task]).hypergrads

    def validation_loss() -> float:  # the inner loop by hand, the net called directly: an independent computation
        w = torch.zeros(1, 2, dtype=torch.float64)
        b = torch.zeros(1, dtype=torch.float64)
        for _ in range(3):
            w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
            weights = model.weights.module(task["x"]).squeeze(1)
            loss = (weights * ((task["x"] @ w.T + b - task["y"]) ** 2).squeeze(1)).mean()
            gw, gb = torch.autograd.grad(loss, [w, b])
            w, b = w - 0.3 * gw, b - 0.3 * gb
        return float(((task["x"] @ w.T + b - task["y"]) ** 2).mean())

    params = dict(model.named_parameters())
    for name, grad in zip([n for n, p in model.named_parameters() if p.requires_grad], hypergrads):
        p = params[name]
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += 1e-6
            up = validation_loss()
            with torch.no_grad():
                p.view(-1)[i] -= 2e-6
            down = validation_loss()
            with torch.no_grad():
                p.view(-1)[i] += 1e-6
            assert float(grad.reshape(-1)[i]) == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-9), name
