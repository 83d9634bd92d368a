"""lightning_hypergrad: hypergradients for bilevel optimization in PyTorch and Lightning.

The core engine works in plain PyTorch: describe a :class:`BilevelProblem`, pick an estimator
(:class:`Greedy`, :class:`FO`, :class:`T1T2`, :class:`RMD`, :class:`TruncatedRMD`, :class:`Neumann`,
:class:`ConjugateGradient`, :class:`FMD`) and call it.
"""

from lightning_hypergrad.estimators import (
    ESTIMATORS,
    FMD,
    FO,
    RMD,
    T1T2,
    ConjugateGradient,
    Greedy,
    HypergradEstimator,
    HypergradResult,
    Neumann,
    TruncatedRMD,
    get_estimator,
)
from lightning_hypergrad.optim import SGD, Adam, AdamW, DifferentiableOptimizer, OptimizerState
from lightning_hypergrad.problem import BilevelProblem

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "FMD",
    "FO",
    "RMD",
    "SGD",
    "T1T2",
    "Adam",
    "AdamW",
    "BilevelProblem",
    "ConjugateGradient",
    "DifferentiableOptimizer",
    "Greedy",
    "HypergradEstimator",
    "HypergradResult",
    "Neumann",
    "OptimizerState",
    "TruncatedRMD",
    "get_estimator",
]
