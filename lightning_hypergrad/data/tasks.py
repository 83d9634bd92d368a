"""N-way K-shot task sampling with learn2learn, made reproducible: each task is a function of its seed."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from lightning_hypergrad.data._learn2learn import import_learn2learn
from lightning_hypergrad.data.sources import ClassSplit

BATCH_KEYS = ("support_x", "support_y", "query_x", "query_y")


def derive_seed(*parts: int | str) -> int:
    """A 64-bit seed that depends on every part (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


class TaskSampler:
    """Samples N-way K-shot tasks of one class split with learn2learn's ``TaskDataset`` and splits each in two.

    learn2learn draws its classes and examples from Python's global :mod:`random`; :meth:`sample` seeds it for the
    call and restores its previous state afterwards, so that a task depends on its seed alone. learn2learn's objects
    are built on first use in each process (they are not pickled to dataloader workers).

    Args:
        split: the images and labels of the split.
        ways: classes per task.
        shots: support examples per class.
        queries: query examples per class.

    Raises:
        RuntimeError: from :meth:`sample`, if learn2learn returns a task without ``shots + queries`` examples of
            every class (a class with too few examples; :class:`FewShotDataModule` checks this beforehand).
    """

    def __init__(self, split: ClassSplit, ways: int, shots: int, queries: int) -> None:
        self.split = split
        self.ways = ways
        self.shots = shots
        self.queries = queries
        self._tasks: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tasks"] = None
        return state

    def _task_dataset(self) -> Any:
        if self._tasks is None:
            l2l = import_learn2learn()
            from learn2learn.data.transforms import ConsecutiveLabels, KShots, LoadData, NWays, RemapLabels

            meta = l2l.data.MetaDataset(self.split.dataset, labels_to_indices=self.split.labels_to_indices())
            transforms = [
                NWays(meta, n=self.ways),
                KShots(meta, k=self.shots + self.queries),
                LoadData(meta),
                RemapLabels(meta),
                ConsecutiveLabels(meta),
            ]
            self._tasks = l2l.data.TaskDataset(meta, task_transforms=transforms, num_tasks=-1)
        return self._tasks

    def sample(self, seed: int) -> dict[str, Tensor]:
        """The task of ``seed``: ``support_x/_y`` (``shots`` per class) and ``query_x/_y`` (``queries`` per class)."""
        tasks = self._task_dataset()
        saved = random.getstate()
        try:
            random.seed(seed)
            x, y = tasks.sample()
        finally:
            random.setstate(saved)
        y = torch.as_tensor(y, dtype=torch.long)
        support, query = [], []
        for c in range(self.ways):
            index = (y == c).nonzero().flatten()
            if len(index) != self.shots + self.queries:
                raise RuntimeError(
                    f"learn2learn returned {len(index)} examples of class {c}, expected {self.shots} + {self.queries}"
                )
            support.append(index[: self.shots])
            query.append(index[self.shots :])
        s, q = torch.cat(support), torch.cat(query)
        return {"support_x": x[s], "support_y": y[s], "query_x": x[q], "query_y": y[q]}


class TaskBatches(Dataset):
    """Batches of tasks: item ``i`` stacks tasks ``i * batch_size ...`` (the last batch may be smaller).

    Task ``t`` is sampled with the seed derived from ``(seed, stream, epoch, t)``, so a batch is a deterministic
    function of those and of its index, in any process and in any order.

    Args:
        sampler: samples one task from a seed.
        num_tasks: tasks in all.
        batch_size: tasks per batch.
        seed: the base seed.
        stream: separates the task streams of the splits (e.g. ``"train"``, ``"val"``).
        epoch: the epoch whose tasks are drawn (changed with :meth:`set_epoch`).
        shard: ``(rank, world_size)``: batch ``i`` holds only this process's contiguous share of the tasks of
            meta-batch ``i`` (``batch_size`` must be divisible by ``world_size``), so that processes that average
            their hypergradients see exactly the meta-batch of a single process.

    Raises:
        IndexError: an index outside ``0 .. len(self) - 1`` (which ends iteration by ``__getitem__``).
    """

    def __init__(
        self,
        sampler: TaskSampler,
        num_tasks: int,
        batch_size: int,
        seed: int,
        stream: str,
        epoch: int = 0,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        rank, world_size = shard
        if batch_size % world_size:
            raise ValueError(
                f"meta_batch_size={batch_size} is not divisible by the {world_size} processes; choose a multiple of "
                f"{world_size} so that every process gets the same share of each meta-batch"
            )
        self.shard = shard
        self.sampler = sampler
        self.num_tasks = num_tasks
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        """Selects the tasks of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_tasks / self.batch_size)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range for {len(self)} batches")
        first = index * self.batch_size
        ids = range(first, min(first + self.batch_size, self.num_tasks))
        rank, world_size = self.shard
        if world_size > 1:
            share = self.batch_size // world_size
            ids = ids[rank * share : (rank + 1) * share]
        tasks = [self.sampler.sample(derive_seed(self.seed, self.stream, self.epoch, t)) for t in ids]
        return {key: torch.stack([task[key] for task in tasks]) for key in BATCH_KEYS}


class EpochSampler(Sampler[int]):
    """Yields ``0 .. length - 1`` in order; ``set_epoch`` (which Lightning calls every epoch) is forwarded.

    Args:
        length: the number of indices.
        on_set_epoch: called with the epoch by :meth:`set_epoch`.
        skip: the first iteration starts at this index (the batches that a resumed run has already trained on);
            later iterations start at 0. The length stays ``length``, which Lightning's restored batch counter
            expects.
        on_iter: called with the first index each time an iteration starts (the data module notes where the
            epoch started and checks which sampler Lightning uses).
    """

    def __init__(
        self,
        length: int,
        on_set_epoch: Callable[[int], None],
        skip: int = 0,
        on_iter: Callable[[int], None] | None = None,
    ) -> None:
        self.length = length
        self.on_set_epoch = on_set_epoch
        self.skip = skip
        self.on_iter = on_iter

    def set_epoch(self, epoch: int) -> None:
        """Forwards the epoch (Lightning calls this before each training epoch)."""
        self.on_set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        start, self.skip = self.skip, 0
        if self.on_iter is not None:
            self.on_iter(start)
        return iter(range(start, self.length))

    def __len__(self) -> int:
        return self.length
