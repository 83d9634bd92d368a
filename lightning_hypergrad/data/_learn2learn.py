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
