"""``BilevelModule``: the LightningModule that runs the inner loops and steps the hyperparameters.

Lightning's part only: the subclass hooks, setup, the training step (the meta-gradient into ``.grad``, the
processes' average, the non-finite policy, clipping, the outer step and its schedulers). The meta-gradient itself is
:mod:`lightning_hypergrad.meta_gradient` (no Lightning), the tasks' stacking :mod:`lightning_hypergrad.meta_batch`,
the checkpoint hooks :mod:`lightning_hypergrad.checkpointing`, validation and test
:mod:`lightning_hypergrad.evaluation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_hypergrad._checks import check_choice, check_int, check_positive_number
from lightning_hypergrad.callbacks.step_timer import StepTimer
from lightning_hypergrad.checkpointing import CheckpointHooks
from lightning_hypergrad.data_settings import DataSettings
from lightning_hypergrad.distributed import average_across_processes
from lightning_hypergrad.estimators import HypergradEstimator, get_estimator
from lightning_hypergrad.evaluation import EvaluationHooks, TaskMetrics
from lightning_hypergrad.meta_batch import StackedTasks, Task, split_meta_batch, stack_tasks
from lightning_hypergrad.optim import SGD, DifferentiableOptimizer, OptimizerState
from lightning_hypergrad.schedulers import check_schedulers, step_schedulers
from lightning_hypergrad.task_problems import TaskProblems, check_compile_losses

DEFAULT_ESTIMATOR = "rmd(checkpoint_every='sqrt')"
"""The estimator of a :class:`BilevelModule` built without one (see the README's "Which to use")."""


class BilevelModule(TaskProblems, DataSettings, CheckpointHooks, EvaluationHooks, L.LightningModule):
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
            starting each task from :meth:`init_params`. Needs one task per meta-batch and an initialization that is
            not learned (the carried parameters replace ``w_0``, so a learned one would get no hypergradient): both
            are refused at setup, before any work. The carried state is saved in checkpoints.
        batch_tasks: run the inner loops of a meta-batch's tasks together, as one problem whose inner parameters
            are the tasks' parameters stacked along a first (task) dimension: the losses are the sums of the
            per-task losses, each computed by ``torch.func.vmap`` over :meth:`inner_loss`, :meth:`outer_loss`
            and :meth:`task_metrics`, so each inner step issues one set of kernels for the whole meta-batch. The
            tasks' problems are independent and every inner optimizer acts element-wise, so the hypergradient is
            the one-by-one path's (up to the order of floating-point sums). The tasks are stacked by
            :meth:`stack_tasks` (dicts with equal keys and tensor shapes). They run one by one instead, and the
            module says so once on the console with the reason, where: they cannot be stacked; the estimator's
            result is not a sum over the tasks (``estimator.batchable`` is false: ``ConjugateGradient`` and
            ``Neumann(scale="auto")``, whose steps or scale depend on the whole problem); in online mode (one task);
            where the inner optimizer's settings are hyperparameters (a setting computed from ``h`` is one value for
            all the stacked tasks, not one per task); and with a learned initialization (one ``w_0`` shared by
            every task, which the stacked problem would need broadcast along the task dimension). The losses and
            metrics must be written with
            operations ``vmap`` supports (no ``.item()``, no data-dependent Python branches). :meth:`features` is
            still called once per task, and the graphs of all the tasks' features stay alive until the
            hypergradient's backward pass: the memory of that part grows with the meta-batch (one by one, each
            task's is freed after its hypergradient); ``batch_tasks=False`` is the memory-frugal choice.
        compile_losses: run :meth:`inner_loss`, :meth:`outer_loss` and :meth:`features` through ``torch.compile``
            (static shapes; compiled on first use, which takes tens of seconds on a CPU). Only for estimators without
            double backward (``fo``, ``t1t2_fd``, ``greedy_fd(gamma)``, ``sama``): AOTAutograd, which compiles the
            backward, cannot be differentiated again, so the others are refused here. A callback's reference
            estimator that needs double backward (``HypergradCallback``'s ``rmd``) runs the hooks eager. Not with
            ``batch_tasks``.

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
        compile_losses: bool = False,
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
        self.compile_losses = check_compile_losses(compile_losses, self.estimator, batch_tasks)
        self.carried_params: list[Tensor] | None = None
        self.carried_state: OptimizerState | None = None
        self.skipped_steps = 0
        self._checked = False  # whether the hyperparameters' dependence on the losses was checked
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
        if self.online and self.meta_batch_size not in (None, 1):
            raise ValueError(
                f"online=True carries one inner model from step to step, but meta_batch_size is "
                f"{self.meta_batch_size}; set meta_batch_size 1 (model and data), or online: false"
            )
        self.check_inner_model()

    def check_inner_model(self) -> None:
        """Refuse, before any work, what defines no hypergradient: an estimator without a term for a learned
        initialization, online mode with a learned initialization, an ``init_params`` beside an ``inner_model``.

        :meth:`setup` calls it; a subclass that builds its inner model in ``setup`` calls it again after.
        """
        if self._inner_model() is not None and type(self).init_params is not BilevelModule.init_params:
            raise ValueError(
                f"{type(self).__name__} has both an inner_model (InnerModel) and its own init_params; the inner "
                "loop starts where the InnerModel's init says, so init_params would be ignored: remove init_params "
                "(set InnerModel(init=...) instead), or drop inner_model and return the flat list from init_params"
            )
        if self._learned_init():
            if self.online:
                raise ValueError(
                    "online=True with a learned initialization (InnerModel init='learned'): from the second step on "
                    "the carried inner parameters replace w_0, so the initialization would get no hypergradient; use "
                    "online: false for MAML-style learning, or init 'fixed' with online"
                )
            if self._differentiates_init():  # with iMAML's proximal term, w_0 is a constant and phi in the loss
                self.estimator.check_learned_init()

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
        step = self.meta_gradient(tasks)  # not checked for NaN: the policy below applies, once per step
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
            # keeps Lightning's step counter (max_steps, checkpoints) in step with the batches, and the schedulers
            # below follow that counter, as they follow the batches in automatic optimization
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()
        else:
            for a, g in zip(self.hyperparameters(), hypergrads):
                a.grad = g  # zero_grad() above left every .grad None
            if self.gradient_clip_val is not None:
                self.clip_gradients(
                    optimizer,
                    gradient_clip_val=self.gradient_clip_val,
                    gradient_clip_algorithm=self.gradient_clip_algorithm,
                )
            optimizer.step()
        batch_size = len(tasks)
        self.log("train/outer_loss", metrics.pop("outer_loss"), prog_bar=True, batch_size=batch_size)
        for key, value in metrics.items():
            self.log(f"train/{key}", value, prog_bar=key == "acc", batch_size=batch_size)
        self.log("train/hypergrad_norm", norm, batch_size=batch_size)
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=batch_size)
        step_schedulers(self, "step", batch_idx)
        return {"loss": torch.zeros(()), "hypergrad": [g.detach() for g in hypergrads]}

    def on_fit_start(self) -> None:
        check_schedulers(self)

    def on_train_epoch_end(self) -> None:
        # a run resumed from a checkpoint written at the end of an epoch ends that epoch again (Lightning repeats the
        # epoch-end hooks); its schedulers were stepped for it before the checkpoint
        if self._trainer is not None and self.current_epoch == self._last_epoch_end:
            return
        self._last_epoch_end = self.current_epoch
        step_schedulers(self, "epoch", self.current_epoch)

    def _warn_once(self, key: str, message: str) -> None:
        """A console warning, once per run and kind (on the main process)."""
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning)
