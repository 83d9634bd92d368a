"""Data for meta-learning: :class:`FewShotDataModule` builds N-way K-shot tasks with learn2learn.

The datasets it knows are registered by name (:mod:`lightning_hypergrad.data.registry`); importing this package
registers the built-in ones (:mod:`lightning_hypergrad.data.datasets`).
"""

from lightning_hypergrad.data import datasets as _builtin_datasets  # noqa: F401  (registers the built-in datasets)
from lightning_hypergrad.data.fewshot import FewShotDataModule
from lightning_hypergrad.data.registry import DATASETS, DatasetOptions, DatasetSpec, get_dataset, register, unregister
from lightning_hypergrad.data.sources import DataFileError

__all__ = [
    "DATASETS",
    "DataFileError",
    "DatasetOptions",
    "DatasetSpec",
    "FewShotDataModule",
    "get_dataset",
    "register",
    "unregister",
]
