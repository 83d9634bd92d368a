"""Image sources for few-shot learning: each loader returns the meta-train, meta-validation and meta-test splits.

A split is a map-style dataset of ``(image, label)`` pairs (images as float tensors ``(C, H, W)`` in ``[0, 1]``) with
its labels known up front, so that learn2learn's ``MetaDataset`` needs no pass over the images to index them.
"""

from __future__ import annotations

import os
import pickle
import random
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

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

OMNIGLOT_ARCHIVES = ("images_background.npz", "images_evaluation.npz")
OMNIGLOT_TORCHVISION_FOLDER = "omniglot-py"
CIFAR100_FOLDER = "cifar-100-python"
CIFARFS_SPLIT_FOLDER = "cifarfs_splits"
MINI_IMAGENET_MODES = {"train": "train", "val": "validation", "test": "test"}


def mini_imagenet_file(root: Path, split: str) -> Path:
    """The learn2learn pickle of one mini-ImageNet split (``split`` in :data:`SPLITS`)."""
    return root / f"mini-imagenet-cache-{MINI_IMAGENET_MODES[split]}.pkl"


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


def _tensor_split(images: Tensor, labels: Tensor, classes: Sequence[int], size: int | None) -> ClassSplit:
    """The examples of ``classes`` (original label values), relabelled ``0..len(classes)-1`` in that order."""
    remap = {int(c): i for i, c in enumerate(classes)}
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in remap:
        mask |= labels == c
    index = mask.nonzero().flatten()
    new_labels = [remap[int(label)] for label in labels[index]]
    return ClassSplit(TensorImages(images[index], new_labels, size), new_labels)


# ---------------------------------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------------------------------


def load_digits_splits(image_size: int | None) -> dict[str, ClassSplit]:
    """scikit-learn's bundled 8x8 digits in ``[0, 1]``: digits 0-4 meta-train, 5-9 meta-validation and meta-test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images / 16.0).float().unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    size = None if image_size in (None, 8) else image_size
    held_out = _tensor_split(images, labels, range(5, 10), size)
    return {"train": _tensor_split(images, labels, range(5), size), "val": held_out, "test": held_out}


# ---------------------------------------------------------------------------------------------------------------------
# Omniglot
# ---------------------------------------------------------------------------------------------------------------------


def omniglot_available(root: Path) -> bool:
    """Whether ``root`` holds the two NumPy archives or torchvision's extracted ``omniglot-py`` folders."""
    archives = all((root / name).is_file() for name in OMNIGLOT_ARCHIVES)
    folders = all((root / OMNIGLOT_TORCHVISION_FOLDER / Path(name).stem).is_dir() for name in OMNIGLOT_ARCHIVES)
    return archives or folders


def _read_omniglot_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's extracted ``images_*`` folder (``alphabet/character/*.png``) in the NumPy-archive layout."""
    from PIL import Image

    characters = sorted(p for alphabet in sorted(folder.iterdir()) if alphabet.is_dir() for p in alphabet.iterdir())
    characters = [c for c in characters if c.is_dir()]
    drawings = []
    for character in characters:
        files = sorted(character.glob("*.png"))
        drawings.append(np.stack([np.asarray(Image.open(f).convert("L")) > 127 for f in files]))
    counts = {len(d) for d in drawings}
    if len(counts) != 1:
        raise ValueError(f"{folder}: characters have different numbers of drawings ({sorted(counts)})")
    images = np.stack(drawings)
    labels = np.repeat(np.arange(len(characters), dtype=np.int64)[:, None], images.shape[1], axis=1)
    return images, labels


def prepare_omniglot(root: Path, download: bool) -> None:
    """Makes sure ``root`` holds the two NumPy archives, downloading with torchvision if allowed.

    When only torchvision's extracted folders are there (or were just downloaded), they are converted to the archive
    layout once, so that later runs read two files instead of 32,460 images.
    """
    if all((root / name).is_file() for name in OMNIGLOT_ARCHIVES):
        return
    if not omniglot_available(root):
        if not download:
            raise FileNotFoundError(omniglot_missing_message(root))
        from torchvision.datasets import Omniglot

        for background in (True, False):
            Omniglot(str(root), background=background, download=True)
    for name in OMNIGLOT_ARCHIVES:
        target = root / name
        if target.is_file():
            continue
        images, labels = _read_omniglot_folder(root / OMNIGLOT_TORCHVISION_FOLDER / target.stem)
        partial = root / f".{name}.partial.npz"
        np.savez_compressed(partial, images=images, labels=labels)
        os.replace(partial, target)


