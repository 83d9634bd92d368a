"""The command line: ``lightning-hypergrad fit --config configs/quickstart.yaml`` (also ``lightning ...``).

A :class:`lightning.pytorch.cli.LightningCLI` over any :class:`BilevelModule` subclass and any data module;
``fit``, ``validate``, ``test``, ``predict`` and ``--print_config`` work as in Lightning, with these additions:

- **Checkpoints of a config stay together, and no run touches another's.** Every run writes its checkpoints into
  ``lightning-hypergrad/<config>/checkpoints/`` (``<config>``: the names of the ``--config`` files, e.g.
  ``quickstart`` or ``omniglot+t1t2``; ``--checkpoint.dirpath`` sets another folder), each file named after the
  run (``<run>-epoch=E-step=S.ckpt`` and ``last-<run>.ckpt``, ``<run>`` the W&B run id), so that runs of the same
  config never overwrite or delete each other's files. The ``checkpoint`` settings are those of
  :class:`RunCheckpoint` (Lightning's ``ModelCheckpoint``), with ``save_last: true``.
- **``--ckpt_path last``** resumes (or evaluates) the most recent ``last-*.ckpt`` of the config's folder.
- **A resumed run is the same experiment.** Every checkpoint holds the model and data settings of its run (the
  estimator with its arguments, the inner optimizer with its settings, every other model and data setting, as the
  config has them). ``fit --ckpt_path ...`` continues with the checkpoint's settings where the configs say otherwise
  (naming them on stderr), and refuses a ``--model.*`` or ``--data.*`` argument of the command line that differs
  from the checkpoint's, naming each difference and how to start a new run instead; ``--resume_with_changes true``
  continues with them, saying so. ``validate`` and ``test`` use the settings as given and name those that differ
  (evaluating a trained backbone with another number of inner steps is a use). Checkpoints written before the
  settings were stored are compared on the model's and data module's saved hyperparameters and used as given.
- **Errors of settings are one message.** :func:`main` prints the message of an invalid setting (``error: ...``)
  without the traceback and exits with status 1; ``LIGHTNING_HYPERGRAD_DEBUG=1`` shows the traceback.
- **Nothing in the working directory but the logger's runs and the checkpoints.** The run's config goes into the
  run's own folder (:class:`SaveConfigToRun`); a run that stops before it logged anything or wrote a checkpoint
  removes the empty W&B run it started, and what can be checked before the logger starts is.
- **W&B's environment variables are followed** (``WANDB_MODE``, ``WANDB_DIR``: :func:`follow_wandb_environment`),
  and the lines Lightning prints at every run that say nothing about it are not shown (:func:`quiet_third_parties`).
- **W&B keeps what a killed run logged**: its ``.wandb`` file is written every second
  (``WANDB__TRANSACTION_LOG_FLUSH_INTERVAL``, W&B's default 15 s), so a run stopped by SIGKILL keeps its history
  up to the last second.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_hypergrad._configs import resolve_config_args
from lightning_hypergrad._console import stopped_before_training
from lightning_hypergrad.module import BilevelModule

DEBUG_ENV = "LIGHTNING_HYPERGRAD_DEBUG"
"""Set to 1 to see the traceback of an error instead of its message alone."""

CHECKPOINT_ROOT = "lightning-hypergrad"
"""The folder, under the trainer's ``default_root_dir`` (the working directory by default), of the checkpoints."""

WANDB_FLUSH_ENV = "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"
WANDB_FLUSH_SECONDS = "1"
"""How often W&B writes a run's ``.wandb`` file (W&B's default is 15 s: a run killed sooner kept nothing)."""

RUN_KEY = "lightning_hypergrad_run"
"""The key of a checkpoint that holds the name of the run that wrote it (its W&B run id)."""

SETTINGS_KEY = "lightning_hypergrad_settings"
"""The key of a checkpoint that holds its run's ``model`` and ``data`` settings, as the run's config had them."""

SECTIONS = ("model", "data")
"""The config sections whose settings make the experiment (the trainer's, such as ``max_steps``, do not)."""

SETTING_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError, ImportError, MisconfigurationException)
"""The errors whose message alone :func:`main` prints: those that report a setting (this package's and Lightning's)
or a missing file or package."""


