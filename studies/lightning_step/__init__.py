"""Seconds per training step of ``FewShotClassifier`` through Lightning, per estimator (``python -m
studies.lightning_step``). The study is :mod:`studies.lightning_step.step_time`; it prints its table (no records).
"""
