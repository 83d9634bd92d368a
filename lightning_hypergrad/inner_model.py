"""An ``nn.Module`` as the inner model: the adapter between a module and the engine's flat list of tensors.

The engine (:func:`~lightning_hypergrad.inner_loop.unroll` and the estimators) works on a list of tensors ``w``.
:class:`InnerModel` names the entries of that list by the module's parameter names and calls the module with any
values of them (``torch.func.functional_call``), so that a loss is written with the model called as usual::

    inner = InnerModel(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    loss = lambda w, h: F.cross_entropy(inner(w, x), y)        # w: one tensor per name, in inner.names
    problem = BilevelProblem(loss, ..., init_params=inner.init_params(hyperparameters), ...)

Buffers (batch norm's running statistics): every call of the inner model normalizes with the statistics of the
batch it is given, in training, validation and test alike, and never reads or updates the running statistics, as
MAML's reference implementation does. So an inner step is a pure function of ``(w, h)`` (which reverse mode,
checkpointed replays, forward mode and ``vmap`` need), validation sees the function that training differentiated,
and the buffers keep their initial values: checkpoints hold them unchanged. Spectral norm (either form of
``spectral_norm``) is treated alike: its power iteration does not run inside a call, its ``u`` and ``v`` stay.

Random draws (dropout): the estimators that replay an inner step restore the random state the step first ran with
(:class:`~lightning_hypergrad.inner_loop.StepRandomness`), so every exact estimator gives one hypergradient for one
seed. ``torch.vmap`` (``batch_tasks=True``) cannot batch them: a random draw under it is refused with one line.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_hypergrad._call_plan import Plan, make_plan, pure_call

INITS = ("learned", "fixed", "zeros")
V = TypeVar("V")
_MISSING: Any = object()


class InnerModel(nn.Module):
    """An ``nn.Module`` whose parameters are the inner parameters ``w``, addressed by name.

    Args:
        module: the inner model (any architecture; batch norm is handled as the module docstring says).
        init: where the inner loop starts:

            - ``"fixed"`` (default): at the module's parameters as they are now, a constant: they become buffers
              of the module (so that its ``parameters()``, and a :class:`~lightning_hypergrad.BilevelModule`'s, are
              hyperparameters only; they are saved in checkpoints and moved with the module).
            - ``"zeros"``: at zero (the paper's linear head).
            - ``"learned"``: at the module's parameters, which are hyperparameters (MAML learns ``w_0``): the
              estimators differentiate the initialization (each says how; the others refuse it).
        params: the names (or glob patterns, ``"head.*"``) of the parameters that are inner parameters; default all.
            The module's other parameters must be constants (not require grad): they are used as they are.
        proximal: with ``init="learned"``, implicit MAML (iMAML, Rajeswaran et al., 2019): ``lambda > 0`` adds
            ``lambda/2 |w - phi|^2`` to the inner loss, where ``phi`` are the module's parameters (the learned
            initialization), and the inner loop starts at ``phi`` detached. ``w_T`` then depends on ``phi`` through
            the proximal term alone, so the implicit estimators define its hypergradient
            (``(I + H / lambda)^-1 g_T``, with ``H`` the Hessian of the inner loss without the term).

    A tensor shared under several names (tied weights, ``b.weight = a.weight``) is one inner parameter, named by its
    first name (:attr:`aliases` has them all), in every ``init``: a call puts its value in every place, so the inner
    loop moves every use, and a constant initialization makes every place a buffer. ``params``, :meth:`select` and
    :class:`BoundModel` take any of its names.

    The module is called as it was wrapped. A later change of its structure (a submodule replaced, added or
    removed, a parametrization added) is followed where every inner parameter still lives in the module that held
    it (the call plan is rebuilt), and refused with one line otherwise (a ``RuntimeError`` at the next call).

    Raises:
        ValueError: ``init`` unknown, a name of ``params`` that matches nothing, another parameter that requires
            grad, or ``proximal`` not a number > 0 or given without ``init="learned"``.
    """

    def __init__(
        self, module: nn.Module, init: str = "fixed", params: Sequence[str] | None = None, proximal: float | None = None
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"InnerModel takes an nn.Module, got {type(module).__name__}")
        if init not in INITS:
            raise ValueError(f"InnerModel init={init!r} is not one of {', '.join(map(repr, INITS))}")
        if proximal is not None:
            if isinstance(proximal, bool) or not isinstance(proximal, (int, float)) or not 0 < proximal < math.inf:
                raise ValueError(f"InnerModel proximal (iMAML's lambda) must be a number > 0, got {proximal!r}")
            if init != "learned":
                raise ValueError(
                    f"InnerModel proximal={proximal} pulls w towards a learned initialization; set init='learned' "
                    "(iMAML), or remove proximal"
                )
        self.module = module
        self.init = init
        #: iMAML's ``lambda`` (``None``: no proximal term)
        self.proximal = None if proximal is None else float(proximal)
        groups: dict[int, list[str]] = {}  # each tensor's names, tied ones sharing a tensor
        for name, p in module.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        every = [name for names in groups.values() for name in names]
        chosen = list(groups.values())
        if params is not None:
            params = [params] if isinstance(params, str) else list(params)
            for pattern in params:
                if not fnmatch.filter(every, pattern):
                    raise ValueError(
                        f"InnerModel params: {pattern!r} matches no parameter of the module; its parameters are "
                        f"{', '.join(every)}"
                    )
            chosen = [names for names in chosen if any(fnmatch.fnmatchcase(n, p) for n in names for p in params)]
        if not chosen:
            raise ValueError("InnerModel: the module has no parameters to train in the inner loop")
        #: the names of the inner parameters, in the order of the engine's list of tensors
        self.names: tuple[str, ...] = tuple(names[0] for names in chosen)
        #: every name of each inner parameter (more than one where it is tied), by its name in :attr:`names`
        self.aliases: dict[str, tuple[str, ...]] = {names[0]: tuple(names) for names in chosen}
        others = self.trainable_others()
        if others:
            raise ValueError(
                f"InnerModel: the parameters {', '.join(others)} are not inner parameters but require grad; a loss "
                "would use them directly, where the estimators cannot see them. Freeze them (requires_grad_(False)), "
                "add them to params, or compute them in a separate module whose output the losses receive"
            )
        if init != "learned":  # constants: buffers, so that the module's parameters() are hyperparameters only
            for name in self.names:
                value = getattr(*self._locate(name)).detach()
                for alias in self.aliases[name]:  # a tied tensor: every place holds the one buffer
                    sub, attr = self._locate(alias)
                    sub._parameters.pop(attr, None)  # (gone already where one submodule is used twice)
                    sub.register_buffer(attr, value)
        # the submodule that holds each name: a later change of the module is checked against them (make_plan)
        self.__dict__["_owners"] = {a: self._locate(a)[0] for names in self.aliases.values() for a in names}

    # ------------------------------------------------------------------ the inner parameters
    def parameter_tensors(self) -> list[Tensor]:
        """The module's tensors of the inner parameters, in the order of :attr:`names` (parameters when learned,
        buffers otherwise)."""
        return [getattr(*self._locate(name)) for name in self.names]

    def _locate(self, name: str) -> tuple[nn.Module, str]:
        """The submodule that holds the tensor ``name`` (``"0.weight"``) and its attribute name there."""
        owner, _, attr = name.rpartition(".")
        return self.module.get_submodule(owner), attr

    def trainable_others(self) -> list[str]:
        """The names of the module's parameters that require grad and are not inner parameters."""
        known = {alias for names in self.aliases.values() for alias in names}
        found = self.module.named_parameters(remove_duplicate=False)
        return [name for name, p in found if p.requires_grad and name not in known]

    def initial(self) -> list[Tensor]:
        """``w_0`` for a constant initialization (``"fixed"``: copies of the parameters, ``"zeros"``: zeros)."""
        tensors = [p.detach() for p in self.parameter_tensors()]
        if self.init == "zeros":
            return [torch.zeros_like(p) for p in tensors]
        return [p.clone() for p in tensors]

    def init_params(self, hyperparameters: Sequence[Tensor]) -> list[Tensor] | Callable[[Sequence[Tensor]], list]:
        """What :class:`~lightning_hypergrad.BilevelProblem` takes as ``init_params``.

        A constant initialization gives :meth:`initial`. A learned one gives a function of ``h`` that picks the
        module's parameters out of ``h``, where ``h`` is ``hyperparameters`` (the problem has no ``features``): each
        inner parameter must be one of them.
        """
        if self.init != "learned":
            return self.initial()
        ids = {id(a): i for i, a in enumerate(hyperparameters)}
        tensors = self.parameter_tensors()
        missing = [n for n, p in zip(self.names, tensors) if id(p) not in ids]
        if missing:
            raise ValueError(
                f"InnerModel(init='learned'): the parameters {', '.join(missing)} are not among the hyperparameters; "
                "a learned initialization is a hyperparameter, so list them (e.g. hyperparameters=list(model."
                "parameters()))"
            )
        index = [ids[id(p)] for p in tensors]
        return lambda h: [h[i] for i in index]

    def named(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        """``{name: tensor}`` for a list ``params`` of inner parameters."""
        if len(params) != len(self.names):
            raise ValueError(f"InnerModel: got {len(params)} tensors for {len(self.names)} inner parameters")
        return dict(zip(self.names, params))

    def select(self, values: Mapping[str, V], default: V = _MISSING) -> list[V]:
        """One value per inner parameter, by name: for per-parameter (per-layer) optimizer settings.

        ``values`` maps names or glob patterns (``"0.*"``, ``"*.bias"``) to values; the first matching key wins (a
        tied parameter matches by any of its names). A parameter that no key matches takes ``default`` (an error
        without one). A key that matches nothing is an error (a typo would otherwise be silent).
        """
        fits = lambda name, key: any(fnmatch.fnmatchcase(a, key) for a in self.aliases[name])  # noqa: E731
        for key in values:
            if not any(fits(n, key) for n in self.names):
                raise ValueError(f"InnerModel.select: {key!r} matches no inner parameter ({', '.join(self.names)})")
        out = []
        for name in self.names:
            match = next((v for k, v in values.items() if fits(name, k)), _MISSING)
            if match is _MISSING:
                if default is _MISSING:
                    raise ValueError(f"InnerModel.select: no value for {name!r}; give one or a default")
                match = default
            out.append(match)
        return out

    # ------------------------------------------------------------------ calling the module
    def forward(self, params: Sequence[Tensor], *args: Any, **kwargs: Any) -> Any:
        """The module's output on ``args`` with its inner parameters set to ``params``.

        The values are put in the module's own slots for the call and the old ones put back after it: what
        ``torch.func.functional_call`` does, in a few microseconds instead of about fifteen (an inner loop calls
        the model once or twice per step). Modules with tied or parametrized weights go through
        ``functional_call`` itself, given the value under each of a tied parameter's names.
        """
        if len(params) != len(self.names):
            raise ValueError(f"InnerModel: got {len(params)} tensors for {len(self.names)} inner parameters")
        plan = self._call_plan()
        with pure_call(plan):
            try:
                if plan.slots is None:
                    values = {a: value for name, value in zip(self.names, params) for a in self.aliases[name]}
                    return torch.func.functional_call(self.module, values, args, kwargs, strict=False)
                saved = [table[attr] for table, attr, _ in plan.slots]
                try:
                    for table, attr, i in plan.slots:
                        table[attr] = params[i]
                    return self.module(*args, **kwargs)
                finally:
                    for (table, attr, _), value in zip(plan.slots, saved):
                        table[attr] = value
            except RuntimeError as error:
                if "vmap" in str(error) and "randomness" in str(error):  # a setting: its message alone on the CLI
                    raise ValueError(
                        "InnerModel: the module draws random numbers (dropout or another random operation) under "
                        "torch.vmap, which refuses them (batch_tasks=True runs the tasks under vmap); set "
                        "batch_tasks=False, or make the module deterministic (e.g. eval() its dropout layers)"
                    ) from None
                raise

    def _call_plan(self) -> Plan:
        """Where each inner parameter lives and how the module is called (a ``Plan``); made at the first call
        and again whenever the module's structure changed since."""
        plan = self.__dict__.get("_plan")
        if plan is None or not plan.holds():
            plan = self.__dict__["_plan"] = make_plan(self, self.__dict__["_owners"])
        return plan

    def bind(self, params: Sequence[Tensor]) -> BoundModel:
        """The module with its inner parameters set to ``params``, as a callable model."""
        return BoundModel(self, list(params))


class BoundModel:
    """An inner model with given values of its inner parameters: ``model(x)`` runs the module with them.

    Attributes:
        params: the values, one tensor per name of :attr:`InnerModel.names`.
    """

    def __init__(self, inner: InnerModel, params: list[Tensor]) -> None:
        self.inner = inner
        self.params = params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.forward(self.params, *args, **kwargs)  # the wrapper has no hooks of its own to run

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, value)`` of each inner parameter."""
        return iter(zip(self.inner.names, self.params))

    def __getitem__(self, key: str | int) -> Tensor:
        """The value of the inner parameter ``key``: a name (any of a tied parameter's), or a position in
        :attr:`InnerModel.names` (the flat list's, so that code written for ``params[i]`` keeps working)."""
        if isinstance(key, int):
            return self.params[key]
        found = [v for name, v in zip(self.inner.names, self.params) if key in self.inner.aliases[name]]
        return found[0] if found else self.inner.named(self.params)[key]

    def __len__(self) -> int:
        return len(self.params)


def per_task_batch_norm(module: nn.Module, tasks: int) -> contextlib.AbstractContextManager[None]:
    """Within the block, ``module``'s batch norm treats its input as ``tasks`` equal groups along the batch dimension:
    each task's images are normalized with that task's statistics, and the running statistics are updated once per
    task in task order, as ``tasks`` separate calls would update them.

    So one call of a backbone on the images of a meta-batch's tasks, concatenated task by task, gives the features
    (and, through them, the gradients) and the buffers of one call per task, up to the order of floating-point sums.
    Outside training, or without running statistics tracked, batch norm with running statistics is unchanged.
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    return _per_task(norms, tasks)


@contextlib.contextmanager
def _per_task(norms: Sequence[_BatchNorm], tasks: int) -> Iterator[None]:
    try:
        for m in norms:
            m.forward = functools.partial(_per_task_norm, m, tasks)  # an instance attribute: Module.__call__ uses it
        yield
    finally:
        for m in norms:
            m.__dict__.pop("forward", None)


def _per_task_norm(m: _BatchNorm, tasks: int, x: Tensor) -> Tensor:
    """``m``'s forward with one set of batch statistics per task (see :func:`per_task_batch_norm`)."""
    uses_batch = m.training or not m.track_running_stats or m.running_mean is None
    if not uses_batch:
        return type(m).forward(m, x)
    if x.shape[0] % tasks:
        raise ValueError(f"per-task batch norm: a batch of {x.shape[0]} does not split into {tasks} equal tasks")
    n, channels = x.shape[0] // tasks, x.shape[1]
    # each (task, channel) pair a channel of its own: torch's batch norm then takes the statistics of each task
    grouped = x.reshape(tasks, n, channels, -1).transpose(0, 1).reshape(n, tasks * channels, -1)
    track = m.training and m.track_running_stats and m.running_mean is not None
    means = torch.zeros(tasks * channels, dtype=x.dtype, device=x.device) if track else None
    variances = torch.ones(tasks * channels, dtype=x.dtype, device=x.device) if track else None
    weight = m.weight.repeat(tasks) if m.affine else None
    bias = m.bias.repeat(tasks) if m.affine else None
    out = F.batch_norm(grouped, means, variances, weight, bias, True, 1.0, m.eps)  # momentum 1: the batch's own
    if track:
        with torch.no_grad():
            _update_running_stats(m, means.reshape(tasks, channels), variances.reshape(tasks, channels))
    return out.reshape(n, tasks, channels, -1).transpose(0, 1).reshape(x.shape)


def _update_running_stats(m: _BatchNorm, means: Tensor, unbiased: Tensor) -> None:
    """The running statistics after one update per task, in task order (``means``, ``unbiased``: ``(tasks, C)``, each
    task's mean and unbiased variance).

    With a fixed momentum ``mu`` the ``K`` updates ``r <- (1 - mu) r + mu x_k`` are one weighted sum,
    ``(1 - mu)^K r + sum_k mu (1 - mu)^(K-1-k) x_k`` (a few operations whatever ``K``); with ``momentum=None``
    (a cumulative average, whose factors depend on the count so far) one update per task.
    """
    tasks = means.shape[0]
    if m.momentum is None:
        for k in range(tasks):
            m.num_batches_tracked.add_(1)
            factor = 1.0 / float(m.num_batches_tracked)
            m.running_mean.mul_(1 - factor).add_(means[k], alpha=factor)
            m.running_var.mul_(1 - factor).add_(unbiased[k], alpha=factor)
        return
    mu = float(m.momentum)
    m.num_batches_tracked.add_(tasks)
    weights = torch.tensor([mu * (1 - mu) ** (tasks - 1 - k) for k in range(tasks)], dtype=means.dtype)
    weights = weights.to(means.device, non_blocking=True)
    keep = (1 - mu) ** tasks
    m.running_mean.mul_(keep).add_(weights @ means)
    m.running_var.mul_(keep).add_(weights @ unbiased)
