"""An ``nn.Module`` as a hyperparameter: a module that the losses call with its parameters taken from ``h``.

The estimators call the losses with copies ``h`` of the hyperparameter tensors (and forward mode with tangents), so
a loss must never call a module whose parameters are hyperparameters directly: it would capture the tensors
themselves, which the estimators cannot see (``check_dependence`` refuses it). :class:`HyperModule` is the
counterpart of :class:`~lightning_hypergrad.inner_model.InnerModel` for hyperparameters: it finds its module's
parameters in the list of hyperparameters once (:meth:`HyperModule.attach`), and ``meta_net(h)`` is the module
called with the entries of ``h`` at those positions, differentiably::

    meta_net = HyperModule(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid()))
    hyperparameters = list(meta_net.parameters())
    meta_net.attach(hyperparameters)                    # a BilevelModule does this for its HyperModules
    inner = lambda w, h: (meta_net(h)(x).squeeze(1) * (x @ w[0] - y) ** 2).mean()   # a reweighted loss
    problem = BilevelProblem(inner, outer, hyperparameters, init_params=[w0], optimizer=SGD(lr=0.1), steps=10)

With ``features``, the losses receive the features as ``h``, not the hyperparameters: a module of the
hyperparameters is then called inside ``features`` itself (directly, ``meta_net.module(x)``), where the estimators
differentiate the hyperparameters as they are, and the losses receive its output. A module that the losses must call
on something of ``w`` (a learned loss of the predictions) goes through ``features`` as its parameters
(``[*feats, *meta_net.parameters()]``), the HyperModule attached to a list that holds them at the same positions.

Buffers of the module (batch norm's running statistics) are used as they are: the module runs in its own mode
(``train()`` or ``eval()``), as a direct call would. Parameters that do not require grad and are not among the
hyperparameters are constants, used as they are too.

The module is called as it was at :meth:`HyperModule.attach`. A later change of it (a submodule replaced or added,
a parameter reassigned, a parametrization such as ``weight_norm``) is followed where every attached parameter is
still where it was and no new parameter requires grad, and refused with one line otherwise (a ``RuntimeError`` at the
next call): attach again after such a change.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hypergrad._call_plan import structure_of

HYPER_MODULE_MARK = "_lightning_hypergrad_hyper_module"
"""The attribute that marks a parameter as a :class:`HyperModule`'s (so that the refusal of a loss that captures it
says how to call the module with ``h``)."""


class HyperModule(nn.Module):
    """A module whose parameters are hyperparameters, called by the losses with their values taken from ``h``.

    ``meta_net(h)(x)`` runs ``module`` on ``x`` with each of its parameters replaced by the entry of ``h`` at that
    parameter's position in the hyperparameters (:meth:`attach` finds the positions, by identity), so the result is
    differentiable with respect to ``h``, as the estimators need. The module's parameters are parameters of the
    wrapper: an owning module's ``parameters()`` (a :class:`~lightning_hypergrad.BilevelModule`'s hyperparameters)
    holds them.

    Args:
        module: the module (a reweighting network, a learned loss, an augmentation network).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: ``module`` has no parameters.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"HyperModule takes an nn.Module, got {type(module).__name__}")
        if isinstance(module, HyperModule):
            raise TypeError("HyperModule takes the module itself, not another HyperModule")
        if not any(True for _ in module.parameters()):
            raise ValueError(f"HyperModule: the {type(module).__name__} has no parameters to take from h")
        self.module = module
        #: the names of the parameters taken from ``h`` (the module's parameter names), set by :meth:`attach`
        self.names: tuple[str, ...] = ()
        #: the position in ``h`` of each parameter of :attr:`names`; ``None`` before :meth:`attach`
        self.positions: tuple[int, ...] | None = None
        self._mark()

    def _mark(self) -> None:
        for p in self.module.parameters():
            setattr(p, HYPER_MODULE_MARK, True)

    def _describe(self) -> str:
        return f"HyperModule({type(self.module).__name__})"

    # ------------------------------------------------------------------ where the parameters are in h
    def attach(self, hyperparameters: Sequence[Tensor]) -> None:
        """Record the position of each of the module's parameters in ``hyperparameters`` (found by identity).

        ``hyperparameters`` is the list that the problem's losses receive as ``h`` (a
        :class:`~lightning_hypergrad.BilevelProblem`'s ``hyperparameters``; a
        :class:`~lightning_hypergrad.BilevelModule` attaches its HyperModules to its own). A parameter that does
        not require grad and is not in the list is a constant, used as it is.

        Raises:
            ValueError: a parameter that requires grad is not in ``hyperparameters`` (the message names it).
        """
        hyperparameters = list(hyperparameters)
        ids = {id(a): i for i, a in enumerate(hyperparameters)}
        named = list(self.module.named_parameters())
        missing = [name for name, p in named if p.requires_grad and id(p) not in ids]
        if missing:
            raise ValueError(
                f"{self._describe()}.attach: the parameters {', '.join(missing)} are not among the "
                f"{len(hyperparameters)} hyperparameter tensors given; attach it to the list the problem's "
                "hyperparameters are (e.g. hyperparameters=[*meta_net.parameters(), ...]), or freeze the parameters "
                "that are constants (requires_grad_(False))"
            )
        bound = [(name, p, ids[id(p)]) for name, p in named if id(p) in ids]
        self.names = tuple(name for name, _, _ in bound)
        self.positions = tuple(i for _, _, i in bound)
        self.__dict__["_shapes"] = tuple(p.shape for _, p, _ in bound)
        self.__dict__["_bound"] = tuple(p for _, p, _ in bound)
        self._plan_calls()
        self._mark()

    def _plan_calls(self) -> None:
        """Record how a call puts the values of ``h`` into the module, and the module's structure it holds for."""
        self.__dict__["_slot_plan"] = self._find_slots()
        self.__dict__["_structure"] = structure_of(self, "module")

    def _slots(self) -> list[tuple[nn.Module, str]] | None:
        """The call plan of :meth:`attach`, checked against the module as it is now: rebuilt where the module's
        structure changed with every attached parameter in place, refused (one line) where it did not."""
        slots = self.__dict__["_slot_plan"]
        if self.__dict__["_structure"].holds() and (
            slots is None or all(map(operator.is_, [o._parameters.get(a) for o, a in slots], self.__dict__["_bound"]))
        ):
            return slots
        current = dict(self.module.named_parameters())
        moved = [n for n, p in zip(self.names, self.__dict__["_bound"]) if current.get(n) is not p]
        if moved:
            self._changed(f"the parameters {', '.join(moved)} are not the ones attached")
        new = [n for n, p in current.items() if p.requires_grad and n not in self.names]
        if new:
            self._changed(f"the parameters {', '.join(new)} require grad and were not attached")
        self._plan_calls()
        return self.__dict__["_slot_plan"]

    def _changed(self, why: str) -> None:
        raise RuntimeError(
            f"{self._describe()}: the module changed after attach ({why}); a HyperModule calls the module as it was "
            "attached: make the change before attaching, or call meta_net.attach(hyperparameters) again with the "
            "changed module's parameters among them"
        )

    def _find_slots(self) -> list[tuple[nn.Module, str]] | None:
        """The submodule and attribute of each bound parameter, or ``None`` where the fast swap does not apply
        (tied or parametrized weights: ``torch.func.functional_call`` handles them)."""
        module = self.module
        tied = len(list(module.named_parameters(remove_duplicate=False))) != len(list(module.named_parameters()))
        parametrized = any(hasattr(m, "parametrizations") for m in module.modules())
        if tied or parametrized:
            return None
        slots = []
        for name in self.names:
            owner, _, attr = name.rpartition(".")
            slots.append((module.get_submodule(owner), attr))
        return slots

    # ------------------------------------------------------------------ calling the module
    def forward(self, h: Sequence[Tensor], *args: Any, **kwargs: Any) -> BoundHyperModule:
        """``meta_net(h)``: the module bound to the entries of ``h`` at the attached positions (see :meth:`bind`)."""
        if args or kwargs:
            raise TypeError(
                f"{self._describe()} is called with h alone and returns the module to call: write meta_net(h)(x), "
                f"not meta_net(h, ...) (got {1 + len(args)} positional and {len(kwargs)} keyword arguments)"
            )
        return self.bind(h)

    def bind(self, h: Sequence[Tensor]) -> BoundHyperModule:
        """The module with its parameters set to the entries of ``h`` at the positions :meth:`attach` recorded, as
        a callable: ``meta_net.bind(h)(x)``, or ``meta_net(h)(x)``.

        Raises:
            TypeError: ``h`` is not a list or tuple of tensors (e.g. the data: ``meta_net(x)``).
            ValueError: :meth:`attach` was not called, or ``h`` does not hold the parameters at their positions.
        """
        if not isinstance(h, (list, tuple)) or not all(isinstance(x, Tensor) for x in h):
            got = f"a tensor of shape {tuple(h.shape)}" if isinstance(h, Tensor) else type(h).__name__
            raise TypeError(
                f"{self._describe()} takes h, the list of hyperparameter tensors that the loss receives, and returns "
                f"the module to call on the data: write meta_net(h)(x), not meta_net(x) (got {got})"
            )
        if self.positions is None:
            raise ValueError(
                f"{self._describe()} was called before attach: call meta_net.attach(hyperparameters) once with the "
                "problem's list of hyperparameter tensors (or make the HyperModule an attribute of a BilevelModule, "
                "which attaches it)"
            )
        shapes = self.__dict__["_shapes"]
        for name, i, shape in zip(self.names, self.positions, shapes):
            if i >= len(h) or h[i].shape != shape:
                got = "nothing" if i >= len(h) else f"shape {tuple(h[i].shape)}"
                raise ValueError(
                    f"{self._describe()}: h[{i}] should be its parameter {name!r} of shape {tuple(shape)}, but h has "
                    f"{got} there ({len(h)} tensors); pass the h the loss receives, from a problem whose "
                    "hyperparameters are the list given to attach (with `features`, the losses receive the features: "
                    "call the module inside features instead)"
                )
        return BoundHyperModule(self, [h[i] for i in self.positions])


