"""Table 2 of the paper (few-shot classification), reproduced: ``python -m studies.table2 run|report``.

The modules, in the order of a run: :mod:`~studies.table2.settings` (the paper's protocol, read from its config),
:mod:`~studies.table2.run` (one run and its record), :mod:`~studies.table2.workers` (the worker processes of
``--workers``), :mod:`~studies.table2.records` (reading the records), :mod:`~studies.table2.runner` (planning and
running the missing runs, the lock, ``main``), :mod:`~studies.table2.summary` (the report's numbers),
:mod:`~studies.table2.report` (its tables), :mod:`~studies.table2.plots` (its figures) and :mod:`~studies.table2.cli`
(the parser). The records and reports are in ``studies/table2/results/<dataset>/``.
"""

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
