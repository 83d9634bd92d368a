"""A meta-batch's tasks: split into a list, and stacked into one batch where their shapes allow (``batch_tasks``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Task = Any
"""One task of a meta-batch, as the dataloader yields it (a dict of tensors for the few-shot data)."""


def split_meta_batch(batch: Any) -> list[Task]:
    """The tasks of a meta-batch: a list as it is, or a dict of tensors stacked along a first (task) dimension."""
    if isinstance(batch, (list, tuple)):
        return list(batch)
    if isinstance(batch, dict):
        sizes = {v.shape[0] for v in batch.values() if isinstance(v, Tensor)}
        if len(sizes) != 1:
            raise ValueError(
                "a meta-batch given as a dict must hold tensors with one shared first (task) dimension, got first "
                f"dimensions {sorted(sizes)}; return a list of tasks from the dataloader, or override split_tasks"
            )
        return [{k: v[i] if isinstance(v, Tensor) else v for k, v in batch.items()} for i in range(sizes.pop())]
    raise TypeError(f"cannot split a meta-batch of type {type(batch).__name__}; override BilevelModule.split_tasks")


@dataclass
class StackedTasks:
    """Tasks of equal shapes as one batch: each tensor entry stacked along a new first (task) dimension.

    Attributes:
        tensors: the stacked tensor entries (``{"support_x": [B, ...], ...}``).
        constants: the entries that are not tensors, equal in every task.
        size: the number of tasks ``B``.
    """

    tensors: dict[str, Tensor]
    constants: dict[str, Any]
    size: int

    def task(self, tensors: dict[str, Tensor]) -> dict[str, Any]:
        """One task from the (unbatched) tensors ``vmap`` hands to a per-task function."""
        return {**tensors, **self.constants}


def stack_tasks(tasks: Sequence[Task]) -> StackedTasks | None:
    """``tasks`` stacked into one :class:`StackedTasks`, or ``None`` where they cannot be.

    Tasks can be stacked when they are dicts with the same keys whose tensor entries have equal shapes and dtypes,
    and whose other entries are equal.
    """
    if not tasks or not all(isinstance(t, dict) for t in tasks):
        return None
    first = tasks[0]
    if any(t.keys() != first.keys() for t in tasks):
        return None
    tensors: dict[str, Tensor] = {}
    constants: dict[str, Any] = {}
    for key, value in first.items():
        column = [t[key] for t in tasks]
        if isinstance(value, Tensor):
            if not all(
                isinstance(v, Tensor) and v.shape == value.shape and v.dtype == value.dtype and v.device == value.device
                for v in column
            ):
                return None
            tensors[key] = torch.stack(column)
        else:
            if any(isinstance(v, Tensor) or v != value for v in column):
                return None
            constants[key] = value
    return StackedTasks(tensors, constants, len(tasks)) if tensors else None
