"""Hypergradient estimators, one module each, behind one interface (:class:`HypergradEstimator`)."""

from lightning_hypergrad.estimators.base import HypergradEstimator, HypergradResult
from lightning_hypergrad.estimators.conjugate_gradient import ConjugateGradient
from lightning_hypergrad.estimators.first_order import FO
from lightning_hypergrad.estimators.forward import FMD
from lightning_hypergrad.estimators.greedy import T1T2, Greedy
from lightning_hypergrad.estimators.neumann import Neumann
from lightning_hypergrad.estimators.reverse import RMD, TruncatedRMD

ESTIMATORS: dict[str, type[HypergradEstimator]] = {
    cls.name: cls for cls in (FO, T1T2, Greedy, RMD, TruncatedRMD, Neumann, ConjugateGradient, FMD)
}


def get_estimator(name: str, **kwargs) -> HypergradEstimator:
    """The estimator registered under ``name`` (e.g. ``"greedy"``), built with ``kwargs``.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    key = name.lower().replace("-", "_")
    if key not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[key](**kwargs)


__all__ = [
    "ESTIMATORS",
    "FMD",
    "FO",
    "RMD",
    "T1T2",
    "ConjugateGradient",
    "Greedy",
    "HypergradEstimator",
    "HypergradResult",
    "Neumann",
    "TruncatedRMD",
    "get_estimator",
]
