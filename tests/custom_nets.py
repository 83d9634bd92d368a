"""A backbone and a head of a user's own, imported by their dotted paths (``custom_nets.TinyBackbone``) in
tests/test_backbone_paths.py: ``tests/`` is on the path of the test run."""

from __future__ import annotations

from torch import nn


class TinyBackbone(nn.Sequential):
    """One 3x3 convolution with ``width`` channels, then global average pooling: ``width`` features."""

    def __init__(self, image_shape: tuple[int, int, int], width: int = 4) -> None:
        super().__init__(nn.Conv2d(image_shape[0], width, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_backbone(image_shape):  # no annotations, as a user's function may have none
    """A :class:`TinyBackbone` of 3 channels."""
    return TinyBackbone(image_shape, width=3)


def tiny_head(in_features, ways):
    """A linear head without bias."""
    return nn.Linear(in_features, ways, bias=False)


NOT_CALLABLE = 3
