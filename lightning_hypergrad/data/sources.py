"""The building blocks that every dataset's loader shares: the split names, :class:`ClassSplit` and image datasets.

A dataset's loader (one module per dataset in :mod:`lightning_hypergrad.data.datasets`) returns the meta-train,
meta-validation and meta-test splits, each a :class:`ClassSplit`: a map-style dataset of ``(image, label)`` pairs
(images as float tensors ``(C, H, W)`` in ``[0, 1]``) with its labels known up front, so that learn2learn's
``MetaDataset`` needs no pass over the images to index them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")
"""The names of the three class splits, in this order everywhere."""

SPLIT_NAMES = {"train": "meta-train", "val": "meta-validation", "test": "meta-test"}
"""How error messages name the splits."""


@dataclass
class ClassSplit:
    """One class split: a dataset of ``(image, label)`` pairs and the label of every index.

    Attributes:
        dataset: the images; ``dataset[i]`` is ``(float tensor (C, H, W), int label)``.
        labels: ``labels[i]`` is the label of ``dataset[i]``.
        class_names: optional; the name of each label ``0 .. len(class_names) - 1`` (class folders, which may be
            empty: those labels then have no index).
    """

    dataset: Dataset
    labels: list[int]
    class_names: list[str] | None = None

    def labels_to_indices(self) -> dict[int, list[int]]:
        """The indices of each label, in index order (the bookkeeping learn2learn's ``MetaDataset`` takes)."""
        out: dict[int, list[int]] = {}
        for index, label in enumerate(self.labels):
            out.setdefault(label, []).append(index)
        return out

    def examples_per_class(self) -> dict[int, int]:
        """The number of examples of every class, named classes without examples included (as 0)."""
        counts = {i: 0 for i in range(len(self.class_names or ()))}
        for label in self.labels:
            counts[label] = counts.get(label, 0) + 1
        return counts

    def class_name(self, label: int) -> str:
        """The name of ``label`` (its folder) when known, else the label itself."""
        return repr(self.class_names[label]) if self.class_names else str(label)


def resize(images: Tensor, size: int) -> Tensor:
    """Resizes a float batch ``(N, C, H, W)`` to ``(N, C, size, size)``: area averaging down, bilinear up."""
    if images.shape[-2:] == (size, size):
        return images
    if size <= min(images.shape[-2:]):
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


class TensorImages(Dataset):
    """Images held in one tensor; ``uint8`` images are scaled to ``[0, 1]`` and resized one at a time when read.

    Args:
        images: ``(N, C, H, W)``, ``uint8`` (0-255) or floating point (already in ``[0, 1]``).
        labels: ``N`` integer labels.
        size: if given, the side each image is resized to when read.

    Raises:
        ValueError: ``images`` is not 4-dimensional or its length differs from that of ``labels``.
    """

    def __init__(self, images: Tensor, labels: Sequence[int], size: int | None = None) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"expected images (N, C, H, W) and N labels, got {tuple(images.shape)} and {len(labels)}")
        self.images = images
        self.labels = [int(label) for label in labels]
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        image = image.float().div(255) if image.dtype == torch.uint8 else image.float()
        if self.size is not None:
            image = resize(image.unsqueeze(0), self.size).squeeze(0)
        return image, self.labels[index]


class ImageFiles(Dataset):
    """Image files read with PIL when indexed, converted to RGB and resized to ``size`` x ``size``.

    Args:
        paths: one file per example.
        labels: the label of each file.
        size: the side of the square images returned.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], size: int) -> None:
        self.paths = list(paths)
        self.labels = [int(label) for label in labels]
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            rgb = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
            array = np.asarray(rgb, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255), self.labels[index]


def tensor_split(images: Tensor, labels: Tensor, classes: Sequence[int], size: int | None) -> ClassSplit:
    """The examples of ``classes`` (original label values), relabelled ``0..len(classes)-1`` in that order."""
    remap = {int(c): i for i, c in enumerate(classes)}
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in remap:
        mask |= labels == c
    index = mask.nonzero().flatten()
    new_labels = [remap[int(label)] for label in labels[index]]
    return ClassSplit(TensorImages(images[index], new_labels, size), new_labels)
