"""Every private name of Lightning and W&B that the command line uses, each behind one override or function of this
file that says why no public name does the job.

``tests/test_cli_private_names.py`` checks each of them against the installed versions (those of the checkpoint:
``tests/test_epoch_end_checkpoint.py``), in the test subset of the oldest versions that ``pyproject.toml`` admits too
(``scripts/oldest_tests.txt``), so that a version that renames one or changes what it does fails there, not in a
user's run. Written against Lightning 2.6 and W&B 0.17 to 0.31.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger


class CLIHooks(LightningCLI):
    """LightningCLI with two of its private steps taken over: the checkpoint's hyperparameters are not parsed over the
    config, and a subclass can skip the subcommand (:meth:`skip_subcommand`)."""

    def _parse_ckpt_path(self) -> None:
        """Nothing, in place of Lightning's, which parses the ``hyper_parameters`` of the ``--ckpt_path`` checkpoint
        over the configs and the command line (so that a setting given with ``--ckpt_path`` would be silently replaced
        by the checkpoint's). The command line compares the settings itself
        (:meth:`~lightning_hypergrad.cli.app.HypergradCLI.parse_arguments`).

        Private because: ``LightningCLI.__init__`` calls it between ``parse_arguments`` and
        ``before_instantiate_classes``, and no argument of LightningCLI turns it off.
        """

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning's (``before_<subcommand>``, the trainer's method, ``after_<subcommand>``), unless
        :meth:`skip_subcommand` says to run nothing.

        Private because: ``before_<subcommand>``, the public hook that runs first, cannot skip the subcommand other
        than by raising, which a caller of :func:`~lightning_hypergrad.cli.app.cli` would receive.
        """
        if not self.skip_subcommand(subcommand):
            super()._run_subcommand(subcommand)

    def skip_subcommand(self, subcommand: str) -> bool:
        """Whether to run nothing for ``subcommand``: asked once the trainer is built, before ``before_<subcommand>``.
        ``False`` here."""
        return False


def started_wandb_run(logger: WandbLogger) -> Any:
    """The W&B run that ``logger`` has started, ``None`` before it starts one.

    Private because: ``logger.experiment``, the public way to the run, starts one (``_experiment`` is the run, or
    ``None``).
    """
    return getattr(logger, "_experiment", None)


def wandb_init_arguments(logger: WandbLogger) -> dict[str, Any] | None:
    """The keyword arguments that ``logger`` will pass to ``wandb.init`` when its run starts, to change in place;
    ``None`` once the run has started (or where this Lightning keeps no such dict).

    Private because: WandbLogger builds them from its constructor's arguments (``_wandb_init``), and passes some
    that the config does not set (``anonymous=None``, ``dir="."``); no public name changes them afterwards.
    """
    init = getattr(logger, "_wandb_init", None)
    if not isinstance(init, dict) or started_wandb_run(logger) is not None:
        return None
    return init


def set_wandb_offline(logger: WandbLogger, offline: bool) -> None:
    """Whether ``logger`` sets ``WANDB_MODE=dryrun`` when its run starts (what the constructor's ``offline`` sets).

    Private because: WandbLogger reads ``_offline`` when the run starts, over the environment's ``WANDB_MODE``; only
    the constructor sets it publicly.
    """
    logger._offline = offline


def set_wandb_save_dir(logger: WandbLogger, directory: str) -> None:
    """The folder of ``logger``'s runs: ``wandb.init(dir=...)`` and the logger's ``save_dir``.

    Private because: ``save_dir`` is a read-only property over ``_save_dir``, and ``dir`` is in ``_wandb_init``
    (:func:`wandb_init_arguments`); only the constructor sets them publicly.
    """
    init = wandb_init_arguments(logger)
    if init is not None:
        init["dir"] = directory
    logger._save_dir = directory


PYTREE_MODULE = r"lightning\.pytorch\.utilities\._pytree$"
"""The module of Lightning (as a ``warnings`` filter's ``module`` pattern) whose use of torch's deprecated ``LeafSpec``
makes torch warn at every run: the warning is about Lightning's code, not the run.

Private because: the warning comes from that module, ``_pytree``, and a filter names the module it comes from to
silence nothing else.
"""


def steps_between_checkpoints(callback: ModelCheckpoint) -> int:
    """The checkpoint's ``every_n_train_steps`` (0: none by steps).

    Private because: ``ModelCheckpoint`` keeps its constructor's argument as ``_every_n_train_steps`` only.
    """
    return int(callback._every_n_train_steps or 0)


def save_checkpoint_now(callback: ModelCheckpoint, trainer: Any) -> None:
    """Writes the checkpoint that ``callback`` would write at a step of ``every_n_train_steps`` (its top-k file and
    ``last``), now, unless Lightning's rules skip it (sanity check, ``fast_dev_run``, already written at this step).

    Private because: ``ModelCheckpoint`` writes its files in ``_save_topk_checkpoint`` and ``_save_last_checkpoint``
    from ``_monitor_candidates``, called from its hooks only; no public method writes them at another moment.
    """
    if callback._should_skip_saving_checkpoint(trainer):
        return
    candidates = callback._monitor_candidates(trainer)
    callback._save_topk_checkpoint(trainer, candidates)
    callback._save_last_checkpoint(trainer, candidates)
