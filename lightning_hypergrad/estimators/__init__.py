"""Hypergradient estimators, one module each, behind one interface (:class:`HypergradEstimator`).

Each estimator has one spec string (``greedy(0.99)``): :func:`get_estimator` parses it and ``str(estimator)`` prints it.
"""

import ast

from lightning_hypergrad.estimators.auto_greedy import AutoGreedy
from lightning_hypergrad.estimators.base import HypergradEstimator, HypergradResult
from lightning_hypergrad.estimators.conjugate_gradient import ConjugateGradient
from lightning_hypergrad.estimators.first_order import FO
from lightning_hypergrad.estimators.forward import FMD
from lightning_hypergrad.estimators.greedy import T1T2, Greedy
from lightning_hypergrad.estimators.greedy_variants import GreedyTail, MomentumGreedy
from lightning_hypergrad.estimators.neumann import Neumann
from lightning_hypergrad.estimators.reverse import RMD, TruncatedRMD

#: the estimator classes by the name of their spec string (the names :func:`get_estimator` knows)
ESTIMATORS: dict[str, type[HypergradEstimator]] = {
    cls.name: cls
    for cls in (
        FO,
        T1T2,
        Greedy,
        RMD,
        TruncatedRMD,
        Neumann,
        ConjugateGradient,
        FMD,
        MomentumGreedy,
        GreedyTail,
        AutoGreedy,
    )
}


def get_estimator(spec: str | HypergradEstimator, **kwargs) -> HypergradEstimator:
    """The estimator that the spec string ``spec`` names; ``str(estimator)`` gives the spec back.

    A spec is a name, optionally with the constructor's arguments in parentheses: ``fo``, ``t1t2``, ``greedy``
    (default gamma), ``greedy(0.99)``, ``rmd``, ``truncated_rmd(5)``, ``neumann(10)``, ``neumann(10, scale=0.05)``,
    ``cg(10)``, ``fmd``. Names are case-insensitive (``Greedy(0.9)`` works) and ``-`` stands for ``_``. ``kwargs``
    are further constructor arguments. An estimator instance is returned as it is.

    Raises:
        ValueError: an unknown name or a spec that does not parse; the message lists the known names.
    """
    if isinstance(spec, HypergradEstimator) and not kwargs:
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"an estimator spec must be a string such as 'greedy(0.99)', got {spec!r}")
    name, args, options = _parse_spec(spec)
    if name not in ESTIMATORS:
        raise ValueError(
            f"unknown estimator {spec!r}; choose one of {', '.join(sorted(ESTIMATORS))}, e.g. 'greedy(0.99)'"
        )
    cls = ESTIMATORS[name]
    if len(args) > len(cls.spec_args):
        expected = ", ".join(cls.spec_args) or "no positional argument"
        raise ValueError(
            f"estimator spec {spec!r} has {len(args)} positional arguments; {name} takes {expected} "
            f"(give the others as key=value)"
        )
    try:
        return cls(**dict(zip(cls.spec_args, args)), **options, **kwargs)
    except TypeError as error:
        raise ValueError(f"estimator spec {spec!r}: {error}") from None


def _parse_spec(spec: str) -> tuple[str, list[object], dict[str, object]]:
    """``"greedy(0.99)"`` -> ``("greedy", [0.99], {})``."""
    text = spec.strip()
    head, paren, rest = text.partition("(")
    name = head.strip().lower().replace("-", "_")
    if not paren:
        return name, [], {}
    try:
        call = ast.parse(f"f({rest}", mode="eval").body
        if not isinstance(call, ast.Call) or not rest.rstrip().endswith(")"):
            raise SyntaxError
        args = [ast.literal_eval(a) for a in call.args]
        options = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg is not None}
    except (SyntaxError, ValueError):
        raise ValueError(
            f"cannot parse the estimator spec {spec!r}: write a name with optional literal arguments, e.g. "
            "'greedy(0.99)' or 'neumann(10, scale=0.05)', with string values quoted: 'neumann(10, damping=\"1/lr\")'"
        ) from None
    return name, args, options


__all__ = [
    "AutoGreedy",
    "ESTIMATORS",
    "FMD",
    "FO",
    "RMD",
    "T1T2",
    "ConjugateGradient",
    "Greedy",
    "GreedyTail",
    "HypergradEstimator",
    "HypergradResult",
    "MomentumGreedy",
    "Neumann",
    "TruncatedRMD",
    "get_estimator",
]
