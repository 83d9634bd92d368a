"""The building blocks that every dataset's loader shares: the split names, :class:`ClassSplit` and image datasets.

A dataset's loader (one module per dataset in :mod:`lightning_hypergrad.data.datasets`) returns the meta-train,
meta-validation and meta-test splits, each a :class:`ClassSplit`: a map-style dataset of ``(image, label)`` pairs
(images as float tensors ``(C, H, W)`` in ``[0, 1]``) with its labels known up front, so that learn2learn's
``MetaDataset`` needs no pass over the images to index them.

It also holds the check of the data files (:func:`verify_files`): a file that is there but damaged (cut short by an
interrupted download or copy, or with flipped bits) raises one :class:`DataFileError` naming the file and how to get
it again, before any training step, instead of a traceback from deep inside NumPy, ``pickle`` or PIL.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
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

CHECKSUM_FILE = "SHA256SUMS"
"""The checksum listing looked for beside the data files, in the format of ``sha256sum``: ``<hex>  <file name>``."""

GET_AGAIN = (
    "Delete it and get it again (`download: true` where the dataset downloads), or copy it again from its source."
)
"""What to do about a damaged file, when the dataset says nothing more precise."""


# ---------------------------------------------------------------------------------------------------------------------
# the check of the data files
# ---------------------------------------------------------------------------------------------------------------------


class DataFileError(ValueError):
    """A data file that is there but cannot be used: cut short, damaged, or not the file its ``SHA256SUMS`` lists.

    The message names the file, what is wrong with it and how to get it again.

    Attributes:
        path: the file (``None`` when not given).
    """

    def __init__(self, message: str, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


def damaged(path: Path, problem: str, remedy: str = GET_AGAIN) -> DataFileError:
    """The error for ``path``: ``"<path> <problem>. <remedy>"``."""
    return DataFileError(f"{path} {problem}. {remedy}", path)


_PASS_THROUGH = (DataFileError, FileNotFoundError, PermissionError, IsADirectoryError, MemoryError)
"""Errors that :func:`reading` leaves as they are: they already say what is wrong, or are not about the file."""


@contextmanager
def reading(path: Path, remedy: str = GET_AGAIN) -> Iterator[None]:
    """Turns any error raised inside the block, which reads ``path`` alone, into a :class:`DataFileError` naming it.

    A damaged file makes NumPy, ``zipfile``, ``zlib``, ``pickle`` or PIL raise errors of many types that do not name
    the file (``BadZipFile``, ``Bad CRC-32``, ``EOFError``, ``UnpicklingError``, ...); the message keeps their text.
    """
    try:
        yield
    except _PASS_THROUGH:
        raise
    except Exception as error:
        detail = " ".join(str(error).split())
        detail = f"{type(error).__name__}: {detail[:200]}" if detail else type(error).__name__
        raise damaged(path, f"cannot be read, it is damaged or incomplete ({detail})", remedy) from error


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file, as the lower-case hex digits that ``sha256sum`` prints (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_SUM_LINE = re.compile(r"(\\?)([0-9a-fA-F]{64}) [ *](.+)")
_ESCAPES = {"\\": "\\", "n": "\n", "r": "\r"}


def _absolute(path: Path) -> str:
    return os.path.normpath(os.path.abspath(path))


def read_checksums(folder: Path) -> dict[str, str]:
    """The SHA-256 of each file that ``folder/SHA256SUMS`` lists, by the file's absolute path; ``{}`` without it.

    The format is that of ``sha256sum`` (``<64 hex digits>  <name>``, or ``<hex> *<name>``; names relative to
    ``folder``; a leading backslash marks an escaped name). Blank lines and lines starting with ``#`` are skipped.

    Raises:
        DataFileError: a line in another format (the message names the line).
    """
    listing = folder / CHECKSUM_FILE
    if not listing.is_file():
        return {}
    sums = {}
    for number, line in enumerate(listing.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _SUM_LINE.fullmatch(line)
        if match is None:
            raise damaged(
                listing,
                f"line {number} is not a `sha256sum` line (`<64 hex digits>  <file name>`): {line[:100]!r}",
                f"Fix that line, or delete {CHECKSUM_FILE} to check the files by reading them instead.",
            )
        escaped, digest, name = match.groups()
        if escaped:
            name = re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[0]), name)
        sums[_absolute(folder / name)] = digest.lower()
    return sums


_VERIFIED: set[tuple[str, int, int, str]] = set()
"""The files checked in this process: ``(absolute path, size, modification time in ns, what was checked)``. A file
that changes (size or time) or whose listed checksum changes is checked again."""


def verify_files(
    paths: Iterable[Path],
    readable: Callable[[Path], None] | None = None,
    remedy: str = GET_AGAIN,
    root: Path | None = None,
) -> None:
    """Checks data files before they are used; each file once per process while its size and time stay the same.

    A file listed in a ``SHA256SUMS`` beside it (or in ``root``) must have that SHA-256: its bytes are hashed (about
    1 s per GB on one core). Any other file is given to ``readable``, a cheap check that raises when the file cannot be
    read (e.g. :func:`check_zip`, :func:`check_pickle`, :func:`check_image`); without ``readable`` it is not checked.

    Args:
        paths: the files (they must exist: check absent files first, with the error that says how to get them).
        readable: the check of files without a listed checksum.
        remedy: how to get a damaged file again; it ends the error message.
        root: the dataset's folder, a second place to look for ``SHA256SUMS``.

    Raises:
        DataFileError: a file whose SHA-256 differs from the listed one, or that ``readable`` cannot read; or a
            ``SHA256SUMS`` with a line in another format. The message names the file.
    """
    listings: dict[Path, dict[str, str]] = {}

    def listed(path: Path) -> tuple[str, Path] | None:
        for folder in dict.fromkeys([path.parent] + ([root] if root is not None else [])):
            if folder not in listings:
                listings[folder] = read_checksums(folder)
            expected = listings[folder].get(_absolute(path))
            if expected is not None:
                return expected, folder / CHECKSUM_FILE
        return None

    for path in paths:
        path = Path(path)
        stat = path.stat()
        entry = listed(path)
        if entry is not None:
            what = f"sha256:{entry[0]}"
        elif readable is not None:
            what = f"readable:{readable.__module__}.{readable.__qualname__}"
        else:
            continue
        key = (_absolute(path), stat.st_size, stat.st_mtime_ns, what)
        if key in _VERIFIED:
            continue
        if entry is not None:
            expected, listing = entry
            found = sha256_of(path)
            if found != expected:
                raise damaged(
                    path,
                    f"does not have the SHA-256 that {listing} lists (expected {expected[:16]}..., found "
                    f"{found[:16]}...): it is damaged, incomplete or another version of the file",
                    remedy,
                )
        else:
            with reading(path, remedy):
                readable(path)
        _VERIFIED.add(key)


def check_zip(path: Path, members: Sequence[str] = ()) -> None:
    """Raises when ``path`` is not a readable zip archive (e.g. a NumPy ``.npz``) holding ``members``.

    Reads only the archive's directory at its end, which a cut-short file has lost; flipped bits inside a member are
    found when it is read (its CRC-32), so read members inside :func:`reading`.
    """
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    missing = [name for name in members if name not in names]
    if missing:
        raise ValueError(f"the archive has no {', '.join(missing)} (it holds {', '.join(sorted(names)) or 'nothing'})")


def check_pickle(path: Path) -> None:
    """Raises when ``path`` cannot be a whole pickle: empty, or not ending with the pickle's STOP opcode (``.``).

    Reads two bytes, so it finds files cut short but not flipped bits: unpickle inside :func:`reading`.
    """
    with open(path, "rb") as f:
        if not f.read(1):
            raise ValueError("the file is empty")
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b".":
            raise ValueError("the pickle is cut short (it does not end with the STOP opcode)")


def check_image(path: Path) -> None:
    """Raises when PIL cannot identify ``path`` as an image or finds it damaged (PNG: every chunk's CRC-32).

    Decodes no pixels; a JPEG cut short shows only when read, which :class:`ImageFiles` reports naming the file.
    """
    from PIL import Image

    with Image.open(path) as image:
        image.verify()


# ---------------------------------------------------------------------------------------------------------------------
# the split and image datasets
# ---------------------------------------------------------------------------------------------------------------------


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
        remedy: what to do about a file that cannot be read; it ends the :class:`DataFileError` naming the file.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], size: int, remedy: str = GET_AGAIN) -> None:
        self.paths = list(paths)
        self.labels = [int(label) for label in labels]
        self.size = size
        self.remedy = remedy

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        with reading(self.paths[index], self.remedy), Image.open(self.paths[index]) as image:
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
