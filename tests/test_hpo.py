"""Hyperparameter optimization of one network's training: weight decay, learning rates, sample weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from bilevel_cases import central_difference
from sklearn.metrics import roc_auc_score

import lightning_hypergrad as lh
from lightning_hypergrad.cli import cli
from lightning_hypergrad.hpo import DigitsHPODataModule, HyperCleaner, LearningRateTuner, WeightDecayTuner, auc

ROOT = Path(__file__).resolve().parents[1]
QUIET = [
    "--trainer.logger=false",
    "--trainer.callbacks=[]",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def from_config(example: str, *overrides: str, root: Path):
    """The model, data module and trainer of ``configs/hpo/<example>.yaml``, quiet, with ``overrides``; the run's
    config file is saved under ``root``."""
    config = ["--config", str(ROOT / "configs" / "hpo" / f"{example}.yaml")]
    built = cli([*config, *QUIET, f"--trainer.default_root_dir={root}", *overrides], run=False)
    return built.model, built.datamodule, built.trainer


def sgd_val_loss(model, task, training_loss, steps: int, optimizer) -> float:
    """Validation loss (``task``'s ``x_val``/``y_val``) after ``steps`` of the torch optimizer ``optimizer(w)`` on
    ``training_loss(w)``, from the model's initial network: the independent run every reference here is made of.
    ``w`` is the flat list of the network's parameters (``model.inner_model.names``)."""
    w = [p.clone().requires_grad_() for p in model.inner_model.initial()]
    opt = optimizer(w)
    for _ in range(steps):
        opt.zero_grad()
        training_loss(w).backward()
        opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(model.inner_model(w, task["x_val"]), task["y_val"]))


def fixed_rate_val_loss(model, data, lr: float, momentum: float, steps: int, weight_decay=(0.0, 0.0)) -> float:
    """Validation loss after ``steps`` of ``torch.optim.SGD`` with an L2 penalty on the weight matrices."""
    data.setup()
    task = data.task("train")

    def training_loss(w):
        loss = F.cross_entropy(model.inner_model(w, task["x_train"]), task["y_train"])
        weights = model.inner_model.named(w)
        return loss + sum(0.5 * d * (weights[f"layer{i}.weight"] ** 2).sum() for i, d in enumerate(weight_decay))

    return sgd_val_loss(model, task, training_loss, steps, lambda w: torch.optim.SGD(w, lr=lr, momentum=momentum))


def test_auc_is_the_area_under_the_roc_curve():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (300,), generator=g).float()  # many ties
    positive = torch.rand(300, generator=g) < 0.6
    assert float(auc(scores, positive)) == pytest.approx(roc_auc_score(positive.numpy(), scores.numpy()), abs=1e-12)


