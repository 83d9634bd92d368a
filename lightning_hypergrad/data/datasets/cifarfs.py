"""``dataset="cifarfs"``: the CIFAR-100 images with the CIFAR-FS class split of Bertinetto et al. (ICLR 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning_hypergrad.data.datasets.cifar100 import (
    CIFAR_REMEDY,
    EXAMPLES_REASON,
    check_cifar,
    cifar_files,
    cifar_images,
    prepare_cifar,
    unpickle,
)
from lightning_hypergrad.data.registry import DatasetOptions, DatasetSpec, register
from lightning_hypergrad.data.sources import SPLITS, ClassSplit, reading, tensor_split

CIFARFS_SPLIT_FOLDER = "cifarfs_splits"

CIFAR_FILES = ("train", "test", "meta")
"""The official pickles CIFAR-FS reads: the images and ``meta``, which maps the class names to labels."""


def cifarfs_split_files(root: Path) -> list[Path]:
    """The CIFAR-FS class-split files looked for under ``root``."""
    return [root / CIFARFS_SPLIT_FOLDER / f"{split}.txt" for split in SPLITS]


def cifarfs_missing_message(missing: Sequence[Path]) -> str:
    """The error for absent CIFAR-FS split files: which files and where the official split comes from."""
    return (
        "CIFAR-FS needs the class split of Bertinetto et al. (ICLR 2019), which is not bundled here: missing "
        + ", ".join(str(p) for p in missing)
        + ". Each file lists one CIFAR-100 fine class name per line (64 train, 16 val, 20 test classes). The "
        "official files are published with the paper's data; learn2learn's CIFARFS download (cifar100.zip) "
        "contains them as cifar100/splits/bertinetto/{train,val,test}.txt: copy those three files to the folder "
        "above, or use dataset: cifar100 for the 50/50 class split."
    )


def _check_split_files(root: Path) -> list[Path]:
    """The split files, or ``FileNotFoundError`` naming the absent ones (they cannot be downloaded)."""
    split_files = cifarfs_split_files(root)
    missing = [p for p in split_files if not p.is_file()]
    if missing:
        raise FileNotFoundError(cifarfs_missing_message(missing))
    return split_files


def check_cifarfs_files(options: DatasetOptions) -> None:
    """Raises ``FileNotFoundError`` without the split files, or without the pickles when ``download`` is off."""
    _check_split_files(options.root)
    check_cifar(options.root, options.download, CIFAR_FILES)


def prepare_cifarfs_files(options: DatasetOptions) -> None:
    """Downloads CIFAR-100 with torchvision when allowed and needed (the split files must be there already)."""
    prepare_cifar(options.root, options.download, CIFAR_FILES)


def load_cifarfs_splits(options: DatasetOptions) -> dict[str, ClassSplit]:
    """CIFAR-100 images with the CIFAR-FS class split read from ``root/cifarfs_splits/{train,val,test}.txt``."""
    root = options.root
    split_files = _check_split_files(root)
    prepare_cifar(root, options.download, CIFAR_FILES)
    meta_file = cifar_files(root, ["meta"])[0]
    meta = unpickle(meta_file)
    with reading(meta_file, CIFAR_REMEDY):
        names = [name.decode() if isinstance(name, bytes) else str(name) for name in meta["fine_label_names"]]
    label_of = {name: i for i, name in enumerate(names)}
    images, labels = cifar_images(root)
    size = None if options.image_size in (None, 32) else options.image_size
    out, seen = {}, set()
    for split, path in zip(SPLITS, split_files):
        wanted = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        unknown = [name for name in wanted if name not in label_of]
        if unknown:
            raise ValueError(
                f"{path}: {len(unknown)} class names are not CIFAR-100 fine label names: {unknown[:5]}; the file must "
                f"list names such as {names[:3]}, one per line"
            )
        overlap = seen.intersection(wanted)
        if overlap:
            raise ValueError(f"{path}: classes {sorted(overlap)[:5]} also appear in an earlier split file")
        seen.update(wanted)
        out[split] = tensor_split(images, labels, [label_of[name] for name in wanted], size)
    return out


SPEC = register(
    DatasetSpec(
        name="cifarfs",
        channels=3,
        image_size=32,
        load=load_cifarfs_splits,
        check_files=check_cifarfs_files,
        prepare=prepare_cifarfs_files,
        classes=(64, 16, 20),
        examples_per_class=600,
        examples_reason=EXAMPLES_REASON,
    )
)
