"""Hypergradient quality: cosine and norm ratio of each estimator to the exact (RMD) one.

Run with ``python -m studies.quality``; the study is :mod:`studies.quality.quality`, its published results are in
``studies/quality/results/``.
"""
