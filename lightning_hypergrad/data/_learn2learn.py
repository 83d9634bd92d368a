"""The one place that imports learn2learn: quietly, and only when a dataset or the task sampler needs it."""

from __future__ import annotations

import contextlib
import io
import warnings
from types import ModuleType


def import_learn2learn() -> ModuleType:
    """Imports learn2learn without the deprecation banner and warnings that its ``gym`` import prints."""
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import learn2learn

    return learn2learn


INSTALL_HINT = (
    "install it with: pip install cython gym scipy && pip install --use-pep517 --no-deps "
    '--config-settings="--build-option=build_ext" learn2learn==0.2.0 (plain pip cannot build learn2learn on Python '
    "3.11; docs/guide.md, Installing learn2learn), or run scripts/install.sh"
)


def require_learn2learn(owner: str) -> None:
    """Raise a one-line ``ImportError`` naming what is missing and how to install it, where learn2learn (the
    few-shot extra: learn2learn, gym, scipy) cannot be imported; called where few-shot data is set up, before any
    long work (a logger, a model summary, sanity checking) starts."""
    try:
        import_learn2learn()
    except ImportError as error:
        raise ImportError(
            f"{owner} samples its tasks with learn2learn, the few-shot extra, and importing it failed ({error}): "
            f"{INSTALL_HINT}"
        ) from None  # the message holds the cause; the command line prints this one line