class SaveConfigToRun(SaveConfigCallback):
    """Saves the run's full config in the run's own directory, never over a previous run's file, never in the
    working directory.

    With a :class:`WandbLogger` it goes into the W&B run's files (uploaded by ``wandb sync``) and into the
    run's config; with another logger into its ``log_dir`` (a CSV or TensorBoard run's ``version_N`` folder), under
    a new name if a config is already there. Without a logger (or with W&B disabled) it goes beside the run's
    checkpoints (``lightning-hypergrad/<config>/checkpoints/``), named after the run as its checkpoint files are:
    ``config-<run>.yaml`` for ``fit``, ``config-<subcommand>-<time>.yaml`` for the others.
    """

    def __init__(self, parser, config, config_filename: str = "config.yaml", overwrite: bool = False, multifile=False):
        super().__init__(parser, config, config_filename, overwrite, multifile, save_to_log_dir=False)
        self.saved_path: str | None = None
        """Where this run's config was written (``None`` before, and on the processes other than the first)."""
        self._log_dir: str | None = None
        # saved beside the checkpoints: the outermost folder made for it (None: none made); False: saved elsewhere
        self._made: Path | None | bool = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved:  # what needs every process (Lightning's log_dir and the run's name broadcast)
            checkpoint = _run_checkpoint(trainer)
            if checkpoint is not None:
                checkpoint.name_run(trainer, stage)
            wandb = isinstance(trainer.logger, WandbLogger)
            self._log_dir = trainer.log_dir if trainer.loggers and not wandb else None
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        logger = trainer.logger
        filename = self.config_filename
        run = logger.experiment if isinstance(logger, WandbLogger) else None
        if run is not None and not getattr(run, "disabled", False):
            directory = run.dir
            filename = f"lightning_{filename}"  # W&B keeps its own config.yaml in the same folder
            run.config.update({"cli_config": self.parser.dump(self.config, skip_none=False)})
        elif self._log_dir is not None:
            directory = self._log_dir
        else:
            directory, filename = self._beside_checkpoints(trainer, stage)
            self._made = _first_missing(Path(directory))
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, filename)
        stem, ext = os.path.splitext(filename)
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
        while os.path.exists(path):  # runs started within the same second get -2, -3, ...
            suffix = stamp if n == 1 else f"{stamp}-{n}"
            path = os.path.join(directory, f"{stem}-{suffix}{ext}")
            n += 1
        self.parser.save(self.config, path, skip_none=False, multifile=self.multifile)
        self.saved_path = path

    def _beside_checkpoints(self, trainer, stage: str) -> tuple[str, str]:
        """The checkpoint folder of the run, and the config's name there, after the run."""
        checkpoint = _run_checkpoint(trainer)
        folder = checkpoint.dirpath if checkpoint is not None else None
        if not folder:
            folder = (self.config.get("checkpoint") or {}).get("dirpath") or trainer.default_root_dir
        if stage == "fit":
            run = checkpoint.run_name if checkpoint is not None and checkpoint.run_name else _run_name(trainer)
        else:
            run = f"{getattr(stage, 'value', stage)}-{_run_name(trainer)}"  # (Lightning passes a TrainerFn)
        stem, ext = os.path.splitext(self.config_filename)
        return str(folder), f"{stem}-{run}{ext}"

    def remove_unused(self) -> None:
        """Removes the config this run saved beside its checkpoints, and the folders made for it that are left
        empty: for a run stopped before it wrote a checkpoint."""
        made = self._made
        if self.saved_path is None or made is False:
            return
        path = Path(self.saved_path)
        path.unlink(missing_ok=True)
        self.saved_path = None
        if made is None:
            return
        folder = path.parent
        while folder != made.parent and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (``None``: it exists)."""
    missing = None
    while not folder.exists() and folder != folder.parent:
        missing, folder = folder, folder.parent
    return missing


def _run_checkpoint(trainer) -> RunCheckpoint | None:
    return next((c for c in trainer.callbacks if isinstance(c, RunCheckpoint)), None)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with files that belong to one run, in a folder that runs share.

    - Each file starts with the run's name: ``<run>-epoch=E-step=S.ckpt`` and ``last-<run>.ckpt``, where ``<run>``
      is the W&B run id (another logger's version, or the start time without a logger), so that the runs of one
      config can share a folder and the files of a W&B run are found by its id.
    - A run resumed from a checkpoint starts its own list of files: it restores none of the file paths of the run it
      resumes, so it never deletes or overwrites that run's files (Lightning deletes the previous best file of the
      restored list, and writes ``last`` over the resumed one); a name already taken gets ``-v1``, ``-v2``, ...
    - It does not write again the checkpoint of the step it resumed at (Lightning repeats the end of an epoch that a
      checkpoint written at that end restores).

    Everything else (``every_n_train_steps`` for checkpoints in the middle of an epoch, ``save_top_k``, ``monitor``)
    is ``ModelCheckpoint``'s.
    """

    run_name: str | None = None
    """The name the files start with, set when fitting starts."""

    settings: dict[str, Any] | None = None
    """The run's model and data settings (plain YAML values), written into every checkpoint; set by the CLI."""

    _resumed_step: int | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        with warnings.catch_warnings():  # the folder is shared by the runs of a config: files there are expected
            warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        self.name_run(trainer, stage)

    def name_run(self, trainer, stage: str) -> None:
        """Names the run's files when fitting starts (once; on every process: the first one's name is broadcast)."""
        if stage != "fit" or self.run_name is not None:
            return
        self.run_name = trainer.strategy.broadcast(_run_name(trainer) if trainer.is_global_zero else "", src=0)
        self.filename = f"{self.run_name}-{self.filename or '{epoch}-{step}'}"
        self.CHECKPOINT_NAME_LAST = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}-{self.run_name}"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_KEY] = self.run_name
        if self.settings is not None:
            checkpoint[SETTINGS_KEY] = self.settings

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores nothing: the files listed in the checkpoint are the resumed run's, not this run's."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._resumed_step = checkpoint.get("global_step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        with warnings.catch_warnings():
            # with manual optimization Lightning warns that the checkpoint holds the state after the optimizer
            # step: that is the state a resumed run continues from (the data module counts the batch as done)
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._resumed_step:
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._resumed_step:
            super().on_validation_end(trainer, pl_module)


