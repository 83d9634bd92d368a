"""The meta-gradient of a meta-batch: each task's bilevel problem, its hypergradient, their mean. No Lightning here.

A :class:`TaskFamily` says how a task becomes a :class:`~lightning_hypergrad.BilevelProblem` (the losses of a model
bound to the inner parameters, the initialization, the features); :func:`meta_gradient` runs an estimator over the
tasks, one by one or stacked into one problem, and returns the mean hypergradient and the mean task metrics.
:class:`~lightning_hypergrad.BilevelModule` builds its family from its hooks; plain PyTorch code builds one directly.

Example::

    >>> import torch
    >>> from lightning_hypergrad import SGD, get_estimator
    >>> from lightning_hypergrad.meta_gradient import TaskFamily, meta_gradient
    >>> alpha = torch.tensor([1.0], requires_grad=True)
    >>> family = TaskFamily(
    ...     inner_loss=lambda w, h, task: ((w[0] - task * h[0]) ** 2).sum(),
    ...     outer_loss=lambda w, h, task: ((w[0] - task) ** 2).sum(),
    ...     hyperparameters=[alpha], optimizer=SGD(lr=0.5), steps=1, init=lambda task: [torch.zeros(1)])
    >>> step = meta_gradient(family, [2.0, 3.0], get_estimator("rmd"))
    >>> [round(float(g), 6) for g in step.hypergrads[0]]  # d/da of mean((a t - t)^2) at a = 1
    [0.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_hypergrad.estimators.base import HypergradEstimator
from lightning_hypergrad.meta_batch import StackedTasks, Task
from lightning_hypergrad.optim import DifferentiableOptimizer, OptimizerState
from lightning_hypergrad.problem import BilevelProblem

TaskLoss = Callable[[Any, Sequence[Tensor], Task], Tensor]
"""``loss(model, h, task)``: ``model`` is the inner model bound to the inner parameters (or the flat list of them)."""


@dataclass
class MetaGradient:
    """What :func:`meta_gradient` returns for a meta-batch.

    Attributes:
        hypergrads: the mean hypergradient over the tasks, one tensor per hyperparameter tensor.
        metrics: the mean of each task metric over the tasks, with ``outer_loss`` (0-dim tensors on ``device``).
        params: the final inner parameters of the last task (what online mode carries on).
        state: the inner optimizer's final state of the last task.
    """

    hypergrads: list[Tensor]
    metrics: dict[str, Tensor]
    params: list[Tensor]
    state: OptimizerState | None


@dataclass
class TaskFamily:
    """How each task of a meta-batch becomes a bilevel problem.

    Attributes:
        inner_loss: ``L_train(model, h, task)``.
        outer_loss: ``L_val(model, h, task)``.
        hyperparameters: the hyperparameter tensors ``alpha``.
        optimizer: the differentiable inner optimizer.
        steps: ``T``.
        init: what a task's problem takes as ``init_params``: ``w_0`` (tensors), or, for a learned initialization
            (MAML), a function of ``h`` that picks ``w_0`` out of the hyperparameters.
        learned_tensors: with ``features`` and a learned initialization: the hyperparameter tensors that ``w_0`` is
            (e.g. an :class:`~lightning_hypergrad.InnerModel`'s parameters). The problem's ``h`` is then the features
            followed by them, and the losses receive the features alone.
        bind: the model the losses receive for the flat inner parameters ``w`` (``None``: the list ``w`` itself).
        features: optional ``features(task) -> tensors``: the part that depends on the hyperparameters alone; the
            losses then receive it as ``h``.
        stacked_features: optional; the features of stacked tasks at once (``None`` from it: one call per task).
        task_metrics: optional ``metrics(model, h, task) -> {name: number}`` after the inner loop.
        hyperparameter_names: optional names of the hyperparameter tensors, for error messages.
        proximal: iMAML's ``lambda``, with a learned initialization: the problems start at the initialization
            detached and add ``lambda/2 |w - phi(h)|^2`` to the inner loss (``phi``: the initialization, read from
            ``h``), so that ``w_0`` is a constant and the initialization a hyperparameter of the inner loss.
    """

    inner_loss: TaskLoss
    outer_loss: TaskLoss
    hyperparameters: Sequence[Tensor]
    optimizer: DifferentiableOptimizer
    steps: int
    init: Callable[[Task], Sequence[Tensor] | Callable[[Sequence[Tensor]], list]]
    learned_tensors: Sequence[Tensor] = ()
    bind: Callable[[Sequence[Tensor]], Any] | None = None
    features: Callable[[Task], Sequence[Tensor]] | None = None
    stacked_features: Callable[[StackedTasks], Sequence[Tensor] | None] | None = None
    task_metrics: Callable[[Any, Sequence[Tensor], Task], dict[str, Any]] | None = None
    hyperparameter_names: Sequence[str] | None = None
    proximal: float | None = None

    def bound(self, fn: Callable[..., Any]) -> Callable[[Sequence[Tensor], Sequence[Tensor], Task], Any]:
        """``fn(model, h, task)`` as a function of the flat inner parameters ``w``."""
        bind = self.bind if self.bind is not None else list
        return lambda w, h, task: fn(bind(w), h, task)

    def metrics(self, params: Sequence[Tensor], h: Sequence[Tensor], task: Task) -> dict[str, Any]:
        """The task metrics after the inner loop (none without ``task_metrics``)."""
        return {} if self.task_metrics is None else self.bound(self.task_metrics)(params, h, task)

    def problem(self, task: Task, start: tuple[list[Tensor], OptimizerState] | None = None) -> TaskProblem:
        """The bilevel problem of ``task``; ``start``: the inner parameters and optimizer state to start from
        (online mode), instead of the initialization."""
        return TaskProblem(self, task, start)


@dataclass
class TaskProblem:
    """One task's :class:`~lightning_hypergrad.BilevelProblem` and the features computed for it.

    With a learned initialization and features, the problem's ``h`` is the features followed by the
    initialization's tensors, and the losses receive the features alone (:meth:`losses_h`).
    """

    family: TaskFamily
    task: Task
    start: tuple[list[Tensor], OptimizerState] | None = None
    #: the features of the task once the estimator computed them (``None`` before, or without features)
    features: list[Tensor] | None = field(default=None, init=False)
    problem: BilevelProblem = field(init=False)

    def __post_init__(self) -> None:
        family, task = self.family, self.task
        learned = bool(family.learned_tensors) and self.start is None and family.features is not None
        self._tail = list(family.learned_tensors) if learned else []
        features = None
        if family.features is not None:
            features_of = family.features

            def features() -> list[Tensor]:
                self.features = list(features_of(task))
                return [*self.features, *self._tail]

        tail = len(self._tail)
        init: Any = self.start[0] if self.start is not None else None
        if init is None:
            # what the problem takes as init_params; with a learned initialization, a function of h (phi)
            init = (lambda h: list(h)[len(h) - tail :]) if self._tail else family.init(task)
        phi = init
        proximal = family.proximal if self.start is None and callable(phi) else None
        if proximal is not None:  # iMAML: start at the initialization, detached
            init = [x.detach() for x in (self._tail or phi(family.hyperparameters))]
        inner_loss, outer_loss = family.bound(family.inner_loss), family.bound(family.outer_loss)
        if proximal is None:
            inner = lambda w, h: inner_loss(w, self.losses_h(h), task)  # noqa: E731
        else:

            def inner(w, h):
                pull = sum(((a - b) ** 2).sum() for a, b in zip(w, phi(h)))
                return inner_loss(w, self.losses_h(h), task) + 0.5 * proximal * pull

        self.problem = BilevelProblem(
            inner_loss=inner,
            outer_loss=lambda w, h: outer_loss(w, self.losses_h(h), task),
            hyperparameters=family.hyperparameters,
            init_params=init,
            optimizer=family.optimizer,
            steps=family.steps,
            features=features,
            init_state=None if self.start is None else self.start[1],
            hyperparameter_names=family.hyperparameter_names,
        )

    def losses_h(self, h: Sequence[Tensor]) -> list[Tensor]:
        """The part of the problem's ``h`` that the losses receive (without a learned initialization's tensors)."""
        return list(h)[: len(h) - len(self._tail)] if self._tail else list(h)

    def detached_h(self) -> list[Tensor]:
        """What the losses received as ``h`` in the last estimate (features or hyperparameters), detached."""
        h = self.features if self.features is not None else self.family.hyperparameters
        return [x.detach() for x in h]


def meta_gradient(
    family: TaskFamily,
    tasks: Sequence[Task],
    estimator: HypergradEstimator,
    *,
    stacked: StackedTasks | None = None,
    start: tuple[list[Tensor], OptimizerState] | None = None,
    check: bool = True,
    device: torch.device | None = None,
) -> MetaGradient:
    """The mean hypergradient over ``tasks`` and the mean of the task metrics (with ``outer_loss``).

    Args:
        family: how each task becomes a problem.
        tasks: the meta-batch's tasks.
        estimator: the hypergradient estimator.
        stacked: the tasks stacked (:func:`~lightning_hypergrad.meta_batch.stack_tasks`): they then run as one
            problem whose losses are the sums of the per-task losses (``torch.func.vmap``); the caller decides
            whether the estimator and the family allow it (``estimator.batchable``, no learned initialization).
        start: online mode: the inner parameters and optimizer state the (single) task starts from.
        check: check that every hyperparameter reaches a loss (once per run is enough).
        device: where the metrics go (default: the first hyperparameter's device).

    Nothing waits for the device; the hypergradients are not checked for NaN (the caller's policy).
    """
    device = device if device is not None else family.hyperparameters[0].device
    if stacked is not None:
        return _stacked_meta_gradient(family, tasks, stacked, estimator, check, device)
    total = [torch.zeros_like(a) for a in family.hyperparameters]
    sums: dict[str, Tensor] = {}
    result = None
    for task in tasks:
        task_problem = family.problem(task, start)
        result = estimator(task_problem.problem, check=check, check_finite=False)
        check = False
        for t, g in zip(total, result.hypergrads):
            t.add_(g)
        with torch.no_grad():
            metrics = {"outer_loss": result.loss, **family.metrics(result.params, task_problem.detached_h(), task)}
        for key, value in metrics.items():
            value = as_float(value).detach().to(device).reshape(())
            sums[key] = value if key not in sums else sums[key] + value
    n = max(len(tasks), 1)
    return MetaGradient(
        hypergrads=[t / n for t in total],
        metrics={k: v / n for k, v in sums.items()},
        params=[] if result is None else result.params,
        state=None if result is None else result.state,
    )


def _stacked_meta_gradient(
    family: TaskFamily,
    tasks: Sequence[Task],
    stacked: StackedTasks,
    estimator: HypergradEstimator,
    check: bool,
    device: torch.device,
) -> MetaGradient:
    """:func:`meta_gradient` for ``tasks``, stacked into one problem as ``stacked``."""
    computed: list[list[Tensor]] = []
    features = None
    if family.features is not None:
        features_of, stacked_of = family.features, family.stacked_features

        def features() -> list[Tensor]:
            together = stacked_of(stacked) if stacked_of is not None else None
            if together is None:
                per_task = [features_of(task) for task in tasks]
                together = [torch.stack(column) for column in zip(*per_task)]
            computed.append(list(together))
            return computed[-1]

    h_dim = 0 if family.features is not None else None

    def summed(fn: TaskLoss) -> Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]:
        fn_w = family.bound(fn)

        def per_task(w, h, tensors):
            return fn_w(w, h, stacked.task(tensors)).reshape(())

        batched = torch.func.vmap(per_task, in_dims=(0, h_dim, 0))
        return lambda w, h: batched(list(w), list(h), stacked.tensors).sum()

    init = [torch.stack(column) for column in zip(*(family.init(task) for task in tasks))]
    problem = BilevelProblem(
        inner_loss=summed(family.inner_loss),
        outer_loss=summed(family.outer_loss),
        hyperparameters=family.hyperparameters,
        init_params=init,
        optimizer=family.optimizer,
        steps=family.steps,
        features=features,
        hyperparameter_names=family.hyperparameter_names,
    )
    result = estimator(problem, check=check, check_finite=False)
    n = stacked.size
    h = [x.detach() for x in (computed[-1] if computed else family.hyperparameters)]
    means = {"outer_loss": result.loss / n}
    if family.task_metrics is not None:
        with torch.no_grad():
            metrics = torch.func.vmap(
                lambda w, hh, tensors: family.metrics(w, hh, stacked.task(tensors)), in_dims=(0, h_dim, 0)
            )(result.params, h, stacked.tensors)
        means.update({k: as_float(v).detach().to(device).mean() for k, v in metrics.items()})
    return MetaGradient(
        hypergrads=[g / n for g in result.hypergrads],
        metrics=means,
        params=[p[-1] for p in result.params],
        state=result.state.replace([x[-1] for x in result.state.tensors()]),
    )


def as_float(value: Any) -> Tensor:
    """A metric as a floating-point tensor (a count or a flag becomes the default float dtype)."""
    value = torch.as_tensor(value)
    return value if value.is_floating_point() else value.to(torch.get_default_dtype())
