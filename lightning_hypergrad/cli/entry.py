"""The console command, ``lightning-hypergrad`` (also ``lightning``, ``python -m lightning_hypergrad``): :func:`main`,
and what it does when SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) stops it.

Imports nothing heavy, so that :func:`main` handles a stop signal from its first line on, while torch and Lightning
load: nothing is started then, and the process leaves at once with one line and the interrupted status, not with a
traceback of the import. Once they are loaded, a stop ends the run the way Lightning ends it, and :func:`main` says
where the run stopped and how to resume it.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from typing import Any, NoReturn

DEBUG_ENV = "LIGHTNING_HYPERGRAD_DEBUG"
"""Set to 1 to see the traceback of an error instead of its message alone."""

COMMANDS = ("lightning-hypergrad", "lightning")
"""The console command's names. The handling of a stop during the imports acts only in a process started as one of
them (``sys.argv[0]``), never in a process that calls :func:`main` from Python (a test, a notebook)."""

EXIT_INTERRUPTED = {"SIGINT": 130, "SIGTERM": 143}
"""The exit status of a run stopped by a signal before its end (128 + the signal's number, as shells report it):
the run is interrupted, and resumable from its last checkpoint."""


def stopped_before_training(name: str) -> str:
    """The line of a run stopped by the signal ``name`` before its training started."""
    return f"stopped by {name} before training started: nothing to resume, run the command again\n"


class StopSignals:
    """The stop signals that the console command received, and what it does on each.

    - During the imports (:meth:`install_early`), a signal ends the process at once with one line. Nothing is started
      yet (no checkpoint, no logger), and a ``KeyboardInterrupt`` raised through an import under way can be swallowed
      by the library importing, or abort in torch's C++ part (status -6). After a stop, any error is its consequence
      (an import cut short can leave a module half initialized): :meth:`excepthook` reports it as the stop.
    - During the run (:meth:`install`), SIGINT stops at once (``KeyboardInterrupt``, which Lightning's fit handles);
      SIGTERM stops at once outside training, and inside it lets Lightning finish the current step (Lightning's own
      handler runs too: it stops the loop at the next batch). :meth:`report` then writes the run's last line.
    """

    def __init__(self) -> None:
        self.received: list[str] = []
        """The names of the signals received, in order."""
        self.cli: Any = None
        """The command line being run, once its arguments are parsed (:meth:`watch`): its trainer tells where the
        run stopped."""

    def install_early(self) -> None:
        """Handles the signals as during the imports: a stop leaves at once."""
        sys.excepthook = self.excepthook
        signal.signal(signal.SIGINT, self._leave)
        signal.signal(signal.SIGTERM, self._leave)

    def install(self) -> None:
        """Handles the signals as during the run: a stop ends the run as Lightning ends it."""
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)

    def watch(self, cli: Any) -> None:
        """Follows ``cli`` (a :class:`~lightning_hypergrad.cli.app.HypergradCLI`), whose trainer :meth:`report`
        reads."""
        self.cli = cli

    def excepthook(self, kind: type[BaseException], value: BaseException, traceback: Any) -> None:
        """``sys.excepthook`` during the imports: after a stop, or for a ``KeyboardInterrupt``, the one line."""
        if issubclass(kind, KeyboardInterrupt) or self.received:
            _leave_before_training(self.received[-1] if self.received else "SIGINT")
        sys.__excepthook__(kind, value, traceback)

    def _leave(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        _leave_before_training(name)

    def _stop(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        trainer = getattr(self.cli, "trainer", None)
        training = trainer is not None and trainer.state.status == "running"
        if name == "SIGINT" or not training:
            raise KeyboardInterrupt

    def report(self) -> int:
        """Writes the one line of a stopped run (the step reached, its last checkpoint, the command that resumes it)
        and returns the exit status (:data:`EXIT_INTERRUPTED`)."""
        name = self.received[-1] if self.received else "SIGINT"
        trainer = getattr(self.cli, "trainer", None)
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


def _leave_before_training(name: str) -> NoReturn:
    sys.stderr.write(stopped_before_training(name))
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED[name])


def _last_written(trainer: Any) -> str | None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
            return callback.last_model_path
    return None


def install_early() -> StopSignals | None:
    """In the console command's process (``sys.argv[0]`` is one of :data:`COMMANDS`): a :class:`StopSignals` that
    handles a stop during the imports; elsewhere nothing (``None``)."""
    if os.path.basename(sys.argv[0] if sys.argv else "") not in COMMANDS:
        return None
    stops = StopSignals()
    stops.install_early()
    return stops


def _root_cause(error: BaseException, setting_errors: tuple[type[BaseException], ...]) -> BaseException:
    """The innermost exception of ``error``'s ``raise ... from`` chain that reports a setting, else ``error``."""
    found = error
    while error.__cause__ is not None:
        error = error.__cause__
        if isinstance(error, setting_errors):
            found = error
    return found


def main() -> None:
    """The console command: :func:`~lightning_hypergrad.cli.app.cli` on ``sys.argv``; an invalid setting is reported
    as its message alone.

    Errors of settings (:data:`~lightning_hypergrad.cli.app.SETTING_ERRORS`: ``ValueError``, ``TypeError``, missing
    files or packages, a non-finite hypergradient with ``nonfinite: raise``) print ``error: <message>`` on stderr and
    exit with status 1; other errors, and every error with ``LIGHTNING_HYPERGRAD_DEBUG=1``, show their traceback. A
    run stopped by SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) prints one line, the step reached, its last
    checkpoint and the command that resumes it, and exits with status 130 or 143 (:data:`EXIT_INTERRUPTED`), never 0.
    """
    stops = install_early() or StopSignals()  # first: a stop while torch and Lightning load is one line
    from lightning_hypergrad.cli.app import SETTING_ERRORS, cli

    stops.install()
    try:
        cli(on_parsed=stops.watch)
    except SystemExit:  # Lightning ends a stopped fit with SystemExit (SIGTERM: status 0, Ctrl-C: 1)
        if stops.received:
            sys.exit(stops.report())
        raise
    except KeyboardInterrupt:
        sys.exit(stops.report())
    except SETTING_ERRORS as error:
        if stops.received:  # e.g. an import cut short by Ctrl-C ("partially initialized module")
            sys.exit(stops.report())
        if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            raise
        sys.stderr.write(f"error: {_root_cause(error, SETTING_ERRORS)}\n({DEBUG_ENV}=1 shows the traceback)\n")
        sys.exit(1)
