"""How an :class:`~lightning_hypergrad.InnerModel` calls its module: where each inner parameter goes, the layers
whose call must be made pure, and the structure of the module the plan was made for (checked at every call). The
structure's record serves :class:`~lightning_hypergrad.HyperModule` too."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm as _SpectralNormHook

if TYPE_CHECKING:
    from lightning_hypergrad.inner_model import InnerModel


class Structure(NamedTuple):
    """A module's tree as it was at one moment, checked later by :meth:`holds` (a few lookups, in C)."""

    #: each module's parent's ``_modules`` (the holder's for the module itself), its key there, the module and its
    #: type (a parametrization changes a module's class)
    parents: list[dict]
    keys: list[str]
    children: list[Any]
    kinds: list[type]
    #: every module's ``_modules`` and ``_parameters``, and their sizes
    tables: list[dict]
    sizes: list[int]

    def holds(self) -> bool:
        """Whether the tree is still the one recorded: the same modules at the same places, as many children and
        parameters in each."""
        found = list(map(dict.get, self.parents, self.keys))
        if not all(map(operator.is_, found, self.children)) or list(map(type, found)) != self.kinds:
            return False
        return list(map(len, self.tables)) == self.sizes


def structure_of(holder: nn.Module, key: str) -> Structure:
    """The :class:`Structure` of ``holder``'s submodule ``key`` (the wrapped module) and everything below it."""
    module = holder._modules[key]
    modules = list(module.modules())
    links = [(holder._modules, key, module)]
    for m in modules:
        links += [(m._modules, k, child) for k, child in m._modules.items()]
    tables = [table for m in modules for table in (m._modules, m._parameters)]
    parents, keys, children = (list(column) for column in zip(*links))
    return Structure(parents, keys, children, list(map(type, children)), tables, list(map(len, tables)))


class Plan(NamedTuple):
    """How :class:`~lightning_hypergrad.InnerModel` calls its module, and the module's structure it was made for."""

    #: ``(table, attr, i)``: the inner parameter ``i`` goes to ``table[attr]`` (``None``: through functional_call)
    slots: list[tuple[dict, str, int]] | None
    #: batch and instance norm: batch statistics in every call
    norms: list[nn.Module]
    #: spectral norm's modules: their power iteration off in a call (``training`` False)
    iterating: list[nn.Module]
    structure: Structure

    def holds(self) -> bool:
        """Whether the module's structure is still the one the plan was made for (a few lookups, in C)."""
        if not self.structure.holds():
            return False
        return self.slots is None or all(attr in table for table, attr, _ in self.slots)


def make_plan(inner: InnerModel, owners: dict[str, nn.Module]) -> Plan:
    """The call plan of ``inner``'s module as it is now, after checking that each inner parameter still lives in the
    submodule that held it when wrapped (``owners``, by name) and that no other parameter requires grad."""
    module = inner.module
    table_kind, kind = ("_parameters", "parameter") if inner.init == "learned" else ("_buffers", "buffer")
    for alias, owner in owners.items():
        path, _, attr = alias.rpartition(".")
        try:
            sub = module.get_submodule(path)
        except AttributeError:
            sub = None
        if sub is not owner:
            changed(f"the submodule {path!r} that held {alias!r} was replaced or removed")
        if attr not in getattr(sub, table_kind):
            changed(f"{alias!r} is no longer a {kind} of its module; a parametrization (weight_norm) moves it")
    others = inner.trainable_others()
    if others:
        changed(f"the parameters {', '.join(others)}, which are not inner parameters, require grad")
    modules = list(module.modules())
    tied = any(len(names) > 1 for names in inner.aliases.values())
    slots: list[tuple[dict, str, int]] | None = None
    if not tied and not any(hasattr(m, "parametrizations") for m in modules):  # else torch.func.functional_call
        slots = []
        for i, name in enumerate(inner.names):
            path, _, attr = name.rpartition(".")
            sub = module.get_submodule(path)
            slots.append((sub._parameters if attr in sub._parameters else sub._buffers, attr, i))
    norms = [m for m in modules if isinstance(m, (_BatchNorm, _InstanceNorm))]
    iterating = [m for m in modules if isinstance(m, _SpectralNorm)]
    iterating += [m for m in modules if any(isinstance(k, _SpectralNormHook) for k in m._forward_pre_hooks.values())]
    return Plan(slots, norms, iterating, structure_of(inner, "module"))


def changed(why: str) -> NoReturn:
    """Refuse a module changed after wrapping, in one line saying ``why``."""
    raise RuntimeError(
        f"InnerModel: the module changed after it was wrapped ({why}); an InnerModel calls the module as it was "
        "wrapped: make the change before wrapping it, or wrap the changed module in a new InnerModel"
    )


@contextlib.contextmanager
def pure_call(plan: Plan) -> Iterator[None]:
    """Within the block, a call of the module is a pure function: batch statistics, no power iteration."""
    saved = [(m.training, m.track_running_stats) for m in plan.norms]
    iterating = [m.training for m in plan.iterating]
    try:
        for m in plan.norms:
            m.training, m.track_running_stats = True, False
        for m in plan.iterating:
            m.training = False
        yield
    finally:
        for m, (training, track) in zip(plan.norms, saved):
            m.training, m.track_running_stats = training, track
        for m, training in zip(plan.iterating, iterating):
            m.training = training
