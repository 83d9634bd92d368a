"""``dataset="omniglot-l2l"``: learn2learn's Omniglot preparation (its class split, 28x28 Lanczos images, the four
rotations as classes), on generated archives of the full 1623 characters and, where they are, on the real files."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_hypergrad.data import FewShotDataModule
from lightning_hypergrad.data.datasets.omniglot_l2l import l2l_class_split

l2l = pytest.importorskip("learn2learn", reason="learn2learn (the few-shot extra) is not installed")

CHARACTERS = (964, 659)


def write_archives(root: Path, drawings: int = 2, side: int = 21, characters: tuple[int, int] = CHARACTERS) -> None:
    """The two archives with ``characters`` characters of ``drawings`` drawings each; every drawing random bits
    (True: background), seeded by its archive, character and drawing, so that each can be found again."""
    root.mkdir(parents=True, exist_ok=True)
    for name, n_chars, offset in (
        ("images_background.npz", characters[0], 0),
        ("images_evaluation.npz", characters[1], characters[0]),
    ):
        rng = np.random.default_rng(offset)
        images = rng.random((n_chars, drawings, side, side)) < 0.8
        labels = np.repeat(np.arange(n_chars, dtype=np.int64)[:, None], drawings, axis=1)
        np.savez_compressed(root / name, images=images, labels=labels)


def _drawing(root: Path, character: int, drawing: int) -> np.ndarray:
    """Drawing ``drawing`` of character ``character`` (background characters first, then the evaluation ones)."""
    name, c = ("images_background.npz", character) if character < 964 else ("images_evaluation.npz", character - 964)
    with np.load(root / name) as archive:
        return archive["images"][c, drawing]


def _torchvision_preparation(drawing: np.ndarray) -> torch.Tensor:
    """learn2learn's transform of torchvision's Omniglot image: Resize(28, LANCZOS), ToTensor(), 1 - x."""
    from PIL import Image
    from torchvision import transforms

    image = Image.fromarray(drawing.astype(np.uint8) * 255, mode="L")  # the PNG converted to "L" by torchvision
    prepare = transforms.Compose(
        [transforms.Resize(28, interpolation=transforms.InterpolationMode.LANCZOS), transforms.ToTensor()]
    )
    return 1.0 - prepare(image)


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("omniglot")
    write_archives(root)
    return root


@pytest.fixture(scope="module")
def data(archives: Path) -> FewShotDataModule:
    dm = FewShotDataModule("omniglot-l2l", root=str(archives), ways=5, shots=1, queries=1, split_seed=42)
    dm.setup()
    return dm


def test_the_class_split_is_learn2learns(monkeypatch: pytest.MonkeyPatch):
    """learn2learn's own ``omniglot_tasksets`` after ``random.seed(seed)`` (its FullOmniglot stood in for by labels
    alone) picks the same meta-train, meta-validation and meta-test characters, in the same order."""
    from learn2learn.vision.benchmarks import omniglot_benchmark

    class Labels(torch.utils.data.Dataset):
        def __len__(self):
            return 2 * 1623

        def __getitem__(self, index):
            return torch.zeros(1), index // 2

    monkeypatch.setattr(omniglot_benchmark.l2l.vision.datasets, "FullOmniglot", lambda *a, **k: Labels())
    for seed in (42, 7):
        random.seed(seed)
        (train, val, test), _ = omniglot_benchmark.omniglot_tasksets(5, 2, 5, 2, root="unused")
        ours = l2l_class_split(1623, seed)
        assert [list(d.labels) for d in (train, val, test)] == [list(split) for split in ours]
    assert [len(split) for split in ours] == [1100, 100, 423]


def test_split_sizes_rotations_and_image_size(archives: Path, data: FewShotDataModule):
    splits = data.splits
    assert [len(set(splits[s].labels)) for s in ("train", "val", "test")] == [4400, 400, 1692]
    assert [len(splits[s].labels) for s in ("train", "val", "test")] == [4400 * 2, 400 * 2, 1692 * 2]
    chosen = l2l_class_split(1623, 42)
    for split, characters in zip(("train", "val", "test"), chosen):
        dataset, n = splits[split].dataset, len(characters)
        for label in (0, n - 1):  # the first and last class: characters[label], each rotation a class of its own
            first = splits[split].labels.index(label)
            image, got = dataset[first]
            assert got == label and image.shape == (1, 28, 28)
            want = _torchvision_preparation(_drawing(archives, characters[label], 0))
            assert torch.equal(image, want)  # learn2learn's preparation to the bit
            for k in (1, 2, 3):
                rotated, rotated_label = dataset[k * len(dataset) // 4 + first]
                assert rotated_label == k * n + label
                assert torch.equal(rotated, torch.rot90(want, k, dims=(-2, -1)))
    # the rotation is torchvision's rotate (learn2learn's RandomClassRotation) by 90 k degrees
    from torchvision.transforms import functional as TF

    image = splits["train"].dataset[0][0]
    for k in (1, 2, 3):
        assert torch.equal(splits["train"].dataset[k * 2200][0], TF.rotate(image, 90.0 * k))


def test_tasks_of_the_l2l_preparation(data: FewShotDataModule):
    batch = next(iter(data.train_dataloader()))
    assert batch["support_x"].shape[1:] == (5, 1, 28, 28) and batch["query_x"].shape[1:] == (5, 1, 28, 28)
    assert float(batch["support_x"].min()) >= 0 and float(batch["support_x"].max()) <= 1


def test_partial_archives_are_refused_at_once(tmp_path: Path):
    write_archives(tmp_path, characters=(12, 9))
    with pytest.raises(ValueError, match=r"splits Omniglot's 1623 characters .* holds 12 \+ 9 characters.*'omniglot'"):
        FewShotDataModule("omniglot-l2l", root=str(tmp_path), ways=5, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"ways=401 is more than the 400 classes of the meta-validation split"):
        FewShotDataModule("omniglot-l2l", root=str(tmp_path), ways=401)


def _real_root() -> Path:
    if "OMNIGLOT_ROOT" in os.environ:
        return Path(os.environ["OMNIGLOT_ROOT"])
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


REAL = _real_root()


@pytest.mark.skipif(
    not (REAL / "images_background.npz").is_file() or not (REAL / "images_evaluation.npz").is_file(),
    reason=f"the real Omniglot archives are not in {REAL} (set OMNIGLOT_ROOT to their folder); generated archives "
    "cover the rest",
)
def test_real_omniglot_as_learn2learn_prepares_it():
    dm = FewShotDataModule("omniglot-l2l", root=str(REAL), ways=5, shots=1, queries=1, split_seed=42)
    dm.setup()
    splits = dm.splits
    assert [len(set(splits[s].labels)) for s in ("train", "val", "test")] == [4400, 400, 1692]
    assert [len(splits[s].labels) for s in ("train", "val", "test")] == [88000, 8000, 33840]
    character = l2l_class_split(1623, 42)[2][5]  # meta-test class 5 (rotation 0)
    image, label = splits["test"].dataset[splits["test"].labels.index(5)]
    assert label == 5 and torch.equal(image, _torchvision_preparation(_drawing(REAL, character, 0)))
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.mean()) < 0.5  # strokes near 1
