"""The command line and W&B: W&B's own environment variables are followed (:func:`follow_wandb_environment`), a run
killed keeps what it logged up to the last second (:data:`WANDB_FLUSH_ENV`), a run stopped before it logged anything
leaves no W&B run behind (:func:`remove_unused_wandb_runs`), and a resumed run is told how to continue its W&B run
(:func:`continue_run_notice`)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

from lightning_hypergrad.cli._lightning import (
    set_wandb_offline,
    set_wandb_save_dir,
    started_wandb_run,
    wandb_init_arguments,
)
from lightning_hypergrad.cli.messages import notice

WANDB_FLUSH_ENV = "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"
"""W&B's environment variable of how often it writes a run's ``.wandb`` file (set unless the environment sets it)."""

WANDB_FLUSH_SECONDS = "1"
"""How often W&B writes a run's ``.wandb`` file (W&B's default is 15 s: a run killed sooner kept nothing)."""

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
    init = wandb_init_arguments(logger)
    if init is None:
        return
    if init.get("anonymous") is None:
        init.pop("anonymous", None)
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in WANDB_MODES:
        set_wandb_offline(logger, WANDB_MODES[mode])
    directory = os.environ.get("WANDB_DIR", "").strip()
    if directory and init.get("dir") in (None, "."):
        os.makedirs(directory, exist_ok=True)  # (W&B warns of a missing "git root" where it is missing)
        set_wandb_save_dir(logger, directory)


def remove_unused_wandb_runs(trainer) -> None:
    """Ends each W&B run of ``trainer`` that this process started and that has no step logged, and removes the
    run's folder (``wandb/offline-run-*``), the links in ``wandb/`` that point into it, and ``wandb/`` if nothing is
    left there. For a run stopped by an error (or a signal) before it logged anything or wrote a checkpoint.
    """
    for logger in trainer.loggers:
        run = started_wandb_run(logger) if isinstance(logger, WandbLogger) else None
        if run is None or getattr(run, "disabled", False):
            continue
        try:
            if run.step != run.starting_step:
                continue
            folder = Path(run.sync_dir)
            # W&B's closing lines would name the folder removed here
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                run.finish(exit_code=1)
        except Exception:  # noqa: BLE001 (a run that cannot say what it holds is kept)
            continue
        if _remove_run_folder(folder):
            notice(f"removed the W&B run {folder}: the run stopped before it logged anything")


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


def continue_run_notice(run: str | None, logger: Any) -> str | None:
    """For ``fit`` from a checkpoint written by the W&B run ``run``: how to continue that W&B run, where the config's
    ``logger`` (its plain YAML value) would start a new one; ``None`` where there is nothing to say."""
    wandb_logger = isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger")
    if not run or not wandb_logger or (logger.get("init_args") or {}).get("id"):
        return None
    return (
        f"resuming run {run} in a new W&B run; to continue W&B run {run} instead, add "
        f"--trainer.logger.init_args.id {run} --trainer.logger.init_args.resume allow"
    )
