"""``dataset="omniglot-l2l"``: Omniglot prepared as learn2learn's benchmark (``get_tasksets("omniglot")``), the
preparation behind its published MAML numbers: the class split, the 28x28 images and the four rotations as classes.

It reads the same two NumPy archives as ``dataset="omniglot"`` (checked, converted or downloaded the same way), and
prepares them as learn2learn's ``omniglot_tasksets`` prepares torchvision's files:

- **Images**: each drawing (white background, black strokes) resized to ``image_size`` (28) with PIL's Lanczos
  filter, scaled to ``[0, 1]`` and inverted (``1 - x``), as learn2learn's ``Resize(28, LANCZOS)``, ``ToTensor()``
  and ``1.0 - x``: strokes near 1, the same floats to the bit.
- **Class split**: the 1623 characters in one list, the 964 background characters then the 659 evaluation ones,
  shuffled with Python's ``random`` seeded by ``split_seed``; the first 1100 are meta-train, the next 100
  meta-validation and the other 423 meta-test, as learn2learn's ``random.shuffle`` after ``random.seed(split_seed)``
  (learn2learn's ``maml_omniglot.py`` seeds 42: ``split_seed=42`` gives its split). learn2learn numbers the characters
  in the order torchvision lists the folders (``os.listdir``'s order), the archives in the sorted alphabet and
  character order: the two numberings, and so the characters of each split, are the same where the listing is sorted.
- **Rotations**: each character rotated by 0, 90, 180 and 270 degrees (counter-clockwise) is a class of its own:
  4400 / 400 / 1692 classes of 20 drawings. learn2learn rotates each class of a sampled task by a random multiple of
  90 degrees (``RandomClassRotation``); as new classes, a task may also hold one character under two rotations
  (in about 0.7% of 5-way meta-train tasks), which learn2learn's sampling never gives.

Needs both complete archives (964 and 659 characters): the split is defined on Omniglot's 1623 characters.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_hypergrad.data.datasets.omniglot import (
    ARCHIVE_REMEDY,
    OMNIGLOT_ARCHIVES,
    OMNIGLOT_CHARACTERS,
    _characters,
    check_omniglot_files,
    prepare_omniglot,
    prepare_omniglot_files,
    verify_omniglot_archives,
)
from lightning_hypergrad.data.registry import DatasetOptions, DatasetSpec, register
from lightning_hypergrad.data.sources import ClassSplit, reading

NAME = "omniglot-l2l"
L2L_SPLIT = (1100, 100)
"""The meta-train and meta-validation characters of learn2learn's split; the rest (423) are meta-test."""
ROTATIONS = (0, 90, 180, 270)
"""The rotations (degrees, counter-clockwise), each making a new class of every character."""


def l2l_class_split(characters: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """The meta-train, meta-validation and meta-test characters (indices into the background characters followed by
    the evaluation ones) of learn2learn's Omniglot benchmark, for Python's ``random`` seeded with ``seed``."""
    order = list(range(characters))
    random.Random(seed).shuffle(order)  # what random.seed(seed); random.shuffle(order) gives
    train, val = L2L_SPLIT
    return order[:train], order[train : train + val], order[train + val :]


def l2l_images(archive: Path, size: int) -> Tensor:
    """One archive's drawings as ``(n_chars, n_drawings, 1, size, size)`` floats: Lanczos-resized, scaled to
    ``[0, 1]``, inverted (learn2learn's preparation)."""
    from PIL import Image

    with reading(archive, ARCHIVE_REMEDY), np.load(archive) as data:
        drawings = data["images"]
    if drawings.ndim != 4:
        raise ValueError(f"{archive}: expected `images` (n_chars, n_drawings, H, W), got shape {drawings.shape}")
    pixels = np.empty((*drawings.shape[:2], size, size), dtype=np.uint8)
    for c in range(drawings.shape[0]):
        for d in range(drawings.shape[1]):
            image = Image.fromarray(drawings[c, d].astype(np.uint8) * 255, mode="L")  # True (background) is white
            pixels[c, d] = np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))
    return 1.0 - torch.from_numpy(pixels).unsqueeze(2).float().div(255)


