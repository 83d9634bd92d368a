"""``FewShotClassifier``: the paper's meta-learning model (a conv backbone as hyperparameters, a linear head inside)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hypergrad._checks import check_int
from lightning_hypergrad.estimators import HypergradEstimator
from lightning_hypergrad.module import BilevelModule, Task
from lightning_hypergrad.optim import DifferentiableOptimizer


class ConvBackbone(nn.Sequential):
    """``depth`` blocks of (3x3 convolution with ``width`` channels, batch norm, ReLU, 2x2 max pooling), flattened.

    Pooling stops once the feature map is 1x1, so small images (8x8 digits) work at any depth.
    """

    def __init__(self, image_shape: Sequence[int], depth: int = 3, width: int = 32) -> None:
        channels, height, width_px = image_shape
        layers: list[nn.Module] = []
        for _ in range(depth):
            # no bias: batch norm removes it, and Adam would move it by rounding noise alone
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            if min(height, width_px) >= 2:
                layers.append(nn.MaxPool2d(2))
                height, width_px = height // 2, width_px // 2
            channels = width
        layers.append(nn.Flatten())
        super().__init__(*layers)
        self.out_features = channels * height * width_px


class FewShotClassifier(BilevelModule):
    """N-way few-shot classification as in the paper: the backbone is ``alpha``, the linear head is ``w``.

    For each task the head starts at zero and is trained for ``T`` inner steps on the support set's features;
    the outer loss is the cross-entropy on the query set. The backbone's features of the support and query images
    are computed once per task (:meth:`features`), so every estimator costs about one backbone forward and
    backward per task. Batch norm uses the task's batch statistics in training (its running statistics are
    updated once per task) and the running statistics in validation and test.

    Validation and test run the inner loop on held-out tasks and log the query accuracy and its 95% confidence
    interval over the tasks (``val/acc``, ``val/acc_ci95``).

    Args:
        ways: classes per task; ``None`` takes the data module's ``ways`` when training starts.
        image_shape: ``(channels, height, width)``; ``None`` takes the data module's ``image_shape``.
        depth: number of convolutional blocks of the backbone.
        width: channels of each block.
        estimator, inner_optimizer, inner_steps, meta_batch_size, outer_lr, gradient_clip_val,
        gradient_clip_algorithm, nonfinite, batch_tasks: see :class:`BilevelModule`. The tasks of a meta-batch
            always share their shapes here, so ``batch_tasks=True`` runs them together; it is off by default, as it
            keeps every task's backbone activations alive at once (on 2 CPU cores, meta-batch 10: about 9x the
            peak memory for 1.0-1.2x the speed; see docs/scale.md).

    Raises:
        ValueError: ``depth`` or ``width`` < 1, or ``ways``/``image_shape`` disagreeing with the data module's.
    """

    def __init__(
        self,
        ways: int | None = None,
        image_shape: tuple[int, int, int] | None = None,
        depth: int = 3,
        width: int = 32,
        estimator: HypergradEstimator | str | None = None,
        inner_optimizer: DifferentiableOptimizer | None = None,
        inner_steps: int = 10,
        meta_batch_size: int | None = None,
        outer_lr: float = 1e-3,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        nonfinite: str = "skip",
        batch_tasks: bool = False,
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
        )
        check_int("depth", depth, owner="FewShotClassifier")
        check_int("width", width, owner="FewShotClassifier")
        if ways is not None:
            check_int("ways (or null to take the data module's)", ways, 2, owner="FewShotClassifier")
        self.save_hyperparameters(ignore=["estimator", "inner_optimizer"])
        self.depth, self.width = depth, width
        self.ways = ways
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.backbone: ConvBackbone | None = None
        if self.image_shape is not None:
            self._build()

    def _build(self) -> None:
        self.backbone = ConvBackbone(self.image_shape, self.depth, self.width)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.settings_from_data("ways", "image_shape")
        if self.backbone is None:
            self._build()

    def features(self, task: Task) -> list[Tensor]:
        n_support = task["support_x"].shape[0]
        images = torch.cat([task["support_x"], task["query_x"]])
        out = self.backbone(images)  # one pass: batch norm sees the support and query images together
        return [out[:n_support], out[n_support:]]

    def init_params(self, task: Task) -> list[Tensor]:
        d = self.backbone.out_features
        ref = task["support_x"]
        return [ref.new_zeros(self.ways, d), ref.new_zeros(self.ways)]

    @staticmethod
    def logits(params: Sequence[Tensor], features: Tensor) -> Tensor:
        return F.linear(features, params[0], params[1])

    def inner_loss(self, params, h, task):
        return F.cross_entropy(self.logits(params, h[0]), task["support_y"])

    def outer_loss(self, params, h, task):
        return F.cross_entropy(self.logits(params, h[1]), task["query_y"])

    def task_metrics(self, params, h, task):
        return {"acc": (self.logits(params, h[1]).argmax(-1) == task["query_y"]).float().mean()}
