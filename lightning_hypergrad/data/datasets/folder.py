"""``dataset="folder"``: your own images, ``root/<class>/<images>`` or ``root/{train,val,test}/<class>/<images>``.

Every image is checked in :meth:`~lightning_hypergrad.data.FewShotDataModule.setup`, before any training step:
against a ``SHA256SUMS`` in its class folder or in ``root`` when one lists it, else by PIL without decoding pixels
(the header, and for PNG every chunk's CRC-32; about 0.1 ms for a small image). An image that cannot be read raises
:class:`~lightning_hypergrad.data.sources.DataFileError` naming it, there or when it is read.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from lightning_hypergrad.data.registry import DatasetOptions, DatasetSpec, register
from lightning_hypergrad.data.sources import SPLITS, ClassSplit, ImageFiles, check_image, verify_files

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
"""The files read as images (case-insensitive); others are ignored."""

IMAGE_REMEDY = (
    "Replace it with a good copy, or delete it (every file with an image extension in a class folder is read)."
)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _folder_split(class_dirs: Sequence[Path], size: int) -> ClassSplit:
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = _image_files(class_dir)
        paths += files
        labels += [label] * len(files)
    return ClassSplit(ImageFiles(paths, labels, size, IMAGE_REMEDY), labels, [d.name for d in class_dirs])


def check_folder(options: DatasetOptions) -> None:
    """Raises ``FileNotFoundError`` when ``root`` is not a folder."""
    if not options.root.is_dir():
        raise FileNotFoundError(
            f"dataset 'folder': root {options.root} is not a folder; set root to a folder holding "
            "root/<class>/<images> or root/{train,val,test}/<class>/<images>"
        )


def load_folder_splits(options: DatasetOptions) -> dict[str, ClassSplit]:
    """``root/<class>/<images>`` split 60/20/20% by class, or ``root/{train,val,test}/<class>/<images>`` as given.

    Raises:
        ValueError: a split ends up with no class.
        DataFileError: an image that cannot be read (the message names it).
    """
    splits = _folder_splits(options)
    for split in splits.values():
        verify_files(split.dataset.paths, check_image, IMAGE_REMEDY, root=options.root)
    return splits


def _folder_splits(options: DatasetOptions) -> dict[str, ClassSplit]:
    root = options.root
    size = options.image_size or 32
    if all((root / split).is_dir() for split in SPLITS):
        return {split: _folder_split(_class_folders(root / split), size) for split in SPLITS}
    classes = _class_folders(root)
    random.Random(options.split_seed).shuffle(classes)
    n_train, n_val = round(0.6 * len(classes)), round(0.2 * len(classes))
    parts = [classes[:n_train], classes[n_train : n_train + n_val], classes[n_train + n_val :]]
    if min(len(part) for part in parts) == 0:
        raise ValueError(
            f"{root} has {len(classes)} class folders, split 60/20/20% into {[len(p) for p in parts]} train/val/test "
            "classes: a split would be empty. Add class folders (at least 3, in practice several times `ways`), or "
            "give the split yourself with root/train, root/val and root/test folders of classes."
        )
    return {split: _folder_split(part, size) for split, part in zip(SPLITS, parts)}


SPEC = register(
    DatasetSpec(
        name="folder",
        channels=3,
        image_size=32,
        load=load_folder_splits,
        check_files=check_folder,
        needs_root="a folder of class folders (root/<class>/<images>) or of train/val/test folders of class folders",
    )
)
