"""The command line's LightningCLI: :class:`HypergradCLI`, and :func:`cli`, which builds and runs it over any
:class:`~lightning_hypergrad.module.BilevelModule` and any data module (see :mod:`lightning_hypergrad.cli`)."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.loggers import WandbLogger

from lightning_hypergrad._configs import resolve_config_args
from lightning_hypergrad.cli._lightning import CLIHooks
from lightning_hypergrad.cli.checkpoints import (
    RUN_KEY,
    SETTINGS_KEY,
    RunCheckpoint,
    checkpoint_folder,
    last_checkpoint,
    legacy_checkpoint_folder,
    read_checkpoint,
)
from lightning_hypergrad.cli.messages import notice, quiet_third_parties
from lightning_hypergrad.cli.resume import (
    SECTIONS,
    check_model_class,
    differences,
    explicit_settings,
    settle_with_checkpoint,
)
from lightning_hypergrad.cli.run_files import RemoveAbortedStart, SaveConfigToRun
from lightning_hypergrad.cli.wandb import (
    WANDB_FLUSH_ENV,
    WANDB_FLUSH_SECONDS,
    continue_run_notice,
    follow_wandb_environment,
)
from lightning_hypergrad.module import BilevelModule

SETTING_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError, ImportError, MisconfigurationException)
"""The errors whose message alone :func:`~lightning_hypergrad.cli.entry.main` prints: those that report a setting
(this package's and Lightning's) or a missing file or package."""


class _Parser(LightningArgumentParser):
    """Lightning's parser, whose errors show one line of usage instead of every option (``--help`` lists them)."""

    def print_usage(self, file=None) -> None:
        (file or sys.stdout).write(f"usage: {self.prog} [options]\n")


