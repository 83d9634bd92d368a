"""The hyperparameter-optimization examples with every estimator, side by side (``python -m studies.hpo``).

The study is :mod:`studies.hpo.comparison`; published records and tables: ``studies/hpo/results/``.
"""