def _run_name(trainer) -> str:
    """The W&B run id, another logger's version, or the time: what the checkpoint files of a run start with."""
    logger = trainer.logger
    if isinstance(logger, WandbLogger):
        name = logger.experiment.id
    elif logger is not None and logger.version is not None:
        name = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    else:
        name = time.strftime("%Y%m%d-%H%M%S")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))


class _Parser(LightningArgumentParser):
    """Lightning's parser, whose errors show one line of usage instead of every option (``--help`` lists them)."""

    def print_usage(self, file=None) -> None:
        (file or sys.stdout).write(f"usage: {self.prog} [options]\n")


class HypergradCLI(LightningCLI):
    """Lightning's CLI with a :class:`RunCheckpoint` (``checkpoint``), ``--ckpt_path last`` per config, and the
    settings given with ``--ckpt_path`` applied and named (see the module's documentation)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_argument(
            "--resume_with_changes",
            type=bool,
            default=False,
            help="fit --ckpt_path: continue the checkpoint's run with the --model.* and --data.* settings of the "
            "command line that differ from the checkpoint's (refused otherwise)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        _STOPPED["cli"] = self
        self._given = list(args) if isinstance(args, (list, tuple)) else (sys.argv[1:] if args is None else [])
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
        else:  # a list, or the command line: --config quickstart names a config shipped with the package
            self.config = parser.parse_args(resolve_config_args(self._given))

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        settings = self._settings()
        for callback in getattr(self.trainer, "callbacks", []):
            if isinstance(callback, RunCheckpoint):
                callback.settings = settings

    def _dumped(self) -> dict[str, Any]:
        """This run's config (of its subcommand), as plain YAML values."""
        ours = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
        return ours.get(self.config.get("subcommand"), ours)

    def _settings(self) -> dict[str, Any]:
        """The model and data sections of this run's config, as plain YAML values."""
        ours = self._dumped()
        return {section: ours.get(section) for section in SECTIONS}

    def _explicit(self) -> set[tuple[str, str]]:
        """The ``(section, setting)`` pairs given by ``--model.*`` / ``--data.*`` arguments (``"*"``: the whole
        section, as ``--model MAML`` gives it)."""
        found = set()
        for token in getattr(self, "_given", []):
            if not token.startswith("--"):
                continue
            parts = [p for p in token[2:].split("=", 1)[0].split(".") if p not in ("init_args", "dict_kwargs")]
            if parts[0] in SECTIONS:
                found.add((parts[0], parts[1] if len(parts) > 1 else "*"))
        return found

    def _parse_ckpt_path(self) -> None:
        """Runs between parsing and instantiation, in place of Lightning's, which parses the checkpoint's model
        hyperparameters over the configs and the command line.

        Sets the default checkpoint folder, resolves ``--ckpt_path last`` and lists the settings that differ from
        the checkpoint's; the checkpoint then restores weights and state only.
        """
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        checkpoint = config.get("checkpoint")
        if checkpoint is not None and not checkpoint.get("dirpath"):
            checkpoint.dirpath = self._checkpoint_dir(config)
        if "ckpt_path" not in config or not config.ckpt_path:
            return
        if config.ckpt_path == "last":
            config.ckpt_path = self._last_checkpoint(config)
            if config.ckpt_path is None:
                return
        path = Path(config.ckpt_path)
        if path.exists():  # (Lightning itself reports a missing file, and reads remote ones)
            saved = read_checkpoint(path)
            if saved is not None:
                self._checkpoint_step = (path, saved.get("global_step"))
                self._resume_settings(path, config, saved)

    def _checkpoint_dir(self, config) -> str:
        """``lightning-hypergrad/<config>/checkpoints`` under the trainer's ``default_root_dir``."""
        files = list(config.get("config") or [])
        if config is not self.config:  # configs given before the subcommand
            files = list(self.config.get("config") or []) + files
        names = [Path(str(file)).stem for file in files]
        model = config.get("model")
        if not names and model is not None:
            names = [str(model.get("class_path", "model")).rsplit(".", 1)[-1]]
        name = "+".join(names) or "run"
        root = config.get("trainer", {}).get("default_root_dir")
        return os.path.join(*([root] if root else []), CHECKPOINT_ROOT, name, "checkpoints")

    def _last_checkpoint(self, config) -> str | None:
        """The most recent ``last*.ckpt`` of the checkpoint folder; ``None`` (a new run) for ``fit`` without one."""
        folder = config.checkpoint.dirpath if config.get("checkpoint") is not None else None
        candidates = sorted(Path(folder).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if folder else []
        if candidates:
            return str(candidates[-1])
        where = f"in {folder}" if folder else "(checkpoint.dirpath is not set)"
        if self.config.get("subcommand") == "fit":
            _notice(f"ckpt_path=last: no last checkpoint of this config {where}: starting a new run")
            return None
        raise FileNotFoundError(
            f"ckpt_path=last: no last checkpoint of this config {where}; fit the config first, or give the path "
            "of a .ckpt file"
        )

    def _resume_settings(self, path: Path, config, saved: dict) -> None:
        """The settings of a run given a checkpoint: the checkpoint's where it holds them (see the module's
        documentation), and the notices about them and about the checkpoint's W&B run."""
        stored = saved.get(SETTINGS_KEY)
        fitting = self.config.get("subcommand") == "fit"
        if not isinstance(stored, dict) or not fitting:
            self._name_differences(path, saved, stored if isinstance(stored, dict) else None)
            return
        ours = self._settings()
        explicit = self._explicit()
        given, taken = [], []
        for section in SECTIONS:
            for name, value, theirs in _section_differences(ours.get(section) or {}, stored.get(section) or {}):
                if (section, name) in explicit or (section, "*") in explicit:
                    given.append(_describe(f"{section}.{name}", value, theirs, "checkpoint"))
                else:
                    taken.append((section, name, theirs, _describe(f"{section}.{name}", theirs, value, "config")))
        if given and not config.get("resume_with_changes"):
            raise ValueError(
                f"ckpt_path={path}: a resumed run continues the checkpoint's experiment, and the command line sets "
                f"{'; '.join(given)}. To run these settings, start a new run (drop --ckpt_path); to continue the "
                "checkpoint's run with them anyway, add --resume_with_changes true"
            )
        for section, name, theirs, _ in taken:
            _set_setting(config, section, name, theirs)
        if taken:
            _notice(
                f"ckpt_path={path}: continuing with the checkpoint's settings where the config differs: "
                f"{'; '.join(line for *_, line in taken)}"
            )
        if given:
            _notice(
                f"ckpt_path={path}: --resume_with_changes: the run goes on with settings that differ from the "
                f"checkpoint's, so it does not end as the checkpoint's run would have: {'; '.join(given)}"
            )
        self._wandb_notice(saved)

    def _name_differences(self, path: Path, saved: dict, stored: dict[str, Any] | None) -> None:
        """Lists on stderr each model and data setting that differs from the one ``path`` was written with, and
        for ``fit`` how to continue the checkpoint's W&B run."""
        ours = self._settings()
        differences = []
        if stored is not None:
            for section in SECTIONS:
                differences += [
                    _describe(f"{section}.{name}", value, theirs, "checkpoint")
                    for name, value, theirs in _section_differences(ours.get(section) or {}, stored.get(section) or {})
                ]
        else:
            for section, key in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
                differences += _differences(section, ours.get(section) or {}, dict(saved.get(key) or {}))
        fitting = self.config.get("subcommand") == "fit"
        if differences:
            consequence = (
                "; the run goes on with them, so it does not end as the checkpoint's run would have" if fitting else ""
            )
            _notice(
                f"ckpt_path={path}: used as given, these settings differ from the checkpoint's: "
                f"{'; '.join(differences)}{consequence}"
            )
        if fitting:
            self._wandb_notice(saved)

    def _wandb_notice(self, saved: dict) -> None:
        """For ``fit``: how to continue the checkpoint's W&B run, where a W&B logger would start a new one."""
        if self._reached_max_steps():  # no run starts
            return
        run = saved.get(RUN_KEY)
        logger = (self._dumped().get("trainer") or {}).get("logger") or {}
        wandb_logger = isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger")
        if run and wandb_logger and not (logger.get("init_args") or {}).get("id"):
            _notice(
                f"resuming run {run} in a new W&B run; to continue W&B run {run} instead, add "
                f"--trainer.logger.init_args.id {run} --trainer.logger.init_args.resume allow"
            )

    def instantiate_trainer(self, **kwargs: Any):
        """Lightning's, without the ``checkpoint`` callback when ``trainer.enable_checkpointing`` is false."""
        extra = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if config.get("enable_checkpointing") is False:
            extra = [callback for callback in extra if not isinstance(callback, RunCheckpoint)]
        trainer = self._instantiate_trainer(config, extra)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                follow_wandb_environment(logger)
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning's, but nothing for a ``fit`` whose checkpoint has reached ``max_steps``, and no W&B run left by
        a run that stops before it logged anything (see :func:`remove_unused_wandb_runs`)."""
        if subcommand == "fit" and self._finished():
            return
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            _remove_aborted_start(getattr(self, "trainer", None))
            raise

    def _reached_max_steps(self) -> bool:
        """Whether the checkpoint of ``--ckpt_path`` is at ``trainer.max_steps`` or beyond."""
        step = getattr(self, "_checkpoint_step", (None, None))[1]
        max_steps = (self._dumped().get("trainer") or {}).get("max_steps")
        return isinstance(step, int) and isinstance(max_steps, int) and 0 <= max_steps <= step

    def _finished(self) -> bool:
        """Whether ``fit --ckpt_path`` resumes a run that has already reached ``trainer.max_steps`` (said on stderr):
        Lightning would start a logger and stop at once."""
        if not self._reached_max_steps():
            return False
        path, step = self._checkpoint_step
        max_steps = self.trainer.max_steps
        _notice(
            f"ckpt_path={path}: its run has reached step {step}, and trainer.max_steps is {max_steps}: nothing to "
            "train, nothing logged or written; raise --trainer.max_steps to train on"
        )
        return True

    def _check_before_logger(self, stage: str) -> None:
        """What can be refused before the logger starts (a W&B run would otherwise stay behind, empty): an estimator
        that cannot differentiate the inner optimizer's settings, and a few-shot data set that cannot make the tasks
        (too few classes or examples in a split, a damaged file found on loading)."""
        from lightning_hypergrad.data import FewShotDataModule

        model = self.model
        if stage == "fit" and isinstance(model, BilevelModule):
            model.estimator.check_optimizer(model.inner_optimizer)
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


def read_checkpoint(path: Path) -> dict | None:
    """The checkpoint at ``path`` (memory-mapped), or a one-line ``ValueError`` naming the file and what is wrong.

    ``None`` where the file holds objects that only a full (not ``weights_only``) load reads: Lightning loads it.
    For a damaged ``last-<run>.ckpt`` the message lists the intact checkpoints of the same run, newest first.
    """
    if path.is_dir():
        files = sorted(p.name for p in path.glob("*.ckpt"))
        hint = f" such as {', '.join(files[:3])}" if files else ""
        raise ValueError(f"ckpt_path={path} is a folder, not a checkpoint file: give one of its .ckpt files{hint}")
    try:
        saved = _load(path)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            return None
        saved = error
    except Exception as error:  # noqa: BLE001 (every way a file can fail to be a checkpoint)
        saved = error
    if isinstance(saved, BaseException):
        reason = str(saved).split(". ")[0].strip().rstrip(".")[:160]
        if not zipfile.is_zipfile(path) and "zip" not in reason:
            reason = "it is not the zip archive torch.save writes"
        raise ValueError(
            f"ckpt_path={path} cannot be read as a checkpoint ({reason}): the file is damaged (cut short by a kill or "
            f"a full disk?) or is not a checkpoint{_intact_alternatives(path)}"
        )
    if not isinstance(saved, dict) or "state_dict" not in saved:
        what = f"a {type(saved).__name__}" + (
            f" with keys {', '.join(map(str, list(saved)[:4]))}" if isinstance(saved, dict) else ""
        )
        raise ValueError(
            f"ckpt_path={path} is not a Lightning checkpoint: it holds {what}, no 'state_dict'; give a .ckpt file "
            "that fit wrote"
        )
    return saved


def _load(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except RuntimeError as error:
        if "mmap can only be used" not in str(error):
            raise
        return torch.load(path, weights_only=True, map_location="cpu")  # an old format, or no checkpoint at all


def _intact_alternatives(path: Path) -> str:
    """For ``last-<run>.ckpt``: the readable checkpoints of the same run, newest first, as a sentence."""
    if not path.name.startswith(f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}-"):
        return ""
    run = path.stem[len(ModelCheckpoint.CHECKPOINT_NAME_LAST) + 1 :]
    intact = []
    for candidate in sorted(path.parent.glob(f"{run}-*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            if "state_dict" in _load(candidate):
                intact.append(str(candidate))
        except Exception:  # noqa: BLE001 (damaged too: not offered)
            continue
    if not intact:
        return f"; no other checkpoint of run {run} in {path.parent} can be read"
    return f"; intact checkpoints of the same run, newest first: {', '.join(intact)} (resume with --ckpt_path <file>)"


WANDB_MODES = {"offline": True, "dryrun": True, "online": False, "run": False, "disabled": False}
"""W&B's ``WANDB_MODE`` values, and whether each makes the logger offline (``disabled``: W&B itself then logs nothing;
``offline`` would make Lightning set ``WANDB_MODE=dryrun`` over it)."""


def follow_wandb_environment(logger: WandbLogger) -> None:
    """Lets W&B's own environment variables decide what the config's ``WandbLogger`` settings would override.

    - ``WANDB_MODE`` (``disabled``, ``offline``, ``online``) wins over the config's ``offline: true``, which Lightning
      turns into ``WANDB_MODE=dryrun`` whatever the variable says.
    - ``WANDB_DIR`` is where the runs go when the config sets no ``save_dir`` (Lightning passes ``dir="."`` to W&B).
    - No ``anonymous`` argument reaches W&B when the config sets none: Lightning passes ``anonymous=None``, which
      W&B warns about as a setting it no longer has.

    Acts on the logger before its run starts (the trainer's loggers start theirs when fitting begins).
    """
    init = getattr(logger, "_wandb_init", None)
    if not isinstance(init, dict) or getattr(logger, "_experiment", None) is not None:
        return
    if init.get("anonymous") is None:
        init.pop("anonymous", None)
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in WANDB_MODES:
        logger._offline = WANDB_MODES[mode]
    directory = os.environ.get("WANDB_DIR", "").strip()
    if directory and init.get("dir") in (None, "."):
        os.makedirs(directory, exist_ok=True)  # (W&B warns of a missing "git root" where it is missing)
        init["dir"] = logger._save_dir = directory


def _remove_aborted_start(trainer) -> None:
    """After a run stopped by an error (or a signal) before it wrote a checkpoint: what its start left that holds
    nothing of the run (:func:`remove_unused_wandb_runs`, and a config saved beside the checkpoints)."""
    if trainer is None or rank_zero_only.rank != 0:
        return
    if any(isinstance(c, ModelCheckpoint) and (c.last_model_path or c.best_model_path) for c in trainer.callbacks):
        return
    remove_unused_wandb_runs(trainer)
    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigToRun):
            callback.remove_unused()


def remove_unused_wandb_runs(trainer) -> None:
    """Ends each W&B run of ``trainer`` that this process started and that has no step logged, and removes the
    run's folder (``wandb/offline-run-*``), the links in ``wandb/`` that point into it, and ``wandb/`` if nothing is
    left there. For a run stopped by an error (or a signal) before it logged anything or wrote a checkpoint.
    """
    for logger in trainer.loggers:
        run = getattr(logger, "_experiment", None) if isinstance(logger, WandbLogger) else None
        if run is None or getattr(run, "disabled", False):
            continue
        try:
            if run.step != run.starting_step:
                continue
            folder = Path(run.sync_dir)
            with contextlib.suppress(Exception):
                run._settings.silent = True  # its closing lines would name the folder removed here
            run.finish(exit_code=1)
        except Exception:  # noqa: BLE001 (a run that cannot say what it holds is kept)
            continue
        if _remove_run_folder(folder):
            _notice(f"removed the W&B run {folder}: the run stopped before it logged anything")


def _remove_run_folder(folder: Path) -> bool:
    if not folder.is_dir() or not folder.name.startswith(("offline-run-", "run-")):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    for entry in list(parent.iterdir()):
        if entry.is_symlink() and not entry.exists() and Path(os.readlink(entry)).parts[:1] == (folder.name,):
            entry.unlink()
    if not any(parent.iterdir()):
        parent.rmdir()
    return True


LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
"""The start of the line Lightning prints at every start when ``litlogger`` is not installed (an advertisement)."""


class _WithoutLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LITLOGGER_TIP)


def quiet_third_parties() -> None:
    """Silences what Lightning prints at every run that says nothing about the run: its litlogger tip, and torch's
    deprecation of ``LeafSpec``, which Lightning's own ``_pytree`` module still uses. Nothing else is filtered."""
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree$",
    )
    lightning_info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _WithoutLitLoggerTip) for f in lightning_info.filters):
        lightning_info.addFilter(_WithoutLitLoggerTip())


