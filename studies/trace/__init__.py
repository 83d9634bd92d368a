"""Traces of single Table 2 training runs and the estimators' hypergradients at initialization (see :mod:`.trace`)."""
