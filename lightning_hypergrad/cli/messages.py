"""What the command line writes besides Lightning's own lines: its notes (:func:`notice`), and nothing of what other
libraries print at every run that says nothing about the run (:func:`quiet_third_parties`)."""

from __future__ import annotations

import logging
import sys
import warnings

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_hypergrad.cli._lightning import PYTREE_MODULE

LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
"""The start of the line Lightning prints at every start when ``litlogger`` is not installed (an advertisement)."""


def notice(message: str) -> None:
    """Writes ``note: message`` on stderr (once, from the first process)."""
    if rank_zero_only.rank == 0:
        sys.stderr.write(f"note: {message}\n")


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
        module=PYTREE_MODULE,
    )
    lightning_info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _WithoutLitLoggerTip) for f in lightning_info.filters):
        lightning_info.addFilter(_WithoutLitLoggerTip())