class BoundHyperModule:
    """A :class:`HyperModule`'s module with given values of its parameters: ``bound(x)`` runs the module with them.

    Attributes:
        params: the values, one tensor per name of :attr:`HyperModule.names`.
    """

    def __init__(self, hyper: HyperModule, params: list[Tensor]) -> None:
        self.hyper = hyper
        self.params = params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The module's output on ``args`` with its parameters set to :attr:`params`.

        The values are put in the module's own slots for the call and the old ones put back after it (what
        ``torch.func.functional_call`` does, faster); modules with tied or parametrized weights go through
        ``functional_call`` itself.
        """
        hyper = self.hyper
        slots = hyper._slots()
        if slots is None:
            named = dict(zip(hyper.names, self.params))
            return torch.func.functional_call(hyper.module, named, args, kwargs, strict=False)
        tables = [(owner._parameters, attr) for owner, attr in slots]
        saved = [table[attr] for table, attr in tables]
        try:
            for (table, attr), value in zip(tables, self.params):
                table[attr] = value
            return hyper.module(*args, **kwargs)
        finally:
            for (table, attr), value in zip(tables, saved):
                table[attr] = value

    def named_parameters(self) -> list[tuple[str, Tensor]]:
        """``(name, value)`` of each parameter taken from ``h``."""
        return list(zip(self.hyper.names, self.params))