def omniglot_missing_message(root: Path) -> str:
    """The error for absent Omniglot data: the paths looked at and how to get them."""
    looked = [str(root / name) for name in OMNIGLOT_ARCHIVES]
    looked += [str(root / OMNIGLOT_TORCHVISION_FOLDER / Path(name).stem) for name in OMNIGLOT_ARCHIVES]
    return (
        "Omniglot data not found; looked for " + ", ".join(looked) + ". Either place the two NumPy archives "
        "(images_background.npz and images_evaluation.npz, arrays `images` bool (n_chars, 20, 105, 105) and `labels` "
        "int64 (n_chars, 20)) in that folder (set `root` to it), or set `download: true` on a machine with internet "
        "access to fetch the original files with torchvision."
    )


def _omniglot_images(archive: Path, size: int, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """One archive as float images ``(n_chars * 20, 1, size, size)`` with strokes 1.0, and character labels."""
    with np.load(archive) as data:
        drawings, labels = data["images"], data["labels"]
    if drawings.ndim != 4 or labels.shape != drawings.shape[:2]:
        raise ValueError(
            f"{archive}: expected `images` (n_chars, n_drawings, H, W) and `labels` (n_chars, n_drawings), got "
            f"{drawings.shape} and {labels.shape}"
        )
    flat = drawings.reshape(-1, 1, *drawings.shape[2:])
    out = torch.empty(len(flat), 1, size, size)
    for start in range(0, len(flat), chunk):
        ink = torch.from_numpy(~flat[start : start + chunk]).float()  # True is background: invert so strokes are 1
        out[start : start + chunk] = resize(ink, size)
    return out, torch.from_numpy(labels.reshape(-1).astype(np.int64))


def load_omniglot_splits(root: Path, image_size: int | None, download: bool) -> dict[str, ClassSplit]:
    """Omniglot: background characters meta-train; evaluation characters halved (first half meta-validation)."""
    prepare_omniglot(root, download)
    size = image_size or 28
    images, labels = _omniglot_images(root / OMNIGLOT_ARCHIVES[0], size)
    train = _tensor_split(images, labels, torch.unique(labels).tolist(), None)
    images, labels = _omniglot_images(root / OMNIGLOT_ARCHIVES[1], size)
    characters = torch.unique(labels).tolist()
    half = (len(characters) + 1) // 2
    return {
        "train": train,
        "val": _tensor_split(images, labels, characters[:half], None),
        "test": _tensor_split(images, labels, characters[half:], None),
    }


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR-100 and CIFAR-FS
# ---------------------------------------------------------------------------------------------------------------------


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


def prepare_cifar(root: Path, download: bool, names: Sequence[str] = ("train", "test")) -> None:
    """Makes sure ``root/cifar-100-python`` holds the official pickles, downloading with torchvision if allowed."""
    missing = [p for p in cifar_files(root, names) if not p.is_file()]
    if not missing:
        return
    if not download:
        raise FileNotFoundError(cifar_missing_message(missing))
    from torchvision.datasets import CIFAR100

    CIFAR100(str(root), train=True, download=True)


def _unpickle(path: Path) -> dict[str, object]:
    """One official CIFAR pickle, with its byte-string keys decoded."""
    with open(path, "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar_images(root: Path) -> tuple[Tensor, Tensor]:
    """All 60,000 images (train and test files merged) as ``uint8 (N, 3, 32, 32)`` with their fine labels."""
    images, labels = [], []
    for path in cifar_files(root):
        part = _unpickle(path)
        images.append(np.asarray(part["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(part["fine_labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_cifar100_splits(root: Path, image_size: int | None, download: bool, split_seed: int) -> dict[str, ClassSplit]:
    """CIFAR-100 with its 100 classes shuffled by ``split_seed``: 50 meta-train, 50 meta-validation (= meta-test)."""
    prepare_cifar(root, download)
    images, labels = _cifar_images(root)
    classes = torch.unique(labels).tolist()
    random.Random(split_seed).shuffle(classes)
    half = len(classes) // 2
    size = None if image_size in (None, 32) else image_size
    held_out = _tensor_split(images, labels, classes[half:], size)
    return {"train": _tensor_split(images, labels, classes[:half], size), "val": held_out, "test": held_out}


def load_cifarfs_splits(root: Path, image_size: int | None, download: bool) -> dict[str, ClassSplit]:
    """CIFAR-100 images with the CIFAR-FS class split read from ``root/cifarfs_splits/{train,val,test}.txt``."""
    split_files = cifarfs_split_files(root)
    missing = [p for p in split_files if not p.is_file()]
    if missing:
        raise FileNotFoundError(cifarfs_missing_message(missing))
    prepare_cifar(root, download, ("train", "test", "meta"))
    meta = _unpickle(cifar_files(root, ["meta"])[0])
    names = [name.decode() if isinstance(name, bytes) else str(name) for name in meta["fine_label_names"]]
    label_of = {name: i for i, name in enumerate(names)}
    images, labels = _cifar_images(root)
    size = None if image_size in (None, 32) else image_size
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
        out[split] = _tensor_split(images, labels, [label_of[name] for name in wanted], size)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# mini-ImageNet
# ---------------------------------------------------------------------------------------------------------------------


def mini_imagenet_missing_message(missing: Sequence[Path]) -> str:
    """The error for absent mini-ImageNet pickles: the paths looked at and how to get them."""
    return (
        "mini-ImageNet data not found: missing " + ", ".join(str(p) for p in missing) + ". Set `download: true` on a "
        "machine with internet access (learn2learn downloads its mini-imagenet-cache-*.pkl files), or place those "
        "pickles in `root`."
    )


def load_mini_imagenet_splits(root: Path, image_size: int | None, download: bool) -> dict[str, ClassSplit]:
    """learn2learn's mini-ImageNet pickles (Ravi and Larochelle's 64/16/20 class split), in ``[0, 1]`` when read."""
    from lightning_hypergrad.data.tasks import import_learn2learn

    missing = [mini_imagenet_file(root, split) for split in SPLITS if not mini_imagenet_file(root, split).is_file()]
    if missing and not download:
        raise FileNotFoundError(mini_imagenet_missing_message(missing))
    datasets = import_learn2learn().vision.datasets
    size = None if image_size in (None, 84) else image_size
    out = {}
    for split, mode in MINI_IMAGENET_MODES.items():
        source = datasets.MiniImagenet(str(root), mode=mode, download=download)
        images = source.x.to(torch.uint8)  # learn2learn keeps 0-255 as float32: hold a quarter of the memory
        labels = [int(label) for label in source.y]
        del source
        out[split] = ClassSplit(TensorImages(images, labels, size), labels)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# folder
# ---------------------------------------------------------------------------------------------------------------------


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
    return ClassSplit(ImageFiles(paths, labels, size), labels, [d.name for d in class_dirs])


def load_folder_splits(root: Path, image_size: int | None, split_seed: int) -> dict[str, ClassSplit]:
    """``root/<class>/<images>`` split 60/20/20% by class, or ``root/{train,val,test}/<class>/<images>`` as given.

    Raises:
        ValueError: a split ends up with no class.
    """
    size = image_size or 32
    if all((root / split).is_dir() for split in SPLITS):
        return {split: _folder_split(_class_folders(root / split), size) for split in SPLITS}
    classes = _class_folders(root)
    random.Random(split_seed).shuffle(classes)
    n_train, n_val = round(0.6 * len(classes)), round(0.2 * len(classes))
    parts = [classes[:n_train], classes[n_train : n_train + n_val], classes[n_train + n_val :]]
    if min(len(part) for part in parts) == 0:
        raise ValueError(
            f"{root} has {len(classes)} class folders, split 60/20/20% into {[len(p) for p in parts]} train/val/test "
            "classes: a split would be empty. Add class folders (at least 3, in practice several times `ways`), or "
            "give the split yourself with root/train, root/val and root/test folders of classes."
        )
    return {split: _folder_split(part, size) for split, part in zip(SPLITS, parts)}
