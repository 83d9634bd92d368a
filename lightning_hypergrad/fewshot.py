"""Few-shot classifiers: ``FewShotClassifier`` (the paper's model: a backbone as hyperparameters, a head inside) and
``MAML`` (the whole network inside, its initialization learned)."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hypergrad._checks import check_choice, check_int
from lightning_hypergrad.estimators import HypergradEstimator
from lightning_hypergrad.inner_model import INITS, InnerModel, per_task_batch_norm
from lightning_hypergrad.module import BilevelModule, Task
from lightning_hypergrad.nets import BACKBONES, ConvBackbone, batch_statistics, build_backbone  # noqa: F401
from lightning_hypergrad.optim import DifferentiableOptimizer
from lightning_hypergrad.query_logits import QueryLogits

BackboneFactory = Callable[[tuple[int, int, int]], nn.Module]
"""``backbone(image_shape) -> nn.Module`` mapping images to flat features (its ``out_features``, where it has one,
is their size; otherwise one forward pass of zeros finds it)."""
HeadFactory = Callable[[int, int], nn.Module]
"""``head(in_features, ways) -> nn.Module``: a head class (``torch.nn.Linear``, ``lightning_hypergrad.nets.MLPHead``)
or any function of the two; in a config, the class path and its other arguments."""

EVAL_BATCH_NORM = ("running", "batch")
"""The values of ``FewShotClassifier(eval_batch_norm=...)``: the backbone's batch norm in validation and test."""

_BACKBONE_SIGNATURE = "backbone(image_shape) -> nn.Module"
_HEAD_SIGNATURE = "head(in_features, ways) -> nn.Module"


def _import_path(setting: str, path: str, signature: str, owner: str = "") -> Callable[..., nn.Module]:
    """The class or function that the dotted ``path`` names (``mypkg.nets.MyBackbone``), for the setting ``setting``
    (``backbone``, ``head``) that takes a callable ``signature``.

    Raises:
        ValueError: ``path`` does not import (no such module, or no such name in it); the message names the setting.
        TypeError: ``path`` names something that cannot be called.
    """
    label = f"{owner} {setting}" if owner else setting
    module_name, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError) as error:
        reason = f"{type(error).__name__}: {error}"
    else:
        reason = None if module_name else "not a dotted path"
    if reason is not None:
        raise ValueError(
            f"{label}={path!r} cannot be imported ({reason}): give the dotted path (module.name) of a class or a "
            f"function {signature}, in a module that Python can import (installed, or in a folder on PYTHONPATH)"
        )
    if not callable(found):
        raise TypeError(f"{label}={path!r} is a {type(found).__name__}, not a class or a function {signature}")
    return found


