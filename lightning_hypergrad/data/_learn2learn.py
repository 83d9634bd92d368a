"""The one place that imports learn2learn: quietly, and only when a dataset or the task sampler needs it."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import warnings
from types import ModuleType


def import_learn2learn() -> ModuleType:
    """Imports learn2learn without the deprecation banner and warnings that its ``gym`` import prints."""
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import learn2learn

    return learn2learn


FEWSHOT_COMMAND = (
    "pip install cython numpy gym scipy tqdm requests && pip install --use-pep517 --no-deps "
    '--config-settings="--build-option=build_ext" learn2learn==0.2.0'
)
"""The few-shot extra for a pip user, the one command that the README gives and ``scripts/check_install.sh`` runs in a
fresh environment: learn2learn 0.2.0's bundled C files do not compile on Python 3.11, so it is built from source
with Cython (``build_ext``) and without pip resolving its dependencies, which the first half installs."""

INSTALL_HINT = (
    f"install it with: {FEWSHOT_COMMAND} (plain pip cannot build learn2learn on Python 3.11; README, Installing with "
    "pip), or, in a checkout, run scripts/install.sh"
)


EXTRA = ("learn2learn", "gym", "scipy")
"""The modules of the few-shot extra (learn2learn imports gym and scipy)."""


def require_learn2learn(owner: str) -> None:
    """Raise a one-line ``ImportError`` naming what is missing and how to install it, where a module of the few-shot
    extra cannot be found; called where few-shot data is set up, before any long work (a logger, a model summary,
    sanity checking) starts. It looks the modules up without importing them (learn2learn's import is slow and
    loud: it runs later, where the tasks are sampled)."""
    missing = [name for name in EXTRA if _missing(name)]
    if missing:
        raise ImportError(
            f"{owner} samples its tasks with learn2learn, the few-shot extra, and "
            f"{', '.join(repr(m) for m in missing)} cannot be found (No module named {missing[0]!r}): {INSTALL_HINT}"
        )


def _missing(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is None
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True
