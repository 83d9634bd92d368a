"""``dataset="mini-imagenet"``: learn2learn's mini-ImageNet pickles (Ravi and Larochelle's 64/16/20 class split).

The pickles are checked when the data module is built: against a ``SHA256SUMS`` in ``root`` that lists them (hashing
reads about 1 GB per second), else by their last byte, which a file cut short has lost; a pickle damaged otherwise is
found when it is read. Either way a damaged pickle raises
:class:`~lightning_hypergrad.data.sources.DataFileError` naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_hypergrad.data._learn2learn import import_learn2learn
from lightning_hypergrad.data.registry import DatasetOptions, DatasetSpec, register
from lightning_hypergrad.data.sources import SPLITS, ClassSplit, TensorImages, check_pickle, reading, verify_files

MINI_IMAGENET_MODES = {"train": "train", "val": "validation", "test": "test"}
"""learn2learn's ``mode`` of each split."""

MINI_IMAGENET_REMEDY = (
    "Delete it and run again with `download: true` (learn2learn downloads it again), or copy it again from where you "
    "got it."
)


def mini_imagenet_file(root: Path, split: str) -> Path:
    """The learn2learn pickle of one mini-ImageNet split (``split`` in :data:`SPLITS`)."""
    return root / f"mini-imagenet-cache-{MINI_IMAGENET_MODES[split]}.pkl"


def mini_imagenet_missing_message(missing: Sequence[Path]) -> str:
    """The error for absent mini-ImageNet pickles: the paths looked at and how to get them."""
    return (
        "mini-ImageNet data not found: missing " + ", ".join(str(p) for p in missing) + ". Set `download: true` on a "
        "machine with internet access (learn2learn downloads its mini-imagenet-cache-*.pkl files), or place those "
        "pickles in `root`."
    )


def _missing(root: Path) -> list[Path]:
    return [mini_imagenet_file(root, split) for split in SPLITS if not mini_imagenet_file(root, split).is_file()]


def check_mini_imagenet_files(options: DatasetOptions) -> None:
    """Raises ``FileNotFoundError`` when a split's pickle is absent and ``download`` is off, and
    :class:`~lightning_hypergrad.data.sources.DataFileError` when one there is damaged."""
    missing = _missing(options.root)
    if missing and not options.download:
        raise FileNotFoundError(mini_imagenet_missing_message(missing))
    present = [mini_imagenet_file(options.root, split) for split in SPLITS]
    verify_files([p for p in present if p.is_file()], check_pickle, MINI_IMAGENET_REMEDY, root=options.root)


def prepare_mini_imagenet_files(options: DatasetOptions) -> None:
    """Downloads the absent pickles with learn2learn when ``download`` is set."""
    if not options.download:
        return
    for split, mode in MINI_IMAGENET_MODES.items():
        if not mini_imagenet_file(options.root, split).is_file():
            import_learn2learn().vision.datasets.MiniImagenet(str(options.root), mode=mode, download=True)


def load_mini_imagenet_splits(options: DatasetOptions) -> dict[str, ClassSplit]:
    """learn2learn's mini-ImageNet pickles, in ``[0, 1]`` when read."""
    check_mini_imagenet_files(options)
    datasets = import_learn2learn().vision.datasets
    size = None if options.image_size in (None, 84) else options.image_size
    out = {}
    for split, mode in MINI_IMAGENET_MODES.items():
        path = mini_imagenet_file(options.root, split)
        if path.is_file():  # read errors of a file that is there name it; those of a download stay as they are
            with reading(path, MINI_IMAGENET_REMEDY):
                source = datasets.MiniImagenet(str(options.root), mode=mode, download=options.download)
        else:
            source = datasets.MiniImagenet(str(options.root), mode=mode, download=options.download)
        images = source.x.to(torch.uint8)  # learn2learn keeps 0-255 as float32: hold a quarter of the memory
        labels = [int(label) for label in source.y]
        del source
        out[split] = ClassSplit(TensorImages(images, labels, size), labels)
    return out


SPEC = register(
    DatasetSpec(
        name="mini-imagenet",
        channels=3,
        image_size=84,
        load=load_mini_imagenet_splits,
        check_files=check_mini_imagenet_files,
        prepare=prepare_mini_imagenet_files,
        classes=(64, 16, 20),
        examples_per_class=600,
        examples_reason="every mini-ImageNet class has 600 images",
    )
)
