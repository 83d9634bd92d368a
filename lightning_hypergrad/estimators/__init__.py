"""Hypergradient estimators, one module each, behind one interface (:class:`HypergradEstimator`) and one registry.

Each estimator has one spec string (``greedy(0.99)``): :func:`get_estimator` parses it, ``str(estimator)`` prints
it, :func:`list_estimators` lists the names. A new estimator is one new module of this package: a class decorated
with :func:`register_estimator` that declares its :class:`Capabilities`.
"""

from lightning_hypergrad.estimators import registry
from lightning_hypergrad.estimators.auto_greedy import AutoGreedy
from lightning_hypergrad.estimators.base import AdjointEstimator, HypergradEstimator, HypergradResult
from lightning_hypergrad.estimators.conjugate_gradient import ConjugateGradient
from lightning_hypergrad.estimators.finite_difference import T1T2FD, GreedyFD
from lightning_hypergrad.estimators.first_order import FO
from lightning_hypergrad.estimators.forward import FMD
from lightning_hypergrad.estimators.greedy import T1T2, Greedy
from lightning_hypergrad.estimators.greedy_variants import GreedyTail, MomentumGreedy
from lightning_hypergrad.estimators.minres import MINRES
from lightning_hypergrad.estimators.mixed_mode import MixedRMD
from lightning_hypergrad.estimators.neumann import Neumann
from lightning_hypergrad.estimators.registry import (
    Capabilities,
    estimator_table,
    get_estimator,
    list_estimators,
    register_estimator,
    registered,
)
from lightning_hypergrad.estimators.reverse import RMD, TruncatedRMD
from lightning_hypergrad.estimators.sama import SAMA


def __getattr__(name: str):
    if name == "ESTIMATORS":  # the estimator classes by spec name (a live view; every module of the package loaded)
        registered()
        return registry.ESTIMATORS
    raise AttributeError(f"module 'lightning_hypergrad.estimators' has no attribute {name!r}")


__all__ = [
    "AdjointEstimator",
    "AutoGreedy",
    "Capabilities",
    "ESTIMATORS",
    "FMD",
    "FO",
    "RMD",
    "SAMA",
    "T1T2",
    "T1T2FD",
    "ConjugateGradient",
    "Greedy",
    "GreedyFD",
    "GreedyTail",
    "HypergradEstimator",
    "HypergradResult",
    "MINRES",
    "MixedRMD",
    "MomentumGreedy",
    "Neumann",
    "TruncatedRMD",
    "estimator_table",
    "get_estimator",
    "list_estimators",
    "register_estimator",
]
