"""FewShotDataModule: task format, reproducibility, the dataset layouts (on generated data) and the error messages."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning_cases import BatchRecorder

from lightning_hypergrad.data import FewShotDataModule
from lightning_hypergrad.data.sources import ClassSplit


def _omniglot_root() -> Path:
    """``$OMNIGLOT_ROOT``, else the shared copy beside the repository (never inside it)."""
    if "OMNIGLOT_ROOT" in os.environ:
        return Path(os.environ["OMNIGLOT_ROOT"])
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


OMNIGLOT_ROOT = _omniglot_root()


def _digits(**kwargs: object) -> FewShotDataModule:
    settings: dict = {"ways": 3, "shots": 2, "queries": 4, "meta_batch_size": 3, "train_batches": 4, "val_tasks": 5}
    settings.update(kwargs)
    dm = FewShotDataModule("digits", **settings)
    dm.setup("fit")
    return dm


def _batches(loader: torch.utils.data.DataLoader, n: int | None = None) -> list[dict[str, torch.Tensor]]:
    out = []
    for i, batch in enumerate(loader):
        if n is not None and i == n:
            break
        out.append(batch)
    return out


def _equal(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def _check_tasks(batch: dict[str, torch.Tensor], ways: int, shots: int, queries: int, shape: tuple[int, ...]) -> None:
    b = batch["support_x"].shape[0]
    assert batch["support_x"].shape == (b, ways * shots, *shape)
    assert batch["query_x"].shape == (b, ways * queries, *shape)
    assert batch["support_x"].dtype == batch["query_x"].dtype == torch.float32
    assert batch["support_y"].dtype == batch["query_y"].dtype == torch.long
    for t in range(b):
        assert torch.bincount(batch["support_y"][t], minlength=ways).tolist() == [shots] * ways
        assert torch.bincount(batch["query_y"][t], minlength=ways).tolist() == [queries] * ways


# ---------------------------------------------------------------------------------------------------------------------
# digits: format and reproducibility
# ---------------------------------------------------------------------------------------------------------------------


def test_digits_batches_have_the_task_format() -> None:
    dm = _digits()
    assert dm.ways == 3 and dm.meta_batch_size == 3 and dm.image_shape == (1, 8, 8)
    train = _batches(dm.train_dataloader())
    assert len(train) == 4
    for batch in train:
        assert batch["support_x"].shape[0] == 3
        _check_tasks(batch, 3, 2, 4, (1, 8, 8))
        assert 0.0 <= batch["support_x"].min() and batch["support_x"].max() <= 1.0
        for t in range(3):
            # support and query are disjoint (scikit-learn's 1,797 digit images are all distinct)
            support = batch["support_x"][t].flatten(1)
            query = batch["query_x"][t].flatten(1)
            assert not (support[:, None] == query[None]).all(-1).any()
            # the task's examples are all distinct images
            assert len(torch.unique(torch.cat([support, query]), dim=0)) == 3 * (2 + 4)
    val = _batches(dm.val_dataloader())
    assert [b["query_x"].shape[0] for b in val] == [3, 2]  # 5 tasks, 3 at a time: the last batch is smaller
    for batch in val:
        _check_tasks(batch, 3, 2, 4, (1, 8, 8))
    assert len(dm.test_dataloader()) == 200  # test_tasks defaults to 600


def test_digits_classes_are_split_0_to_4_and_5_to_9() -> None:
    dm = _digits()
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float()
    for split, digits_of_split in (("train", range(5)), ("val", range(5, 10)), ("test", range(5, 10))):
        data = dm.splits[split]
        assert len(set(data.labels)) == 5
        expected = sum(int((torch.from_numpy(digits.target) == d).sum()) for d in digits_of_split)
        assert len(data.labels) == expected
        first = data.dataset[0][0][0]
        match = (images == first).flatten(1).all(1).nonzero().flatten()
        assert int(digits.target[match[0]]) in digits_of_split


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    a = _batches(_digits(seed=3).train_dataloader())
    b = _batches(_digits(seed=3).train_dataloader())
    c = _batches(_digits(seed=4).train_dataloader())
    assert _equal(a, b)
    assert not _equal(a, c)
    assert _equal(_batches(_digits(seed=3).val_dataloader()), _batches(_digits(seed=3).val_dataloader()))


def test_epochs_differ_and_state_dict_resumes_the_sequence() -> None:
    dm = _digits(seed=7)
    loader = dm.train_dataloader()
    epoch0 = _batches(loader)
    val0 = _batches(dm.val_dataloader())
    loader.sampler.set_epoch(1)  # what Lightning does at the start of every training epoch
    assert dm.epoch == 1
    epoch1 = _batches(loader)
    assert not _equal(epoch0, epoch1)
    assert _equal(_batches(dm.val_dataloader()), val0)  # the validation tasks are fixed
    state = dm.state_dict()
    assert state == {"seed": 7, "epoch": 1, "batches_done": 0}  # no trainer: no batch done mid-epoch

    resumed = _digits(seed=0)
    resumed.load_state_dict(state)
    assert resumed.seed == 7 and resumed.epoch == 1
    assert _equal(_batches(resumed.train_dataloader()), epoch1)
    resumed.set_epoch(0)
    assert _equal(_batches(resumed.train_dataloader()), epoch0)
    # batch i is a function of (seed, epoch, i): it does not depend on the batches drawn before it
    assert _equal([resumed.train_dataloader().dataset[2]], [epoch0[2]])


def test_sampling_leaves_the_global_random_state_alone_and_pickles() -> None:
    dm = _digits()
    random.seed(123)
    before = random.getstate()
    batches = dm.train_dataloader().dataset
    first = batches[0]
    assert random.getstate() == before
    copy = pickle.loads(pickle.dumps(batches))  # what a spawned dataloader worker receives
    assert _equal([copy[0]], [first])


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_lightning_sets_the_epoch_through_the_sampler() -> None:
    from lightning.pytorch import Trainer

    dm = FewShotDataModule("digits", ways=2, shots=1, queries=2, meta_batch_size=2, train_batches=2, seed=5)
    model = BatchRecorder()
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    assert dm.epoch == 1
    reference = _digits(ways=2, shots=1, queries=2, meta_batch_size=2, train_batches=2, seed=5)
    expected = []
    for epoch in (0, 1):
        reference.set_epoch(epoch)
        expected += [b["query_x"] for b in _batches(reference.train_dataloader())]
    assert len(model.seen) == 4 and all(torch.equal(a, b) for a, b in zip(model.seen, expected))


# ---------------------------------------------------------------------------------------------------------------------
# Omniglot (generated archives in the official layout)
# ---------------------------------------------------------------------------------------------------------------------


def _write_omniglot(root: Path, background: int = 12, evaluation: int = 9) -> None:
    """Character ``c`` of each archive: ink (False) in its top ``5 * (c + 1)`` rows, background (True) below."""
    for name, n_chars in (("images_background.npz", background), ("images_evaluation.npz", evaluation)):
        images = np.ones((n_chars, 20, 105, 105), dtype=bool)
        for c in range(n_chars):
            images[c, :, : 5 * (c + 1)] = False
        images[:, :, 100:, :] ^= np.random.default_rng(0).random((n_chars, 20, 5, 105)) < 0.5  # distinct drawings
        labels = np.repeat(np.arange(n_chars, dtype=np.int64)[:, None], 20, axis=1)
        np.savez_compressed(root / name, images=images, labels=labels)


def _ink_rows(split: ClassSplit) -> set[int]:
    """The character of each class of a loaded split, read back from its number of ink rows."""
    per_class = split.labels_to_indices()
    found = set()
    for indices in per_class.values():
        image = split.dataset[indices[0]][0][0]  # (28, 28), strokes are 1
        found.add(round(float(image[:26].mean()) * (26 * 105 / 28) / 5) - 1)
    return found


def test_omniglot_archives_load_with_strokes_as_one_and_the_specified_splits(tmp_path: Path) -> None:
    _write_omniglot(tmp_path)
    dm = FewShotDataModule("omniglot", root=str(tmp_path), ways=3, shots=1, queries=2, meta_batch_size=2)
    assert dm.image_shape == (1, 28, 28)
    dm.setup()
    counts = {split: len(set(dm.splits[split].labels)) for split in ("train", "val", "test")}
    assert counts == {"train": 12, "val": 5, "test": 4}  # background; evaluation halved, first half (rounded up) val
    assert all(len(dm.splits[s].labels) == 20 * counts[s] for s in counts)
    assert _ink_rows(dm.splits["train"]) == set(range(12))
    assert _ink_rows(dm.splits["val"]) == set(range(5))
    assert _ink_rows(dm.splits["test"]) == set(range(5, 9))
    image = dm.splits["train"].dataset[0][0]
    assert image.shape == (1, 28, 28)
    assert torch.all(image[0, :1] == 1.0) and torch.all(image[0, 2:26] == 0.0)  # character 0: 5 ink rows on top
    batch = next(iter(dm.train_dataloader()))
    _check_tasks(batch, 3, 1, 2, (1, 28, 28))
    _check_tasks(next(iter(dm.test_dataloader())), 3, 1, 2, (1, 28, 28))


def test_omniglot_image_size_and_too_many_ways_for_the_local_copy(tmp_path: Path) -> None:
    _write_omniglot(tmp_path, background=6, evaluation=4)
    dm = FewShotDataModule("omniglot", root=str(tmp_path), ways=2, shots=1, queries=1, image_size=14)
    assert dm.image_shape == (1, 14, 14)
    dm.setup()
    assert next(iter(dm.val_dataloader()))["query_x"].shape[-3:] == (1, 14, 14)
    dm = FewShotDataModule("omniglot", root=str(tmp_path), ways=3, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"ways=3 but the meta-validation split .* has 2 classes"):
        dm.setup()


def test_omniglot_torchvision_folders_are_converted_to_the_archives_once(tmp_path: Path) -> None:
    from PIL import Image

    base = tmp_path / "omniglot-py"
    for split, n_chars in (("images_background", 3), ("images_evaluation", 4)):
        for c in range(n_chars):
            folder = base / split / f"Alphabet_{c % 2}" / f"character{c:02d}"
            folder.mkdir(parents=True)
            for i in range(20):
                pixels = np.full((105, 105), 255, dtype=np.uint8)
                pixels[: 5 * (c + 1)] = 0  # ink on top, as in _write_omniglot
                pixels[104, i] = 0
                Image.fromarray(pixels).convert("1").save(folder / f"{c:04d}_{i:02d}.png")
    dm = FewShotDataModule("omniglot", root=str(tmp_path), ways=2, shots=1, queries=1)
    dm.setup()
    assert (tmp_path / "images_background.npz").is_file() and (tmp_path / "images_evaluation.npz").is_file()
    with np.load(tmp_path / "images_evaluation.npz") as archive:
        assert archive["images"].shape == (4, 20, 105, 105) and archive["images"].dtype == bool
        assert archive["labels"].tolist() == [[c] * 20 for c in range(4)]
    assert _ink_rows(dm.splits["train"]) == set(range(3))
    # characters are ordered by alphabet, then character: Alphabet_0 holds characters 0 and 2 of the evaluation set
    assert _ink_rows(dm.splits["val"]) == {0, 2} and _ink_rows(dm.splits["test"]) == {1, 3}


@pytest.mark.skipif(
    not (OMNIGLOT_ROOT / "images_background.npz").is_file(),
    reason=f"the real Omniglot archives are not in {OMNIGLOT_ROOT} (set OMNIGLOT_ROOT to their folder)",
)
def test_real_omniglot() -> None:
    dm = FewShotDataModule(
        "omniglot", root=str(OMNIGLOT_ROOT), ways=5, shots=1, queries=15, meta_batch_size=2, train_batches=1
    )
    dm.setup()
    assert len(set(dm.splits["train"].labels)) == 964
    assert len(set(dm.splits["val"].labels)) == 330 and len(set(dm.splits["test"].labels)) == 329
    batch = next(iter(dm.train_dataloader()))
    assert batch["support_x"].shape == (2, 5, 1, 28, 28) and batch["query_x"].shape == (2, 75, 1, 28, 28)
    _check_tasks(batch, 5, 1, 15, (1, 28, 28))
    assert batch["support_x"].max() == 1.0 and batch["support_x"].mean() < 0.5  # strokes are 1 on a 0 background


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR-100 and CIFAR-FS (generated cifar-100-python layout)
# ---------------------------------------------------------------------------------------------------------------------


def _write_cifar(root: Path, per_class: int = 12) -> list[str]:
    """100 classes; every pixel of an image of class ``c`` in its first channel is ``c``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"class{c:03d}" for c in range(100)]
    rng = np.random.default_rng(0)
    n_test = per_class // 4
    for name, n in (("train", per_class - n_test), ("test", n_test)):
        labels = np.repeat(np.arange(100), n)
        data = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
        data[:, 0] = labels[:, None, None]
        content = {
            b"filenames": [f"{i}.png".encode() for i in range(len(labels))],
            b"batch_label": name.encode(),
            b"fine_labels": labels.tolist(),
            b"coarse_labels": (labels // 5).tolist(),
            b"data": data.reshape(len(labels), 3072),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(content, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": []}, f)
    return names


def _original_classes(split: ClassSplit) -> set[int]:
    return {round(float(split.dataset[i][0][0, 0, 0]) * 255) for i in range(len(split.labels))}


def test_cifar100_splits_classes_50_50_by_split_seed(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    settings = {"root": str(tmp_path), "ways": 5, "shots": 2, "queries": 3, "meta_batch_size": 2}
    dm = FewShotDataModule("cifar100", split_seed=1, **settings)
    assert dm.image_shape == (3, 32, 32)
    dm.setup()
    train, val = _original_classes(dm.splits["train"]), _original_classes(dm.splits["val"])
    assert len(train) == len(val) == 50 and not train & val and train | val == set(range(100))
    assert _original_classes(dm.splits["test"]) == val  # meta-test = meta-validation
    assert len(dm.splits["train"].labels) == 50 * 12  # train and test files merged
    again = FewShotDataModule("cifar100", split_seed=1, **settings)
    again.setup()
    assert _original_classes(again.splits["train"]) == train
    other = FewShotDataModule("cifar100", split_seed=2, **settings)
    other.setup()
    assert _original_classes(other.splits["train"]) != train
    batch = next(iter(dm.train_dataloader()))
    _check_tasks(batch, 5, 2, 3, (3, 32, 32))


def test_cifarfs_reads_the_split_files(tmp_path: Path) -> None:
    names = _write_cifar(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"cifarfs_splits.train\.txt"):
        FewShotDataModule("cifarfs", root=str(tmp_path))
    splits = tmp_path / "cifarfs_splits"
    splits.mkdir()
    order = list(range(100))
    random.Random(0).shuffle(order)
    parts = {"train": order[:64], "val": order[64:80], "test": order[80:]}
    for split, classes in parts.items():
        (splits / f"{split}.txt").write_text("".join(names[c] + "\n" for c in classes))
    dm = FewShotDataModule("cifarfs", root=str(tmp_path), ways=5, shots=1, queries=2, meta_batch_size=2)
    dm.setup()
    for split, classes in parts.items():
        assert _original_classes(dm.splits[split]) == set(classes)
    _check_tasks(next(iter(dm.val_dataloader())), 5, 1, 2, (3, 32, 32))


# ---------------------------------------------------------------------------------------------------------------------
# folder (generated PNG files)
# ---------------------------------------------------------------------------------------------------------------------


def _write_pngs(folder: Path, n: int, value: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        pixels = np.full((10, 12, 3), value, dtype=np.uint8)
        pixels[0, 0] = i
        Image.fromarray(pixels).save(folder / f"{i}.png")


def test_folder_flat_layout_is_split_60_20_20(tmp_path: Path) -> None:
    for c in range(10):
        _write_pngs(tmp_path / f"class{c}", 3, 20 * c)
    dm = FewShotDataModule("folder", root=str(tmp_path), ways=2, shots=1, queries=2, image_size=16)
    assert dm.image_shape == (3, 16, 16)
    dm.setup()
    counts = [len(set(dm.splits[s].labels)) for s in ("train", "val", "test")]
    assert counts == [6, 2, 2]
    values = [{round(float(dm.splits[s].dataset[i][0][1, 5, 5]) * 255) for i in range(6)} for s in ("val", "test")]
    assert not values[0] & values[1]
    batch = next(iter(dm.train_dataloader()))
    _check_tasks(batch, 2, 1, 2, (3, 16, 16))


def test_folder_split_layout_and_its_checks(tmp_path: Path) -> None:
    for split, n_classes in (("train", 3), ("val", 2), ("test", 2)):
        for c in range(n_classes):
            _write_pngs(tmp_path / split / f"{split}{c}", 3, 30 * c)
    dm = FewShotDataModule("folder", root=str(tmp_path), ways=2, shots=1, queries=2)
    dm.setup()
    assert [len(set(dm.splits[s].labels)) for s in ("train", "val", "test")] == [3, 2, 2]
    _check_tasks(next(iter(dm.test_dataloader())), 2, 1, 2, (3, 32, 32))
    with pytest.raises(ValueError, match=r"ways=3 but the meta-validation split .* has 2 classes"):
        FewShotDataModule("folder", root=str(tmp_path), ways=3, shots=1, queries=1).setup()
    with pytest.raises(ValueError, match=r"shots \+ queries = 2 \+ 2 = 4.*'train0' has 3"):
        FewShotDataModule("folder", root=str(tmp_path), ways=2, shots=2, queries=2).setup()
    (tmp_path / "val" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"meta-validation split .*class 'empty' has 0"):
        FewShotDataModule("folder", root=str(tmp_path), ways=2, shots=1, queries=2).setup()


# ---------------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "imagenet"}, r"unknown dataset 'imagenet'.*cifar100, cifarfs, digits, folder, mini-imagenet"),
        ({"ways": 0}, r"ways must be an integer >= 1, got 0: set it to 1 or more"),
        ({"shots": 0}, r"shots must be an integer >= 1"),
        ({"queries": -1}, r"queries must be an integer >= 1"),
        ({"meta_batch_size": 0}, r"meta_batch_size must be an integer >= 1"),
        ({"train_batches": 0}, r"train_batches must be an integer >= 1"),
        ({"val_tasks": 0}, r"val_tasks must be an integer >= 1"),
        ({"test_tasks": 0}, r"test_tasks must be an integer >= 1"),
        ({"num_workers": -1}, r"num_workers must be an integer >= 0"),
        ({"image_size": 0}, r"image_size must be an integer >= 1"),
        ({"ways": 2.5}, r"ways must be an integer >= 1, got 2.5: set it to a whole number"),
        ({"ways": 6}, r"ways=6 is more than the 5 classes .*set ways between 1 and 5"),
        ({"shots": 100, "queries": 75}, r"shots \+ queries = 100 \+ 75 = 175 .*174.*shots \+ queries <= 174"),
        ({"dataset": "omniglot", "ways": 331}, r"ways=331 .* 330 classes of the meta-validation split.*1 and 329"),
        ({"dataset": "omniglot", "shots": 5, "queries": 16}, r"shots \+ queries = 5 \+ 16 = 21 .* 20 examples"),
        ({"dataset": "cifar100", "ways": 51}, r"ways=51 .*1 and 50"),
        ({"dataset": "cifarfs", "ways": 17}, r"ways=17 .* 16 classes of the meta-validation split"),
        ({"dataset": "mini-imagenet", "ways": 21}, r"ways=21 .*1 and 16"),
        ({"dataset": "mini-imagenet", "shots": 500, "queries": 101}, r"= 601 .* 600 examples"),
        ({"dataset": "folder"}, r"needs root"),
        ({"download": "yes"}, r"download must be true or false"),
    ],
)
def test_invalid_settings_raise_naming_the_setting(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FewShotDataModule(**kwargs)


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("omniglot", "images_background.npz"),
        ("cifar100", "cifar-100-python/train"),
        ("mini-imagenet", "mini-imagenet-cache-train.pkl"),
        ("folder", ""),
    ],
)
def test_missing_data_raises_file_not_found_naming_the_path(tmp_path: Path, dataset: str, expected: str) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        FewShotDataModule(dataset, root=str(root))
    assert str(root / expected) in str(info.value)
    if dataset != "folder":
        assert "download: true" in str(info.value)
