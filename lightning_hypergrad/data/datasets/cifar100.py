"""``dataset="cifar100"``: CIFAR-100 in the official ``cifar-100-python`` layout, classes split 50/50 by a seed.

The helpers that read the official files (:func:`cifar_files`, :func:`prepare_cifar`, :func:`cifar_images`, ...) are
shared with ``cifarfs``, which uses the same images with another class split.

The pickles are checked when the data module is built (and again after a download): against a ``SHA256SUMS`` in
``root/cifar-100-python`` or ``root`` that lists them (hashing their 190 MB takes about 0.2 s), else by their last
byte, which a file cut short has lost; a pickle damaged otherwise is found when it is read. Either way a damaged pickle
raises :class:`~lightning_hypergrad.data.sources.DataFileError` naming it.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_hypergrad.data.registry import DatasetOptions, DatasetSpec, register
from lightning_hypergrad.data.sources import ClassSplit, check_pickle, reading, tensor_split, verify_files

CIFAR100_FOLDER = "cifar-100-python"

EXAMPLES_REASON = "every CIFAR-100 class has 600 images (train and test files merged)"

CIFAR_REMEDY = (
    "Delete it and run again with `download: true` (torchvision fetches cifar-100-python.tar.gz again and extracts "
    "it), or extract the official cifar-100-python.tar.gz again."
)


def cifar_files(root: Path, names: Sequence[str] = ("train", "test")) -> list[Path]:
    """The official ``cifar-100-python`` pickles under ``root``."""
    return [root / CIFAR100_FOLDER / name for name in names]


def cifar_missing_message(missing: Sequence[Path]) -> str:
    """The error for absent CIFAR-100 files: the paths looked at and how to get them."""
    return (
        "CIFAR-100 data not found: missing " + ", ".join(str(p) for p in missing) + ". Either extract the official "
        "cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) so that `root` holds the "
        "cifar-100-python folder, or set `download: true` on a machine with internet access (torchvision downloads it)."
    )


def verify_cifar(root: Path, names: Sequence[str] = ("train", "test")) -> None:
    """Raises :class:`~lightning_hypergrad.data.sources.DataFileError` naming a pickle of ``names`` that is damaged.

    Checks each pickle there against a ``SHA256SUMS`` beside it or in ``root`` when one lists it, else its last byte.
    """
    present = [p for p in cifar_files(root, names) if p.is_file()]
    verify_files(present, check_pickle, CIFAR_REMEDY, root=root)


def check_cifar(root: Path, download: bool, names: Sequence[str] = ("train", "test")) -> None:
    """Raises ``FileNotFoundError`` when pickles of ``names`` are absent and ``download`` is off, and
    :class:`~lightning_hypergrad.data.sources.DataFileError` when one there is damaged."""
    missing = [p for p in cifar_files(root, names) if not p.is_file()]
    if missing and not download:
        raise FileNotFoundError(cifar_missing_message(missing))
    verify_cifar(root, names)


def prepare_cifar(root: Path, download: bool, names: Sequence[str] = ("train", "test")) -> None:
    """Makes sure ``root/cifar-100-python`` holds the official pickles, downloading with torchvision if allowed.

    Raises:
        FileNotFoundError: pickles are absent and ``download`` is off.
        DataFileError: a pickle is damaged (once per process: nothing to do for pickles checked already).
    """
    missing = [p for p in cifar_files(root, names) if not p.is_file()]
    if missing:
        if not download:
            raise FileNotFoundError(cifar_missing_message(missing))
        from torchvision.datasets import CIFAR100

        CIFAR100(str(root), train=True, download=True)
    verify_cifar(root, names)


def unpickle(path: Path) -> dict[str, object]:
    """One official CIFAR pickle, with its byte-string keys decoded.

    Raises:
        DataFileError: the file cannot be unpickled into a dictionary (the message names it).
    """
    with reading(path, CIFAR_REMEDY):
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="bytes")
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def cifar_images(root: Path) -> tuple[Tensor, Tensor]:
    """All 60,000 images (train and test files merged) as ``uint8 (N, 3, 32, 32)`` with their fine labels."""
    images, labels = [], []
    for path in cifar_files(root):
        part = unpickle(path)
        with reading(path, CIFAR_REMEDY):
            images.append(np.asarray(part["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(part["fine_labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def check_cifar100_files(options: DatasetOptions) -> None:
    """Raises ``FileNotFoundError`` when the train and test pickles are absent and ``download`` is off."""
    check_cifar(options.root, options.download)


def prepare_cifar100_files(options: DatasetOptions) -> None:
    """Downloads CIFAR-100 with torchvision when allowed and needed."""
    prepare_cifar(options.root, options.download)


def load_cifar100_splits(options: DatasetOptions) -> dict[str, ClassSplit]:
    """CIFAR-100 with its 100 classes shuffled by ``split_seed``: 50 meta-train, 50 meta-validation (= meta-test)."""
    prepare_cifar(options.root, options.download)
    images, labels = cifar_images(options.root)
    classes = torch.unique(labels).tolist()
    random.Random(options.split_seed).shuffle(classes)
    half = len(classes) // 2
    size = None if options.image_size in (None, 32) else options.image_size
    held_out = tensor_split(images, labels, classes[half:], size)
    return {"train": tensor_split(images, labels, classes[:half], size), "val": held_out, "test": held_out}


SPEC = register(
    DatasetSpec(
        name="cifar100",
        channels=3,
        image_size=32,
        load=load_cifar100_splits,
        check_files=check_cifar100_files,
        prepare=prepare_cifar100_files,
        classes=(50, 50, 50),
        examples_per_class=600,
        examples_reason=EXAMPLES_REASON,
    )
)
