"""Table 2 of the paper (few-shot classification), reproduced: ``python -m studies.table2 run|report``.

The runner is :mod:`studies.table2.runner`; its records and reports are in ``studies/table2/results/<dataset>/``.
"""

from studies.table2.runner import (
    CHOSEN,
    PaperSettings,
    baseline_methods,
    canonical,
    choose_gammas,
    default_methods,
    gamma_of,
    jvps,
    main,
    mean_ci95,
    paired_differences,
    plot_differences,
    record_name,
    report,
    resolve_root,
    summarize,
    t975,
)

__all__ = [
    "CHOSEN",
    "PaperSettings",
    "baseline_methods",
    "canonical",
    "choose_gammas",
    "default_methods",
    "gamma_of",
    "jvps",
    "main",
    "mean_ci95",
    "paired_differences",
    "plot_differences",
    "record_name",
    "report",
    "resolve_root",
    "summarize",
    "t975",
]