class FewShotClassifier(BilevelModule):
    """N-way few-shot classification as in the paper: the backbone is ``alpha``, the head is ``w``.

    For each task the head starts at ``w_0`` (zero for the default linear head) and is trained for ``T`` inner steps
    on the support set's features; the outer loss is the cross-entropy on the query set. The backbone's features of
    the support and query images are computed once per task (:meth:`features`), so every estimator costs about one
    backbone forward and backward per task. The backbone's batch norm uses the task's batch statistics in training
    (its running statistics are updated once per task) and, by default, the running statistics in validation and
    test (``eval_batch_norm``). The head is an :class:`~lightning_hypergrad.inner_model.InnerModel`: batch norm
    inside it always uses the batch's statistics.

    Validation and test run the inner loop on held-out tasks and log the query accuracy and its 95% confidence
    interval over the tasks (``val/acc``, ``val/acc_ci95``).

    Args:
        ways: classes per task; ``None`` takes the data module's ``ways`` when training starts.
        image_shape: ``(channels, height, width)``; ``None`` takes the data module's ``image_shape``.
        depth: number of convolutional blocks of the ``"conv"`` backbone.
        width: channels of each block of ``"conv"``; the base width of ``"resnet"``.
        backbone: ``"conv"`` (the paper's, default), ``"conv4"`` (4 x 64) or ``"resnet"``
            (see :mod:`lightning_hypergrad.nets`), or your own: ``backbone(image_shape) -> nn.Module`` returning
            flat features, a class or a function, given as itself or as its dotted path (``"mypkg.MyBackbone"``,
            also on the command line: ``--model.init_args.backbone mypkg.MyBackbone``). A dotted path is imported
            when the model is built, and kept in the checkpoint's hyperparameters.
        head: ``head(in_features, ways) -> nn.Module``, a class or a function, given as itself or as its dotted path
            (``"mypkg.my_head"``, ``--model.init_args.head mypkg.my_head``; a path is kept in the hyperparameters);
            ``None``: a linear head (``torch.nn.Linear``). In a config, a class with other arguments:
            ``head: {class_path: lightning_hypergrad.nets.MLPHead, init_args: {hidden: [64]}}``.
        head_init: where each task's head starts: ``"zeros"``, ``"fixed"`` (the head's own random initialization,
            drawn once) or ``"learned"`` (a hyperparameter beside the backbone, as ANIL learns it). ``None``:
            ``"zeros"`` for the linear head (the paper's), ``"fixed"`` for any other.
        estimator, inner_optimizer, inner_steps, meta_batch_size, outer_lr: see :class:`BilevelModule`.
        gradient_clip_val, gradient_clip_algorithm, nonfinite, batch_tasks: see :class:`BilevelModule`. The tasks
            of a meta-batch always share their shapes here, so ``batch_tasks=True`` runs them together; it is off by
            default, as it keeps every task's backbone activations alive at once (on 2 CPU cores, meta-batch 10:
            about 9x the peak memory for 1.0-1.2x the speed; see docs/scale.md).
        batch_backbone: with ``batch_tasks=True``, run the backbone once over every task's images, batch norm per
            task (:func:`~lightning_hypergrad.inner_model.per_task_batch_norm`: the same features, gradients and
            running statistics as one call per task), instead of once per task. ``None`` (default): on a GPU, where
            it issues one set of kernels instead of one per task; not on a CPU, where one pass over the whole
            meta-batch's activations is slower than ten cache-sized ones (3.5x on the cost study's problem, see
            docs/scale.md). ``True`` or ``False``: always or never.
        eval_batch_norm: the backbone's batch norm in validation and test: ``"running"`` (the default, also for
            ``None``) normalizes with the running statistics gathered in training; ``"batch"`` with the statistics
            of each task's images (its support and query together, one pass, as in training), leaving the running
            statistics as they are: the protocol of MAML's reference code and learn2learn's examples, which
            published few-shot numbers follow. The default is not that protocol, so numbers evaluated with it cannot
            be set beside published ones.

    Raises:
        ValueError: ``depth`` or ``width`` < 1, an unknown backbone, head_init or eval_batch_norm, a backbone or head
            path that does not import, or ``ways``/``image_shape`` disagreeing with the data module's.
        TypeError: a head, or a path of a backbone or a head, that cannot be called.
    """

    def __init__(
        self,
        ways: int | None = None,
        image_shape: tuple[int, int, int] | None = None,
        depth: int = 3,
        width: int = 32,
        backbone: str | BackboneFactory = "conv",
        head: str | HeadFactory | None = None,
        head_init: str | None = None,
        estimator: HypergradEstimator | str | None = None,
        inner_optimizer: DifferentiableOptimizer | None = None,
        inner_steps: int = 10,
        meta_batch_size: int | None = None,
        outer_lr: float = 1e-3,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        nonfinite: str = "skip",
        batch_tasks: bool = False,
        batch_backbone: bool | None = None,
        eval_batch_norm: str | None = None,
        compile_losses: bool = False,
    ) -> None:
        super().__init__(
            estimator=estimator,
            inner_optimizer=inner_optimizer,
            inner_steps=inner_steps,
            meta_batch_size=meta_batch_size,
            outer_lr=outer_lr,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
            nonfinite=nonfinite,
            batch_tasks=batch_tasks,
            compile_losses=compile_losses,
        )
        owner = type(self).__name__
        check_int("depth", depth, owner=owner)
        check_int("width", width, owner=owner)
        # a dotted path is imported here, into another variable: the hyperparameters keep the path
        backbone_factory = backbone
        if isinstance(backbone, str) and backbone not in BACKBONES:
            if "." not in backbone:
                raise ValueError(
                    f"{owner} backbone must be one of {', '.join(map(repr, BACKBONES))}, or the dotted path of a class "
                    f"or a function {_BACKBONE_SIGNATURE} (mypkg.MyBackbone), got {backbone!r}"
                )
            backbone_factory = _import_path("backbone", backbone, _BACKBONE_SIGNATURE, owner)
        elif not isinstance(backbone, str) and not callable(backbone):
            check_choice("backbone", backbone, BACKBONES, owner=owner)
        head_factory = _import_path("head", head, _HEAD_SIGNATURE, owner) if isinstance(head, str) else head
        if head_factory is not None and not callable(head_factory):
            raise TypeError(
                f"{owner} head must be a function {_HEAD_SIGNATURE}, such as a head class "
                f"(torch.nn.Linear, lightning_hypergrad.nets.MLPHead) or its dotted path, got {head!r}"
            )
        if head_init is not None:
            check_choice("head_init", head_init, INITS, owner=owner)
        if eval_batch_norm is not None:
            check_choice("eval_batch_norm", eval_batch_norm, EVAL_BATCH_NORM, owner=owner)
        self.eval_batch_norm = eval_batch_norm or "running"
        if batch_backbone is not None and not isinstance(batch_backbone, bool):
            raise TypeError(f"{owner} batch_backbone must be true, false or null (automatic), got {batch_backbone!r}")
        self.batch_backbone = batch_backbone
        if ways is not None:
            check_int("ways (or null to take the data module's)", ways, 2, owner=owner)
        callables = [name for name, value in (("backbone", backbone), ("head", head)) if not isinstance(value, str)]
        self.save_hyperparameters(ignore=["estimator", "inner_optimizer", *callables])  # names and paths are kept
        self.depth, self.width, self.backbone_name = depth, width, backbone_factory
        self.head_factory = head_factory
        self.head_init = head_init if head_init is not None else ("zeros" if head is None else "fixed")
        self.ways = ways
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.backbone: nn.Module | None = None
        self.inner_model: InnerModel | None = None
        if self.image_shape is not None and self.ways is not None:
            self._build()

    def _head(self, in_features: int) -> nn.Module:
        if self.head_factory is None:
            return nn.Linear(in_features, self.ways)
        head = self.head_factory(in_features, self.ways)
        if not isinstance(head, nn.Module):
            raise TypeError(
                f"{type(self).__name__} head(in_features, ways) returned {type(head).__name__}, not a module"
            )
        return head

    def _backbone(self) -> nn.Module:
        if not callable(self.backbone_name):
            return build_backbone(self.backbone_name, self.image_shape, self.depth, self.width)
        backbone = self.backbone_name(self.image_shape)
        if not isinstance(backbone, nn.Module):
            raise TypeError(
                f"{type(self).__name__} backbone(image_shape) returned {type(backbone).__name__}, not a module"
            )
        if not isinstance(getattr(backbone, "out_features", None), int):
            with torch.no_grad():
                out = backbone.eval()(torch.zeros(2, *self.image_shape))
            backbone.train()
            if out.dim() != 2:
                raise ValueError(
                    f"{type(self).__name__} backbone returns features of shape {tuple(out.shape[1:])} per image; "
                    "return flat features (end it with nn.Flatten())"
                )
            backbone.out_features = out.shape[1]
        return backbone

    def _build(self) -> None:
        self.backbone = self._backbone()
        if self.head_init == "zeros":  # the head's random draw is discarded: keep the random stream as it was
            with torch.random.fork_rng(devices=[]):
                head = self._head(self.backbone.out_features)
        else:
            head = self._head(self.backbone.out_features)
        self.inner_model = InnerModel(head, init=self.head_init)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.settings_from_data("ways", "image_shape")
        if self.inner_model is None:
            self._build()
        self.check_inner_model()

    TASK_KEYS = ("support_x", "support_y", "query_x", "query_y")

    def split_tasks(self, batch):
        """The tasks of a meta-batch, each checked once for the keys and the image dtype this model needs."""
        tasks = super().split_tasks(batch)
        if tasks:
            self.check_task(tasks[0])
        return tasks

    def check_task(self, task: Task) -> None:
        """A one-line error for a task this model cannot use (missing keys, images of another dtype)."""
        owner = type(self).__name__
        if not isinstance(task, dict):
            raise TypeError(
                f"{owner} takes tasks as dicts with keys {', '.join(self.TASK_KEYS)}, got {type(task).__name__}"
            )
        missing = [k for k in self.TASK_KEYS if k not in task]
        if missing:
            raise ValueError(
                f"{owner}: a task lacks {', '.join(missing)} (it has {', '.join(map(str, task))}); each task needs "
                f"{', '.join(self.TASK_KEYS)} (FewShotDataModule yields them)"
            )
        reference = next((p for p in self.parameters()), None)
        if reference is None:
            reference = next(iter(self.inner_model.parameter_tensors()), None)
        for key in ("support_x", "query_x"):
            x = task[key]
            if isinstance(x, Tensor) and reference is not None and x.dtype != reference.dtype:
                raise TypeError(
                    f"{owner}: the task's {key} is {str(x.dtype).replace('torch.', '')} and the model "
                    f"{str(reference.dtype).replace('torch.', '')}: convert the images (x.to(torch.float32)) or the "
                    "model (model.double())"
                )

    def features(self, task: Task) -> list[Tensor]:
        n_support = task["support_x"].shape[0]
        images = torch.cat([task["support_x"], task["query_x"]])
        with self._evaluation_norm():
            out = self.backbone(images)  # one pass: batch norm sees the support and query images together
        return [out[:n_support], out[n_support:]]

    def _evaluation_norm(self) -> contextlib.AbstractContextManager[None]:
        """The backbone's batch norm on each batch's statistics outside training, with ``eval_batch_norm="batch"``."""
        if self.training or self.eval_batch_norm != "batch":
            return contextlib.nullcontext()
        return batch_statistics(self.backbone)

    def stacked_features(self, stacked):
        """One backbone call over the images of every task (``batch_tasks=True``), batch norm per task
        (:func:`~lightning_hypergrad.inner_model.per_task_batch_norm`): the features, gradients and running statistics
        of one call per task. ``None`` (one call per task) where ``batch_backbone`` says so or a subclass overrides
        :meth:`features`."""
        batched = self.batch_backbone if self.batch_backbone is not None else self.device.type != "cpu"
        if not batched or type(self).features is not FewShotClassifier.features:
            return None
        support, query = stacked.tensors["support_x"], stacked.tensors["query_x"]
        tasks, n_support = support.shape[:2]
        images = torch.cat([support, query], dim=1).flatten(0, 1)  # task by task: its support, then its query
        with per_task_batch_norm(self.backbone, tasks):
            out = self.backbone(images)
        out = out.reshape(tasks, -1, *out.shape[1:])
        return [out[:, :n_support], out[:, n_support:]]

    def inner_loss(self, model, h, task):
        return F.cross_entropy(model(h[0]), task["support_y"])

    def outer_loss(self, model, h, task):
        return F.cross_entropy(model(h[1]), task["query_y"])

    def task_metrics(self, model, h, task):
        return {"acc": (model(h[1]).argmax(-1) == task["query_y"]).float().mean()}


