"""Experiments that reproduce the paper's results; each module is a subcommand of ``lightning-hypergrad-bench``.

- :mod:`lightning_hypergrad.experiments.table2`: Table 2, few-shot classification with FO, T1-T2, IFT (Neumann)
  and generalized greedy hypergradients (``lightning-hypergrad-bench table2 run|report``).
"""
