"""A stop at an epoch's end keeps that epoch's validation row, and the runs of a config never share a name.

The defects these guard against: with ``checkpoint.every_n_train_steps`` falling on an epoch's last batch, the
checkpoint was written before the epoch's validation; a SIGTERM during that validation cut it short, and the run
resumed from the checkpoint went on past the epoch's end without validating it, so that its row was lost for good.
Two runs without a logger started in the same second got the same name (the start time), and so the same files.
"""

from __future__ import annotations

import inspect
import os
import signal

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_hypergrad.cli import cli
from lightning_hypergrad.cli.checkpoints import RunCheckpoint, name_of_run

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

SMALL = [  # 3 batches an epoch, a checkpoint every 3 steps (at each epoch's last batch), 2 validation batches
    "--config",
    "quickstart",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.train_batches=3",
    "--data.init_args.val_tasks=4",
    "--data.init_args.meta_batch_size=2",
    "--model.init_args.inner_steps=1",
    "--model.init_args.width=4",
    "--checkpoint.every_n_train_steps=3",
    "--trainer.max_steps=6",
]


class Validations(Callback):
    """Notes the epoch and step of every validation that ends (not the sanity check) in the file ``seen``; with
    ``stop_at_epoch``, sends this process SIGTERM at the first batch of that epoch's validation."""

    def __init__(self, seen: str = "validations.txt", stop_at_epoch: int | None = None) -> None:
        self.seen = seen
        self.stop_at_epoch = stop_at_epoch

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == self.stop_at_epoch and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler notes it; its loops stop

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            with open(self.seen, "a") as seen:
                seen.write(f"{trainer.current_epoch} {trainer.global_step}\n")


def validations(path: str = "validations.txt") -> list[tuple[int, int]]:
    with open(path) as seen:
        return [tuple(int(x) for x in line.split()) for line in seen]


def test_sigterm_during_an_epoch_end_validation_keeps_that_epochs_validation_row(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "validations.txt").touch()
    stop = "{'class_path': 'test_epoch_end_checkpoint.Validations', 'init_args': {'stop_at_epoch': 0}}"
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException
        cli(["fit", *SMALL, f"--trainer.callbacks+={stop}"])
    stopped = validations()
    cli(["fit", *SMALL, "--trainer.callbacks+=test_epoch_end_checkpoint.Validations", "--ckpt_path", "last"])
    seen = validations()
    assert (0, 3) in seen, f"epoch 0's validation never ran to its end (the stopped run's: {stopped}; all: {seen})"
    assert seen[-1] == (1, 6)


def test_the_checkpoint_at_an_epochs_last_batch_is_written_after_its_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import torch

    ran = cli(["fit", *SMALL, "--trainer.max_steps=3"])
    saved = torch.load(ran.trainer.checkpoint_callback.last_model_path, weights_only=False)
    progress = saved["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]
    assert saved["global_step"] == 3 and progress["completed"] == 2  # the epoch's validation (2 batches) is in it
    assert saved["lightning_hypergrad"]["last_epoch_end"] == 0  # and the module's end of the epoch


def test_the_private_names_of_the_checkpoint_are_there():
    """``steps_between_checkpoints`` and ``save_checkpoint_now`` (cli/_lightning.py) read and call these."""
    from lightning_hypergrad.cli._lightning import steps_between_checkpoints

    assert steps_between_checkpoints(RunCheckpoint(every_n_train_steps=3)) == 3
    assert steps_between_checkpoints(RunCheckpoint()) == 0
    for name in ("_save_topk_checkpoint", "_save_last_checkpoint"):
        assert list(inspect.signature(getattr(ModelCheckpoint, name)).parameters) == [
            "self",
            "trainer",
            "monitor_candidates",
        ]
    assert list(inspect.signature(ModelCheckpoint._monitor_candidates).parameters) == ["self", "trainer"]
    assert list(inspect.signature(ModelCheckpoint._should_skip_saving_checkpoint).parameters) == ["self", "trainer"]


def test_two_runs_without_a_logger_started_in_the_same_second_get_different_names():
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    names = {name_of_run(trainer) for _ in range(20)}
    assert len(names) == 20
