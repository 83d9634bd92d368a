"""lightning_hypergrad: hypergradients for bilevel optimization in PyTorch and Lightning.

The core engine works in plain PyTorch: describe a :class:`BilevelProblem`, pick an estimator
(:class:`Greedy`, :class:`FO`, :class:`T1T2`, :class:`RMD`, :class:`TruncatedRMD`, :class:`Neumann`,
:class:`ConjugateGradient`, :class:`FMD`, or any name of :func:`list_estimators`) and call it.

Importing the package does nothing else: each public name is imported from its module on first use, so that
``import lightning_hypergrad`` is fast, has no side effects and needs Lightning only for the Lightning layer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_ESTIMATORS = "lightning_hypergrad.estimators"
_OPTIM = "lightning_hypergrad.optim"

#: every public name and the module that defines it
_PUBLIC = {
    **dict.fromkeys(
        (
            "ESTIMATORS",
            "FMD",
            "FO",
            "RMD",
            "SAMA",
            "T1T2",
            "T1T2FD",
            "AutoGreedy",
            "Capabilities",
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
            "get_estimator",
            "list_estimators",
            "register_estimator",
        ),
        _ESTIMATORS,
    ),
    **dict.fromkeys(("SGD", "Adam", "AdamW", "DifferentiableOptimizer", "OptimizerState"), _OPTIM),
    "BilevelProblem": "lightning_hypergrad.problem",
    "InnerModel": "lightning_hypergrad.inner_model",
    "HyperModule": "lightning_hypergrad.hyper_module",
    "MetaGradient": "lightning_hypergrad.meta_gradient",
    "meta_gradient": "lightning_hypergrad.meta_gradient",
    "BilevelModule": "lightning_hypergrad.module",
    "FewShotClassifier": "lightning_hypergrad.fewshot",
    "MAML": "lightning_hypergrad.fewshot",
    "IMAML": "lightning_hypergrad.fewshot",
    "HypergradCallback": "lightning_hypergrad.callbacks",
    "FewShotDataModule": "lightning_hypergrad.data",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # cached after the first use
        return value
    raise AttributeError(f"module 'lightning_hypergrad' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


if TYPE_CHECKING:  # for type checkers and editors: the names that __getattr__ provides
    from lightning_hypergrad.estimators import (  # noqa: F401
        FMD,
        FO,
        RMD,
        T1T2,
        AutoGreedy,
        Capabilities,
        ConjugateGradient,
        Greedy,
        GreedyTail,
        HypergradEstimator,
        HypergradResult,
        MomentumGreedy,
        Neumann,
        TruncatedRMD,
        get_estimator,
        list_estimators,
        register_estimator,
    )
    from lightning_hypergrad.inner_model import InnerModel  # noqa: F401
    from lightning_hypergrad.optim import SGD, Adam, AdamW, DifferentiableOptimizer, OptimizerState  # noqa: F401
    from lightning_hypergrad.problem import BilevelProblem  # noqa: F401

__all__ = sorted(_PUBLIC)
