"""``DigitsHPODataModule``: scikit-learn's digits as one hyperparameter-optimization problem, offline."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_hypergrad._checks import check_int

DIGITS_SIZE = 1797


class _Repeated(Dataset):
    """``length`` items, each a meta-batch of one task (the same task every time)."""

    def __init__(self, task: dict[str, Tensor], length: int) -> None:
        self.task = task
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> list[dict[str, Tensor]]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return [self.task]


def _as_batch(item: Any) -> Any:
    return item


class DigitsHPODataModule(L.LightningDataModule):
    """The 1797 8x8 digits of scikit-learn, split at random into a training, a validation and a test set.

    Every training step gets the same task, a meta-batch of one: the whole training set (``x_train``, ``y_train``)
    and the whole validation set (``x_val``, ``y_val``), so the inner loop trains on the first and the outer loss is
    measured on the second. Validation evaluates on the validation set; test puts the test set in the place of the
    validation set. With ``corrupt_fraction > 0`` that fraction of the training labels is replaced by a different
    class drawn at random (for data hypercleaning); ``corrupted`` marks them in the tasks, for evaluation only.

    Args:
        train_size: examples in the training set.
        val_size: examples in the validation set.
        test_size: examples in the test set; ``None``: all the remaining ones.
        corrupt_fraction: fraction of the training labels to corrupt, in ``[0, 1)``.
        steps_per_epoch: training steps (outer steps) per epoch.
        seed: the seed of the split and of the corruption.

    Raises:
        ValueError: sizes that do not fit in the 1797 examples, or a fraction outside ``[0, 1)``.
    """

    def __init__(
        self,
        train_size: int = 200,
        val_size: int = 300,
        test_size: int | None = None,
        corrupt_fraction: float = 0.0,
        steps_per_epoch: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("train_size", train_size), ("val_size", val_size), ("steps_per_epoch", steps_per_epoch)):
            check_int(name, value, owner="DigitsHPODataModule")
        if test_size is not None:
            check_int("test_size (or null)", test_size, owner="DigitsHPODataModule")
        used = train_size + val_size + (test_size or 1)
        if used > DIGITS_SIZE:
            raise ValueError(
                f"DigitsHPODataModule train_size + val_size + test_size = {used} exceeds the {DIGITS_SIZE} digits; "
                "make the splits smaller"
            )
        if not isinstance(corrupt_fraction, (int, float)) or not 0 <= corrupt_fraction < 1:
            raise ValueError(f"DigitsHPODataModule corrupt_fraction must be in [0, 1), got {corrupt_fraction!r}")
        self.save_hyperparameters()
        self.train_size, self.val_size, self.test_size = train_size, val_size, test_size
        self.corrupt_fraction = float(corrupt_fraction)
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.splits: dict[str, Tensor] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32)
        y = torch.tensor(y, dtype=torch.long)
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(y), generator=generator)
        n_train, n_val = self.train_size, self.val_size
        n_test = self.test_size or len(y) - n_train - n_val
        train, val = order[:n_train], order[n_train : n_train + n_val]
        test = order[n_train + n_val : n_train + n_val + n_test]
        y_train = y[train].clone()
        corrupted = torch.zeros(n_train, dtype=torch.bool)
        n_corrupt = round(self.corrupt_fraction * n_train)
        if n_corrupt:
            which = torch.randperm(n_train, generator=generator)[:n_corrupt]
            shift = torch.randint(1, 10, (n_corrupt,), generator=generator)  # never the true class
            y_train[which] = (y_train[which] + shift) % 10
            corrupted[which] = True
        self.splits = {
            "x_train": x[train], "y_train": y_train, "corrupted": corrupted, "clean_y_train": y[train],
            "x_val": x[val], "y_val": y[val], "x_test": x[test], "y_test": y[test],
        }  # fmt: skip

    def task(self, stage: str) -> dict[str, Tensor]:
        """The task of ``stage``: the training set and, as ``x_val``/``y_val``, the validation (or test) set."""
        if self.splits is None:
            self.setup()
        s = self.splits
        outer = ("x_test", "y_test") if stage == "test" else ("x_val", "y_val")
        return {
            "x_train": s["x_train"], "y_train": s["y_train"], "corrupted": s["corrupted"],
            "x_val": s[outer[0]], "y_val": s[outer[1]],
        }  # fmt: skip

    def _loader(self, stage: str, length: int) -> DataLoader:
        return DataLoader(_Repeated(self.task(stage), length), batch_size=None, collate_fn=_as_batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.steps_per_epoch)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", 1)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", 1)
