"""The few-shot networks: backbones by name and heads to put on them.

Backbones (``FewShotClassifier(backbone=...)``):

- ``"conv"``: the paper's ``depth`` x ``width`` convolutional network (default 3 x 32), :class:`ConvBackbone`;
- ``"conv4"``: the common 4-block, 64-channel network of MAML and Prototypical Networks (``ConvBackbone`` with
  depth 4 and width 64);
- ``"resnet"``: :class:`ResNetBackbone`, four residual stages (a small ResNet-12 layout);
- by dotted path, :class:`FCBackbone`: the fully connected network of MAML's Omniglot experiments (784-256-128-64-64,
  each layer with batch norm), with :class:`TruncatedNormalLinear` as its head.

Heads take ``(in_features, ways)`` as their first two arguments, so that a config names the class and its other
arguments only (``torch.nn.Linear`` is one; :class:`MLPHead`, :class:`CosineHead` and :class:`TruncatedNormalLinear`
are others).

:func:`batch_statistics` makes a network's batch norm use the batch's statistics wherever it runs (the evaluation
protocol of MAML's reference code, ``FewShotClassifier(eval_batch_norm="batch")``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_hypergrad._checks import check_choice, check_int, check_positive_number

#: the names of the built-in backbones (``FewShotClassifier(backbone=...)``)
BACKBONES = ("conv", "conv4", "resnet")


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


class _ResidualBlock(nn.Module):
    """Three 3x3 convolutions with batch norm, a 1x1 shortcut, then 2x2 max pooling (while the map is >= 2x2)."""

    def __init__(self, channels: int, width: int, pool: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.1),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.1),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width))
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(F.leaky_relu(self.body(x) + self.shortcut(x), 0.1))


class ResNetBackbone(nn.Sequential):
    """Four residual stages of ``width``, ``2 width``, ``4 width``, ``8 width`` channels (ResNet-12's layout with a
    base width of ``width``; 64 is ResNet-12's), each halving the map while it is at least 2x2, then global average
    pooling."""

    def __init__(self, image_shape: Sequence[int], width: int = 16) -> None:
        channels, height, width_px = image_shape
        blocks: list[nn.Module] = []
        for k in range(4):
            pool = min(height, width_px) >= 2
            blocks.append(_ResidualBlock(channels, width * 2**k, pool))
            if pool:
                height, width_px = height // 2, width_px // 2
            channels = width * 2**k
        super().__init__(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = channels


def build_backbone(name: str, image_shape: Sequence[int], depth: int = 3, width: int = 32) -> nn.Module:
    """The backbone ``name`` (one of :data:`BACKBONES`) for images of ``image_shape``; ``out_features`` set.

    ``depth`` and ``width`` shape ``"conv"``; ``width`` is the base width of ``"resnet"``; ``"conv4"`` is fixed.
    """
    check_choice("backbone", name, BACKBONES)
    if name == "conv":
        return ConvBackbone(image_shape, depth, width)
    if name == "conv4":
        return ConvBackbone(image_shape, 4, 64)
    return ResNetBackbone(image_shape, width)


class MLPHead(nn.Sequential):
    """A multilayer perceptron head: ``hidden`` layers of Linear (batch norm if asked) and ReLU, then Linear.

    Args:
        in_features: the backbone's features.
        ways: the classes.
        hidden: the widths of the hidden layers.
        batch_norm: batch norm after each hidden Linear (the inner model's batch norm uses each batch's statistics,
            see :mod:`lightning_hypergrad.inner_model`).
    """

    def __init__(self, in_features: int, ways: int, hidden: Sequence[int] = (64,), batch_norm: bool = False) -> None:
        layers: list[nn.Module] = []
        for width in hidden:
            check_int("MLPHead hidden width", width)
            layers.append(nn.Linear(in_features, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
            in_features = width
        layers.append(nn.Linear(in_features, ways))
        super().__init__(*layers)


class CosineHead(nn.Module):
    """A cosine classifier: ``scale * cos(feature, weight_c)`` for each class ``c`` (Chen et al., 2019).

    Its weights start at random (a cosine to zero vectors is undefined), so use it with ``head_init="fixed"`` or
    ``"learned"``.
    """

    def __init__(self, in_features: int, ways: int, scale: float = 10.0) -> None:
        super().__init__()
        check_positive_number("CosineHead scale", scale)
        self.weight = nn.Parameter(torch.randn(ways, in_features) / math.sqrt(in_features))
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


def truncated_normal_(weight: Tensor, std: float) -> Tensor:
    """Fills ``weight`` with draws of ``N(0, std^2)`` truncated at two standard deviations (in place, returned)."""
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


class TruncatedNormalLinear(nn.Linear):
    """A linear layer with weights from a normal of std ``std`` truncated at two std, and zero biases: the
    initialization of the fully connected network of MAML's Omniglot experiments (as learn2learn's ``OmniglotFC``)."""

    def __init__(self, in_features: int, out_features: int, std: float = 0.01) -> None:
        super().__init__(in_features, out_features)
        check_positive_number("TruncatedNormalLinear std", std)
        truncated_normal_(self.weight, std)
        nn.init.zeros_(self.bias)


class FCBackbone(nn.Sequential):
    """The fully connected network of MAML's Omniglot experiments (Finn et al., 2017, after Santoro et al., 2016),
    without its last layer: the image flattened, then for each width of ``sizes`` a :class:`TruncatedNormalLinear`,
    batch norm (``eps=1e-3``, learned scale and shift, no running statistics: always the batch's) and ReLU.

    With ``head=TruncatedNormalLinear`` it is learn2learn's ``OmniglotFC`` layer for layer (784-256-128-64-64, then
    the classes), as ``backbone=lightning_hypergrad.nets.FCBackbone`` in a config.
    """

    def __init__(self, image_shape: Sequence[int], sizes: Sequence[int] = (256, 128, 64, 64)) -> None:
        in_features = math.prod(image_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        for size in sizes:
            check_int("FCBackbone layer size", size)
            layers += [
                TruncatedNormalLinear(in_features, size),
                nn.BatchNorm1d(size, eps=1e-3, track_running_stats=False),
                nn.ReLU(),
            ]
            in_features = size
        super().__init__(*layers)
        self.out_features = in_features


@contextlib.contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Within the block, every batch norm layer of ``module`` normalizes with the statistics of the batch it is given
    and leaves its running statistics (and their count) as they are, in training and evaluation mode alike; their
    modes are restored after it. MAML's reference code and learn2learn's examples evaluate so."""
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    try:
        for m in norms:
            # training: the batch's statistics; not tracking: the running ones are neither read nor updated
            m.training, m.track_running_stats = True, False
        yield
    finally:
        for m, (training, track) in zip(norms, saved):
            m.training, m.track_running_stats = training, track
