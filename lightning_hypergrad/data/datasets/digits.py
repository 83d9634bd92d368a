"""``dataset="digits"``: scikit-learn's bundled 8x8 digits, offline, for tests and demos."""

from __future__ import annotations

import torch

from lightning_hypergrad.data.registry import DatasetOptions, DatasetSpec, register
from lightning_hypergrad.data.sources import ClassSplit, tensor_split


def load_digits_splits(options: DatasetOptions) -> dict[str, ClassSplit]:
    """scikit-learn's bundled 8x8 digits in ``[0, 1]``: digits 0-4 meta-train, 5-9 meta-validation and meta-test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images / 16.0).float().unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    size = None if options.image_size in (None, 8) else options.image_size
    held_out = tensor_split(images, labels, range(5, 10), size)
    return {"train": tensor_split(images, labels, range(5), size), "val": held_out, "test": held_out}


SPEC = register(
    DatasetSpec(
        name="digits",
        channels=1,
        image_size=8,
        load=load_digits_splits,
        classes=(5, 5, 5),
        examples_per_class=174,
        examples_reason="the smallest digit class of scikit-learn's digits has 174 images",
    )
)