def test_the_data_module_corrupts_exactly_the_stated_fraction_with_wrong_labels():
    data = DigitsHPODataModule(train_size=500, val_size=300, test_size=400, corrupt_fraction=0.3, seed=3)
    data.setup()
    s = data.splits
    assert s["corrupted"].sum() == 150
    assert torch.equal(s["y_train"] != s["clean_y_train"], s["corrupted"])
    assert (s["x_train"].shape, s["x_val"].shape, s["x_test"].shape) == ((500, 64), (300, 64), (400, 64))
    rows = {tuple(x.tolist()) for key in ("x_train", "x_val", "x_test") for x in s[key]}
    assert len(rows) > 1150  # the splits do not share examples (the digits hold a few duplicate images)
    test = data.task("test")
    assert torch.equal(test["x_val"], s["x_test"]) and torch.equal(test["x_train"], s["x_train"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(train_size=1500, val_size=300), "exceeds"),
        (dict(corrupt_fraction=1.0), "corrupt_fraction"),
        (dict(train_size=0), "train_size"),
    ],
)
def test_the_data_module_rejects_impossible_splits(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsHPODataModule(**kwargs)


def test_hypercleaning_with_greedy_ranks_corrupted_examples_below_clean_ones(tmp_path):
    """configs/hpo/hypercleaning.yaml: 30% of 500 digits mislabelled; the target is an AUC of at least 0.9."""
    model, data, trainer = from_config("hypercleaning", root=tmp_path)
    trainer.fit(model, data)
    weights = model.sample_weights()
    corrupted = data.splits["corrupted"]
    score = roc_auc_score((~corrupted).numpy(), weights.numpy())
    assert score >= 0.9
    assert float(trainer.callback_metrics["val/auc"]) == pytest.approx(score, abs=1e-6)
    assert weights[corrupted].mean() < 0.5 < weights[~corrupted].mean()  # the weights started at 0.5


def test_a_too_strong_weight_decay_is_learned_down(tmp_path):
    """Ground truth from torch.optim: with only 100 training digits, a weight decay of 0.3 underfits and 1e-3 does
    better; starting at 0.3, the learned weight decay of every layer must fall."""
    model, data, trainer = from_config(
        "weight_decay", "--model.init_weight_decay=0.3", "--model.outer_lr=0.1", "--trainer.max_steps=30", root=tmp_path
    )
    steps = 30 * model.inner_steps
    strong = fixed_rate_val_loss(model, data, 0.3, 0.9, steps, weight_decay=(0.3, 0.3))
    weak = fixed_rate_val_loss(model, data, 0.3, 0.9, steps, weight_decay=(1e-3, 1e-3))
    assert weak < strong
    trainer.fit(model, data)
    decays = [float(d) for d in model.weight_decays()]
    assert all(d < 0.3 * 0.5 for d in decays), decays
    with torch.no_grad():
        learned = float(model.outer_loss(model.inner_model.bind(model.carried_params), [], data.task("val")))
    assert learned < strong


@pytest.mark.parametrize("better, worse", [(0.3, 0.003), (1.0, 4.0)])
def test_the_learned_learning_rate_moves_towards_the_better_of_two_known_rates(tmp_path, better, worse):
    """Ground truth from two torch.optim runs of the same length; the learned rate starts at their geometric mean.

    From above, the start is 2: from much higher (sqrt(10)) the first layer's units die in the first window, its
    hypergradient is exactly zero from then on, and no rule that follows the hypergradient moves it."""
    steps = 8
    model, data, trainer = from_config(
        "lr_schedule", f"--trainer.max_steps={steps}", "--model.init_lr=0.03", root=tmp_path
    )
    total = steps * model.inner_steps
    losses = {lr: fixed_rate_val_loss(model, data, lr, 0.9, total) for lr in (better, worse)}
    assert losses[better] < losses[worse]  # what the test takes as known
    start = math.sqrt(better * worse)
    model, data, trainer = from_config(
        "lr_schedule", f"--trainer.max_steps={steps}", f"--model.init_lr={start}", root=tmp_path
    )
    trainer.fit(model, data)
    moved = model.learning_rates().log() - math.log(start)
    assert bool((moved * math.copysign(1, math.log(better / start)) > 0.05).all()), model.learning_rates()


def test_learning_rate_hypergradient_matches_finite_differences():
    """RMD of the outer loss with respect to each layer's log learning rate and the logit momentum, against
    central differences of torch.optim.SGD runs with those rates (float64, offline: every step from w_0)."""
    torch.manual_seed(0)
    model = LearningRateTuner(
        hidden=[6], init_lr=0.2, momentum=0.5, learn_momentum=True, online=False, inner_steps=6, estimator=lh.RMD()
    ).double()
    data = DigitsHPODataModule(train_size=40, val_size=30, test_size=10)
    data.setup()
    task = {k: v.double() if v.is_floating_point() else v for k, v in data.task("train").items()}
    result = lh.RMD()(model.make_problem(task))
    grads = torch.cat([g.reshape(-1) for g in result.hypergrads])

    def outer(values: torch.Tensor) -> float:  # [log lr of each layer..., logit momentum]
        log_lr, logit_momentum = values[:-1], float(values[-1])

        def optimizer(w):
            named = model.inner_model.named(w)
            layer = [[named[f"layer{i}.weight"], named[f"layer{i}.bias"]] for i in range(len(log_lr))]
            groups = [{"params": layer[i], "lr": float(log_lr[i].exp())} for i in range(len(log_lr))]
            return torch.optim.SGD(groups, momentum=1 / (1 + math.exp(-logit_momentum)))

        def training_loss(w):
            return F.cross_entropy(model.inner_model(w, task["x_train"]), task["y_train"])

        return sgd_val_loss(model, task, training_loss, model.inner_steps, optimizer)

    base = torch.cat([model.log_lr.detach().reshape(-1), model.logit_momentum.detach().reshape(1)])
    numeric = central_difference(outer, base, eps=1e-5)
    torch.testing.assert_close(grads, numeric, rtol=1e-5, atol=1e-9)


def test_implicit_estimators_refuse_learning_rates_before_training(tmp_path):
    model, data, trainer = from_config("lr_schedule", "--model.estimator=lightning_hypergrad.Neumann", root=tmp_path)
    with pytest.raises(ValueError, match="cannot differentiate through the inner optimizer's own settings"):
        trainer.fit(model, data)
    assert trainer.global_step == 0


def test_online_validation_measures_the_network_being_trained(tmp_path):
    model, data, trainer = from_config(
        "hypercleaning", "--trainer.max_steps=5", "--data.steps_per_epoch=5", root=tmp_path
    )
    trainer.fit(model, data)
    val = data.task("val")
    with torch.no_grad():
        expected = F.cross_entropy(model.inner_model(model.carried_params, val["x_val"]), val["y_val"])
    assert float(trainer.callback_metrics["val/outer_loss"]) == pytest.approx(float(expected), rel=1e-6)
    assert model.carried_state.step == 5 * model.inner_steps


def test_hypercleaner_takes_the_training_size_from_the_data_and_refuses_a_mismatch():
    data = DigitsHPODataModule(train_size=50, val_size=20, steps_per_epoch=1)
    model = HyperCleaner(inner_steps=2)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, data)
    assert model.sample_logits.shape == (50,) and model.hparams["train_size"] == 50
    with pytest.raises(ValueError, match="train_size=40 disagrees.*set model train_size to 50"):
        L.Trainer(max_steps=1, logger=False, enable_progress_bar=False).fit(HyperCleaner(train_size=40), data)


