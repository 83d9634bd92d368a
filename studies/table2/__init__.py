"""Table 2 of the paper (few-shot classification), reproduced: ``python -m studies.table2 run|report``.

The modules, in the order of a run: :mod:`~studies.table2.settings` (the paper's protocol, read from its config),
:mod:`~studies.table2.run` (one run and its record), :mod:`~studies.table2.workers` (the worker processes of
``--workers``), :mod:`~studies.table2.records` (reading the records), :mod:`~studies.table2.runner` (planning and
running the missing runs, the lock, ``main``), :mod:`~studies.table2.summary` (the report's numbers),
:mod:`~studies.table2.report` (its tables), :mod:`~studies.table2.plots` (its figures) and :mod:`~studies.table2.cli`
(the parser). The records and reports are in ``studies/table2/results/<dataset>/``.

``python -m studies.table2`` imports this package (torch and Lightning with it) before its ``__main__``: a stop signal
while they load ends the process at once with one line (:data:`STARTING`), not with the traceback of the import.
"""

import os
import signal
import sys


def _leave_while_starting(signum: int, frame: object) -> None:
    sys.stderr.write(f"stopped by {signal.Signals(signum).name} while starting: nothing was run\n")
    sys.stderr.flush()
    os._exit(128 + signum)


STARTING: dict[int, object] = {}
"""The handlers of SIGINT and SIGTERM that the stop while starting replaced (``python -m studies.table2`` only, where
``sys.argv[0]`` is ``-m`` while the package is imported); ``__main__`` puts them back once the imports are done."""
if sys.argv[:1] == ["-m"]:
    STARTING = {stop: signal.signal(stop, _leave_while_starting) for stop in (signal.SIGINT, signal.SIGTERM)}

# ruff: noqa: E402 (the imports come after the handlers)
from studies.table2.plots import plot_differences
from studies.table2.report import report
from studies.table2.runner import main
from studies.table2.settings import (
    CHOSEN,
    PaperSettings,
    baseline_methods,
    canonical,
    default_methods,
    greedy_gamma,
    jvps,
    record_name,
    resolve_root,
)
from studies.table2.summary import choose_gammas, paired_differences, summarize

__all__ = [
    "CHOSEN",
    "PaperSettings",
    "baseline_methods",
    "canonical",
    "choose_gammas",
    "default_methods",
    "greedy_gamma",
    "jvps",
    "main",
    "paired_differences",
    "plot_differences",
    "record_name",
    "report",
    "resolve_root",
    "summarize",
]
