"""lightning_hypergrad: hypergradients for bilevel optimization in PyTorch and Lightning.

The core engine works in plain PyTorch: describe a :class:`BilevelProblem`, pick an estimator
(:class:`Greedy`, :class:`FO`, :class:`T1T2`, :class:`RMD`, :class:`TruncatedRMD`, :class:`Neumann`,
:class:`ConjugateGradient`, :class:`FMD`) and call it.
"""

from lightning_hypergrad import _console

_console.install()  # the console command only: a Ctrl-C while torch loads is one line (see _console)

from lightning_hypergrad.estimators import (  # noqa: E402
    ESTIMATORS,
    FMD,
    FO,
    RMD,
    T1T2,
    AutoGreedy,
    ConjugateGradient,
    Greedy,
    GreedyTail,
    HypergradEstimator,
    HypergradResult,
    MomentumGreedy,
    Neumann,
    TruncatedRMD,
    get_estimator,
)
from lightning_hypergrad.inner_model import InnerModel  # noqa: E402
from lightning_hypergrad.optim import SGD, Adam, AdamW, DifferentiableOptimizer, OptimizerState  # noqa: E402
from lightning_hypergrad.problem import BilevelProblem  # noqa: E402

__version__ = "0.1.0"

# The Lightning layer is imported on first use, so that the core engine works (and imports fast) without it.
_LIGHTNING_NAMES = {
    "BilevelModule": "lightning_hypergrad.module",
    "FewShotClassifier": "lightning_hypergrad.fewshot",
    "MAML": "lightning_hypergrad.fewshot",
    "HypergradCallback": "lightning_hypergrad.callbacks",
    "FewShotDataModule": "lightning_hypergrad.data",
}


def __getattr__(name: str):
    if name in _LIGHTNING_NAMES:
        import importlib

        return getattr(importlib.import_module(_LIGHTNING_NAMES[name]), name)
    raise AttributeError(f"module 'lightning_hypergrad' has no attribute {name!r}")


__all__ = [
    "AutoGreedy",
    "BilevelModule",
    "FewShotClassifier",
    "FewShotDataModule",
    "HypergradCallback",
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
    "GreedyTail",
    "HypergradEstimator",
    "HypergradResult",
    "InnerModel",
    "MAML",
    "MomentumGreedy",
    "Neumann",
    "OptimizerState",
    "TruncatedRMD",
    "get_estimator",
]