def test_the_network_is_an_nn_module_drawn_from_init_seed_alone():
    """The network's initial weights are the uniform draws of a generator seeded with init_seed, per layer the weight
    then the bias (the numbers of every published run); building the module leaves the global random state as it
    was; the network's weights are constants, so the hyperparameters are the tuner's own parameters alone."""
    state = torch.get_rng_state()
    model = WeightDecayTuner(in_features=64, hidden=[5, 4], classes=10, init_seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.inner_model.names == tuple(f"layer{i}.{kind}" for i in range(3) for kind in ("weight", "bias"))
    g = torch.Generator().manual_seed(3)
    expected = []
    for fan_in, fan_out in [(64, 5), (5, 4), (4, 10)]:
        bound = 1 / math.sqrt(fan_in)
        expected += [(torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound]
        expected += [(torch.rand(fan_out, generator=g) * 2 - 1) * bound]
    assert all(torch.equal(a, b) for a, b in zip(model.inner_model.initial(), expected, strict=True))
    x = torch.randn(7, 64)
    plain = F.linear(torch.relu(F.linear(torch.relu(F.linear(x, *expected[:2])), *expected[2:4])), *expected[4:])
    assert torch.equal(model.inner_model(expected, x), plain)
    assert [p is a for p, a in zip(model.hyperparameters(), model.log_weight_decay)] == [True] * 3
    assert len(list(model.parameters())) == 3


def test_tuners_reject_bad_settings():
    with pytest.raises(ValueError, match="per must be"):
        WeightDecayTuner(per="neuron")
    with pytest.raises(ValueError, match="remove inner_optimizer"):
        LearningRateTuner(inner_optimizer=lh.SGD())
    with pytest.raises(ValueError, match="init_weight"):
        HyperCleaner(init_weight=1.0)
    with pytest.raises(ValueError, match="hidden must be a list"):
        WeightDecayTuner(hidden=64)
    with pytest.raises(ValueError, match="test_size"):
        DigitsHPODataModule(test_size=True)


@pytest.mark.parametrize("example", ["weight_decay", "lr_schedule", "hypercleaning"])
def test_each_example_config_runs_from_the_command_line(tmp_path, example):
    command = [str(Path(sys.executable).parent / "lightning-hypergrad"), "fit"]
    command += ["--config", str(ROOT / "configs" / "hpo" / f"{example}.yaml"), "--trainer.max_steps=3"]
    command += ["--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1", "--data.steps_per_epoch=3"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"val/outer_loss" in record and b"train/outer_loss" in record


def test_forward_mode_gives_the_learning_rate_hypergradient_of_reverse_mode():
    """FMD (Jacobian-vector products forward through the steps) against RMD (backward through them)."""
    model = LearningRateTuner(
        hidden=[5], init_lr=0.3, momentum=0.6, learn_momentum=True, online=False, inner_steps=5
    ).double()
    data = DigitsHPODataModule(train_size=30, val_size=20, test_size=10, seed=1)
    data.setup()
    task = {k: v.double() if v.is_floating_point() else v for k, v in data.task("train").items()}
    forward = lh.FMD()(model.make_problem(task)).hypergrads
    reverse = lh.RMD()(model.make_problem(task)).hypergrads
    for f, r in zip(forward, reverse):
        torch.testing.assert_close(f, r, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("estimator", ["T1T2", "Greedy", "RMD", "FMD"])
def test_learning_rates_and_momentum_train_with_each_estimator_that_supports_them(tmp_path, estimator):
    model, data, trainer = from_config(
        "lr_schedule",
        "--trainer.max_steps=3",
        "--model.learn_momentum=true",
        f"--model.estimator=lightning_hypergrad.{estimator}",
        root=tmp_path,
    )
    start = [p.detach().clone() for p in model.hyperparameters()]
    trainer.fit(model, data)
    assert len(start) == 2  # the log learning rates and the logit momentum
    for before, after in zip(start, model.hyperparameters()):
        assert bool((after.detach() != before).all())
    assert 0 < float(trainer.callback_metrics["hparams/momentum"]) < 1


def _double_task(data: DigitsHPODataModule) -> dict:
    data.setup()
    return {k: v.double() if v.is_floating_point() else v for k, v in data.task("train").items()}


@pytest.mark.parametrize("per", ["layer", "weight"])
def test_weight_decay_hypergradient_matches_finite_differences(per):
    """RMD against central differences of torch.optim.SGD runs whose penalty is written out here: exp(a_l) / 2 times
    the squared norm of each weight matrix, biases not penalized."""
    model = WeightDecayTuner(
        hidden=[4], per=per, init_weight_decay=0.05, inner_steps=5, inner_optimizer=lh.SGD(0.3, 0.5)
    )
    model = model.double()
    task = _double_task(DigitsHPODataModule(train_size=30, val_size=20, test_size=10, seed=2))
    hypergrads = lh.RMD()(model.make_problem(task)).hypergrads
    sgd = lambda w: torch.optim.SGD(w, lr=0.3, momentum=0.5)  # noqa: E731
    for layer in range(2):
        decays = [a.detach().clone() for a in model.log_weight_decay]

        def outer(value, layer=layer, decays=decays):
            logs = [value if i == layer else d for i, d in enumerate(decays)]

            def training_loss(w):
                weights = model.inner_model.named(w)
                penalty = sum(0.5 * (logs[i].exp() * weights[f"layer{i}.weight"] ** 2).sum() for i in range(2))
                return F.cross_entropy(model.inner_model(w, task["x_train"]), task["y_train"]) + penalty

            return sgd_val_loss(model, task, training_loss, model.inner_steps, sgd)

        numeric = central_difference(outer, decays[layer], eps=1e-5)
        torch.testing.assert_close(hypergrads[layer], numeric, rtol=1e-5, atol=1e-10)


def test_sample_weight_hypergradient_matches_finite_differences():
    """RMD against central differences of torch.optim.SGD runs on the mean of sigmoid(c_i) times each example's
    cross-entropy, written out here."""
    model = HyperCleaner(train_size=25, inner_steps=6, inner_optimizer=lh.SGD(0.5, 0.9)).double()
    task = _double_task(DigitsHPODataModule(train_size=25, val_size=20, test_size=10, corrupt_fraction=0.3))
    logits = model.sample_logits.detach().clone() + torch.linspace(-1, 1, 25, dtype=torch.float64)
    with torch.no_grad():
        model.sample_logits.copy_(logits)
    hypergrads = lh.RMD()(model.make_problem(task)).hypergrads[0]

    def outer(c):
        def training_loss(w):
            losses = F.cross_entropy(model.inner_model(w, task["x_train"]), task["y_train"], reduction="none")
            return (torch.sigmoid(c) * losses).sum() / len(losses)

        return sgd_val_loss(model, task, training_loss, model.inner_steps, sgd)

    sgd = lambda w: torch.optim.SGD(w, lr=0.5, momentum=0.9)  # noqa: E731
    numeric = central_difference(outer, logits, eps=1e-5)
    torch.testing.assert_close(hypergrads, numeric, rtol=1e-5, atol=1e-10)


def test_a_hypercleaner_checkpoint_restores_the_sample_weights(tmp_path):
    model, data, trainer = from_config(
        "hypercleaning", "--trainer.max_steps=3", "--trainer.enable_checkpointing=true", root=tmp_path
    )
    trainer.fit(model, data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = HyperCleaner.load_from_checkpoint(tmp_path / "last.ckpt")
    assert torch.equal(restored.sample_logits, model.sample_logits.detach())
    assert not bool((restored.sample_weights() == 0.5).all())
    assert all(torch.equal(a, b) for a, b in zip(restored.carried_params, model.carried_params))


# ---------------------------------------------------------------------------------------------------------------------
# the outer rule of LearningRateTuner: Rprop (sign steps of adaptive size) on the log learning rates
# ---------------------------------------------------------------------------------------------------------------------


def test_rprop_moves_a_log_learning_rate_by_the_steps_worked_out_by_hand():
    """One log learning rate, first step 0.03, largest step 0.1; a sequence of hypergradients whose sizes vary by
    orders of magnitude. Worked out by hand: a step doubles while the sign stays (capped at 0.1), halves after a
    flip with no move on that outer step, and a zero hypergradient neither moves nor changes the step."""
    model = LearningRateTuner(hidden=[], init_lr=0.1, outer_lr=0.03, max_outer_step=0.1)
    (optimizer,) = [model.configure_optimizers()]
    start = float(model.log_lr)
    grads = [-0.2, -1e-5, -3.0, -0.5, 0.7, 0.7, 1e-6, -1.0, 0.0, -2.0]
    # step:  0.03  0.06   0.1   0.1   0.05 0.05 0.1   0.05  0.05  0.05
    # move: +0.03 +0.06  +0.1  +0.1   0   -0.05 -0.1  0     0    +0.05
    expected = [0.03, 0.09, 0.19, 0.29, 0.29, 0.24, 0.14, 0.14, 0.14, 0.19]
    moved = []
    for g in grads:
        optimizer.zero_grad()
        model.log_lr.grad = torch.full_like(model.log_lr, g)
        optimizer.step()
        moved.append(float(model.log_lr) - start)
    assert moved == pytest.approx(expected, abs=1e-6)


def test_the_first_outer_step_of_a_fit_is_minus_outer_lr_times_the_sign_of_the_hypergradient(tmp_path):
    """Through Lightning: what reaches the outer optimizer is the step's hypergradient (the callback's
    outputs["hypergrad"], computed before the step), and the first Rprop step moves each log rate by outer_lr
    against its sign."""
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs["hypergrad"][0].clone())

    model, data, trainer = from_config("lr_schedule", "--trainer.max_steps=1", root=tmp_path)
    trainer.callbacks.append(Record())
    start = model.log_lr.detach().clone()
    reference = lh.Greedy(0.9)(model.make_problem(_task(data))).hypergrads[0]
    trainer.fit(model, data)
    (hypergrad,) = seen
    torch.testing.assert_close(hypergrad, reference)
    assert bool((hypergrad != 0).all())
    torch.testing.assert_close(model.log_lr.detach() - start, -0.03 * hypergrad.sign())


def _task(data: DigitsHPODataModule) -> dict:
    data.setup()
    return data.task("train")


def test_an_rprop_run_resumes_from_a_checkpoint_as_if_uninterrupted(tmp_path):
    """Rprop's step sizes and last signs are the outer optimizer's state: saved and restored with it."""
    small = ["--data.train_size=100", "--data.val_size=50", "--data.test_size=50", "--model.inner_steps=2"]
    model, data, trainer = from_config("lr_schedule", "--trainer.max_steps=6", *small, root=tmp_path / "a")
    trainer.fit(model, data)
    first, data1, trainer1 = from_config("lr_schedule", "--trainer.max_steps=3", *small, root=tmp_path / "b")
    trainer1.fit(first, data1)
    trainer1.save_checkpoint(tmp_path / "step3.ckpt")
    state = torch.load(tmp_path / "step3.ckpt", weights_only=False)["optimizer_states"][0]["state"][0]
    assert set(state) >= {"prev", "step_size"}
    resumed, data2, trainer2 = from_config("lr_schedule", "--trainer.max_steps=6", *small, root=tmp_path / "c")
    trainer2.fit(resumed, data2, ckpt_path=tmp_path / "step3.ckpt")
    assert torch.equal(resumed.log_lr.detach(), model.log_lr.detach())
    assert not torch.equal(first.log_lr.detach(), model.log_lr.detach())


def test_outer_optimizer_settings_are_checked():
    with pytest.raises(ValueError, match="outer_optimizer must be one of 'adam', 'rprop'"):
        LearningRateTuner(outer_optimizer="sgd")
    with pytest.raises(ValueError, match="max_outer_step must be a finite number > 0"):
        LearningRateTuner(max_outer_step=0)
    with pytest.raises(ValueError, match=r"outer_lr=0.15 \(Rprop's first step\) exceeds max_outer_step=0.1"):
        LearningRateTuner(outer_lr=0.15)
    assert isinstance(LearningRateTuner(outer_lr=0.15, outer_optimizer="adam").configure_optimizers(), torch.optim.Adam)
    assert isinstance(WeightDecayTuner().configure_optimizers(), torch.optim.Adam)  # the others keep Adam
    rprop = WeightDecayTuner(outer_optimizer="rprop", outer_lr=0.01, max_outer_step=0.2).configure_optimizers()
    assert rprop.defaults["step_sizes"] == (pytest.approx(2e-4), 0.2) and rprop.defaults["etas"] == (0.5, 2.0)


# ---------------------------------------------------------------------------------------------------------------------
# the studies: their statistics and their tiny forms
# ---------------------------------------------------------------------------------------------------------------------


def test_the_median_interval_is_the_sign_test_interval():
    from studies.stats import mean_interval, median_interval

    values = [0.5, -0.1, 0.3, 0.9, -0.4, 0.2, 0.0, 0.7, -0.2, 0.1]  # sorted: -0.4 -0.2 -0.1 0 .1 .2 .3 .5 .7 .9
    low, high, coverage = median_interval(values)
    assert (low, high) == (-0.2, 0.7)  # the 2nd and 9th of 10
    assert coverage == pytest.approx(1 - 2 * (1 + 10) / 1024)  # P(B <= 1) = (C(10,0) + C(10,1)) / 2^10 per tail
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # [min, max] of 5 covers 1 - 2/32 < 0.95
    assert median_interval(range(6))[:2] == (0, 5)
    low, high = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776
    assert (3 - low, high - 3) == (pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5)),) * 2


def test_the_unseen_seed_study_runs_in_a_tiny_form(tmp_path):
    from studies.hpo import unseen

    summary = unseen.main(["--seeds", "10", "11", "--steps", "2", "--grid", "0.03", "0.1", "--decays", "0.001",
                           "--lr-variants", "outer_lr_x3", "--out", str(tmp_path)])  # fmt: skip
    saved = json.loads((tmp_path / "unseen.json").read_text())
    lr = summary["lr_schedule"]
    assert lr["seeds"] == [10, 11] and lr["val"]["n"] == 2 and set(lr["variants"]) == {"outer_lr_x3"}
    runs = [r for r in saved["records"] if r["example"] == "lr_schedule" and r["seed"] == 10]
    assert [r["variant"] for r in runs] == ["config", "fixed_lr0.03", "fixed_lr0.1", "plain_sgd_lr0.03",
                                            "plain_sgd_lr0.1", "outer_lr_x3"]  # fmt: skip
    assert runs[5]["overrides"][:2] == ["--model.outer_lr", "0.09"]  # 3x the config's 0.03
    assert all(r["final_lr"] == pytest.approx([lr_] * 2) for r, lr_ in zip(runs[1:3], (0.03, 0.1)))  # FO: fixed
    best = min(runs[1:3], key=lambda r: r["val"]["loss"])
    assert lr["val"]["diffs"][0] == pytest.approx(runs[0]["val"]["loss"] / best["val"]["loss"] - 1)
    assert set(summary) == {"lr_schedule", "weight_decay", "hypercleaning"}
    table = (tmp_path / "unseen.md").read_text()
    assert "| outer_lr_x3 |" in table and "| 11 |" in table and "AUC: at least 0.9 on" in table
    (tmp_path / "unseen.md").unlink()
    unseen.main(["--report", "--out", str(tmp_path)])
    assert (tmp_path / "unseen.md").read_text() == table


def test_the_tuning_study_runs_in_a_tiny_form(tmp_path):
    from studies.hpo import tuning

    records = tuning.main(["--seeds", "0", "--windows", "150", "--adam-lrs", "0.15", "--max-steps-per-inner",
                           "0.001", "--first-steps", "0.5", "--grid", "0.1", "--out", str(tmp_path)])  # fmt: skip
    rprop = "T150 rprop max=0.15 first=0.075"
    assert [r["variant"] for r in records] == ["fixed_lr0.1", "T150 adam outer_lr=0.15", rprop]
    assert all(r["outer_steps"] == 2 and r["inner_steps"] == 150 for r in records[1:])
    assert f"| {rprop} |" in (tmp_path / "tuning_rule.md").read_text()