def _notice(message: str) -> None:
    """Writes ``note: message`` on stderr (once, from the first process)."""
    if rank_zero_only.rank == 0:
        sys.stderr.write(f"note: {message}\n")


def _differences(section: str, given: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """``section.key: given (checkpoint: saved)`` for each setting of ``saved`` that ``given`` sets otherwise.

    A setting left ``null`` is not compared (the module takes it from the data module, as it did when the
    checkpoint was written).
    """
    saved = dict(saved)
    saved.pop("_instantiator", None)
    out = []
    class_path = saved.pop("_class_path", None)
    if class_path is not None and given.get("class_path") not in (None, class_path):
        out.append(f"{section}: {given['class_path']} (checkpoint: {class_path})")
    args = {**(given.get("init_args") or {}), **(given.get("dict_kwargs") or {})} if "class_path" in given else given
    for key, theirs in saved.items():
        if key not in args or args[key] is None:
            continue
        if not _same(args[key], theirs):
            out.append(f"{section}.{key}: {args[key]!r} (checkpoint: {theirs!r})")
    return out


def _section_differences(given: dict[str, Any], stored: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(setting, given value, stored value)`` for each setting of a config section that differs.

    Settings are the section's ``class_path`` and each of its ``init_args`` (compared whole: an estimator with its
    arguments is one setting). A setting the stored section lacks (added since) is not compared.
    """
    out = []
    if given.get("class_path") != stored.get("class_path"):
        return [("class_path", given.get("class_path"), stored.get("class_path"))]
    ours, theirs = given.get("init_args") or {}, stored.get("init_args") or {}
    for name, value in theirs.items():
        if name in ours and not _same(ours[name], value):
            out.append((name, ours[name], value))
    return out


def _describe(key: str, value: Any, other: Any, other_name: str) -> str:
    """``key: value (other_name: other)``; for two instances of one class, each argument that differs alone."""
    if isinstance(value, dict) and isinstance(other, dict) and value.get("class_path") == other.get("class_path"):
        ours, theirs = value.get("init_args") or {}, other.get("init_args") or {}
        parts = [
            _describe(f"{key}.{name}", ours.get(name), theirs.get(name), other_name)
            for name in dict.fromkeys([*ours, *theirs])
            if not _same(ours.get(name), theirs.get(name))
        ]
        return "; ".join(parts)
    return f"{key}: {_short(value)} ({other_name}: {_short(other)})"


def _short(value: Any) -> str:
    """A setting as a short string: a class with arguments as ``Class(arg=value, ...)``."""
    if isinstance(value, dict) and "class_path" in value:
        args = ", ".join(f"{k}={_short(v)}" for k, v in (value.get("init_args") or {}).items())
        return f"{str(value['class_path']).rsplit('.', 1)[-1]}({args})"
    return repr(value)


def _set_setting(config, section: str, name: str, value: Any) -> None:
    """Sets ``section.name`` (``class_path``: the whole section) of the parsed ``config`` to a stored value."""
    from jsonargparse import dict_to_namespace

    if name == "class_path":
        config[section] = dict_to_namespace(value) if isinstance(value, dict) else value
        return
    config[section]["init_args"][name] = dict_to_namespace(value) if isinstance(value, dict) else value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the command line over ``args`` (``sys.argv`` when ``None``)."""
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
    )


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of ``error``'s ``raise ... from`` chain that reports a setting, else ``error``."""
    found = error
    while error.__cause__ is not None:
        error = error.__cause__
        if isinstance(error, SETTING_ERRORS):
            found = error
    return found


