"""The command line: ``lightning-hypergrad fit --config configs/quickstart.yaml`` (also ``lightning ...``).

A :class:`lightning.pytorch.cli.LightningCLI` over any :class:`~lightning_hypergrad.module.BilevelModule` subclass and
any data module; ``fit``, ``validate``, ``test``, ``predict`` and ``--print_config`` work as in Lightning, with these
additions:

- **Checkpoints of a config stay together, and no run touches another's.** Every run writes its checkpoints into
  ``lightning-hypergrad/<config>/checkpoints/`` (``<config>``: the names of the ``--config`` files, e.g.
  ``quickstart`` or ``paper-omniglot+t1t2``, one folder for each shipped config; ``--checkpoint.dirpath`` sets
  another folder), each file named after the run (``<run>-epoch=E-step=S.ckpt`` and ``last-<run>.ckpt``, ``<run>``
  the W&B run id), so that runs of the same config never overwrite or delete each other's files. The ``checkpoint``
  settings are those of :class:`~lightning_hypergrad.cli.checkpoints.RunCheckpoint` (Lightning's
  ``ModelCheckpoint``), with ``save_last: true``.
- **``--ckpt_path last``** resumes (or evaluates) the most recent ``last-*.ckpt`` of the config's folder. A
  checkpoint of another model class is refused before anything is built.
- **A resumed run is the same experiment.** Every checkpoint holds the model and data settings of its run (the
  estimator with its arguments, the inner optimizer with its settings, every other model and data setting, as the
  config has them). ``fit --ckpt_path ...`` continues with the checkpoint's settings where the configs say otherwise
  (naming them on stderr), and refuses a ``--model.*`` or ``--data.*`` argument of the command line that differs
  from the checkpoint's, naming each difference and how to start a new run instead; ``--resume_with_changes true``
  continues with them, saying so. ``validate`` and ``test`` use the settings as given and name those that differ
  (evaluating a trained backbone with another number of inner steps is a use). A checkpoint that holds no settings
  (one that the Python API wrote) is used as given.
- **Errors of settings are one message.** :func:`main` prints the message of an invalid setting (``error: ...``)
  without the traceback and exits with status 1; ``LIGHTNING_HYPERGRAD_DEBUG=1`` shows the traceback.
- **A stopped run says so.** SIGINT (Ctrl-C) or SIGTERM ends the run with one line, the step reached, its last
  checkpoint and the command that resumes it, and the status 130 or 143; during the imports, at once.
- **Nothing in the working directory but the logger's runs and the checkpoints.** The run's config goes into the
  run's own folder (:class:`~lightning_hypergrad.cli.run_files.SaveConfigToRun`); a run that stops before it logged
  anything or wrote a checkpoint removes the empty W&B run it started, and what can be checked before the logger
  starts is.
- **W&B's environment variables are followed** (``WANDB_MODE``, ``WANDB_DIR``:
  :func:`~lightning_hypergrad.cli.wandb.follow_wandb_environment`), and the lines Lightning prints at every run that
  say nothing about it are not shown (:func:`~lightning_hypergrad.cli.messages.quiet_third_parties`).
- **W&B keeps what a killed run logged**: its ``.wandb`` file is written every second
  (``WANDB__TRANSACTION_LOG_FLUSH_INTERVAL``, W&B's default 15 s), so a run stopped by SIGKILL keeps its history
  up to the last second.

One module for each job: :mod:`~lightning_hypergrad.cli.entry` (the console command, its stop signals and exit
statuses), :mod:`~lightning_hypergrad.cli.app` (the LightningCLI subclass), :mod:`~lightning_hypergrad.cli.checkpoints`
(naming and reading checkpoints), :mod:`~lightning_hypergrad.cli.resume` (a run's settings against its checkpoint's),
:mod:`~lightning_hypergrad.cli.run_files` (the run's config), :mod:`~lightning_hypergrad.cli.wandb` (W&B),
:mod:`~lightning_hypergrad.cli.messages` (what it prints and silences), and :mod:`~lightning_hypergrad.cli._lightning`,
where every private name of Lightning and W&B that these use is, each with why.

Importing this package loads neither torch nor Lightning: :func:`main` starts by handling stop signals, then loads
them. The other names here (:func:`~lightning_hypergrad.cli.app.cli`, ``HypergradCLI``, ``read_checkpoint``, ...) are
imported from their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_hypergrad.cli.entry import DEBUG_ENV, EXIT_INTERRUPTED, main

_LAZY = {
    "cli": "app",
    "HypergradCLI": "app",
    "SETTING_ERRORS": "app",
    "CHECKPOINT_ROOT": "checkpoints",
    "RUN_KEY": "checkpoints",
    "SETTINGS_KEY": "checkpoints",
    "RunCheckpoint": "checkpoints",
    "read_checkpoint": "checkpoints",
    "SECTIONS": "resume",
    "SaveConfigToRun": "run_files",
    "WANDB_FLUSH_ENV": "wandb",
    "WANDB_FLUSH_SECONDS": "wandb",
    "WANDB_MODES": "wandb",
    "follow_wandb_environment": "wandb",
    "remove_unused_wandb_runs": "wandb",
    "LITLOGGER_TIP": "messages",
    "quiet_third_parties": "messages",
}
"""The names this package gives from its modules, each imported (with torch and Lightning) on first use."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["DEBUG_ENV", "EXIT_INTERRUPTED", "main", *_LAZY]
