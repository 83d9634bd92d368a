"""``BilevelModule``: the LightningModule that runs the inner loop and steps the hyperparameters."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_hypergrad._checks import check_choice, check_int, check_positive_number
from lightning_hypergrad.callbacks.step_timer import StepTimer
from lightning_hypergrad.distributed import average_across_processes
from lightning_hypergrad.estimators import HypergradEstimator, get_estimator
from lightning_hypergrad.evaluation import TaskMetrics, clone_task
from lightning_hypergrad.inner_loop import StepMode, unroll
from lightning_hypergrad.inner_model import InnerModel
from lightning_hypergrad.optim import SGD, DifferentiableOptimizer, OptimizerState
from lightning_hypergrad.problem import BilevelProblem

Task = Any

_STAGE_NAMES = {"val": "meta-validation", "test": "meta-test"}

DEFAULT_ESTIMATOR = "rmd(checkpoint_every='sqrt')"
"""The estimator of a :class:`BilevelModule` built without one (see the README's "Which to use")."""


@dataclass
class MetaGradient:
    """What :meth:`BilevelModule.meta_gradient` returns for a meta-batch.

    Attributes:
        hypergrads: the mean hypergradient over the tasks, one tensor per hyperparameter tensor.
        metrics: the mean of each task metric over the tasks, with ``outer_loss`` (0-dim tensors on the module's
            device).
        params: the final inner parameters of the last task (what online mode carries on).
        state: the inner optimizer's final state of the last task.
    """

    hypergrads: list[Tensor]
    metrics: dict[str, Tensor]
    params: list[Tensor]
    state: OptimizerState | None


def split_meta_batch(batch: Any) -> list[Task]:
    """The tasks of a meta-batch: a list as it is, or a dict of tensors stacked along a first (task) dimension."""
    if isinstance(batch, (list, tuple)):
        return list(batch)
    if isinstance(batch, dict):
        sizes = {v.shape[0] for v in batch.values() if isinstance(v, Tensor)}
        if len(sizes) != 1:
            raise ValueError(
                "a meta-batch given as a dict must hold tensors with one shared first (task) dimension, got first "
                f"dimensions {sorted(sizes)}; return a list of tasks from the dataloader, or override split_tasks"
            )
        return [{k: v[i] if isinstance(v, Tensor) else v for k, v in batch.items()} for i in range(sizes.pop())]
    raise TypeError(f"cannot split a meta-batch of type {type(batch).__name__}; override BilevelModule.split_tasks")


@dataclass
class StackedTasks:
    """Tasks of equal shapes as one batch: each tensor entry stacked along a new first (task) dimension.

    Attributes:
        tensors: the stacked tensor entries (``{"support_x": [B, ...], ...}``).
        constants: the entries that are not tensors, equal in every task.
        size: the number of tasks ``B``.
    """

    tensors: dict[str, Tensor]
    constants: dict[str, Any]
    size: int

    def task(self, tensors: dict[str, Tensor]) -> dict[str, Any]:
        """One task from the (unbatched) tensors ``vmap`` hands to a per-task function."""
        return {**tensors, **self.constants}


def stack_tasks(tasks: Sequence[Task]) -> StackedTasks | None:
    """``tasks`` stacked into one :class:`StackedTasks`, or ``None`` where they cannot be.

    Tasks can be stacked when they are dicts with the same keys whose tensor entries have equal shapes and dtypes,
    and whose other entries are equal.
    """
    if not tasks or not all(isinstance(t, dict) for t in tasks):
        return None
    first = tasks[0]
    if any(t.keys() != first.keys() for t in tasks):
        return None
    tensors: dict[str, Tensor] = {}
    constants: dict[str, Any] = {}
    for key, value in first.items():
        column = [t[key] for t in tasks]
        if isinstance(value, Tensor):
            if not all(
                isinstance(v, Tensor) and v.shape == value.shape and v.dtype == value.dtype and v.device == value.device
                for v in column
            ):
                return None
            tensors[key] = torch.stack(column)
        else:
            if any(isinstance(v, Tensor) or v != value for v in column):
                return None
            constants[key] = value
    return StackedTasks(tensors, constants, len(tasks)) if tensors else None


class BilevelModule(L.LightningModule):
    """A LightningModule for bilevel optimization with manual optimization.

    The module's own parameters are the hyperparameters ``alpha`` (e.g. a backbone), stepped by the optimizer of
    :meth:`configure_optimizers` (Adam by default). Each training step takes a meta-batch of tasks, runs the
    ``T``-step inner loop of each task with the differentiable ``inner_optimizer``, lets ``estimator`` compute
    its hypergradient, accumulates the mean over the tasks into the hyperparameters' ``.grad``, clips it if asked,
    and steps the outer optimizer.

    A subclass writes what is specific to its problem:

    - the inner model: either an ``nn.Module`` assigned as ``self.inner_model = InnerModel(module, init=...)`` (the
      losses then receive ``model``, the module bound to the current inner parameters: ``model(x)``; ``init`` says
      where the inner loop starts, ``"learned"`` making ``w_0`` a hyperparameter as in MAML; see
      :class:`~lightning_hypergrad.inner_model.InnerModel`), or a flat list of tensors, with :meth:`init_params`
      (``w_0`` of a task; the losses then receive that list as ``params``);
    - :meth:`inner_loss` and :meth:`outer_loss` (``L_train``, ``L_val``);
    - optionally :meth:`features`, the part that depends on the hyperparameters alone (computed once per task,
      e.g. a backbone's features of the task's images); the losses then receive it as ``h``;
    - optionally :meth:`task_metrics` (per-task numbers to log, e.g. query accuracy).

    Logged: ``train/outer_loss``, ``train/hypergrad_norm``, ``train/seconds_per_step`` (by a
    :class:`~lightning_hypergrad.callbacks.StepTimer` the module adds), the task metrics under
    ``train/``, and, in validation and test, each task metric's mean and 95% confidence interval over the tasks
    (``val/acc``, ``val/acc_ci95``).

    Args:
        estimator: the hypergradient estimator, or its spec string (``"greedy(0.99)"``, ``"t1t2"``, see
            :func:`~lightning_hypergrad.get_estimator`); default ``"rmd(checkpoint_every='sqrt')"``
            (``DEFAULT_ESTIMATOR``), exact reverse mode with O(P sqrt(T)) memory: on the project's measurements the
            exact hypergradient was the best or level with it in four of the eight settings compared, Greedy(0.99) in
            one (the README's "Which to use").
        inner_optimizer: the differentiable inner optimizer (default ``SGD(lr=0.1, momentum=0.9)``).
        inner_steps: ``T``, the number of inner steps per task.
        meta_batch_size: tasks per outer step; ``None`` takes the data module's ``meta_batch_size`` (the data module
            batches the tasks; a value set here must agree with it, see :meth:`settings_from_data`).
        outer_lr: learning rate of the default outer optimizer (Adam).
        gradient_clip_val: clip the hypergradient (Lightning's ``clip_gradients``) at this value; ``None``: no clip.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        nonfinite: what happens on NaN or infinite numbers (e.g. an exploding inner learning rate). In training,
            the hypergradient is checked before the outer step: ``"skip"`` skips the outer step, warns once on the
            console and counts it in ``train/skipped_steps``; ``"raise"`` raises a ``FloatingPointError``. The
            hyperparameters are never updated with a non-finite value. In validation and test, tasks with a
            non-finite number are counted in ``val/nonfinite_tasks`` (``test/...``) and make the metric's mean NaN
            (never the mean of the finite tasks alone); ``"skip"`` warns once and goes on (checkpoints are written
            as usual), ``"raise"`` raises.
        online: carry the inner parameters and the inner optimizer's state from one outer step to the next
            (the model keeps training between hyperparameter updates, as in Luketina et al. 2016) instead of
            starting each task from :meth:`init_params`. Needs one task per meta-batch; the carried state is
            saved in checkpoints.
        batch_tasks: run the inner loops of a meta-batch's tasks together, as one problem whose inner parameters
            are the tasks' parameters stacked along a first (task) dimension: the losses are the sums of the
            per-task losses, each computed by ``torch.func.vmap`` over :meth:`inner_loss`, :meth:`outer_loss`
            and :meth:`task_metrics`, so each inner step issues one set of kernels for the whole meta-batch. The
            tasks' problems are independent and every inner optimizer acts element-wise, so the hypergradient is
            the one-by-one path's (up to the order of floating-point sums). The tasks are stacked by
            :meth:`stack_tasks` (dicts with equal keys and tensor shapes); the module runs them one by one where
            they cannot be stacked, where the estimator's result is not a sum over the tasks
            (``estimator.batchable`` is false: ``ConjugateGradient`` and ``Neumann(scale="auto")``, whose steps
            or scale depend on the whole problem), in online mode, where the inner optimizer's settings are
            hyperparameters, and with a learned initialization. The losses and metrics must be written with
            operations ``vmap`` supports (no ``.item()``, no data-dependent Python branches). :meth:`features` is
            still called once per task, and the graphs of all the tasks' features stay alive until the
            hypergradient's backward pass: the memory of that part grows with the meta-batch (one by one, each
            task's is freed after its hypergradient); ``batch_tasks=False`` is the memory-frugal choice.

    Raises:
        ValueError: a setting out of its range (the message names it).
    """

    def __init__(
        self,
        estimator: HypergradEstimator | str | None = None,
        inner_optimizer: DifferentiableOptimizer | None = None,
        inner_steps: int = 10,
        meta_batch_size: int | None = None,
        outer_lr: float = 1e-3,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        nonfinite: str = "skip",
        online: bool = False,
        batch_tasks: bool = False,
    ) -> None:
        super().__init__()
        check_int("inner_steps (T)", inner_steps)
        if meta_batch_size is not None:
            check_int("meta_batch_size (or null to take the data module's)", meta_batch_size)
        check_positive_number("outer_lr", outer_lr)
        if gradient_clip_val is not None:
            check_positive_number("gradient_clip_val (or null: no clipping)", gradient_clip_val)
        check_choice("nonfinite", nonfinite, ("skip", "raise"))
        check_choice("gradient_clip_algorithm", gradient_clip_algorithm, ("norm", "value"))
        self.automatic_optimization = False
        if isinstance(estimator, str):
            estimator = get_estimator(estimator)
        self.estimator = estimator if estimator is not None else get_estimator(DEFAULT_ESTIMATOR)
        self.inner_optimizer = inner_optimizer if inner_optimizer is not None else SGD(lr=0.1, momentum=0.9)
        if not isinstance(self.estimator, HypergradEstimator):
            raise TypeError(
                "estimator must be a HypergradEstimator (e.g. lightning_hypergrad.Greedy) or a spec string such as "
                f"'greedy(0.99)', got {estimator!r}"
            )
        if not isinstance(self.inner_optimizer, DifferentiableOptimizer):
            raise TypeError(
                "inner_optimizer must be a differentiable optimizer (lightning_hypergrad.SGD, Adam or AdamW), got "
                f"{inner_optimizer!r}"
            )
        self.inner_steps = inner_steps
        self.meta_batch_size = meta_batch_size
        self.outer_lr = float(outer_lr)
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.nonfinite = nonfinite
        self.online = bool(online)
        if not isinstance(batch_tasks, bool):
            raise TypeError(f"batch_tasks must be true or false, got {batch_tasks!r}")
        self.batch_tasks = batch_tasks
        self.carried_params: list[Tensor] | None = None
        self.carried_state: OptimizerState | None = None
        self.skipped_steps = 0
        self._checked = False
        self.evaluation = TaskMetrics()
        self._warned: set[str] = set()
        self._last_epoch_end: int | None = None

    # ----------------------------------------------------------------- what a subclass writes
    def init_params(self, task: Task) -> list[Tensor]:
        """The initial inner parameters ``w_0`` of ``task``."""
        raise NotImplementedError(f"{type(self).__name__} must implement init_params(task)")

    def inner_loss(self, params: Sequence[Tensor], h: Sequence[Tensor], task: Task) -> Tensor:
        """``L_train(w, h)`` on ``task``; ``h`` is :meth:`features` or the hyperparameters.

        With an :class:`~lightning_hypergrad.inner_model.InnerModel` as ``self.inner_model``, ``params`` is the
        model bound to the current inner parameters (call it: ``params(x)``); so in :meth:`outer_loss` and
        :meth:`task_metrics`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement inner_loss(params, h, task)")

    def outer_loss(self, params: Sequence[Tensor], h: Sequence[Tensor], task: Task) -> Tensor:
        """``L_val(w, h)`` on ``task``."""
        raise NotImplementedError(f"{type(self).__name__} must implement outer_loss(params, h, task)")

    def features(self, task: Task) -> list[Tensor] | None:
        """The part of the problem that depends on the hyperparameters alone, or ``None`` (the default).

        When a subclass returns tensors here (computed from the module's parameters, e.g. ``self.backbone(x)``),
        the losses receive them as ``h``, and they are computed and differentiated once per task.
        """
        return None

    def stacked_features(self, stacked: StackedTasks) -> list[Tensor] | None:
        """:meth:`features` of all the stacked tasks at once (``batch_tasks``), or ``None`` (the default): one call
        of :meth:`features` per task, stacked.

        An override returns each tensor with a first (task) dimension, equal to stacking the tasks' own
        :meth:`features`, including what they do to buffers (:class:`~lightning_hypergrad.FewShotClassifier` runs
        its backbone once over every task's images, with per-task batch norm).
        """
        return None

    def task_metrics(self, params: Sequence[Tensor], h: Sequence[Tensor], task: Task) -> dict[str, Tensor]:
        """Numbers to log for one task after its inner loop (e.g. ``{"acc": ...}``); none by default."""
        return {}

    def hyperparameters(self) -> list[Tensor]:
        """The hyperparameters ``alpha``: the module's parameters that require grad."""
        return [p for p in self.parameters() if p.requires_grad]

    def split_tasks(self, batch: Any) -> list[Task]:
        """The tasks of a meta-batch (see :func:`split_meta_batch`)."""
        return split_meta_batch(batch)

    def stack_tasks(self, tasks: Sequence[Task]) -> StackedTasks | None:
        """The tasks as one :class:`StackedTasks` for ``batch_tasks``, or ``None`` to run them one by one."""
        return stack_tasks(tasks)

    # ----------------------------------------------------------------- the engine
    def _uses_features(self) -> bool:
        return type(self).features is not BilevelModule.features

    def _inner_model(self) -> InnerModel | None:
        inner = getattr(self, "inner_model", None)
        return inner if isinstance(inner, InnerModel) else None

    def _learned_init(self) -> bool:
        inner = self._inner_model()
        return inner is not None and inner.init == "learned"

    def _bound(self, fn):
        """``fn(w, h, task)`` for the flat list ``w``: ``fn`` itself, or ``fn`` given the inner model bound to ``w``."""
        inner = self._inner_model()
        if inner is None:
            return fn
        return lambda w, h, task: fn(inner.bind(w), h, task)

    def make_problem(self, task: Task, cache: dict | None = None) -> BilevelProblem:
        """The :class:`BilevelProblem` of one task; ``cache['h']`` receives the features when computed."""
        cache = {} if cache is None else cache
        inner = self._inner_model()
        carried = self.online and self.carried_params is not None
        learned = self._learned_init() and not carried
        # a learned w_0 with features: the problem's h is the features followed by the inner model's parameters,
        # and the losses receive the features alone (``split``)
        tail = inner.parameter_tensors() if learned and self._uses_features() else []
        cache["split"] = split = (lambda h: list(h)[: len(h) - len(tail)]) if tail else list
        features = None
        if self._uses_features():

            def features():
                cache["h"] = self.features(task)
                return [*cache["h"], *tail]

        if carried:  # a checkpoint restores them on the CPU
            self.carried_params = [p.to(self.device) for p in self.carried_params]
            self.carried_state = self.carried_state.replace([t.to(self.device) for t in self.carried_state.tensors()])
            init = self.carried_params
        elif tail:
            init = lambda h: list(h)[len(h) - len(tail) :]  # noqa: E731
        elif inner is not None:
            init = inner.init_params(self.hyperparameters())
        else:
            init = self.init_params(task)
        inner_loss, outer_loss = self._bound(self.inner_loss), self._bound(self.outer_loss)
        return BilevelProblem(
            inner_loss=lambda w, h: inner_loss(w, split(h), task),
            outer_loss=lambda w, h: outer_loss(w, split(h), task),
            hyperparameters=self.hyperparameters(),
            init_params=init,
            optimizer=self.inner_optimizer,
            steps=self.inner_steps,
            features=features,
            init_state=self.carried_state if carried else None,
        )

    def meta_gradient(self, tasks: Sequence[Task], estimator: HypergradEstimator | None = None) -> MetaGradient:
        """The mean hypergradient over ``tasks`` and the mean of the task metrics (with ``outer_loss``).

        The tasks run together when ``batch_tasks`` allows it (see :class:`BilevelModule`), else one by one. The
        metrics stay tensors on the module's device: nothing here waits for the device.

        Nothing of the module changes except batch norm's running statistics (as in any forward pass), so that a
        callback can compute a reference hypergradient for the same meta-batch with another ``estimator``.
        """
        estimator = estimator or self.estimator
        if self.online and len(tasks) != 1:
            raise ValueError(
                f"online=True carries one inner model from step to step, but the meta-batch holds {len(tasks)} "
                "tasks; use meta_batch_size 1 (or online=False)"
            )
        stacked = self._stacked(tasks, estimator)
        if stacked is not None:
            return self._meta_gradient_stacked(tasks, stacked, estimator)
        alpha = self.hyperparameters()
        total = [torch.zeros_like(a) for a in alpha]
        sums: dict[str, Tensor] = {}
        result = None
        for task in tasks:
            cache: dict = {}
            problem = self.make_problem(task, cache)
            result = estimator(problem, check=not self._checked, check_finite=False)
            self._checked = True
            for t, g in zip(total, result.hypergrads):
                t.add_(g)
            h = [x.detach() for x in cache["h"]] if "h" in cache else [a.detach() for a in alpha]
            with torch.no_grad():
                metrics = {"outer_loss": result.loss, **self._bound(self.task_metrics)(result.params, h, task)}
            for key, value in metrics.items():
                value = _as_float(value).detach().to(self.device).reshape(())
                sums[key] = value if key not in sums else sums[key] + value
        n = max(len(tasks), 1)
        return MetaGradient(
            hypergrads=[t / n for t in total],
            metrics={k: v / n for k, v in sums.items()},
            params=[] if result is None else result.params,
            state=None if result is None else result.state,
        )

    def _stacked(self, tasks: Sequence[Task], estimator: HypergradEstimator) -> StackedTasks | None:
        if not self.batch_tasks or self.online or len(tasks) < 2 or not estimator.batchable:
            return None
        if self.inner_optimizer.hyper_settings() or self._learned_init():
            return None
        return self.stack_tasks(tasks)

    def _meta_gradient_stacked(
        self, tasks: Sequence[Task], stacked: StackedTasks, estimator: HypergradEstimator
    ) -> MetaGradient:
        """:meth:`meta_gradient` for ``tasks``, stacked into one problem as ``stacked`` (``batch_tasks``)."""
        cache: dict = {}
        features = None
        if self._uses_features():

            def features():
                together = self.stacked_features(stacked)
                if together is None:
                    per_task = [self.features(task) for task in tasks]
                    together = [torch.stack(column) for column in zip(*per_task)]
                cache["h"] = list(together)
                return cache["h"]

        h_dim = 0 if self._uses_features() else None

        def summed(fn):
            fn = self._bound(fn)

            def per_task(w, h, tensors):
                return fn(w, h, stacked.task(tensors)).reshape(())

            batched = torch.func.vmap(per_task, in_dims=(0, h_dim, 0))
            return lambda w, h: batched(list(w), list(h), stacked.tensors).sum()

        inner = self._inner_model()
        per_task_init = (inner.initial() if inner is not None else self.init_params(task) for task in tasks)
        init = [torch.stack(column) for column in zip(*per_task_init)]
        problem = BilevelProblem(
            inner_loss=summed(self.inner_loss),
            outer_loss=summed(self.outer_loss),
            hyperparameters=self.hyperparameters(),
            init_params=init,
            optimizer=self.inner_optimizer,
            steps=self.inner_steps,
            features=features,
        )
        result = estimator(problem, check=not self._checked, check_finite=False)
        self._checked = True
        n = stacked.size
        h = [x.detach() for x in cache["h"]] if "h" in cache else [a.detach() for a in self.hyperparameters()]
        with torch.no_grad():
            metrics = torch.func.vmap(
                lambda w, hh, tensors: self._bound(self.task_metrics)(w, hh, stacked.task(tensors)),
                in_dims=(0, h_dim, 0),
            )(result.params, h, stacked.tensors)
        means = {"outer_loss": result.loss / n}
        means.update({k: _as_float(v).detach().to(self.device).mean() for k, v in metrics.items()})
        return MetaGradient(
            hypergrads=[g / n for g in result.hypergrads],
            metrics=means,
            params=[p[-1] for p in result.params],
            state=result.state.replace([x[-1] for x in result.state.tensors()]),
        )

    def adapt(self, task: Task) -> tuple[list[Tensor], list[Tensor]]:
        """Run the inner loop of ``task`` without any hypergradient; the final parameters and ``h``.

        In online mode, once training has started, the inner model is the one being trained: its carried
        parameters are returned as they are, without further inner steps.
        """
        cache: dict = {}
        problem = self.make_problem(task, cache)
        with torch.no_grad():
            h = problem.features() if problem.features is not None else problem.hyperparameters
            h = [x.detach() for x in h]
        if self.online and self.carried_params is not None:
            return [p.detach().to(self.device) for p in self.carried_params], cache["split"](h)
        trajectory = unroll(problem, h, lambda t: StepMode.CONSTANT)
        return trajectory.params, cache["split"](h)

    # ----------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str) -> None:
        if self._trainer is not None and str(self.trainer.precision) in ("16-mixed", "16", "16-true"):
            raise ValueError(
                f"trainer.precision={self.trainer.precision!r} is not supported by BilevelModule: the hypergradients "
                "are taken with torch.autograd.grad through the inner loop, where Lightning's fp16 loss scaling does "
                "not reach, so small gradients would underflow silently. Use precision: bf16-mixed (CPU, and GPUs from "
                "the A100 on) or 32-true"
            )
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(datamodule, "meta_batch_size"):
            self.settings_from_data("meta_batch_size")
        self.check_inner_model()

    def check_inner_model(self) -> None:
        """Refuse, before any work, an estimator that defines no hypergradient for a learned initialization.

        :meth:`setup` calls it; a subclass that builds its inner model in ``setup`` calls it again after.
        """
        if self._learned_init():
            self.estimator.check_learned_init()

    def problem_outline(self) -> BilevelProblem:
        """A problem with this module's hyperparameters, inner optimizer, T and kind of initialization, and no data:
        what an estimator's :meth:`~lightning_hypergrad.HypergradEstimator.validate` looks at, before any task."""
        return BilevelProblem(
            inner_loss=lambda w, h: w[0].sum(),
            outer_loss=lambda w, h: w[0].sum(),
            hyperparameters=self.hyperparameters(),
            init_params=(lambda h: list(h)) if self._learned_init() else [torch.zeros(1)],
            optimizer=self.inner_optimizer,
            steps=self.inner_steps,
        )

    def settings_from_data(self, *names: str) -> None:
        """Share the settings ``names`` with the data module: the one mechanism between a module and its data.

        Each setting that is ``None`` on the module takes the data module's attribute of that name; a setting given
        on both sides must agree. Call it in ``setup`` (:meth:`BilevelModule.setup` does for ``meta_batch_size``,
        :class:`~lightning_hypergrad.FewShotClassifier` for ``ways`` and ``image_shape``). The values taken are
        stored as :meth:`save_hyperparameters` stores them, so loggers and checkpoints see them, Lightning finds no
        conflict with the data module's hyperparameters, and ``load_from_checkpoint`` rebuilds the same module.

        Raises:
            ValueError: a setting set on neither side, or set differently on both (the message names it).
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        owner = type(self).__name__
        taken = {}
        for name in names:
            theirs = getattr(datamodule, name, None)
            theirs = tuple(theirs) if isinstance(theirs, (list, tuple)) else theirs
            ours = getattr(self, name)
            if theirs is None:
                if ours is None:
                    raise ValueError(f"{owner} {name} is not set and the data module has no `{name}`: set model {name}")
                continue
            if ours is not None and ours != theirs:
                raise ValueError(
                    f"{owner} {name}={ours} disagrees with the data module's {name}={theirs}; set model {name} to "
                    f"{theirs}, or remove it from the config (it is then taken from the data)"
                )
            setattr(self, name, theirs)
            taken[name] = theirs
        if taken:  # what save_hyperparameters stores, without its search of the callers' frames for __init__
            # arguments: outside __init__, Lightning before 2.6 fails there with a KeyError
            self.hparams.update(taken)
            if getattr(self, "_hparams_initial", None) is not None:  # what the loggers are given
                self._hparams_initial.update(copy.deepcopy(taken))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.outer_lr)

    def configure_callbacks(self) -> list[L.Callback]:
        """A :class:`StepTimer` (it logs ``train/seconds_per_step``) unless the trainer already has one."""
        if self._trainer is not None and any(isinstance(c, StepTimer) for c in self.trainer.callbacks):
            return []
        return [StepTimer()]

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """One outer step: the inner loops, the hypergradient into ``.grad``, the outer optimizer's step.

        Returns:
            ``{"loss": 0, "hypergrad": [...]}``: ``hypergrad`` is the step's hypergradient (the mean over the tasks
            and the processes, detached), which callbacks receive as ``outputs["hypergrad"]`` in
            ``on_train_batch_end`` (as :class:`~lightning_hypergrad.HypergradCallback` does).
        """
        tasks = self.split_tasks(batch)
        world = self.trainer.world_size if self._trainer is not None else 1
        if self.meta_batch_size is not None and world == 1 and len(tasks) != self.meta_batch_size:
            raise ValueError(
                f"training step {self.global_step}: the meta-batch holds {len(tasks)} tasks, but meta_batch_size is "
                f"{self.meta_batch_size}; make the dataloader yield {self.meta_batch_size} tasks a batch, or set "
                f"meta_batch_size to {len(tasks)} (or null, to take the data module's)"
            )
        optimizer = self.optimizers()
        optimizer.zero_grad()
        with warnings.catch_warnings():  # the module applies its own policy below, once per step
            warnings.filterwarnings("ignore", message=".*NaN or infinite", category=RuntimeWarning)
            step = self.meta_gradient(tasks)
        if self.online:  # the inner model trains on: the next step starts where this one ended
            self.carried_params = [p.detach().clone() for p in step.params]
            self.carried_state = step.state
        hypergrads = average_across_processes(step.hypergrads, self, self._trainer)
        metrics = step.metrics
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in hypergrads]))
        if not bool(torch.isfinite(norm)):
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"the hypergradient of training step {self.global_step} has NaN or infinite entries, and "
                    "nonfinite='raise'; the inner loop has probably diverged: lower the inner optimizer's learning "
                    "rate or inner_steps, or set nonfinite: skip to skip such steps"
                )
            self.skipped_steps += 1
            self._warn_once(
                "skipped_step",
                f"training step {self.global_step}: the hypergradient has NaN or infinite entries (the inner loop has "
                "probably diverged: lower the inner optimizer's learning rate or inner_steps), so the outer step is "
                "skipped (nonfinite='skip'); later skips are counted in train/skipped_steps without a warning",
            )
            # every .grad is None, so the optimizer leaves the hyperparameters and its state as they are; the call
            # keeps Lightning's step counter (max_steps, schedulers, checkpoints) in step with the batches
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()
        else:
            for a, g in zip(self.hyperparameters(), hypergrads):
                a.grad = g if a.grad is None else a.grad + g
            if self.gradient_clip_val is not None:
                self.clip_gradients(
                    optimizer,
                    gradient_clip_val=self.gradient_clip_val,
                    gradient_clip_algorithm=self.gradient_clip_algorithm,
                )
            optimizer.step()
            self._step_schedulers("step")
        batch_size = len(tasks)
        self.log("train/outer_loss", metrics.pop("outer_loss"), prog_bar=True, batch_size=batch_size)
        for key, value in metrics.items():
            self.log(f"train/{key}", value, prog_bar=key == "acc", batch_size=batch_size)
        self.log("train/hypergrad_norm", norm, batch_size=batch_size)
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=batch_size)
        return {"loss": torch.zeros(()), "hypergrad": [g.detach() for g in hypergrads]}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = self.carried_state
        checkpoint["lightning_hypergrad"] = {
            "skipped_steps": self.skipped_steps,
            "carried_params": self.carried_params,
            "carried_state": None if state is None else {"step": state.step, "buffers": state.buffers},
            "estimator": self.estimator.state_dict() if hasattr(self.estimator, "state_dict") else None,
            "last_epoch_end": self._last_epoch_end,
            "method": self._method(),
        }

    def _method(self) -> dict[str, Any]:
        """The settings of the hypergradient computation, as strings: what a checkpoint says it was written with."""
        return {
            "estimator": str(self.estimator),
            "inner_optimizer": repr(self.inner_optimizer),
            "inner_steps": str(self.inner_steps),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_weights(checkpoint.get("state_dict"))
        saved = checkpoint.get("lightning_hypergrad", {})
        written, ours = saved.get("method") or {}, self._method()
        changed = [f"{k}: {ours[k]} (checkpoint: {v})" for k, v in written.items() if k in ours and ours[k] != v]
        if changed:
            rank_zero_warn(
                f"the checkpoint was written with other settings of the hypergradient than this module's: "
                f"{'; '.join(changed)}; the run goes on with this module's",
                category=UserWarning,
            )
        self.skipped_steps = saved.get("skipped_steps", 0)
        self.carried_params = saved.get("carried_params")
        state = saved.get("carried_state")
        self.carried_state = None if state is None else OptimizerState(state["step"], state["buffers"])
        self._last_epoch_end = saved.get("last_epoch_end")
        if saved.get("estimator") is not None and hasattr(self.estimator, "load_state_dict"):
            self.estimator.load_state_dict(saved["estimator"])  # e.g. AutoGreedy's fitted discount

    def _check_weights(self, state_dict: dict[str, Tensor] | None) -> None:
        """One line, instead of Lightning's wall of missing keys, where a checkpoint holds another model's weights."""
        if state_dict is None:
            return
        ours = self.state_dict()
        missing = [k for k in ours if k not in state_dict]
        unexpected = [k for k in state_dict if k not in ours]
        reshaped = [
            f"{k} {tuple(state_dict[k].shape)} (this model: {tuple(v.shape)})"
            for k, v in ours.items()
            if k in state_dict and isinstance(state_dict[k], Tensor) and state_dict[k].shape != v.shape
        ]
        if not (missing or unexpected or reshaped):
            return
        parts = []
        if missing:
            parts.append(f"{len(missing)} of this model's weights are not in it ({', '.join(missing[:3])}...)")
        if unexpected:
            parts.append(
                f"it holds {len(unexpected)} weights this model does not have ({', '.join(unexpected[:3])}...)"
            )
        if reshaped:
            parts.append(f"{len(reshaped)} have other shapes ({'; '.join(reshaped[:2])})")
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        which = f"the checkpoint {path}" if path else "the checkpoint"
        raise ValueError(
            f"{which} was written by another model than {type(self).__name__} with these settings: "
            f"{'; '.join(parts)}; give a checkpoint of this config's model, or the settings it was written with"
        )

    def on_train_epoch_end(self) -> None:
        # a run resumed from a checkpoint written at the end of an epoch ends that epoch again (Lightning repeats the
        # epoch-end hooks); its schedulers were stepped for it before the checkpoint
        if self._trainer is not None and self.current_epoch == self._last_epoch_end:
            return
        self._last_epoch_end = self.current_epoch
        self._step_schedulers("epoch")

    def _step_schedulers(self, interval: str) -> None:
        if self._trainer is None:
            return
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == interval and (
                self.trainer.global_step % config.frequency == 0 or interval == "epoch"
            ):
                config.scheduler.step()

    def evaluate_task(self, task: Task) -> dict[str, Tensor]:
        """``outer_loss`` and the task metrics of ``task`` after :meth:`adapt` (the trained network, online)."""
        with torch.inference_mode(False), torch.enable_grad():
            task = clone_task(task)
            params, h = self.adapt(task)
            with torch.no_grad():
                outer_loss, task_metrics = self._bound(self.outer_loss), self._bound(self.task_metrics)
                return {"outer_loss": outer_loss(params, h, task), **task_metrics(params, h, task)}

    def _evaluate(self, batch: Any, stage: str) -> None:
        for task in self.split_tasks(batch):
            self.evaluation.update(stage, self.evaluate_task(task), self.device)

    def _log_evaluation(self, stage: str) -> None:
        summary = self.evaluation.summary(stage)
        for key, (mean, ci95) in summary.metrics.items():
            self.log(f"{stage}/{key}", mean, prog_bar=key == "acc")
            self.log(f"{stage}/{key}_ci95", ci95)
        if not summary.tasks:
            return
        self.log(f"{stage}/nonfinite_tasks", float(summary.nonfinite_tasks))
        if summary.nonfinite_tasks:
            message = (
                f"{summary.nonfinite_tasks} of the {summary.tasks} {_STAGE_NAMES.get(stage, stage)} tasks have NaN or "
                f"infinite numbers (their inner loop has probably diverged: lower the inner optimizer's learning rate "
                f"or inner_steps); {stage}/outer_loss is logged as NaN and the count as {stage}/nonfinite_tasks"
            )
            if self.nonfinite == "raise":
                raise FloatingPointError(f"{message}; nonfinite='raise' stops the run (nonfinite: skip goes on)")
            self._warn_once(f"nonfinite_{stage}", message)

    def _warn_once(self, key: str, message: str) -> None:
        """A console warning, once per run and kind (on the main process)."""
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")


def _as_float(value: Any) -> Tensor:
    """A metric as a floating-point tensor (a count or a flag becomes the default float dtype)."""
    value = torch.as_tensor(value)
    return value if value.is_floating_point() else value.to(torch.get_default_dtype())