EXIT_INTERRUPTED = {"SIGINT": 130, "SIGTERM": 143}
"""The exit status of a run stopped by a signal before its end (128 + the signal's number, as shells report it):
the run is interrupted, and resumable from its last checkpoint."""

_STOPPED: dict[str, Any] = {"signal": None, "cli": None}


def _on_signal(signum: int, frame: Any) -> None:
    """Records SIGINT or SIGTERM. SIGINT stops at once (``KeyboardInterrupt``, which Lightning's fit handles); SIGTERM
    stops at once outside training, and inside it lets Lightning finish the current step (its own handler runs
    too: it stops the loop at the next batch)."""
    name = signal.Signals(signum).name
    _STOPPED["signal"] = name
    trainer = getattr(_STOPPED["cli"], "trainer", None)
    training = trainer is not None and trainer.state.status == TrainerStatus.RUNNING
    if name == "SIGINT" or not training:
        raise KeyboardInterrupt


def _report_stop() -> int:
    """Writes the one line of a stopped run (the step reached, its last checkpoint, the command that resumes)."""
    name = _STOPPED["signal"] or "SIGINT"
    trainer = getattr(_STOPPED["cli"], "trainer", None)
    args = list(sys.argv[1:])
    if "--ckpt_path" in args:
        del args[args.index("--ckpt_path") : args.index("--ckpt_path") + 2]
    args = [a for a in args if not a.startswith("--ckpt_path=")]
    command = shlex.join(["lightning-hypergrad", *args, "--ckpt_path", "last"])
    last = _last_written(trainer) if trainer is not None else None
    last = last or (getattr(trainer, "ckpt_path", None) if trainer is not None else None)
    if trainer is None or trainer.state.fn != "fit" or not last:
        if trainer is None or trainer.state.fn == "fit" and trainer.global_step == 0:
            sys.stderr.write(stopped_before_training(name))
        else:
            step = f" at step {trainer.global_step}" if trainer.state.fn == "fit" else ""
            sys.stderr.write(f"stopped by {name}{step}: no checkpoint was written yet, run the command again\n")
        return EXIT_INTERRUPTED[name]
    of = f" of {trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
    sys.stderr.write(
        f"stopped by {name} at step {trainer.global_step}{of}: last checkpoint {last}; resume with: {command}\n"
    )
    return EXIT_INTERRUPTED[name]


