"""Damaged data files (cut short, flipped bits, another checksum) raise one DataFileError naming the file.

All files are generated in ``tmp_path``: small Omniglot archives, CIFAR-100 and mini-ImageNet pickles, PNG folders.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lightning_hypergrad.data import FewShotDataModule, sources
from lightning_hypergrad.data.sources import DataFileError, ImageFiles

SMALL = {"ways": 2, "shots": 1, "queries": 1, "meta_batch_size": 2, "train_batches": 1, "val_tasks": 2, "test_tasks": 2}


def _build_and_setup(dataset: str, root: Path) -> FewShotDataModule:
    dm = FewShotDataModule(dataset, root=str(root), **SMALL)
    dm.setup()
    return dm


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _write_sums(folder: Path, *files: Path) -> Path:
    listing = folder / "SHA256SUMS"
    lines = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(folder).as_posix()}\n" for f in files]
    listing.write_text("".join(lines))
    return listing


def _assert_names(info: pytest.ExceptionInfo, path: Path, *parts: str) -> None:
    message = str(info.value)
    assert str(path) in message, message
    assert info.value.path == path
    assert "\n" not in message and len(message) < 600, message
    for part in parts:
        assert part in message, message


# ---------------------------------------------------------------------------------------------------------------------
# Omniglot archives (20x20 drawings instead of 105x105: the loader resizes any size)
# ---------------------------------------------------------------------------------------------------------------------

ARCHIVES = ("images_background.npz", "images_evaluation.npz")


def _write_omniglot(root: Path, n_chars: int = 4, side: int = 20) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    for name in ARCHIVES:
        images = rng.random((n_chars, 20, side, side)) < 0.7
        labels = np.repeat(np.arange(n_chars, dtype=np.int64)[:, None], 20, axis=1)
        np.savez_compressed(root / name, images=images, labels=labels)
    return root / ARCHIVES[0], root / ARCHIVES[1]


def _flip_inside_images(archive: Path) -> None:
    """Flips a byte in the middle of the compressed ``images`` array (its zip entry stays in place)."""
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo("images.npy")
    with open(archive, "rb") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(f.read(4), dtype="<u2")
    start = info.header_offset + 30 + int(name_length) + int(extra_length)
    _flip(archive, start + info.compress_size // 2)


def test_good_archives_pass_and_are_hashed_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    background, evaluation = _write_omniglot(tmp_path)
    assert len(set(_build_and_setup("omniglot", tmp_path).splits["train"].labels)) == 4  # no SHA256SUMS: read
    _write_sums(tmp_path, background, evaluation)
    hashed: list[Path] = []
    sha256_of = sources.sha256_of
    monkeypatch.setattr(sources, "sha256_of", lambda path: hashed.append(path) or sha256_of(path))
    _build_and_setup("omniglot", tmp_path)
    assert sorted(hashed) == [background, evaluation]  # at the build; setup and later builds find them checked
    _build_and_setup("omniglot", tmp_path)
    assert len(hashed) == 2
    os.utime(background, ns=(0, 0))  # a file that changed is checked again
    _build_and_setup("omniglot", tmp_path)
    assert hashed[2:] == [background]


@pytest.mark.parametrize("with_sums", [False, True])
def test_a_truncated_archive_is_named_when_the_data_module_is_built(tmp_path: Path, with_sums: bool) -> None:
    background, evaluation = _write_omniglot(tmp_path)
    if with_sums:
        _write_sums(tmp_path, background, evaluation)
    _truncate(evaluation)
    with pytest.raises(DataFileError) as info:
        FewShotDataModule("omniglot", root=str(tmp_path), **SMALL)
    expected = "SHA-256 that " + str(tmp_path / "SHA256SUMS") if with_sums else "BadZipFile"
    _assert_names(info, evaluation, expected, "Delete it", "download: true")


def test_a_bit_flip_is_named_at_setup_or_with_sha256sums_at_the_build(tmp_path: Path) -> None:
    background, evaluation = _write_omniglot(tmp_path)
    _flip_inside_images(background)
    dm = FewShotDataModule("omniglot", root=str(tmp_path), **SMALL)  # its zip directory is intact
    with pytest.raises(DataFileError) as info:
        dm.setup()
    _assert_names(info, background, "damaged", "download: true")
    assert isinstance(info.value, ValueError)
    _write_omniglot(tmp_path)
    _write_sums(tmp_path, background, evaluation)
    _flip_inside_images(background)
    with pytest.raises(DataFileError) as info:
        FewShotDataModule("omniglot", root=str(tmp_path), **SMALL)
    _assert_names(info, background, "SHA-256", "download: true")


def test_an_archive_that_differs_from_its_sha256sums_line_is_named(tmp_path: Path) -> None:
    background, evaluation = _write_omniglot(tmp_path)
    good = hashlib.sha256(background.read_bytes()).hexdigest()
    listing = tmp_path / "SHA256SUMS"
    listing.write_text(f"# checksums\r\n{good} *{background.name}\r\n\r\n{'0' * 64}  {evaluation.name}\r\n")
    with pytest.raises(DataFileError) as info:
        FewShotDataModule("omniglot", root=str(tmp_path), **SMALL)
    _assert_names(info, evaluation, f"expected {'0' * 16}", str(listing))
    listing.write_text(f"{good}  {background.name}\nnot a checksum line\n")
    with pytest.raises(DataFileError) as info:
        FewShotDataModule("omniglot", root=str(tmp_path), **SMALL)
    _assert_names(info, listing, "line 2", "sha256sum")


def test_an_archive_without_the_labels_array_is_named(tmp_path: Path) -> None:
    background, _ = _write_omniglot(tmp_path)
    np.savez_compressed(background, images=np.ones((4, 20, 20, 20), dtype=bool))
    with pytest.raises(DataFileError) as info:
        FewShotDataModule("omniglot", root=str(tmp_path), **SMALL)
    _assert_names(info, background, "labels.npy")


def test_a_damaged_png_of_torchvisions_omniglot_folders_is_named(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("images_background", "images_evaluation"):
        for c in range(4):
            folder = tmp_path / "omniglot-py" / split / "Alphabet" / f"character{c}"
            folder.mkdir(parents=True)
            for i in range(20):
                Image.fromarray(np.full((12, 12), 255 * (i % 2), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    broken = tmp_path / "omniglot-py" / "images_evaluation" / "Alphabet" / "character2" / "07.png"
    _truncate(broken)
    dm = FewShotDataModule("omniglot", root=str(tmp_path), **SMALL)
    with pytest.raises(DataFileError) as info:
        dm.prepare_data()
    _assert_names(info, broken, "download: true")


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR-100 / CIFAR-FS pickles
# ---------------------------------------------------------------------------------------------------------------------


def _write_cifar(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per_class in (("train", 3), ("test", 1)):
        labels = np.repeat(np.arange(100), per_class)
        content = {b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), b"fine_labels": labels.tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(content, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{c}".encode() for c in range(100)]}, f, protocol=2)
    return folder


def test_a_truncated_cifar_pickle_is_named_when_the_data_module_is_built(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path)
    assert len(set(_build_and_setup("cifar100", tmp_path).splits["train"].labels)) == 50
    _truncate(folder / "train")
    for dataset in ("cifar100", "cifarfs"):
        (tmp_path / "cifarfs_splits").mkdir(exist_ok=True)
        for split, classes in (("train", range(64)), ("val", range(64, 80)), ("test", range(80, 100))):
            (tmp_path / "cifarfs_splits" / f"{split}.txt").write_text("".join(f"class{c}\n" for c in classes))
        with pytest.raises(DataFileError) as info:
            FewShotDataModule(dataset, root=str(tmp_path), **SMALL)
        _assert_names(info, folder / "train", "cut short", "cifar-100-python.tar.gz", "download: true")


def test_a_cifar_pickle_damaged_inside_is_named_at_setup(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path)
    data = (folder / "test").read_bytes()
    (folder / "test").write_bytes(b"\x00\x01" + data[2:])  # still ends with the STOP opcode
    dm = FewShotDataModule("cifar100", root=str(tmp_path), **SMALL)
    with pytest.raises(DataFileError) as info:
        dm.setup()
    _assert_names(info, folder / "test", "UnpicklingError", "download: true")


def test_a_cifar_pickle_is_checked_against_sha256sums_in_root(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path)
    _write_sums(tmp_path, folder / "train", folder / "test")
    _flip(folder / "train", 1000)  # pixel bytes: it still unpickles, only the checksum sees it
    with pytest.raises(DataFileError) as info:
        FewShotDataModule("cifar100", root=str(tmp_path), **SMALL)
    _assert_names(info, folder / "train", "SHA-256", str(tmp_path / "SHA256SUMS"))


# ---------------------------------------------------------------------------------------------------------------------
# mini-ImageNet pickles
# ---------------------------------------------------------------------------------------------------------------------


def _write_mini_imagenet(root: Path) -> list[Path]:
    paths = []
    for mode in ("train", "validation", "test"):
        content = {
            "image_data": np.zeros((4, 84, 84, 3), dtype=np.uint8),
            "class_dict": {f"{mode}_a": [0, 1], f"{mode}_b": [2, 3]},
        }
        paths.append(root / f"mini-imagenet-cache-{mode}.pkl")
        with open(paths[-1], "wb") as f:
            pickle.dump(content, f)
    return paths


def test_damaged_mini_imagenet_pickles_are_named(tmp_path: Path) -> None:
    train, validation, _ = _write_mini_imagenet(tmp_path)
    _truncate(validation)
    with pytest.raises(DataFileError) as info:
        FewShotDataModule("mini-imagenet", root=str(tmp_path), **SMALL)
    _assert_names(info, validation, "cut short", "download: true")
    _write_mini_imagenet(tmp_path)
    train.write_bytes(b"\x00\x01" + train.read_bytes()[2:])
    dm = FewShotDataModule("mini-imagenet", root=str(tmp_path), **SMALL)
    with pytest.raises(DataFileError) as info:
        dm.setup()
    _assert_names(info, train, "damaged", "download: true")


# ---------------------------------------------------------------------------------------------------------------------
# folders of images
# ---------------------------------------------------------------------------------------------------------------------


def _write_folder(root: Path) -> list[Path]:
    from PIL import Image

    paths = []
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(2):
            paths.append(root / f"class{c}" / f"{i}.png")
            pixels = np.random.default_rng(10 * c + i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.mark.parametrize("damage", ["truncated", "flipped", "not an image"])
def test_a_damaged_image_in_a_folder_is_named_at_setup(tmp_path: Path, damage: str) -> None:
    paths = _write_folder(tmp_path)
    _build_and_setup("folder", tmp_path)
    broken = paths[7]
    if damage == "truncated":
        _truncate(broken)
    elif damage == "flipped":
        _flip(broken, broken.stat().st_size // 2)
    else:
        broken.write_text("not an image")
    dm = FewShotDataModule("folder", root=str(tmp_path), **SMALL)
    with pytest.raises(DataFileError) as info:
        dm.setup()
    _assert_names(info, broken, "Replace it")


def test_an_image_that_fails_when_read_is_named(tmp_path: Path) -> None:
    paths = _write_folder(tmp_path)
    _flip(paths[1], paths[1].stat().st_size // 2)
    with pytest.raises(DataFileError) as info:
        ImageFiles(paths, [0] * len(paths), 8, remedy="Replace it.")[1]
    _assert_names(info, paths[1], "Replace it.")
    assert ImageFiles(paths, [0] * len(paths), 8)[0][0].shape == (3, 8, 8)


# ---------------------------------------------------------------------------------------------------------------------
# the error itself
# ---------------------------------------------------------------------------------------------------------------------


def test_the_error_is_a_value_error_that_survives_pickling(tmp_path: Path) -> None:
    error = sources.damaged(tmp_path / "x.npz", "is broken", "Get it again.")
    assert isinstance(error, ValueError) and str(error) == f"{tmp_path / 'x.npz'} is broken. Get it again."
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is DataFileError and str(again) == str(error) and again.path == tmp_path / "x.npz"
    assert type(DataFileError("worker traceback text")).__name__ == "DataFileError"  # one-argument form
