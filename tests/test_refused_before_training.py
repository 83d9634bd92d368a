"""What the command line can refuse from the settings alone is refused before the trainer starts: no logger, no model
summary, no sanity check, no first step.

The defects these guard against: ``--trainer.precision 16-mixed`` on a CPU ran as bf16 (Lightning's own conversion)
while the docs say that fp16 is refused; ``truncated_rmd(K)`` with K > T and an online module with a meta-batch of
more than one task were refused only after the model summary and the sanity check, at the first step.
"""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer

from lightning_hypergrad.cli import cli
from lightning_hypergrad.cli.app import HypergradCLI

QUICK = ["--config", "quickstart", "--trainer.logger=false", "--trainer.max_steps=1"]
QUICK += ["--data.init_args.train_batches=2", "--data.init_args.val_tasks=2"]
ONLINE = ["--config", "hpo/lr_schedule", "--trainer.logger=false", "--trainer.max_steps=1"]


@pytest.fixture
def never_trained(monkeypatch):
    """The trainer's fit (the model summary, the sanity check, the steps), made to fail the test if it starts."""

    def fit(*args, **kwargs):
        raise AssertionError("the trainer started")

    monkeypatch.setattr(Trainer, "fit", fit)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [*QUICK, "--model.init_args.estimator=truncated_rmd(20)"],
            "TruncatedRMD truncate (K=20) exceeds the number of inner steps (T=10); use K <= T, or RMD for the whole "
            "trajectory",
        ),
        (
            [*ONLINE, "--model.init_args.meta_batch_size=2"],
            "online=True carries one inner model from step to step, but meta_batch_size is 2; set meta_batch_size 1",
        ),
    ],
    ids=["truncated_rmd(K > T)", "online meta-batch of 2"],
)
def test_settings_that_cannot_train_are_refused_before_the_trainer_starts(
    args, message, never_trained, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as refused:
        cli(["fit", *args])
    assert message in str(refused.value)


@pytest.mark.parametrize("precision", ["16-mixed", "16", "16-true"])
def test_fp16_precision_is_refused_before_anything_is_built_on_every_device(precision, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    built = []
    monkeypatch.setattr(HypergradCLI, "instantiate_classes", lambda self: built.append(self))
    with pytest.raises(ValueError, match=rf"trainer.precision='?{precision}'?: fp16 is not supported.*bf16-mixed"):
        cli(["fit", *QUICK, f"--trainer.precision={precision}"])
    assert not built and not list(tmp_path.iterdir())