def _last_written(trainer) -> str | None:
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
            return callback.last_model_path
    return None


def main() -> None:
    """The console command: :func:`cli` on ``sys.argv``; an invalid setting is reported as its message alone.

    Errors of settings (``ValueError``, ``TypeError``, missing files or packages, a non-finite hypergradient with
    ``nonfinite: raise``) print ``error: <message>`` on stderr and exit with status 1; other errors, and every error
    with ``LIGHTNING_HYPERGRAD_DEBUG=1``, show their traceback. A run stopped by SIGINT (Ctrl-C) or SIGTERM (a
    scheduler's preemption) prints one line, the step reached, its last checkpoint and the command that resumes it,
    and exits with status 130 or 143 (:data:`EXIT_INTERRUPTED`), never 0.
    """
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        cli()
    except SystemExit:  # Lightning ends a stopped fit with SystemExit (SIGTERM: status 0, Ctrl-C: 1)
        if _STOPPED["signal"] is not None:
            sys.exit(_report_stop())
        raise
    except KeyboardInterrupt:
        sys.exit(_report_stop())
    except SETTING_ERRORS as error:
        if _STOPPED["signal"] is not None:  # e.g. an import cut short by Ctrl-C ("partially initialized module")
            sys.exit(_report_stop())
        if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            raise
        sys.stderr.write(f"error: {_root_cause(error)}\n({DEBUG_ENV}=1 shows the traceback)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
