"""The datasets that :class:`~lightning_hypergrad.data.FewShotDataModule` knows: one :class:`DatasetSpec` per name.

A spec holds everything dataset-specific: the published class and example counts that settings are checked against
before any file is read, the default image shape, and the three functions that check the files, prepare them
(download, convert) and load the meta-train, meta-validation and meta-test splits. The data module reads all of it
from the spec; it has no table or branch per dataset.

Adding a built-in dataset takes one new file and its test:

1. Write ``lightning_hypergrad/data/datasets/<name>.py`` holding the loader code and, at the end, the spec::

       register(DatasetSpec(name="my-set", channels=3, image_size=32, load=load_my_set))

   ``load_my_set(options)`` takes a :class:`DatasetOptions` (``root``, ``image_size``, ``download``, ``split_seed``)
   and returns ``{"train": ClassSplit, "val": ClassSplit, "test": ClassSplit}`` (see
   :mod:`lightning_hypergrad.data.sources` for :class:`~lightning_hypergrad.data.sources.ClassSplit`,
   :class:`~lightning_hypergrad.data.sources.TensorImages` and
   :func:`~lightning_hypergrad.data.sources.tensor_split`). Give ``check_files`` (raise ``FileNotFoundError`` naming
   the paths looked at and how to get them, and check the files that are there with
   :func:`~lightning_hypergrad.data.sources.verify_files`) and ``prepare`` (download or convert, run once per machine
   by Lightning's ``prepare_data``) when the data comes from files, and ``classes``/``examples_per_class`` when the
   counts are fixed, so that too large ``ways``/``shots``/``queries`` are refused at once.

   Damaged files: ``verify_files(paths, readable, remedy, root=...)`` checks each file against a ``SHA256SUMS``
   beside it (or in ``root``) when that lists it, else with ``readable`` (a cheap check such as
   :func:`~lightning_hypergrad.data.sources.check_zip`, :func:`~lightning_hypergrad.data.sources.check_pickle` or
   :func:`~lightning_hypergrad.data.sources.check_image`), once per process per file size and time, and raises
   :class:`~lightning_hypergrad.data.sources.DataFileError` (a ``ValueError``) naming the file and ending with
   ``remedy`` (how to get it again). In ``load``, read each file inside
   ``with reading(path, remedy):`` (:func:`~lightning_hypergrad.data.sources.reading`), so that damage the cheap
   check cannot see still raises that error naming the file, not a traceback from NumPy, ``pickle`` or PIL.
2. Nothing else: importing :mod:`lightning_hypergrad.data` imports every module of
   ``lightning_hypergrad/data/datasets/``, in the order of their names, which registers them.
3. Add ``tests/test_<name>.py`` (generated files in ``tmp_path``, no download).

Nothing in :mod:`lightning_hypergrad.data.fewshot` changes; list the dataset in the docstring of
:class:`~lightning_hypergrad.data.FewShotDataModule` and in the README.

A dataset of your own, outside the package, needs no file here: call :func:`register` with its spec before building
the data module, then pass its name as ``FewShotDataModule(dataset=...)``. In a script, register at its top; with the
command line, register at import of a module of yours that the config names (e.g. the module of the model class given
by ``class_path``), since the config is parsed before the data module is built. The spec's functions must be defined
at module level when the data module is pickled (multi-process runs that spawn their processes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from lightning_hypergrad._checks import check_int
from lightning_hypergrad.data.sources import SPLIT_NAMES, SPLITS, ClassSplit


@dataclass(frozen=True)
class DatasetOptions:
    """The settings of :class:`~lightning_hypergrad.data.FewShotDataModule` that a dataset's functions receive.

    Attributes:
        root: the data folder (``root``, or ``data`` when it is not set and the dataset does not need it).
        image_size: the side the user asked for, or ``None`` for the dataset's own.
        download: whether the dataset may be downloaded into ``root``.
        split_seed: the seed of a class split that the dataset draws itself.
    """

    root: Path
    image_size: int | None
    download: bool
    split_seed: int


def _no_files(options: DatasetOptions) -> None:
    """Nothing to check or prepare: the dataset reads no files of its own."""


@dataclass(frozen=True)
class DatasetSpec:
    """Everything :class:`~lightning_hypergrad.data.FewShotDataModule` needs to know about one dataset.

    Attributes:
        name: the value of ``FewShotDataModule(dataset=...)``.
        channels: the channels of the images.
        image_size: the side of the (square) images when ``image_size`` is not set.
        load: returns the ``train``, ``val`` and ``test`` splits; called in :meth:`FewShotDataModule.setup`.
        check_files: raises ``FileNotFoundError`` (naming the paths looked at and how to get the data) when the files
            are absent and cannot be downloaded, and :class:`~lightning_hypergrad.data.sources.DataFileError` (naming
            the file and how to get it again) when a file there is damaged; called when the data module is built.
            Default: no check.
        prepare: downloads or converts the files into ``options.root`` (Lightning's ``prepare_data``, one process per
            machine). Default: nothing.
        classes: the published classes of the train/val/test splits, to refuse a too large ``ways`` before reading
            any file; ``None`` when they depend on the files (local copies are checked again after loading).
        examples_per_class: the published examples of the smallest class, to refuse a too large
            ``shots + queries`` at once; ``None`` when they depend on the files.
        examples_reason: why there are that many, put in the error message (e.g. ``"every Omniglot character has
            20 drawings"``).
        needs_root: ``None`` when ``root`` defaults to ``data``; otherwise ``root`` must be set, and the error for
            a missing ``root`` tells the user to set it to this (e.g. ``"a folder of class folders"``).

    Raises:
        ValueError: a setting of the spec itself that cannot work (an empty name, counts below 1, ``classes``
            without three entries, ``examples_per_class`` without ``examples_reason``).
    """

    name: str
    channels: int
    image_size: int
    load: Callable[[DatasetOptions], dict[str, ClassSplit]]
    check_files: Callable[[DatasetOptions], None] = _no_files
    prepare: Callable[[DatasetOptions], None] = _no_files
    classes: tuple[int, int, int] | None = None
    examples_per_class: int | None = None
    examples_reason: str = ""
    needs_root: str | None = None

    def __post_init__(self) -> None:
        owner = f"DatasetSpec {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(
                f"DatasetSpec name must be a non-empty string, got {self.name!r}: set it to the dataset name"
            )
        check_int("channels", self.channels, owner=owner)
        check_int("image_size", self.image_size, owner=owner)
        for field in ("load", "check_files", "prepare"):
            if not callable(getattr(self, field)):
                raise ValueError(f"{owner} {field} must be a function, got {getattr(self, field)!r}")
        if self.classes is not None:
            if not isinstance(self.classes, tuple) or len(self.classes) != len(SPLITS):
                raise ValueError(
                    f"{owner} classes must be a tuple of the train/val/test class counts or None, got "
                    f"{self.classes!r}: set it to e.g. (64, 16, 20), or None when the files decide"
                )
            for split, count in zip(SPLITS, self.classes):
                check_int(f"classes of the {split} split", count, owner=owner)
        if self.examples_per_class is not None:
            check_int("examples_per_class", self.examples_per_class, owner=owner)
            if not self.examples_reason:
                raise ValueError(
                    f"{owner} examples_reason is empty: set it to why every class has at least "
                    f"{self.examples_per_class} examples (it is shown to users who ask for more)"
                )

    def check_task(self, ways: int, shots: int, queries: int) -> None:
        """Refuses ``ways`` above the published classes of a split, or ``shots + queries`` above the examples per class.

        Raises:
            ValueError: naming the setting, the dataset's count and the largest value that works.
        """
        if self.classes is not None:
            for split, count in zip(SPLITS, self.classes):
                if ways > count:
                    raise ValueError(
                        f"ways={ways} is more than the {count} classes of the {SPLIT_NAMES[split]} split of "
                        f"{self.name!r} (train/val/test classes: {'/'.join(map(str, self.classes))}): set ways "
                        f"between 1 and {min(self.classes)}"
                    )
        per_class = self.examples_per_class
        if per_class is not None and shots + queries > per_class:
            raise ValueError(
                f"shots + queries = {shots} + {queries} = {shots + queries} is more than the {per_class} examples per "
                f"class of {self.name!r} ({self.examples_reason}): lower shots or queries so that shots + queries <= "
                f"{per_class}"
            )


_REGISTRY: dict[str, DatasetSpec] = {}

DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(_REGISTRY)
"""The registered datasets by name, in registration order (the built-ins first): the values
``FewShotDataModule(dataset=...)`` accepts. A read-only view: it shows datasets registered later too."""


def register(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Makes ``spec.name`` a value of ``FewShotDataModule(dataset=...)``; returns ``spec``.

    Args:
        spec: the dataset.
        replace: replace a dataset registered under the same name (otherwise that is an error).

    Raises:
        ValueError: ``spec`` is not a :class:`DatasetSpec`, or its name is taken and ``replace`` is off.
    """
    if not isinstance(spec, DatasetSpec):
        raise ValueError(
            f"register takes a DatasetSpec, got {type(spec).__name__}: describe the dataset with DatasetSpec"
        )
    if spec.name in _REGISTRY and not replace:
        raise ValueError(
            f"dataset {spec.name!r} is already registered: give yours another name, or pass replace=True to "
            "register to replace it"
        )
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> DatasetSpec:
    """Removes a registered dataset and returns its spec (e.g. when a test is done with its own).

    Raises:
        ValueError: ``name`` is not registered (the message lists the registered names).
    """
    spec = get_dataset(name)
    del _REGISTRY[name]
    return spec


def get_dataset(name: str) -> DatasetSpec:
    """The spec registered under ``name``.

    Raises:
        ValueError: no dataset of that name; the message lists the registered ones.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"unknown dataset {name!r}: set dataset to one of {', '.join(_REGISTRY)} (or register your own with "
            "lightning_hypergrad.data.register before building the data module)"
        )
    return _REGISTRY[name]
