"""The two problems of the precision study, each able to compute its hypergradient in float64, float32 or bf16.

``fewshot``
    The paper's model as the quickstart config runs it: :class:`lightning_hypergrad.FewShotClassifier` (a conv
    backbone of ``depth`` blocks of ``width`` channels, its parameters the hyperparameters; a linear head, reset to
    zero for each task, trained for ``inner_steps`` steps of SGD with momentum), on the bundled digits data
    (scikit-learn's 8x8 digits, resized to ``image_size``, so that the backbone does a realistic amount of work), one
    meta-batch of ``meta_batch`` tasks drawn by :class:`lightning_hypergrad.FewShotDataModule` with the seed. The
    hypergradient is ``model.meta_gradient(tasks, estimator)``: what a training step computes.
``cnn``
    The horizon study's CNN (:mod:`studies.horizon.cnn`): per-layer log learning rates and log weight decays of a
    small CNN trained from scratch for ``steps`` steps of SGD with momentum on mini-batches, the outer loss its
    validation cross-entropy, at its starting hyperparameters. The seed draws the network's initialization and the
    order of the mini-batches.

The three precisions measured (:data:`PRECISIONS`): ``float64`` and ``float32`` cast the model, the data and the
hyperparameters; ``bf16`` keeps them in float32 and runs the whole hypergradient call inside
``torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)``, which is what Lightning's ``bf16-mixed``
precision plugin wraps every ``training_step`` in (its ``MixedPrecision.forward_context``): the matrix products and
convolutions of the inner loop, of the outer loss and of the estimator's own passes run in bf16, while the parameters,
the optimizer's updates and the gradients that flow into float32 tensors stay float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "float64": (torch.float64, None),
    "float32": (torch.float32, None),
    "bf16": (torch.float32, torch.bfloat16),
    "fp16": (torch.float32, torch.float16),
}
"""Each precision: the dtype of the model, data and hyperparameters, and the autocast dtype (``None``: none).
``fp16`` (float16 autocast, with no loss scaling) is what no Lightning setting gives on the CPU; only
:mod:`studies.precision.lightning_check` computes it, once."""

ORDER_SEED0 = 100_000
"""The CNN's batch order of seed ``s`` is drawn from ``ORDER_SEED0 + s`` (the horizon study's first outer step's)."""

Hypergradient = Callable[[], tuple[Tensor, float]]
"""One hypergradient call: returns the hypergradient flattened (float64, on the CPU) and the outer loss."""


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The context of ``precision``: Lightning's ``bf16-mixed`` autocast for ``bf16``, nothing otherwise."""
    _, autocast_dtype = PRECISIONS[precision]
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=False)


def flat(tensors: list[Tensor]) -> Tensor:
    """The tensors as one float64 vector on the CPU."""
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])


def synchronize(device: torch.device) -> None:
    """Waits for the device's work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------------
# few-shot
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FewShotSettings:
    """Everything the few-shot problem depends on besides the seed."""

    dataset: str = "digits"
    image_size: int = 28
    ways: int = 5
    shots: int = 5
    queries: int = 10
    meta_batch: int = 4
    depth: int = 3
    width: int = 32
    inner_steps: int = 10
    inner_lr: float = 0.1
    momentum: float = 0.9

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FewShotProblem:
    """One meta-batch of the few-shot problem and the seeded model; see the module docstring."""

    name = "fewshot"

    def __init__(self, settings: FewShotSettings, seed: int, device: torch.device | str = "cpu") -> None:
        import lightning_hypergrad as lh
        from lightning_hypergrad.module import split_meta_batch
        from studies.common import quiet

        self.settings, self.seed, self.device = settings, seed, torch.device(device)
        with quiet():
            data = lh.FewShotDataModule(
                dataset=settings.dataset,
                ways=settings.ways,
                shots=settings.shots,
                queries=settings.queries,
                meta_batch_size=settings.meta_batch,
                train_batches=1,
                val_tasks=1,
                test_tasks=1,
                image_size=settings.image_size,
                seed=seed,
            )
            data.setup("fit")
            self.batch = next(iter(data.train_dataloader()))
        self.image_shape = tuple(data.image_shape)
        self.tasks = split_meta_batch(self.batch)

    def model(self, estimator: str = "fo") -> Any:
        """The seeded :class:`~lightning_hypergrad.FewShotClassifier` in float32 on the CPU, in training mode."""
        import lightning_hypergrad as lh

        s = self.settings
        torch.manual_seed(self.seed)
        return lh.FewShotClassifier(
            ways=s.ways,
            image_shape=self.image_shape,
            depth=s.depth,
            width=s.width,
            estimator=estimator,
            inner_optimizer=lh.SGD(lr=s.inner_lr, momentum=s.momentum),
            inner_steps=s.inner_steps,
        ).train()

    def hypergradient(self, spec: str, precision: str) -> Hypergradient:
        """The call that computes ``spec``'s hypergradient in ``precision`` (built here, run by the caller)."""
        from lightning_hypergrad import get_estimator

        dtype, _ = PRECISIONS[precision]
        model = self.model(spec).to(self.device, dtype)
        tasks = [
            {k: v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device) for k, v in task.items()}
            for task in self.tasks
        ]
        estimator = get_estimator(spec)

        def call() -> tuple[Tensor, float]:
            with autocast(precision, self.device):
                step = model.meta_gradient(tasks, estimator)
            return flat(step.hypergrads), float(step.metrics["outer_loss"])

        return call


