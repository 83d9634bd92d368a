"""How a :class:`~lightning_hypergrad.BilevelModule` turns its hooks into each task's bilevel problem, as a mixin.

The module's hooks (the losses, ``features``, the inner model or ``init_params``) and settings become one
:class:`~lightning_hypergrad.meta_gradient.TaskFamily`; the meta-gradient of a meta-batch, the adaptation of an
evaluation task and the outline an estimator checks before any task are computed from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_hypergrad.estimators import HypergradEstimator
from lightning_hypergrad.hyper_module import HyperModule
from lightning_hypergrad.inner_loop import StepMode, unroll
from lightning_hypergrad.inner_model import InnerModel
from lightning_hypergrad.meta_batch import StackedTasks, Task
from lightning_hypergrad.meta_gradient import MetaGradient, TaskFamily, meta_gradient
from lightning_hypergrad.optim import OptimizerState
from lightning_hypergrad.problem import BilevelProblem


class TaskProblems:
    """The bilevel problem of each task, the meta-gradient of a meta-batch and the adaptation of one task."""

    def features(self, task: Task) -> list[Tensor] | None:
        """The part of the problem that depends on the hyperparameters alone, or ``None`` (the default).

        When a subclass returns tensors here (computed from the module's parameters, e.g. ``self.backbone(x)``),
        the losses receive them as ``h``, and they are computed and differentiated once per task.
        """
        return None

    def _uses_features(self) -> bool:
        return type(self).features is not TaskProblems.features

    def _inner_model(self) -> InnerModel | None:
        inner = getattr(self, "inner_model", None)
        return inner if isinstance(inner, InnerModel) else None

    def _learned_init(self) -> bool:
        inner = self._inner_model()
        return inner is not None and inner.init == "learned"

    def _differentiates_init(self) -> bool:
        """Whether the estimators differentiate ``w_0`` (a learned initialization without iMAML's proximal term)."""
        return self._learned_init() and self._inner_model().proximal is None

    def task_family(self, estimator: HypergradEstimator | None = None) -> TaskFamily:
        """How each task becomes a bilevel problem, from this module's hooks and settings (no Lightning involved).

        With ``compile_losses``, the losses and features are the compiled ones where ``estimator`` (default: the
        module's) takes no double backward; a reference estimator that does (the callback's) gets them eager.
        """
        inner = self._inner_model()
        hyperparameters = self.hyperparameters()
        if inner is None:
            init, bind, tail = self.init_params, list, []
        else:
            w0 = inner.init_params(hyperparameters) if not self._uses_features() else inner.initial()
            init, bind = (lambda task: w0), inner.bind
            tail = inner.parameter_tensors() if self._learned_init() and self._uses_features() else []
        if not self._uses_features():  # the losses receive the hyperparameters as h: bind module hyperparameters
            for module in self.modules():
                if isinstance(module, HyperModule):
                    module.attach(hyperparameters)
        names = {id(p): n for n, p in self.named_parameters()}
        estimator = estimator or self.estimator
        compiled = getattr(self, "compile_losses", False) and not estimator.capabilities.double_backward
        return TaskFamily(
            inner_loss=self._compiled("inner_loss") if compiled else self.inner_loss,
            outer_loss=self._compiled("outer_loss") if compiled else self.outer_loss,
            hyperparameters=hyperparameters,
            optimizer=self.inner_optimizer,
            steps=self.inner_steps,
            init=init,
            learned_tensors=tail,
            bind=bind,
            features=(self._compiled("features") if compiled else self.features) if self._uses_features() else None,
            stacked_features=self.stacked_features if self._uses_features() else None,
            task_metrics=self.task_metrics,
            hyperparameter_names=[names.get(id(a), f"hyperparameters[{i}]") for i, a in enumerate(hyperparameters)],
            proximal=None if inner is None else inner.proximal,
        )

    def _compiled(self, hook: str) -> Callable[..., Any]:
        """The hook ``inner_loss``, ``outer_loss`` or ``features`` through ``torch.compile`` (made once, static
        shapes: a few-shot protocol's tasks all have one shape)."""
        cache = self.__dict__.setdefault("_compiled_hooks", {})
        if hook not in cache:
            cache[hook] = torch.compile(getattr(self, hook), dynamic=False)
        return cache[hook]

    def _start(self) -> tuple[list[Tensor], OptimizerState] | None:
        """Online mode, once training has started: the carried inner parameters and state (on this device)."""
        if not self.online or self.carried_params is None:
            return None
        self.carried_params = [p.to(self.device) for p in self.carried_params]  # a checkpoint restores them on the CPU
        self.carried_state = self.carried_state.replace([t.to(self.device) for t in self.carried_state.tensors()])
        return self.carried_params, self.carried_state

    def make_problem(self, task: Task) -> BilevelProblem:
        """The :class:`BilevelProblem` of one task (online: from the carried inner parameters)."""
        return self.task_family().problem(task, self._start()).problem

    def meta_gradient(self, tasks: Sequence[Task], estimator: HypergradEstimator | None = None) -> MetaGradient:
        """The mean hypergradient over ``tasks`` and the mean of the task metrics (with ``outer_loss``).

        The tasks run together when ``batch_tasks`` allows it (see :class:`~lightning_hypergrad.BilevelModule`), else
        one by one. The metrics stay tensors on the module's device: nothing here waits for the device.

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
        step = meta_gradient(
            self.task_family(estimator),
            tasks,
            estimator,
            stacked=stacked,
            start=self._start(),
            check=not self._checked,
            device=self.device,
        )
        self._checked = True
        return step

    def _stacked(self, tasks: Sequence[Task], estimator: HypergradEstimator) -> StackedTasks | None:
        """The tasks stacked for ``batch_tasks``, or ``None`` (said once, with the reason, where they could not be)."""
        if not self.batch_tasks or len(tasks) < 2:
            return None
        reasons = [
            (self.online, "online mode carries one task's inner model"),
            (not estimator.batchable, f"{estimator} takes its steps or scale from the whole problem"),
            (bool(self.inner_optimizer.hyper_settings()), "the inner optimizer's settings are hyperparameters"),
            (self._learned_init(), "the initialization is learned (one w_0 shared by every task)"),
        ]
        reason = next((why for applies, why in reasons if applies), None)
        stacked = self.stack_tasks(tasks) if reason is None else None
        if stacked is None:
            reason = reason or "the tasks cannot be stacked (other keys, shapes or dtypes)"
            self._warn_once(f"unbatched:{reason}", f"batch_tasks=True: the tasks run one by one, since {reason}")
        return stacked

    def adapt(self, task: Task) -> tuple[list[Tensor], list[Tensor]]:
        """Run the inner loop of ``task`` without any hypergradient; the final parameters and ``h``.

        In online mode, once training has started, the inner model is the one being trained: its carried
        parameters are returned as they are, without further inner steps.
        """
        task_problem = self.task_family().problem(task, self._start())
        problem = task_problem.problem
        with torch.no_grad():
            h = problem.features() if problem.features is not None else problem.hyperparameters
            h = [x.detach() for x in h]
        if self.online and self.carried_params is not None:
            return [p.detach().to(self.device) for p in self.carried_params], task_problem.losses_h(h)
        trajectory = unroll(problem, h, lambda t: StepMode.CONSTANT)
        return trajectory.params, task_problem.losses_h(h)

    def problem_outline(self) -> BilevelProblem:
        """A problem with this module's hyperparameters, inner optimizer, T and kind of initialization, and no data:
        what an estimator's :meth:`~lightning_hypergrad.HypergradEstimator.validate` looks at, before any task."""
        return BilevelProblem(
            inner_loss=lambda w, h: w[0].sum(),
            outer_loss=lambda w, h: w[0].sum(),
            hyperparameters=self.hyperparameters(),
            init_params=(lambda h: list(h)) if self._differentiates_init() else [torch.zeros(1)],
            optimizer=self.inner_optimizer,
            steps=self.inner_steps,
        )


def check_compile_losses(compile_losses: object, estimator: HypergradEstimator, batch_tasks: bool) -> bool:
    """``compile_losses`` checked against the estimator and ``batch_tasks``: one line naming the fix."""
    if not isinstance(compile_losses, bool):
        raise TypeError(f"compile_losses must be true or false, got {compile_losses!r}")
    if compile_losses and estimator.capabilities.double_backward:
        from lightning_hypergrad.estimators.registry import capable_names

        raise ValueError(
            f"compile_losses=True: {estimator} differentiates through the inner gradient (double backward), which "
            "torch.compile's AOTAutograd cannot do; use an estimator without double backward "
            f"({capable_names('double_backward', having=False)}) or compile_losses=False"
        )
    if compile_losses and batch_tasks:
        raise ValueError("compile_losses=True does not run with batch_tasks=True; set one of them to false")
    return compile_losses
