"""A LightningDataModule of N-way K-shot classification tasks, sampled with learn2learn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler

from lightning_hypergrad._checks import check_int
from lightning_hypergrad.data._learn2learn import require_learn2learn
from lightning_hypergrad.data.registry import DATASETS, DatasetOptions, DatasetSpec, get_dataset
from lightning_hypergrad.data.sources import SPLIT_NAMES, SPLITS, ClassSplit
from lightning_hypergrad.data.tasks import EpochSampler, TaskBatches, TaskSampler

__all__ = ["DATASETS", "FewShotDataModule"]

_DEFAULT_ROOT = "data"
"""``root`` when it is not set and the dataset does not need it."""

_OWNER = "FewShotDataModule"


class FewShotDataModule(LightningDataModule):
    r"""N-way K-shot classification tasks for meta-learning, sampled with learn2learn.

    Every dataloader yields dictionaries of stacked tasks, ``B`` tasks at a time (``B = meta_batch_size``; the last
    validation or test batch may hold fewer):

    - ``support_x``: float ``(B, ways * shots, C, H, W)``, ``support_y``: long ``(B, ways * shots)``
    - ``query_x``: float ``(B, ways * queries, C, H, W)``, ``query_y``: long ``(B, ways * queries)``

    Labels are in ``[0, ways)``; the support holds exactly ``shots`` and the query exactly ``queries`` distinct
    examples of each class. Images are in ``[0, 1]``.

    Datasets (``dataset``):

    - ``"digits"``: scikit-learn's bundled 8x8 digits (offline, for tests and demos). Digits 0-4 are the meta-train
      classes and digits 5-9 serve as **both** the meta-validation and the meta-test classes.
    - ``"omniglot"``: ``root/images_background.npz`` and ``root/images_evaluation.npz`` (arrays ``images`` bool
      ``(n_chars, 20, 105, 105)``, True = background, and ``labels`` int64 ``(n_chars, 20)``), or with
      ``download=True`` the original files fetched by torchvision into ``root/omniglot-py`` and converted once to
      those archives. Background characters are the meta-train classes; of the evaluation characters the first half
      are meta-validation and the second half meta-test. Strokes are 1.0 and images are resized to 28x28.
      Not the split or the preparation of published few-shot numbers: for those, ``"omniglot-l2l"``.
    - ``"omniglot-l2l"``: the same files prepared as learn2learn's benchmark (``get_tasksets("omniglot")``): its
      class split of the 1623 characters by ``split_seed`` (1100/100/423; learn2learn's examples seed 42), 28x28
      Lanczos-resized images, and each character's four rotations as classes (4400/400/1692 classes), as
      ``lightning_hypergrad/data/datasets/omniglot_l2l.py`` describes.
    - ``"cifar100"``: CIFAR-100 in the official ``root/cifar-100-python`` layout (or downloaded by torchvision),
      all 600 images per class; the 100 classes are shuffled by ``split_seed`` into 50 meta-train and 50
      meta-validation classes, and the meta-test classes are the meta-validation classes (the paper's protocol).
    - ``"cifarfs"``: the same images with the CIFAR-FS class split of Bertinetto et al. (2019), read from
      ``root/cifarfs_splits/{train,val,test}.txt`` (one CIFAR-100 fine class name per line); the split is not bundled.
    - ``"mini-imagenet"``: learn2learn's ``mini-imagenet-cache-{train,validation,test}.pkl`` in ``root``
      (64/16/20 classes), 84x84.
    - ``"folder"``: your own images, ``root/<class>/<images>`` (classes split 60/20/20% into train/val/test by
      ``split_seed``) or ``root/{train,val,test}/<class>/<images>``; read with PIL as RGB, resized to ``image_size``
      (default 32).
    - any name registered with :func:`lightning_hypergrad.data.register` (a
      :class:`~lightning_hypergrad.data.DatasetSpec`; see :mod:`lightning_hypergrad.data.registry`). Everything
      dataset-specific (files, loading, default image shape, published counts) comes from the spec.

    Sampling is reproducible and resumable: training batch ``i`` of epoch ``e`` depends only on ``(seed, e, i)``
    (Lightning calls :meth:`set_epoch` at every training epoch through the sampler; :meth:`state_dict` stores the
    seed and epoch in checkpoints). The validation and test tasks are fixed by ``seed``: every validation sees the
    same tasks.

    Args:
        dataset: one of ``digits``, ``omniglot``, ``omniglot-l2l``, ``cifar100``, ``cifarfs``, ``mini-imagenet``,
            ``folder``, or a registered dataset (the names of :data:`~lightning_hypergrad.data.DATASETS`).
        root: the data folder (default ``data``; required for ``folder``).
        ways: classes per task (N).
        shots: support examples per class (K).
        queries: query examples per class.
        meta_batch_size: tasks per batch.
        train_batches: training batches per epoch.
        val_tasks: number of fixed meta-validation tasks.
        test_tasks: number of fixed meta-test tasks.
        image_size: side of the (square) images after preprocessing; default: the dataset's own (8 digits,
            28 omniglot, 32 cifar100/cifarfs/folder, 84 mini-imagenet).
        download: download the dataset into ``root`` if it is not there (omniglot, cifar100, cifarfs images,
            mini-imagenet; needs internet access).
        split_seed: seed of the class split (``cifar100``, ``omniglot-l2l`` and flat ``folder`` layouts).
        seed: seed of the task sampling.
        num_workers: dataloader worker processes.

    Attributes:
        image_shape: ``(C, H, W)`` of the images after preprocessing.
        spec: the :class:`~lightning_hypergrad.data.DatasetSpec` of ``dataset``.

    Raises:
        ValueError: an unknown dataset; a setting below its minimum; ``ways`` above the classes of a split or
            ``shots + queries`` above the examples per class of a dataset whose spec gives them. From :meth:`setup`:
            a split too small for the tasks, or a registered dataset whose ``load`` breaks its spec (splits or image
            shape).
        FileNotFoundError: the dataset's files are not in ``root`` and ``download`` is off (or, for ``cifarfs``, the
            split files are absent); the message names the paths looked at and how to get the data.
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: str | None = None,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        meta_batch_size: int = 10,
        train_batches: int = 100,
        val_tasks: int = 100,
        test_tasks: int = 600,
        image_size: int | None = None,
        download: bool = False,
        split_seed: int = 0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        spec = get_dataset(dataset)
        for name, value, minimum in (
            ("ways", ways, 1),
            ("shots", shots, 1),
            ("queries", queries, 1),
            ("meta_batch_size", meta_batch_size, 1),
            ("train_batches", train_batches, 1),
            ("val_tasks", val_tasks, 1),
            ("test_tasks", test_tasks, 1),
            ("num_workers", num_workers, 0),
            ("image_size", 1 if image_size is None else image_size, 1),
            ("split_seed", split_seed, None),
            ("seed", seed, None),
        ):
            check_int(name, value, minimum, owner=_OWNER)
        if not isinstance(download, bool):
            raise ValueError(f"download must be true or false, got {download!r}")
        spec.check_task(ways, shots, queries)
        require_learn2learn(_OWNER)

        self.spec: DatasetSpec = spec
        self.dataset = dataset
        self.root = root
        self.ways = ways
        self.shots = shots
        self.queries = queries
        self.meta_batch_size = meta_batch_size
        self.train_batches = train_batches
        self.val_tasks = val_tasks
        self.test_tasks = test_tasks
        self.image_size = image_size
        self.download = download
        self.split_seed = split_seed
        self.seed = seed
        self.num_workers = num_workers
        size = image_size or spec.image_size
        self.image_shape: tuple[int, int, int] = (spec.channels, size, size)
        self.epoch = 0
        self.save_hyperparameters()

        self._root = self._resolve_root()
        self.spec.check_files(self._options())
        self._splits: dict[str, ClassSplit] | None = None
        self._samplers: dict[str, TaskSampler] = {}
        self._batches: dict[str, TaskBatches] = {}
        self._resume_skip = 0
        self._epoch_start_step: int | None = None

    # -----------------------------------------------------------------------------------------------------------------
    # checks
    # -----------------------------------------------------------------------------------------------------------------

    def _resolve_root(self) -> Path:
        if self.spec.needs_root is not None:
            if self.root is None:
                raise ValueError(f"dataset {self.dataset!r} needs root: set root to {self.spec.needs_root}")
            return Path(self.root).expanduser()
        return Path(self.root if self.root is not None else _DEFAULT_ROOT).expanduser()

    def _options(self) -> DatasetOptions:
        """The settings the dataset's functions receive."""
        return DatasetOptions(
            root=self._root, image_size=self.image_size, download=self.download, split_seed=self.split_seed
        )

    def _check_splits(self, splits: dict[str, ClassSplit]) -> None:
        """Every split must have ``ways`` classes with ``shots + queries`` examples each."""
        if not isinstance(splits, dict) or not all(isinstance(splits.get(split), ClassSplit) for split in SPLITS):
            got = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
            raise ValueError(
                f"the load function of dataset {self.dataset!r} returned {got}: it must return a dict with a "
                f"ClassSplit under each of {', '.join(repr(split) for split in SPLITS)}"
            )
        needed = self.shots + self.queries
        for split in SPLITS:
            counts = splits[split].examples_per_class()
            where = f"the {SPLIT_NAMES[split]} split of dataset {self.dataset!r} in {self._root}"
            if len(counts) < self.ways:
                raise ValueError(
                    f"ways={self.ways} but {where} has {len(counts)} classes: set ways between 1 and "
                    f"{len(counts)}, or add classes"
                )
            small = {label: count for label, count in counts.items() if count < needed}
            if small:
                label, count = min(small.items(), key=lambda item: item[1])
                raise ValueError(
                    f"shots + queries = {self.shots} + {self.queries} = {needed}, but {len(small)} classes of {where} "
                    f"have fewer examples (class {splits[split].class_name(label)} has {count}): lower shots or "
                    f"queries so that shots + queries <= {count}, or add images"
                )

    # -----------------------------------------------------------------------------------------------------------------
    # data
    # -----------------------------------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Downloads the dataset into ``root`` when ``download`` is set and it is not there yet (one process)."""
        self.spec.prepare(self._options())

    def _load(self) -> dict[str, ClassSplit]:
        """The dataset's three class splits, from its spec's ``load``."""
        return self.spec.load(self._options())

    def _check_image_shape(self, splits: dict[str, ClassSplit]) -> None:
        """The first training image must have :attr:`image_shape` (a registered loader's promise)."""
        image = splits["train"].dataset[0][0]
        if tuple(image.shape) != self.image_shape:
            raise ValueError(
                f"dataset {self.dataset!r} yields images of shape {tuple(image.shape)}, but its DatasetSpec and "
                f"image_size give (C, H, W) = {self.image_shape}: make its load function return images of "
                "spec.channels x side x side, with side = options.image_size when set, else spec.image_size"
            )

    def setup(self, stage: str | None = None) -> None:
        """Loads the three class splits (once) and checks that each can make ``ways``-way tasks."""
        if self._splits is not None:
            return
        splits = self._load()
        self._check_splits(splits)
        self._check_image_shape(splits)
        self._splits = splits
        self._samplers = {split: TaskSampler(splits[split], self.ways, self.shots, self.queries) for split in SPLITS}

    @property
    def splits(self) -> dict[str, ClassSplit]:
        """The loaded class splits (``train``, ``val``, ``test``); :meth:`setup` must have run."""
        if self._splits is None:
            raise RuntimeError("FewShotDataModule.setup() has not run yet: call it (Lightning does) before this")
        return self._splits

    def _task_batches(self, split: str, num_tasks: int) -> TaskBatches:
        if not self._samplers:
            self.setup()
        epoch = self.epoch if split == "train" else 0
        shard = (0, 1)
        trainer = self._trainer_or_none()
        if split == "train" and trainer is not None and trainer.world_size > 1:
            shard = (trainer.global_rank, trainer.world_size)
        batches = TaskBatches(
            self._samplers[split], num_tasks, self.meta_batch_size, self.seed, split, epoch, shard=shard
        )
        self._batches[split] = batches
        return batches

    def train_dataloader(self) -> DataLoader:
        """``train_batches`` batches of ``meta_batch_size`` fresh tasks, which change with the epoch."""
        batches = self._task_batches("train", self.train_batches * self.meta_batch_size)
        skip, self._resume_skip = self._resume_skip, 0
        sampler = EpochSampler(
            len(batches), self._epoch_from_lightning, skip=skip, on_iter=self._train_iteration_starts
        )
        return self._loader(batches, sampler=sampler)

    def _epoch_from_lightning(self, epoch: int) -> None:
        """The training sampler's ``set_epoch``: selects the tasks of the epoch the trainer is about to train.

        Lightning passes its count of epochs *processed*, which equals
        :attr:`Trainer.current_epoch <lightning.pytorch.Trainer.current_epoch>` in an uninterrupted run but runs one
        ahead of it for the rest of a run resumed from a checkpoint written at an
        epoch's end (the restored epoch is processed but not completed, and Lightning finishes it without a batch).
        The trainer's current epoch is the epoch whose batches follow, so it is the one taken when there is a
        trainer.
        """
        trainer = self._trainer_or_none()
        self.set_epoch(trainer.current_epoch if trainer is not None else epoch)

    def _train_iteration_starts(self, first: int) -> None:
        """Called by the training sampler when an epoch's iteration starts at batch ``first`` (``> 0`` on resume).

        Notes the trainer's step count at the epoch's start, from which :meth:`_batches_done` counts, and refuses
        the sampler that Lightning puts in place of the data module's when ``use_distributed_sampler`` is on.
        """
        trainer = self._trainer_or_none()
        if trainer is None:
            self._epoch_start_step = None
            return
        # Lightning wraps the data module's sampler in a DistributedSampler when use_distributed_sampler is on
        used = getattr(trainer.train_dataloader, "sampler", None)
        if trainer.world_size > 1 and isinstance(used, DistributedSampler):
            raise ValueError(
                "FewShotDataModule splits each meta-batch across the processes itself: set "
                "trainer.use_distributed_sampler: false (Trainer(use_distributed_sampler=False)) for multi-process "
                "runs"
            )
        self._epoch_start_step = trainer.global_step - first

    def val_dataloader(self) -> DataLoader:
        """The ``val_tasks`` fixed meta-validation tasks, ``meta_batch_size`` at a time."""
        return self._loader(self._task_batches("val", self.val_tasks))

    def test_dataloader(self) -> DataLoader:
        """The ``test_tasks`` fixed meta-test tasks, ``meta_batch_size`` at a time."""
        return self._loader(self._task_batches("test", self.test_tasks))

    def _loader(self, batches: TaskBatches, sampler: EpochSampler | None = None) -> DataLoader:
        return DataLoader(
            batches, batch_size=None, shuffle=False, sampler=sampler, num_workers=self.num_workers, pin_memory=False
        )

    # -----------------------------------------------------------------------------------------------------------------
    # reproducibility
    # -----------------------------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Selects the training tasks of ``epoch`` (Lightning calls this through the training sampler)."""
        check_int("epoch", epoch, 0, owner=_OWNER)
        self.epoch = epoch
        if "train" in self._batches:
            self._batches["train"].set_epoch(epoch)

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    def _batches_done(self) -> int:
        """Training batches done in the current epoch (0 at an epoch's end), from the trainer's step count.

        Each training batch of a :class:`~lightning_hypergrad.BilevelModule` is exactly one optimizer step (a
        skipped non-finite step included), so the batches done are the steps since the epoch's iteration started.
        A checkpoint written in ``on_train_batch_end`` counts the batch just trained on, as it should.
        """
        trainer = self._trainer_or_none()
        if trainer is None or self._epoch_start_step is None:
            return 0
        done = trainer.global_step - self._epoch_start_step
        return done if 0 < done < self.train_batches else 0

    def state_dict(self) -> dict[str, Any]:
        """The sampling state saved in checkpoints: ``seed``, ``epoch`` and the batches done in the epoch.

        A run resumed from a checkpoint taken in the middle of an epoch continues with the next batch of that
        epoch, and one taken at an epoch's end with the next epoch (see :meth:`_epoch_from_lightning`), so it sees
        exactly the tasks an uninterrupted run would. The batches done are counted in optimizer
        steps: exact for a :class:`~lightning_hypergrad.BilevelModule` and any module that takes one optimizer step
        per training batch (not with ``accumulate_grad_batches`` > 1).
        """
        return {"seed": self.seed, "epoch": self.epoch, "batches_done": self._batches_done()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the sampling state of :meth:`state_dict`, so that the same batches follow."""
        seed = state_dict.get("seed", self.seed)
        check_int("seed", seed, None, owner=_OWNER)
        self.seed = seed
        for batches in self._batches.values():
            batches.seed = seed
        self.set_epoch(state_dict.get("epoch", 0))
        self._resume_skip = int(state_dict.get("batches_done", 0))
