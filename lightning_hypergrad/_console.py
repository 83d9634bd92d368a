"""What the console command does before its heavy imports: a Ctrl-C or SIGTERM while torch and Lightning load ends
with one line and the interrupted status, not a traceback of the import (:func:`lightning_hypergrad.cli.main` takes
over once it runs). Imports nothing heavy, and acts only in the console command's own process."""

from __future__ import annotations

import os
import signal
import sys

COMMANDS = ("lightning-hypergrad", "lightning")
_received: list[str] = []


def stopped_before_training(name: str) -> str:
    """The line of a run stopped by the signal ``name`` before its training started (here and in the CLI)."""
    return f"stopped by {name} before training started: nothing to resume, run the command again\n"


def _on_signal(signum, frame) -> None:
    # Nothing is started yet (no checkpoint, no logger): leave at once, rather than raise a KeyboardInterrupt through
    # an import under way, which torch's C++ part can turn into an abort (status -6) and a library can swallow.
    name = signal.Signals(signum).name
    _received.append(name)
    sys.stderr.write(stopped_before_training(name))
    sys.stderr.flush()
    os._exit(143 if name == "SIGTERM" else 130)


def _excepthook(kind, value, traceback) -> None:
    # After a stop signal, any error is its consequence: an import cut short can leave a module half initialized
    # when a library swallows the KeyboardInterrupt (numpy without `iterable`, seen in a loaded machine).
    if issubclass(kind, KeyboardInterrupt) or _received:
        name = _received[-1] if _received else "SIGINT"
        sys.stderr.write(stopped_before_training(name))
        sys.stderr.flush()
        os._exit(143 if name == "SIGTERM" else 130)
    sys.__excepthook__(kind, value, traceback)


def install() -> None:
    """In the console command's process (``sys.argv[0]`` is the command), until ``main`` replaces them."""
    if os.path.basename(sys.argv[0] if sys.argv else "") not in COMMANDS:
        return
    sys.excepthook = _excepthook
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