class MAML(FewShotClassifier):
    """Model-agnostic meta-learning (Finn et al., 2017): the whole network (backbone and head) is the inner model,
    and its initialization ``w_0`` is what the outer loop learns.

    Each task starts from the learned ``w_0`` and takes ``T`` inner steps on its support set; the outer loss is the
    query cross-entropy after them. ``estimator="rmd"`` (or ``"rmd(checkpoint_every='sqrt')"``, ``"fmd"``) is
    second-order MAML; ``"fo"`` (``"t1t2"``, ``"greedy(gamma)"`` with the initialization alone as hyperparameter)
    is first-order MAML; the estimators that define no term for an initialization refuse it before any work (see
    :class:`~lightning_hypergrad.BilevelProblem`). The network's batch norm uses each batch's statistics in the
    inner loop, the outer loss, validation and test alike, as in MAML's reference implementation (see
    :mod:`lightning_hypergrad.inner_model`). Validation and test adapt ``w_0`` to each held-out task. The query
    accuracy it logs reuses the query logits of the outer loss at ``w_T``
    (:class:`~lightning_hypergrad.query_logits.QueryLogits`), so a task costs no forward pass beyond what its
    meta-gradient needs.

    Args: as :class:`FewShotClassifier`; ``head_init`` does not apply (the whole initialization is learned), and
        the linear head starts from ``torch.nn.Linear``'s random initialization, as MAML's does. ``eval_batch_norm``
        is ``"batch"`` (``None`` means it too), the only protocol here: the whole network is the inner model, whose
        batch norm always uses each batch's statistics.
    """

    features = BilevelModule.features  # no part outside the inner loop

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("head_init") not in (None, "learned"):
            raise ValueError("MAML learns the whole initialization; remove head_init (or set it to 'learned')")
        if kwargs.get("eval_batch_norm") not in (None, "batch"):
            raise ValueError(
                f"MAML's batch norm always uses each batch's statistics (the whole network is the inner model), so "
                f"eval_batch_norm={kwargs['eval_batch_norm']!r} cannot apply; remove eval_batch_norm (or set it to "
                "'batch')"
            )
        kwargs["head_init"] = "learned"
        kwargs["eval_batch_norm"] = "batch"
        super().__init__(*args, **kwargs)
        self._query_logits = QueryLogits()  # the outer loss's query logits, for the accuracy that follows

    def _build(self) -> None:
        backbone = self._backbone()
        network = nn.Sequential(backbone, self._head(backbone.out_features))
        self.inner_model = InnerModel(network, init="learned")  # network.0 is the backbone, network.1 the head

    def inner_loss(self, model, h, task):
        return F.cross_entropy(model(task["support_x"]), task["support_y"])

    def outer_loss(self, model, h, task):
        if torch.compiler.is_compiling():  # (compile_losses=True: nothing to remember in a traced call)
            return F.cross_entropy(model(task["query_x"]), task["query_y"])
        token = self._query_logits.before(model, task["query_x"])
        logits = model(task["query_x"])
        self._query_logits.remember(token, model, task["query_x"], logits)
        return F.cross_entropy(logits, task["query_y"])

    def task_metrics(self, model, h, task):
        logits = self._query_logits.recall(model, task["query_x"])
        if logits is None:
            logits = model(task["query_x"])
        return {"acc": (logits.argmax(-1) == task["query_y"]).float().mean()}


