"""The studies behind the published results, one folder each with its code and its ``results/``.

Run from the repository root as ``python -m studies.<name> ...`` (commands and what each regenerates:
``docs/studies.md``): ``table2`` (the paper's Table 2), ``cost`` (time and memory against T), ``quality`` (cosine to
the exact hypergradient), ``hpo`` (the hyperparameter-optimization examples), ``ddp`` (two-process scaling) and
``lightning_step`` (a training step through Lightning). ``studies.common`` holds what they share. Nothing here is
part of the installed package: ``import lightning_hypergrad`` imports none of it.
"""