class HypergradCLI(CLIHooks):
    """Lightning's CLI with a :class:`~lightning_hypergrad.cli.checkpoints.RunCheckpoint` (``checkpoint``),
    ``--ckpt_path last`` per config, the settings of a run compared with its checkpoint's
    (:mod:`~lightning_hypergrad.cli.resume`), and what can be checked before the logger starts checked then (see
    :mod:`lightning_hypergrad.cli`).

    Takes Lightning's ``LightningCLI`` arguments, and:

    Args:
        on_parsed: called with the command line itself before its arguments are parsed (the console command follows
            the run's trainer this way, to report where a stop signal ended it).
    """

    def __init__(self, *args: Any, on_parsed: Callable[[HypergradCLI], None] | None = None, **kwargs: Any) -> None:
        self.on_parsed = on_parsed
        self.given_args: list[str] = []
        """The command line's arguments (empty when the arguments are given as a dict or a namespace)."""
        self.checkpoint_step: tuple[Path, int | None] | None = None
        """The ``--ckpt_path`` checkpoint and its step, once read."""
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # not add_lightning_class_args, which would make Lightning add it to every trainer (instantiate_trainer does)
        parser.add_class_arguments(RunCheckpoint, "checkpoint", fail_untyped=False, sub_configs=True)
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_argument(
            "--resume_with_changes",
            type=bool,
            default=False,
            help="fit --ckpt_path: continue the checkpoint's run with the --model.* and --data.* settings of the "
            "command line that differ from the checkpoint's (refused otherwise)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Lightning's, where ``--config <name>`` also names a config shipped with the package; then the checkpoint
        of ``--ckpt_path`` is settled (:meth:`settle_checkpoint`)."""
        if self.on_parsed is not None:
            self.on_parsed(self)
        self.given_args = list(args) if isinstance(args, (list, tuple)) else (sys.argv[1:] if args is None else [])
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
        else:  # a list, or the command line: --config quickstart names a config shipped with the package
            self.config = parser.parse_args(resolve_config_args(self.given_args))
        self.settle_checkpoint()

    def settle_checkpoint(self) -> None:
        """Sets the default checkpoint folder, resolves ``--ckpt_path last``, and settles the settings that differ
        from the checkpoint's (:func:`~lightning_hypergrad.cli.resume.settle_with_checkpoint`): the checkpoint then
        restores weights and state only."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand or "", self.config)
        checkpoint = config.get("checkpoint")
        legacy = None
        if checkpoint is not None and not checkpoint.get("dirpath"):
            files = list(config.get("config") or [])
            if config is not self.config:  # configs given before the subcommand
                files = list(self.config.get("config") or []) + files
            model = config.get("model")
            model_class = model.get("class_path", "model") if model is not None else None
            root = config.get("trainer", {}).get("default_root_dir")
            checkpoint.dirpath = checkpoint_folder(files, model_class, root)
            legacy = legacy_checkpoint_folder(files, root) if files else None
        if not config.get("ckpt_path"):
            return
        fitting = subcommand == "fit"
        if config.ckpt_path == "last":
            folder = checkpoint.dirpath if checkpoint is not None else None
            config.ckpt_path = last_checkpoint(folder, fitting, legacy)
            if config.ckpt_path is None:
                return
        path = Path(config.ckpt_path)
        saved = read_checkpoint(path) if path.exists() else None  # (Lightning reports a missing file, reads remote)
        if saved is None:
            return
        self.checkpoint_step = (path, saved.get("global_step"))
        stored = saved.get(SETTINGS_KEY)
        if isinstance(stored, dict):
            ours = self.experiment_settings()
            check_model_class(path, ours, stored, checkpoint.dirpath if checkpoint is not None else None)
            found = differences(ours, stored)
            allow = bool(config.get("resume_with_changes"))
            explicit = explicit_settings(self.given_args)
            settle_with_checkpoint(path, config, found, fitting=fitting, explicit=explicit, allow_changes=allow)
        if fitting and not self.reached_max_steps():  # (no run starts otherwise)
            logger = (self.config_values().get("trainer") or {}).get("logger")
            message = continue_run_notice(saved.get(RUN_KEY), logger)
            if message is not None:
                notice(message)

    def config_values(self) -> dict[str, Any]:
        """This run's config (of its subcommand), as plain YAML values."""
        ours = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
        return ours.get(self.config.get("subcommand"), ours)

    def experiment_settings(self) -> dict[str, Any]:
        """The ``model`` and ``data`` sections of this run's config, as plain YAML values: what a checkpoint holds."""
        ours = self.config_values()
        return {section: ours.get(section) for section in SECTIONS}

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        settings = self.experiment_settings()
        for callback in getattr(self.trainer, "callbacks", []):
            if isinstance(callback, RunCheckpoint):
                callback.settings = settings

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's, with the run's ``checkpoint`` among the callbacks (unless ``trainer.enable_checkpointing`` is
        false), a :class:`~lightning_hypergrad.cli.run_files.RemoveAbortedStart`, and W&B's environment variables
        followed (:func:`~lightning_hypergrad.cli.wandb.follow_wandb_environment`)."""
        config = self.config_init.get(str(self.subcommand), self.config_init)
        trainer_config = {**config.get("trainer", {}), **kwargs}
        callbacks = trainer_config.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if config.get("checkpoint") is not None and trainer_config.get("enable_checkpointing") is not False:
            callbacks.append(config.get("checkpoint"))
        trainer = super().instantiate_trainer(**{**kwargs, "callbacks": [*callbacks, RemoveAbortedStart()]})
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                follow_wandb_environment(logger)
        return trainer

    def reached_max_steps(self) -> bool:
        """Whether the checkpoint of ``--ckpt_path`` is at ``trainer.max_steps`` or beyond."""
        step = self.checkpoint_step[1] if self.checkpoint_step is not None else None
        max_steps = (self.config_values().get("trainer") or {}).get("max_steps")
        return isinstance(step, int) and isinstance(max_steps, int) and 0 <= max_steps <= step

    def skip_subcommand(self, subcommand: str) -> bool:
        """``fit --ckpt_path`` of a run that has already reached ``trainer.max_steps`` runs nothing (said on stderr):
        Lightning would start a logger and stop at once."""
        if subcommand != "fit" or not self.reached_max_steps():
            return False
        path, step = self.checkpoint_step
        notice(
            f"ckpt_path={path}: its run has reached step {step}, and trainer.max_steps is {self.trainer.max_steps}: "
            "nothing to train, nothing logged or written; raise --trainer.max_steps to train on"
        )
        return True

    def before_instantiate_classes(self) -> None:
        """Refuses ``trainer.precision`` fp16 before anything is built (:func:`check_precision`)."""
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        check_precision((config.get("trainer") or {}).get("precision"))

    def _check_before_logger(self, stage: str) -> None:
        """What can be refused before the logger starts (a W&B run would otherwise stay behind, empty) and before the
        model summary and the sanity check: the module's estimator where it cannot run with the inner optimizer and T
        (:func:`check_estimators`), online mode with a meta-batch of more than one task (:func:`check_online`), and a
        few-shot data set that cannot make the tasks (too few classes or examples in a split, a damaged file found on
        loading)."""
        from lightning_hypergrad.data import FewShotDataModule

        model = self.model
        if stage == "fit" and isinstance(model, BilevelModule):
            check_estimators(model)
            check_online(model, self.datamodule)
        if isinstance(self.datamodule, FewShotDataModule) and not self.datamodule.download:
            self.datamodule.setup(stage)  # (loads once: Lightning's call finds it done)

    def before_fit(self) -> None:
        self._check_before_logger("fit")
        if type(self.datamodule).state_dict is not LightningDataModule.state_dict:
            # the data module stores its sampling state: a resume in the middle of an epoch is exact
            warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch")

    def before_validate(self) -> None:
        self._check_before_logger("validate")

    def before_test(self) -> None:
        self._check_before_logger("test")


FP16 = ("16", "16-mixed", "16-true")
"""The ``trainer.precision`` values of fp16, which :func:`check_precision` refuses."""


def check_precision(precision: Any) -> None:
    """Refuses fp16 (``16-mixed``, ``16``, ``16-true``) as :class:`~lightning_hypergrad.BilevelModule` does, on every
    device: on a CPU Lightning would otherwise run ``16-mixed`` as bf16 (with a warning), not the fp16 asked for."""
    if str(precision) in FP16:
        raise ValueError(
            f"trainer.precision={precision!r}: fp16 is not supported: the hypergradients are taken with "
            "torch.autograd.grad through the inner loop, where Lightning's fp16 loss scaling does not reach, so small "
            "gradients would underflow silently (on a CPU, Lightning would run bf16 instead); use --trainer.precision "
            "bf16-mixed (CPU, and GPUs from the A100 on) or 32-true"
        )


def check_estimators(model: BilevelModule) -> None:
    """Runs the checks of the module's estimator that need only the inner optimizer and T (``truncated_rmd(K)`` with
    K > T, Neumann's or an implicit estimator's ``lr``-based settings with another optimizer than SGD, an optimizer's
    learned settings that the estimator cannot differentiate) on a problem of one hyperparameter: before any task,
    instead of at the first training step. (A HypergradCallback checks its own estimators when fitting starts.)"""
    from lightning_hypergrad.problem import BilevelProblem

    outline = BilevelProblem(
        inner_loss=lambda w, h: (w[0] * h[0]).sum(),
        outer_loss=lambda w, h: w[0].sum(),
        hyperparameters=[torch.zeros(1, requires_grad=True)],
        init_params=[torch.zeros(1)],
        optimizer=model.inner_optimizer,
        steps=model.inner_steps,
    )
    model.estimator.validate(outline)  # (with check_optimizer)


def check_online(model: BilevelModule, datamodule: Any) -> None:
    """Online mode carries one inner model from step to step: a meta-batch (the module's, else the data module's)
    of more than one task is refused, as :meth:`~lightning_hypergrad.BilevelModule.setup` refuses it, before the
    trainer starts."""
    size = model.meta_batch_size if model.meta_batch_size is not None else getattr(datamodule, "meta_batch_size", None)
    if model.online and size not in (None, 1):
        raise ValueError(
            f"online=True carries one inner model from step to step, but meta_batch_size is {size}; set "
            "meta_batch_size 1 (model and data), or online: false"
        )


def cli(
    args: list[str] | None = None, run: bool = True, *, on_parsed: Callable[[HypergradCLI], None] | None = None
) -> HypergradCLI:
    """Build (and by default run) the command line over ``args`` (``sys.argv`` when ``None``); ``on_parsed``: see
    :class:`HypergradCLI`."""
    os.environ.setdefault(WANDB_FLUSH_ENV, WANDB_FLUSH_SECONDS)
    quiet_third_parties()
    return HypergradCLI(
        BilevelModule,
        None,
        subclass_mode_model=True,
        save_config_callback=SaveConfigToRun,
        parser_class=_Parser,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        on_parsed=on_parsed,
    )
