"""The estimator registry: one spec name per estimator, its capabilities and costs declared on the class.

An estimator is added by one file: a :class:`~lightning_hypergrad.estimators.base.HypergradEstimator` subclass with
a ``name``, its :class:`Capabilities`, and the decorator :func:`register_estimator`. :func:`get_estimator` turns a
spec string (``"greedy(0.99)"``) back into the estimator, :func:`list_estimators` lists the names (optionally those
with a capability), and :func:`estimator_table` writes the README's table from the declarations, so that the
refusal messages, the docs and the studies read one source.

Example::

    >>> from lightning_hypergrad.estimators import get_estimator, list_estimators
    >>> str(get_estimator("greedy(0.99)"))
    'greedy(0.99)'
    >>> "rmd" in list_estimators(learned_init=True)
    True
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_hypergrad.estimators.base import HypergradEstimator


@dataclass(frozen=True)
class Capabilities:
    """What an estimator supports and costs, declared on its class (``capabilities = Capabilities(...)``).

    Attributes:
        computes: what it computes, in the paper's notation (one line of the README's table).
        cost: its extra cost per problem (per task of an outer step) beyond the inner loop, in products.
        memory: its memory, in ``P`` (inner parameters), ``H`` (hyperparameters), ``T``, ``S`` (optimizer state).
        example: a spec string of it, as a user would write it (``"greedy(0.99)"``).
        learned_init: whether it defines a hypergradient for a learned initialization (MAML's ``w_0(alpha)``).
        learned_init_refusal: why not, where it does not (completes the refusal's message).
        optimizer_settings: whether it differentiates through the inner optimizer's own settings (a learned lr).
        batchable: whether the hypergradient of a sum of independent problems is the sum of theirs, so that a
            meta-batch's tasks can run as one stacked problem (``BilevelModule(batch_tasks=True)``).
        exact: whether it is the exact hypergradient of the unrolled loop (up to rounding).
        double_backward: whether it differentiates through the inner gradient (``create_graph=True``): such an
            estimator cannot run through an operation without a second derivative (a ``once_differentiable``
            function, some fused kernels) nor under ``torch.compile``.
    """

    computes: str
    cost: str
    memory: str
    example: str
    learned_init: bool = False
    learned_init_refusal: str = "it defines no term for the initialization"
    optimizer_settings: bool = True
    batchable: bool = True
    exact: bool = False
    double_backward: bool = True


_FILTERS = ("learned_init", "optimizer_settings", "batchable", "exact", "double_backward")

_ESTIMATORS: dict[str, type[HypergradEstimator]] = {}
_loaded = False

ESTIMATORS: Mapping[str, type[HypergradEstimator]] = MappingProxyType(_ESTIMATORS)
"""The registered estimator classes by spec name: a read-only view, which a new registration updates."""


def register_estimator(cls: type[HypergradEstimator]) -> type[HypergradEstimator]:
    """Class decorator: register ``cls`` under its spec name ``cls.name``.

    Raises:
        TypeError: ``cls`` declares no ``name`` or no :class:`Capabilities`.
        ValueError: another class is registered under that name.
    """
    name = getattr(cls, "name", "")
    if not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise TypeError(f"{cls.__name__} needs a lowercase spec name (class attribute `name`), got {name!r}")
    if not isinstance(cls.__dict__.get("capabilities"), Capabilities):
        raise TypeError(f"{cls.__name__} must declare its own `capabilities = Capabilities(...)`")
    other = _ESTIMATORS.get(name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"the estimator name {name!r} is taken by {other.__module__}.{other.__qualname__}")
    _ESTIMATORS[name] = cls
    return cls


def _load() -> None:
    """Import every module of this package once, so that each registers its estimators."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import lightning_hypergrad.estimators as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and info.name not in ("registry", "base"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def registered() -> dict[str, type[HypergradEstimator]]:
    """The registered estimator classes by spec name (a copy, in name order)."""
    _load()
    return dict(sorted(_ESTIMATORS.items()))


def list_estimators(**capabilities: bool) -> list[str]:
    """The spec names of the registered estimators, sorted; with ``capability=True/False``, those that have it (or not).

    Args:
        capabilities: any of ``learned_init``, ``optimizer_settings``, ``batchable``, ``exact``,
            ``double_backward``.

    Raises:
        ValueError: an unknown capability.
    """
    unknown = sorted(set(capabilities) - set(_FILTERS))
    if unknown:
        raise ValueError(f"list_estimators: unknown capability {unknown[0]!r}; choose from {', '.join(_FILTERS)}")
    return [
        name
        for name, cls in registered().items()
        if all(getattr(cls.capabilities, key) == value for key, value in capabilities.items())
    ]


def get_estimator(spec: str | HypergradEstimator, **kwargs) -> HypergradEstimator:
    """The estimator that the spec string ``spec`` names; ``str(estimator)`` gives the spec back.

    A spec is a name, optionally with the constructor's arguments in parentheses: ``fo``, ``t1t2``, ``greedy``
    (default gamma), ``greedy(0.99)``, ``rmd``, ``truncated_rmd(5)``, ``neumann(10)``, ``neumann(10, scale=0.05)``,
    ``cg(10)``, ``fmd`` (:func:`list_estimators` has them all). Names are case-insensitive (``Greedy(0.9)`` works)
    and ``-`` stands for ``_``. ``kwargs`` are further constructor arguments. An estimator instance is returned as
    it is.

    Raises:
        ValueError: an unknown name or a spec that does not parse; the message lists the known names.
    """
    from lightning_hypergrad.estimators.base import HypergradEstimator

    if isinstance(spec, HypergradEstimator) and not kwargs:
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"an estimator spec must be a string such as 'greedy(0.99)', got {spec!r}")
    name, args, options = _parse_spec(spec)
    known = registered()
    if name not in known:
        raise ValueError(f"unknown estimator {spec!r}; choose one of {', '.join(known)}, e.g. 'greedy(0.99)'")
    cls = known[name]
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


def capable_names(capability: str, having: bool = True) -> str:
    """The registered specs with ``capability`` (or, ``having=False``, without it), as a message lists them:
    ``"fo, fmd, greedy(gamma), ..."``."""
    names = []
    for name in list_estimators(**{capability: having}):
        args = registered()[name].spec_args
        names.append(f"{name}({', '.join(args)})" if args else name)
    return ", ".join(names)


def _signature(cls: type) -> str:
    parameters = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name not in ("self", "nonfinite")]
    shown = [p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}" for p in parameters]
    return f"{cls.__name__}({', '.join(shown)})"