class IMAML(MAML):
    """Implicit MAML (Rajeswaran et al., 2019): MAML whose inner loss adds ``lambda/2 |w - phi|^2`` and whose inner
    loop starts at ``phi`` detached, so that the implicit estimators give the initialization's hypergradient
    ``(I + H / lambda)^-1 g_T`` (``H``: the Hessian of the support loss at ``w_T``) without a graph through the loop.

    The solver is the estimator: ``"cg(5, normal=True)"`` (CG on the normal equations, which cannot break down where
    ``H + lambda I`` is indefinite at an unconverged ``w_T``; the default), ``"minres(5)"``, ``"cg(5)"`` (stops, with
    a warning, on negative curvature) or ``"neumann(5)"``. An unrolled estimator (``"rmd"``) differentiates through
    the loop from the detached start, a reference that tends to the implicit hypergradient as the inner loop
    converges; ``"fo"`` takes ``g_T`` itself. Memory does not grow with ``inner_steps`` for the implicit estimators.

    Args: as :class:`MAML`, and
        proximal: ``lambda`` > 0, the strength of the pull towards the initialization (iMAML's regularization).
    """

    def __init__(self, *args, proximal: float = 2.0, **kwargs) -> None:
        self.proximal = proximal
        kwargs.setdefault("estimator", "cg(5, normal=True)")
        super().__init__(*args, **kwargs)

    def _build(self) -> None:
        backbone = self._backbone()
        network = nn.Sequential(backbone, self._head(backbone.out_features))
        self.inner_model = InnerModel(network, init="learned", proximal=self.proximal)
