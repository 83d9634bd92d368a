"""``dataset="omniglot"``: Omniglot as two NumPy archives, converted once from torchvision's download if needed.

The archives are checked when the data module is built (and again after a download): against the ``SHA256SUMS``
beside them when it lists them (hashing the 5.7 MB of the full archives takes under 10 ms), else by reading their zip
directory; flipped bits in an archive without a checksum are found when it is loaded. Either way a damaged archive
raises :class:`~lightning_hypergrad.data.sources.DataFileError` naming it.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_hypergrad.data.registry import DatasetOptions, DatasetSpec, register
from lightning_hypergrad.data.sources import ClassSplit, check_zip, reading, resize, tensor_split, verify_files

OMNIGLOT_ARCHIVES = ("images_background.npz", "images_evaluation.npz")
OMNIGLOT_TORCHVISION_FOLDER = "omniglot-py"

OMNIGLOT_ARRAYS = ("images.npy", "labels.npy")
"""The members of each archive (the arrays ``images`` and ``labels``)."""

ARCHIVE_REMEDY = (
    f"Delete it and run again: it is rebuilt from root/{OMNIGLOT_TORCHVISION_FOLDER} when that folder is there, else "
    "downloaded with `download: true`; or copy the archive again from where you got it."
)
PNG_REMEDY = (
    f"Replace it from the original images_*.zip, or delete root/{OMNIGLOT_TORCHVISION_FOLDER} and download it again "
    "with `download: true`."
)


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
        pixels = []
        for file in sorted(character.glob("*.png")):
            with reading(file, PNG_REMEDY), Image.open(file) as image:
                pixels.append(np.asarray(image.convert("L")) > 127)
        drawings.append(np.stack(pixels))
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
    """The error for absent Omniglot data: the paths looked at (of the missing parts only) and how to get them."""
    folders = all((root / OMNIGLOT_TORCHVISION_FOLDER / Path(name).stem).is_dir() for name in OMNIGLOT_ARCHIVES)
    missing = [name for name in OMNIGLOT_ARCHIVES if not (root / name).is_file()]
    looked = [str(root / name) for name in missing]
    if not folders:
        looked += [
            str(root / OMNIGLOT_TORCHVISION_FOLDER / Path(name).stem)
            for name in OMNIGLOT_ARCHIVES
            if not (root / OMNIGLOT_TORCHVISION_FOLDER / Path(name).stem).is_dir()
        ]
    return (
        "Omniglot data not found; looked for " + ", ".join(looked) + ". Either place the two NumPy archives "
        "(images_background.npz and images_evaluation.npz, arrays `images` bool (n_chars, 20, 105, 105) and `labels` "
        "int64 (n_chars, 20)) in that folder (set `root` to it), or set `download: true` on a machine with internet "
        "access to fetch the original files with torchvision."
    )


def _omniglot_images(archive: Path, size: int, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """One archive as float images ``(n_chars * 20, 1, size, size)`` with strokes 1.0, and character labels."""
    with reading(archive, ARCHIVE_REMEDY), np.load(archive) as data:
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


def check_omniglot_archive(path: Path) -> None:
    """Raises when ``path`` is not a zip archive holding the arrays ``images`` and ``labels``."""
    check_zip(path, OMNIGLOT_ARRAYS)


def verify_omniglot_archives(root: Path) -> None:
    """Raises :class:`~lightning_hypergrad.data.sources.DataFileError` naming an archive in ``root`` that is damaged.

    Checks each archive there against ``root/SHA256SUMS`` when that lists it, else its zip directory and arrays.
    """
    archives = [root / name for name in OMNIGLOT_ARCHIVES if (root / name).is_file()]
    verify_files(archives, check_omniglot_archive, ARCHIVE_REMEDY, root=root)


def check_omniglot_files(options: DatasetOptions) -> None:
    """Raises ``FileNotFoundError`` when neither the archives nor torchvision's folders are there and no download,
    :class:`~lightning_hypergrad.data.sources.DataFileError` when an archive there is damaged, and ``ValueError``
    when the two archives hold each other's characters (their names swapped)."""
    if not options.download and not omniglot_available(options.root):
        raise FileNotFoundError(omniglot_missing_message(options.root))
    verify_omniglot_archives(options.root)
    counts = [_characters(options.root / name) for name in OMNIGLOT_ARCHIVES]
    if counts == list(reversed(OMNIGLOT_CHARACTERS)):
        raise ValueError(
            f"{options.root}: {OMNIGLOT_ARCHIVES[0]} holds {counts[0]} characters and {OMNIGLOT_ARCHIVES[1]} "
            f"{counts[1]}, the other way round from Omniglot's ({OMNIGLOT_CHARACTERS[0]} background, "
            f"{OMNIGLOT_CHARACTERS[1]} evaluation): the two files' names are swapped; rename them"
        )


OMNIGLOT_CHARACTERS = (964, 659)
"""The characters of Omniglot's background and evaluation sets."""


def _characters(archive: Path) -> int | None:
    """The number of characters of an archive, from its ``labels`` array's header alone; ``None`` if unreadable."""
    try:
        with zipfile.ZipFile(archive) as z, z.open("labels.npy") as f:
            fmt = np.lib.format
            header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
            shape, _, _ = header(f)
        return int(shape[0])
    except Exception:  # noqa: BLE001 (a damaged archive is reported by its check)
        return None


def prepare_omniglot_files(options: DatasetOptions) -> None:
    """Downloads (if allowed) and converts Omniglot into the two archives."""
    prepare_omniglot(options.root, options.download)


def load_omniglot_splits(options: DatasetOptions) -> dict[str, ClassSplit]:
    """Omniglot: background characters meta-train; evaluation characters halved (first half meta-validation)."""
    root = options.root
    prepare_omniglot(root, options.download)
    verify_omniglot_archives(root)  # once per process: nothing to do when the data module's build checked them
    size = options.image_size or 28
    images, labels = _omniglot_images(root / OMNIGLOT_ARCHIVES[0], size)
    train = tensor_split(images, labels, torch.unique(labels).tolist(), None)
    images, labels = _omniglot_images(root / OMNIGLOT_ARCHIVES[1], size)
    characters = torch.unique(labels).tolist()
    half = (len(characters) + 1) // 2
    return {
        "train": train,
        "val": tensor_split(images, labels, characters[:half], None),
        "test": tensor_split(images, labels, characters[half:], None),
    }


SPEC = register(
    DatasetSpec(
        name="omniglot",
        channels=1,
        image_size=28,
        load=load_omniglot_splits,
        check_files=check_omniglot_files,
        prepare=prepare_omniglot_files,
        classes=(964, 330, 329),
        examples_per_class=20,
        examples_reason="every Omniglot character has 20 drawings",
    )
)
