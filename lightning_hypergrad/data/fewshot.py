"""A LightningDataModule of N-way K-shot classification tasks, sampled with learn2learn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lightning_hypergrad.data import sources
from lightning_hypergrad.data.sources import SPLITS, ClassSplit
from lightning_hypergrad.data.tasks import EpochSampler, TaskBatches, TaskSampler

DATASETS = ("digits", "omniglot", "cifar100", "cifarfs", "mini-imagenet", "folder")
"""The values ``FewShotDataModule(dataset=...)`` accepts."""

_CLASSES = {
    "digits": (5, 5, 5),
    "omniglot": (964, 330, 329),
    "cifar100": (50, 50, 50),
    "cifarfs": (64, 16, 20),
    "mini-imagenet": (64, 16, 20),
}
"""Classes in the train/val/test splits of the built-in datasets (as published; local copies are checked again)."""

_EXAMPLES_PER_CLASS = {
    "digits": (174, "the smallest digit class of scikit-learn's digits has 174 images"),
    "omniglot": (20, "every Omniglot character has 20 drawings"),
    "cifar100": (600, "every CIFAR-100 class has 600 images (train and test files merged)"),
    "cifarfs": (600, "every CIFAR-100 class has 600 images (train and test files merged)"),
    "mini-imagenet": (600, "every mini-ImageNet class has 600 images"),
}

_CHANNELS_AND_SIZE = {
    "digits": (1, 8),
    "omniglot": (1, 28),
    "cifar100": (3, 32),
    "cifarfs": (3, 32),
    "mini-imagenet": (3, 84),
    "folder": (3, 32),
}

_SPLIT_NAMES = {"train": "meta-train", "val": "meta-validation", "test": "meta-test"}

_DEFAULT_ROOT = "data"


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

    Sampling is reproducible and resumable: training batch ``i`` of epoch ``e`` depends only on ``(seed, e, i)``
    (Lightning calls :meth:`set_epoch` at every training epoch through the sampler; :meth:`state_dict` stores the
    seed and epoch in checkpoints). The validation and test tasks are fixed by ``seed``: every validation sees the
    same tasks.

    Args:
        dataset: one of ``digits``, ``omniglot``, ``cifar100``, ``cifarfs``, ``mini-imagenet``, ``folder``.
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
        split_seed: seed of the class split (``cifar100`` and flat ``folder`` layouts).
        seed: seed of the task sampling.
        num_workers: dataloader worker processes.

    Attributes:
        image_shape: ``(C, H, W)`` of the images after preprocessing.

    Raises:
        ValueError: an unknown dataset; a setting below its minimum; ``ways`` above the classes of a split or
            ``shots + queries`` above the examples per class of a built-in dataset.
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
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}: set dataset to one of {', '.join(DATASETS)}")
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
            _check_int(name, value, minimum)
        if not isinstance(download, bool):
            raise ValueError(f"download must be true or false, got {download!r}")
        if dataset in _CLASSES:
            _check_ways(dataset, ways, _CLASSES[dataset])
            _check_examples(dataset, shots, queries, *_EXAMPLES_PER_CLASS[dataset])

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
        channels, size = _CHANNELS_AND_SIZE[dataset]
        self.image_shape: tuple[int, int, int] = (channels, image_size or size, image_size or size)
        self.epoch = 0
        self.save_hyperparameters()

        self._root = self._resolve_root()
        self._check_files()
        self._splits: dict[str, ClassSplit] | None = None
        self._samplers: dict[str, TaskSampler] = {}
        self._batches: dict[str, TaskBatches] = {}
        self._resume_skip = 0

    # -----------------------------------------------------------------------------------------------------------------
    # checks
    # -----------------------------------------------------------------------------------------------------------------

    def _resolve_root(self) -> Path:
        if self.dataset == "folder":
            if self.root is None:
                raise ValueError(
                    "dataset 'folder' needs root: set root to a folder of class folders (root/<class>/<images>) or of "
                    "train/val/test folders of class folders"
                )
            root = Path(self.root).expanduser()
            if not root.is_dir():
                raise FileNotFoundError(
                    f"dataset 'folder': root {root} is not a folder; set root to a folder holding "
                    "root/<class>/<images> or root/{train,val,test}/<class>/<images>"
                )
            return root
        return Path(self.root if self.root is not None else _DEFAULT_ROOT).expanduser()

    def _check_files(self) -> None:
        """Raises ``FileNotFoundError`` at once when the data is absent and cannot be downloaded."""
        root = self._root
        if self.dataset == "omniglot" and not self.download and not sources.omniglot_available(root):
            raise FileNotFoundError(sources.omniglot_missing_message(root))
        if self.dataset == "cifarfs":
            missing = [p for p in sources.cifarfs_split_files(root) if not p.is_file()]
            if missing:
                raise FileNotFoundError(sources.cifarfs_missing_message(missing))
        if self.dataset in ("cifar100", "cifarfs") and not self.download:
            names = ("train", "test", "meta") if self.dataset == "cifarfs" else ("train", "test")
            missing = [p for p in sources.cifar_files(root, names) if not p.is_file()]
            if missing:
                raise FileNotFoundError(sources.cifar_missing_message(missing))
        if self.dataset == "mini-imagenet" and not self.download:
            missing = [sources.mini_imagenet_file(root, s) for s in SPLITS]
            missing = [p for p in missing if not p.is_file()]
            if missing:
                raise FileNotFoundError(sources.mini_imagenet_missing_message(missing))

    def _check_splits(self, splits: dict[str, ClassSplit]) -> None:
        """Every split must have ``ways`` classes with ``shots + queries`` examples each."""
        needed = self.shots + self.queries
        for split in SPLITS:
            counts = splits[split].examples_per_class()
            where = f"the {_SPLIT_NAMES[split]} split of dataset {self.dataset!r} in {self._root}"
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
        root = self._root
        if self.dataset == "omniglot":
            sources.prepare_omniglot(root, self.download)
        elif self.dataset in ("cifar100", "cifarfs"):
            names = ("train", "test", "meta") if self.dataset == "cifarfs" else ("train", "test")
            sources.prepare_cifar(root, self.download, names)
        elif self.dataset == "mini-imagenet" and self.download:
            from lightning_hypergrad.data.tasks import import_learn2learn

            for split, mode in sources.MINI_IMAGENET_MODES.items():
                if not sources.mini_imagenet_file(root, split).is_file():
                    import_learn2learn().vision.datasets.MiniImagenet(str(root), mode=mode, download=True)

    def _load(self) -> dict[str, ClassSplit]:
        root, size = self._root, self.image_size
        if self.dataset == "digits":
            return sources.load_digits_splits(size)
        if self.dataset == "omniglot":
            return sources.load_omniglot_splits(root, size, self.download)
        if self.dataset == "cifar100":
            return sources.load_cifar100_splits(root, size, self.download, self.split_seed)
        if self.dataset == "cifarfs":
            return sources.load_cifarfs_splits(root, size, self.download)
        if self.dataset == "mini-imagenet":
            return sources.load_mini_imagenet_splits(root, size, self.download)
        return sources.load_folder_splits(root, size, self.split_seed)

    def setup(self, stage: str | None = None) -> None:
        """Loads the three class splits (once) and checks that each can make ``ways``-way tasks."""
        if self._splits is not None:
            return
        splits = self._load()
        self._check_splits(splits)
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
        if split == "train" and self._trainer_or_none() is not None and self.trainer.world_size > 1:
            if self.trainer._accelerator_connector.use_distributed_sampler:
                raise ValueError(
                    "FewShotDataModule splits each meta-batch across the processes itself: set "
                    "trainer.use_distributed_sampler: false (Trainer(use_distributed_sampler=False)) for multi-process "
                    "runs"
                )
            shard = (self.trainer.global_rank, self.trainer.world_size)
        batches = TaskBatches(
            self._samplers[split], num_tasks, self.meta_batch_size, self.seed, split, epoch, shard=shard
        )
        self._batches[split] = batches
        return batches

    def train_dataloader(self) -> DataLoader:
        """``train_batches`` batches of ``meta_batch_size`` fresh tasks, which change with the epoch."""
        batches = self._task_batches("train", self.train_batches * self.meta_batch_size)
        skip, self._resume_skip = self._resume_skip, 0
        return self._loader(batches, sampler=EpochSampler(len(batches), self.set_epoch, skip=skip))

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
        _check_int("epoch", epoch, 0)
        self.epoch = epoch
        if "train" in self._batches:
            self._batches["train"].set_epoch(epoch)

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    def _batches_done(self) -> int:
        """Training batches completed in the current epoch (0 at an epoch's end), from the trainer's fit loop."""
        trainer = self._trainer_or_none()
        if trainer is None:
            return 0
        # "processed", not "completed": a checkpoint written in on_train_batch_end counts the batch as not completed
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return done if 0 < done < self.train_batches else 0

    def state_dict(self) -> dict[str, Any]:
        """The sampling state saved in checkpoints: ``seed``, ``epoch`` and the batches done in the epoch.

        A run resumed from a checkpoint taken in the middle of an epoch continues with the next batch of that
        epoch, so it sees exactly the tasks an uninterrupted run would.
        """
        return {"seed": self.seed, "epoch": self.epoch, "batches_done": self._batches_done()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the sampling state of :meth:`state_dict`, so that the same batches follow."""
        seed = state_dict.get("seed", self.seed)
        _check_int("seed", seed, None)
        self.seed = seed
        for batches in self._batches.values():
            batches.seed = seed
        self.set_epoch(state_dict.get("epoch", 0))
        self._resume_skip = int(state_dict.get("batches_done", 0))


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}: set {name} to a whole number")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}: set {name} to {minimum} or more")


def _check_ways(dataset: str, ways: int, classes: tuple[int, int, int]) -> None:
    for split, count in zip(SPLITS, classes):
        if ways > count:
            raise ValueError(
                f"ways={ways} is more than the {count} classes of the {_SPLIT_NAMES[split]} split of {dataset!r} "
                f"(train/val/test classes: {'/'.join(map(str, classes))}): set ways between 1 and {min(classes)}"
            )


def _check_examples(dataset: str, shots: int, queries: int, per_class: int, why: str) -> None:
    if shots + queries > per_class:
        raise ValueError(
            f"shots + queries = {shots} + {queries} = {shots + queries} is more than the {per_class} examples per "
            f"class of {dataset!r} ({why}): lower shots or queries so that shots + queries <= {per_class}"
        )