# ---------------------------------------------------------------------------------------------------------------------
# the horizon study's CNN
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CNNProblemSettings:
    """Everything the CNN problem depends on besides the seed (``data``: ``omniglot`` or ``synthetic``)."""

    data: str = "omniglot"
    characters: int = 50
    size: int = 28
    width: int = 8
    steps: int = 20
    batch: int = 32
    momentum: float = 0.9
    lr_init: float = 0.03
    wd_init: float = 1e-4

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cnn(self) -> Any:
        from studies.horizon.cnn import CNNSettings

        return CNNSettings(self.characters, self.size, self.width, self.steps, self.batch, self.momentum, knots=1)


def cnn_splits(settings: CNNProblemSettings, root: str | None = None) -> Any:
    """The CNN's data: Omniglot's characters from ``root`` (see :func:`studies.common.omniglot_root`), or generated."""
    from studies.common import omniglot_root
    from studies.horizon.cnn import load_splits, synthetic_splits

    if settings.data == "synthetic":
        return synthetic_splits(settings.cnn())
    return load_splits(omniglot_root(root), settings.cnn())


class CNNProblem:
    """One training of the horizon study's CNN at the starting hyperparameters; see the module docstring."""

    name = "cnn"

    def __init__(
        self, settings: CNNProblemSettings, seed: int, splits: Any, device: torch.device | str = "cpu"
    ) -> None:
        from studies.horizon.cnn import batch_order

        self.settings, self.seed, self.device = settings, seed, torch.device(device)
        self.splits = splits
        self.order = batch_order(len(splits.train[1]), settings.cnn(), ORDER_SEED0 + seed)
        self._cast: dict[torch.dtype, Any] = {}

    def _splits(self, dtype: torch.dtype) -> Any:
        from studies.horizon.cnn import Splits

        if dtype not in self._cast:
            parts = (self.splits.train, self.splits.val, self.splits.test)
            self._cast[dtype] = Splits(*[(x.to(self.device, dtype), y.to(self.device)) for x, y in parts])
        return self._cast[dtype]

    def problem(self, precision: str) -> Any:
        """The :class:`~lightning_hypergrad.BilevelProblem` in ``precision``'s dtype (new hyperparameter leaves)."""
        from studies.horizon.cnn import start_hyperparameters, training_problem

        dtype, _ = PRECISIONS[precision]
        cnn = self.settings.cnn()
        start = start_hyperparameters(cnn, self.settings.lr_init, self.settings.wd_init)
        h = [t.detach().to(self.device, dtype).requires_grad_() for t in start]
        problem = training_problem(self._splits(dtype), cnn, self.seed, self.order.to(self.device), h)
        return dataclasses.replace(problem, init_params=[w.to(self.device, dtype) for w in problem.init_params])

    def hypergradient(self, spec: str, precision: str) -> Hypergradient:
        """The call that computes ``spec``'s hypergradient in ``precision`` (built here, run by the caller)."""
        from lightning_hypergrad import get_estimator

        problem = self.problem(precision)
        estimator = get_estimator(spec)
        estimator.validate(problem)  # a refusal (ValueError) before any work
        checked = [False]

        def call() -> tuple[Tensor, float]:
            with autocast(precision, self.device):
                result = estimator(problem, check=not checked[0])
            checked[0] = True
            return flat(result.hypergrads), float(result.loss)

        return call
