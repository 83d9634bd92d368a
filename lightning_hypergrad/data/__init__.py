"""Data for meta-learning: :class:`FewShotDataModule` builds N-way K-shot tasks with learn2learn."""

from lightning_hypergrad.data.fewshot import DATASETS, FewShotDataModule

__all__ = ["DATASETS", "FewShotDataModule"]
