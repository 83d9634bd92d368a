"""Every private name of Lightning and W&B that the command line uses (all in lightning_hypergrad/cli/_lightning.py) is
still there in the installed versions, with the signature and the behaviour relied on.

These run in the oldest-versions subset (scripts/oldest_tests.txt), so that a version that renames one of them or
changes what it does fails here rather than in a user's run.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from lightning_hypergrad.cli._lightning import (
    PYTREE_MODULE,
    CLIHooks,
    set_wandb_offline,
    set_wandb_save_dir,
    started_wandb_run,
    wandb_init_arguments,
)

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")
QUIET = ["--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false"]


class _Model(LightningModule):
    def __init__(self, width: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()


class _Parsed(Exception):
    """Raised with the parsed config where instantiation would start."""


def _parsed_config(cli_class: type[LightningCLI], args: list[str]):
    class Stopped(cli_class):
        def before_instantiate_classes(self) -> None:
            raise _Parsed(self.config)

    with pytest.raises(_Parsed) as stopped:
        Stopped(_Model, args=args, save_config_callback=None)
    return stopped.value.args[0]


def test_lightning_cli_parses_a_checkpoints_hyperparameters_in_parse_ckpt_path_and_ours_turns_it_off(tmp_path):
    """``LightningCLI._parse_ckpt_path(self)`` replaces the command line's model settings by the checkpoint's
    ``hyper_parameters``; ``CLIHooks`` overrides it to keep the command line's."""
    assert list(inspect.signature(LightningCLI._parse_ckpt_path).parameters) == ["self"]
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"width": 7}}, path)
    args = ["validate", "--model.width=3", "--ckpt_path", str(path), *QUIET]
    assert _parsed_config(LightningCLI, args).validate.model.width == 7  # Lightning's private step ran
    assert _parsed_config(CLIHooks, args).validate.model.width == 3


class _RecordingTrainer(Trainer):
    calls: list[str] = []

    def fit(self, *args, **kwargs) -> None:
        self.calls.append("fit")


@pytest.mark.parametrize("skip", [False, True])
def test_lightning_cli_runs_the_subcommand_through_run_subcommand_and_ours_can_skip_it(skip):
    """``LightningCLI.__init__`` calls ``_run_subcommand(self, subcommand)``, which calls ``before_<subcommand>`` and
    the trainer's method; ``CLIHooks`` overrides it to ask ``skip_subcommand`` first."""
    assert list(inspect.signature(LightningCLI._run_subcommand).parameters) == ["self", "subcommand"]
    calls = _RecordingTrainer.calls = []

    class Recording(CLIHooks):
        def skip_subcommand(self, subcommand: str) -> bool:
            calls.append(f"skip {subcommand}?")
            return skip

        def before_fit(self) -> None:
            calls.append("before_fit")

    Recording(_Model, trainer_class=_RecordingTrainer, args=["fit", *QUIET], save_config_callback=None)
    assert calls == (["skip fit?"] if skip else ["skip fit?", "before_fit", "fit"])


@pytest.mark.parametrize("offline", [True, False])
def test_wandb_logger_keeps_its_init_arguments_offline_flag_and_folder_in_private_attributes(
    tmp_path, monkeypatch, offline
):
    """``WandbLogger._wandb_init`` (a dict, with ``dir`` and ``anonymous``), ``_offline``, ``_save_dir`` (behind
    ``save_dir``) and ``_experiment`` (``None`` until the run starts): when the run starts, ``experiment`` passes
    ``_wandb_init`` to ``wandb.init`` and sets ``WANDB_MODE=dryrun`` only when ``_offline``."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_MODE")  # (set first, so that it is restored as it was)
    logger = WandbLogger(project="p", offline=not offline)
    assert logger._offline is (not offline) and started_wandb_run(logger) is None
    init = wandb_init_arguments(logger)
    assert isinstance(init, dict) and {"dir", "anonymous", "project"} <= init.keys()
    set_wandb_offline(logger, offline)
    set_wandb_save_dir(logger, str(tmp_path))
    assert logger.save_dir == str(tmp_path) and init["dir"] == str(tmp_path)
    started, passed = object(), []
    monkeypatch.setattr(wandb, "run", None)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: passed.append(kwargs) or started)
    assert logger.experiment is started
    assert passed == [init]
    assert os.environ.get("WANDB_MODE") == ("dryrun" if offline else None)
    assert started_wandb_run(logger) is started and wandb_init_arguments(logger) is None


def test_lightnings_pytree_module_still_uses_the_deprecated_leafspec():
    """The warning filter of :func:`~lightning_hypergrad.cli.messages.quiet_third_parties` names the module
    ``lightning.pytorch.utilities._pytree``, where Lightning uses torch's deprecated ``LeafSpec``."""
    name = "lightning.pytorch.utilities._pytree"
    spec = importlib.util.find_spec(name)
    assert spec is not None and re.search(PYTREE_MODULE, name)
    assert "LeafSpec" in Path(spec.origin).read_text()


def test_lightnings_logging_step_is_the_training_epoch_loops_batches_that_stepped(tmp_path):
    """:data:`~lightning_hypergrad.checkpointing.LOGGING_STEP`: the training epoch loop's attribute, saved under that
    key, and the step a logger receives."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import Logger

    from lightning_hypergrad.checkpointing import LOGGING_STEP

    class Steps(Logger):
        name, version, steps = "steps", 0, []

        def log_metrics(self, metrics, step=None):
            self.steps.append(step)

        def log_hyperparams(self, params):
            pass

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            self.log("loss", self.layer(batch).sum())
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    logger = Steps()
    trainer = L.Trainer(max_steps=3, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.ones(5, 1), batch_size=1))
    loop = trainer.fit_loop.epoch_loop
    assert getattr(loop, LOGGING_STEP) == 3 == trainer.fit_loop.state_dict()["epoch_loop.state_dict"][LOGGING_STEP]
    assert logger.steps == [0, 1, 2]
