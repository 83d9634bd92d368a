"""The command line's checkpoints: where they go, how they are named (:class:`RunCheckpoint`), which one
``--ckpt_path last`` means (:func:`last_checkpoint`), and reading one (:func:`read_checkpoint`)."""

from __future__ import annotations

import os
import pickle
import re
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from lightning_hypergrad._configs import configs_folder, shipped_configs
from lightning_hypergrad.cli._lightning import save_checkpoint_now, steps_between_checkpoints
from lightning_hypergrad.cli.messages import notice

CHECKPOINT_ROOT = "lightning-hypergrad"
"""The folder, under the trainer's ``default_root_dir`` (the working directory by default), of the checkpoints."""

RUN_KEY = "lightning_hypergrad_run"
"""The key of a checkpoint that holds the name of the run that wrote it (its W&B run id)."""

SETTINGS_KEY = "lightning_hypergrad_settings"
"""The key of a checkpoint that holds its run's ``model`` and ``data`` settings, as the run's config had them."""


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with files that belong to one run, in a folder that runs share.

    - Each file starts with the run's name: ``<run>-epoch=E-step=S.ckpt`` and ``last-<run>.ckpt``, where ``<run>``
      is the W&B run id (another logger's version; without a logger, the start time and 4 random hex digits, so
      that two runs started in the same second differ), so that the runs of one config can share a folder and the
      files of a W&B run are found by its id.
    - A run resumed from a checkpoint starts its own list of files: it restores none of the file paths of the run it
      resumes, so it never deletes or overwrites that run's files (Lightning deletes the previous best file of the
      restored list, and writes ``last`` over the resumed one); a name already taken gets ``-v1``, ``-v2``, ...
    - It does not write again the checkpoint of the step it resumed at (Lightning repeats the end of an epoch that a
      checkpoint written at that end restores).
    - A checkpoint of ``every_n_train_steps`` that falls on an epoch's last batch is written at the epoch's end, after
      its validation and its end hooks, not before them: a run resumed from it (after a stop, or extended with a
      larger ``max_steps``) has that epoch's validation row and goes on from the epoch's end. Written before, Lightning
      resumes past the epoch's end without its validation, and a stop during that validation (SIGTERM at an epoch's
      end) lost its row for good.
    - Every checkpoint holds the run's name (:data:`RUN_KEY`) and its model and data settings (:data:`SETTINGS_KEY`).

    Everything else (``every_n_train_steps`` for checkpoints in the middle of an epoch, ``save_top_k``, ``monitor``)
    is ``ModelCheckpoint``'s.
    """

    run_name: str | None = None
    """The name the files start with, set when fitting starts."""

    settings: dict[str, Any] | None = None
    """The run's model and data settings (plain YAML values), written into every checkpoint; set by the CLI."""

    _resumed_step: int | None = None
    _save_at_epoch_end: bool = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        with warnings.catch_warnings():  # the folder is shared by the runs of a config: files there are expected
            warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        self.name_run(trainer, stage)

    def name_run(self, trainer, stage: str) -> None:
        """Names the run's files when fitting starts (once; on every process: the first one's name is broadcast)."""
        if stage != "fit" or self.run_name is not None:
            return
        self.run_name = trainer.strategy.broadcast(name_of_run(trainer) if trainer.is_global_zero else "", src=0)
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
        every = steps_between_checkpoints(self)
        if every > 0 and trainer.global_step % every == 0 and batch_idx + 1 == trainer.num_training_batches:
            self._save_at_epoch_end = True  # the epoch's last batch: written after its validation and end hooks
            return
        with warnings.catch_warnings():
            # with manual optimization Lightning warns that the checkpoint holds the state after the optimizer
            # step: that is the state a resumed run continues from (the data module counts the batch as done)
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.global_step == self._resumed_step:
            return
        if self._save_at_epoch_end:
            self._save_at_epoch_end = False
            save_checkpoint_now(self, trainer)
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._resumed_step:
            super().on_validation_end(trainer, pl_module)


def run_checkpoint(trainer) -> RunCheckpoint | None:
    """The trainer's :class:`RunCheckpoint` (``None``: it has none)."""
    return next((c for c in trainer.callbacks if isinstance(c, RunCheckpoint)), None)


def name_of_run(trainer) -> str:
    """The W&B run id, another logger's version, or the time and 4 random hex digits (``20260101-120000-3fa2``: runs
    started in the same second differ): what the checkpoint files of a run start with."""
    logger = trainer.logger
    if isinstance(logger, WandbLogger):
        name = logger.experiment.id
    elif logger is not None and logger.version is not None:
        name = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    else:
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))


def config_name(file: Any) -> str:
    """The name of a ``--config`` file in the checkpoint folder's name: the file's stem (``quickstart``,
    ``lr_schedule``); for a shipped config whose stem another shipped config has too, its folder and stem
    (``paper-omniglot``, ``maml-omniglot``), so that every shipped config has a folder of its own."""
    path = Path(str(file))
    folder = configs_folder()
    if folder is not None:
        try:
            shipped = path.resolve().relative_to(folder.resolve()).with_suffix("")
        except ValueError:  # not a shipped config
            return path.stem
        if [Path(name).name for name in shipped_configs()].count(shipped.name) > 1:
            return "-".join(shipped.parts)
    return path.stem


def checkpoint_folder(
    config_files: list[str], model_class_path: str | None, root: str | None, name_of: Any = config_name
) -> str:
    """``lightning-hypergrad/<config>/checkpoints`` under ``root`` (the trainer's ``default_root_dir``), where
    ``<config>`` joins the names of the config files (:func:`config_name`: ``quickstart``, ``paper-omniglot+t1t2``);
    without a config file, the model's class name."""
    names = [name_of(file) for file in config_files]
    if not names and model_class_path is not None:
        names = [str(model_class_path).rsplit(".", 1)[-1]]
    name = "+".join(names) or "run"
    return os.path.join(*([root] if root else []), CHECKPOINT_ROOT, name, "checkpoints")


def legacy_checkpoint_folder(config_files: list[str], root: str | None) -> str | None:
    """The folder that the configs' checkpoints went into when a config was named by its stem alone (before the
    shipped configs that share a stem got folders of their own); ``None`` where that is today's folder."""
    old = checkpoint_folder(config_files, None, root, name_of=lambda file: Path(str(file)).stem)
    return None if old == checkpoint_folder(config_files, None, root) else old


def last_checkpoint(folder: str | None, fitting: bool, legacy: str | None = None) -> str | None:
    """What ``--ckpt_path last`` means: the most recent ``last*.ckpt`` of the checkpoint ``folder``.

    Without one, ``None`` for ``fit`` (a new run starts, said on stderr, naming the ``legacy`` folder where it holds
    checkpoints written before the config had a folder of its own).

    Raises:
        FileNotFoundError: for another subcommand, when the folder holds no ``last*.ckpt``.
    """
    candidates = sorted(Path(folder).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if folder else []
    if candidates:
        return str(candidates[-1])
    where = f"in {folder}" if folder else "(checkpoint.dirpath is not set)"
    older = ""
    if legacy is not None and any(Path(legacy).glob("last*.ckpt")):
        older = (
            f"; the runs of this config before it had a folder of its own wrote theirs into {legacy} (shared with "
            "another config): give one of those with --ckpt_path to resume it"
        )
    if fitting:
        notice(f"ckpt_path=last: no last checkpoint of this config {where}: starting a new run{older}")
        return None
    raise FileNotFoundError(
        f"ckpt_path=last: no last checkpoint of this config {where}; fit the config first, or give the path "
        f"of a .ckpt file{older}"
    )


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
