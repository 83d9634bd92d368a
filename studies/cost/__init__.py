"""Cost of the estimators: seconds per outer step and peak memory against T (``python -m studies.cost``).

:mod:`studies.cost.estimators` measures and writes the JSON records; :mod:`studies.cost.plot` draws the plots and
writes ``cost.md`` from them. Published records and figures: ``studies/cost/results/``.
"""
