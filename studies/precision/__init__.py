"""The precision study: each estimator's hypergradient in bf16 (Lightning's ``bf16-mixed``) against float32, and
float32 against float64, on the few-shot problem and the horizon study's CNN; the time bf16 costs on the CPU; and
what Lightning's precision settings do to a training step (see :mod:`studies.precision.study`)."""