TABLE_START = "<!-- estimator table: generated by `python -m lightning_hypergrad.estimators --readme README.md` -->"
TABLE_END = "<!-- end of the estimator table -->"


def estimator_table() -> str:
    """The README's table of the registered estimators (markdown), from their declared capabilities."""
    yes = {True: "yes", False: "no"}
    lines = [
        "| spec | class | computes | extra cost per problem | memory | exact | learned init | "
        "optimizer settings as hyperparameters | `batch_tasks` | double backward |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cls in registered().values():
        c = cls.capabilities
        lines.append(
            f"| `{c.example}` | `{_signature(cls)}` | {c.computes} | {c.cost} | {c.memory} | {yes[c.exact]} | "
            f"{yes[c.learned_init]} | {yes[c.optimizer_settings]} | {yes[c.batchable]} | {yes[c.double_backward]} |"
        )
    return "\n".join(lines)


def replace_table(text: str) -> str:
    """``text`` (a README) with the part between :data:`TABLE_START` and :data:`TABLE_END` regenerated.

    Raises:
        ValueError: ``text`` lacks the two markers.
    """
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no estimator table between the lines {TABLE_START!r} and {TABLE_END!r}")
    return f"{text[: start + len(TABLE_START)]}\n{estimator_table()}\n{text[end:]}"
