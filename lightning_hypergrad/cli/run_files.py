"""What a run writes besides the logger's files and the checkpoints: its config, in the run's own folder
(:class:`SaveConfigToRun`), never in the working directory; and what a start cut short removes
(:class:`RemoveAbortedStart`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_hypergrad.cli.checkpoints import name_of_run, run_checkpoint
from lightning_hypergrad.cli.wandb import remove_unused_wandb_runs


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
            checkpoint = run_checkpoint(trainer)
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
        checkpoint = run_checkpoint(trainer)
        folder = checkpoint.dirpath if checkpoint is not None else None
        if not folder:
            folder = (self.config.get("checkpoint") or {}).get("dirpath") or trainer.default_root_dir
        if stage == "fit":
            run = checkpoint.run_name if checkpoint is not None and checkpoint.run_name else name_of_run(trainer)
        else:
            run = f"{getattr(stage, 'value', stage)}-{name_of_run(trainer)}"  # (Lightning passes a TrainerFn)
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


class RemoveAbortedStart(Callback):
    """After a run stopped by an error (or a signal) before it wrote a checkpoint: removes what its start left that
    holds nothing of the run, the W&B run that has logged nothing (:func:`remove_unused_wandb_runs`) and the config
    saved beside the checkpoints (:meth:`SaveConfigToRun.remove_unused`)."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if rank_zero_only.rank != 0:
            return
        if any(isinstance(c, ModelCheckpoint) and (c.last_model_path or c.best_model_path) for c in trainer.callbacks):
            return
        remove_unused_wandb_runs(trainer)
        for callback in trainer.callbacks:
            if isinstance(callback, SaveConfigToRun):
                callback.remove_unused()