class RotatedClasses(Dataset):
    """The drawings of some characters, each character once per rotation of :data:`ROTATIONS` as its own class.

    Item ``k * n + j`` is drawing ``j`` of the split (of ``n``), rotated by ``90 k`` degrees counter-clockwise, with
    label ``k * classes + label_j``. The images are shared with the other splits, not copied; rotated when read.

    Args:
        images: every drawing, ``(N, C, H, W)`` with ``H == W``.
        index: the drawings of the split (positions in ``images``).
        labels: their labels, ``0 .. classes - 1``.
        classes: the characters of the split.
    """

    def __init__(self, images: Tensor, index: Tensor, labels: list[int], classes: int) -> None:
        self.images, self.index, self.base_labels, self.classes = images, index, labels, classes

    def __len__(self) -> int:
        return len(ROTATIONS) * len(self.index)

    def label(self, item: int) -> int:
        k, j = divmod(item, len(self.index))
        return k * self.classes + self.base_labels[j]

    def __getitem__(self, item: int) -> tuple[Tensor, int]:
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} out of range for {len(self)} rotated drawings")
        k, j = divmod(item, len(self.index))
        return torch.rot90(self.images[self.index[j]], k, dims=(-2, -1)), self.label(item)


def rotated_split(images: Tensor, characters: Tensor, chosen: list[int]) -> ClassSplit:
    """The :class:`~lightning_hypergrad.data.sources.ClassSplit` of the characters ``chosen`` (in that order, labels
    ``0 .. len(chosen) - 1``) with their rotations as classes; ``characters[i]``: the character of drawing ``i``."""
    remap = torch.full((int(characters.max()) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(chosen)] = torch.arange(len(chosen))
    labels_all = remap[characters]
    index = (labels_all >= 0).nonzero().flatten()
    dataset = RotatedClasses(images, index, labels_all[index].tolist(), len(chosen))
    return ClassSplit(dataset, [dataset.label(i) for i in range(len(dataset))])


def check_l2l_files(options: DatasetOptions) -> None:
    """The checks of ``dataset="omniglot"``, and that both archives are complete (964 and 659 characters)."""
    check_omniglot_files(options)
    counts = tuple(_characters(options.root / name) for name in OMNIGLOT_ARCHIVES)
    if None not in counts and counts != OMNIGLOT_CHARACTERS:
        raise ValueError(
            f"dataset {NAME!r} splits Omniglot's {sum(OMNIGLOT_CHARACTERS)} characters as learn2learn does, but "
            f"{options.root} holds {counts[0]} + {counts[1]} characters: use the complete archives "
            f"({OMNIGLOT_CHARACTERS[0]} + {OMNIGLOT_CHARACTERS[1]}), or dataset 'omniglot' for a partial copy"
        )


def load_l2l_splits(options: DatasetOptions) -> dict[str, ClassSplit]:
    """Omniglot as learn2learn's benchmark: see the module's docstring."""
    root = options.root
    prepare_omniglot(root, options.download)
    verify_omniglot_archives(root)
    size = options.image_size or 28
    parts = [l2l_images(root / name, size) for name in OMNIGLOT_ARCHIVES]
    counts = tuple(part.shape[0] for part in parts)
    if counts != OMNIGLOT_CHARACTERS:
        raise ValueError(f"dataset {NAME!r} needs the complete archives in {root}; they hold {counts} characters")
    if parts[0].shape[1] != parts[1].shape[1]:
        raise ValueError(f"{root}: the two archives hold different numbers of drawings per character")
    drawings = parts[0].shape[1]
    images = torch.cat(parts).flatten(0, 1)  # character c's drawings at c * drawings ...
    characters = torch.arange(sum(counts)).repeat_interleave(drawings)
    chosen = l2l_class_split(sum(counts), options.split_seed)
    return {split: rotated_split(images, characters, c) for split, c in zip(("train", "val", "test"), chosen)}


SPEC = register(
    DatasetSpec(
        name=NAME,
        channels=1,
        image_size=28,
        load=load_l2l_splits,
        check_files=check_l2l_files,
        prepare=prepare_omniglot_files,
        classes=tuple(len(ROTATIONS) * n for n in (*L2L_SPLIT, sum(OMNIGLOT_CHARACTERS) - sum(L2L_SPLIT))),
        examples_per_class=20,
        examples_reason="every Omniglot character has 20 drawings",
    )
)
