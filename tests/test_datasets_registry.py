"""The dataset registry: the built-ins, a dataset registered from outside the package, the import graph of the data
modules, and the resume and multi-process checks that read only Lightning's public API."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_cases import BatchRecorder

from lightning_hypergrad.data import DATASETS, DatasetOptions, DatasetSpec, FewShotDataModule, get_dataset, register
from lightning_hypergrad.data.registry import unregister
from lightning_hypergrad.data.sources import ClassSplit, tensor_split

BUILT_INS = ["cifar100", "cifarfs", "digits", "folder", "mini-imagenet", "omniglot"]  # in module-name order
DATA_PACKAGE = Path(__file__).resolve().parents[1] / "lightning_hypergrad" / "data"


# ---------------------------------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------------------------------


def test_the_registry_lists_the_six_built_ins_in_order() -> None:
    assert list(DATASETS)[: len(BUILT_INS)] == BUILT_INS
    for name in BUILT_INS:
        spec = get_dataset(name)
        assert isinstance(spec, DatasetSpec) and spec.name == name and DATASETS[name] is spec
    assert (get_dataset("omniglot").channels, get_dataset("omniglot").image_size) == (1, 28)
    assert get_dataset("mini-imagenet").classes == (64, 16, 20)
    assert get_dataset("folder").classes is None and get_dataset("folder").needs_root


@pytest.mark.parametrize("build", [get_dataset, FewShotDataModule])
def test_an_unknown_name_lists_the_registered_datasets(build) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet': set dataset to one of (.+)") as info:
        build("imagenet")
    listed = str(info.value).split("one of ", 1)[1]
    assert listed.startswith(", ".join(BUILT_INS))
    assert "register" in listed


# ---------------------------------------------------------------------------------------------------------------------
# a dataset registered from this file: 6 classes of random 8x8 images, no edit in the package
# ---------------------------------------------------------------------------------------------------------------------

NAME = "random-8x8"
CALLS: list[tuple[str, DatasetOptions]] = []


def _load_random(options: DatasetOptions) -> dict[str, ClassSplit]:
    """Classes 0-3 meta-train, 4-5 meta-validation and meta-test; 10 images per class, pixel (0, 0) = the class."""
    CALLS.append(("load", options))
    generator = torch.Generator().manual_seed(options.split_seed)
    labels = torch.arange(6).repeat_interleave(10)
    images = torch.rand(len(labels), 1, 8, 8, generator=generator)
    images[:, 0, 0, 0] = labels / 10
    size = None if options.image_size in (None, 8) else options.image_size
    held_out = tensor_split(images, labels, [4, 5], size)
    return {"train": tensor_split(images, labels, range(4), size), "val": held_out, "test": held_out}


def _check_random(options: DatasetOptions) -> None:
    CALLS.append(("check_files", options))
    if (options.root / "forbidden").exists():
        raise FileNotFoundError(f"random-8x8 refuses {options.root}: remove the folder 'forbidden'")


def _prepare_random(options: DatasetOptions) -> None:
    CALLS.append(("prepare", options))


RANDOM_SPEC = DatasetSpec(
    name=NAME,
    channels=1,
    image_size=8,
    load=_load_random,
    check_files=_check_random,
    prepare=_prepare_random,
    classes=(4, 2, 2),
    examples_per_class=10,
    examples_reason="every random class has 10 images",
)


@pytest.fixture
def random_dataset():
    CALLS.clear()
    register(RANDOM_SPEC)
    yield RANDOM_SPEC
    unregister(NAME)


def test_a_registered_dataset_works_end_to_end(random_dataset, tmp_path: Path) -> None:
    assert NAME in DATASETS and list(DATASETS)[-1] == NAME
    dm = FewShotDataModule(
        dataset=NAME, root=str(tmp_path), ways=2, shots=3, queries=4, meta_batch_size=5, train_batches=2, val_tasks=7
    )
    assert dm.spec is random_dataset and dm.image_shape == (1, 8, 8)
    assert [call for call, _ in CALLS] == ["check_files"]
    assert CALLS[0][1] == DatasetOptions(root=tmp_path, image_size=None, download=False, split_seed=0)
    dm.prepare_data()
    dm.setup("fit")
    assert [call for call, _ in CALLS] == ["check_files", "prepare", "load"]
    train = list(dm.train_dataloader())
    assert len(train) == 2
    for batch in train:
        assert batch["support_x"].shape == (5, 2 * 3, 1, 8, 8) and batch["query_x"].shape == (5, 2 * 4, 1, 8, 8)
        assert batch["support_y"].shape == (5, 6) and batch["query_y"].shape == (5, 8)
        for t in range(5):
            assert torch.bincount(batch["support_y"][t], minlength=2).tolist() == [3, 3]
            assert torch.bincount(batch["query_y"][t], minlength=2).tolist() == [4, 4]
        # the training tasks draw from classes 0-3 only
        assert set((batch["query_x"][:, :, 0, 0, 0] * 10).round().long().flatten().tolist()) <= {0, 1, 2, 3}
    val = list(dm.val_dataloader())
    assert [b["query_x"].shape[0] for b in val] == [5, 2]
    assert set((val[0]["query_x"][:, :, 0, 0, 0] * 10).round().long().flatten().tolist()) == {4, 5}

    resized = FewShotDataModule(dataset=NAME, ways=2, shots=1, queries=1, meta_batch_size=2, image_size=16)
    assert resized.image_shape == (1, 16, 16)
    assert next(iter(resized.test_dataloader()))["support_x"].shape == (2, 2, 1, 16, 16)


def test_a_registered_dataset_gets_the_checks_of_its_spec(random_dataset, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"ways=3 is more than the 2 classes of the meta-validation split of "):
        FewShotDataModule(dataset=NAME, ways=3)
    with pytest.raises(ValueError, match=r"= 11 is more than the 10 examples per class .*every random class has 10"):
        FewShotDataModule(dataset=NAME, ways=2, shots=1, queries=10)
    (tmp_path / "forbidden").mkdir()
    with pytest.raises(FileNotFoundError, match="remove the folder 'forbidden'"):
        FewShotDataModule(dataset=NAME, root=str(tmp_path), ways=2, shots=1, queries=1)


def test_registering_refuses_a_taken_name_and_bad_specs(random_dataset) -> None:
    with pytest.raises(ValueError, match=r"dataset 'digits' is already registered: .*replace=True"):
        register(DatasetSpec(name="digits", channels=1, image_size=8, load=_load_random))
    with pytest.raises(ValueError, match="register takes a DatasetSpec"):
        register(NAME)
    assert register(RANDOM_SPEC, replace=True) is RANDOM_SPEC
    with pytest.raises(ValueError, match=r"examples_reason is empty"):
        DatasetSpec(name="x", channels=1, image_size=8, load=_load_random, examples_per_class=5)
    with pytest.raises(ValueError, match=r"classes must be a tuple of the train/val/test class counts"):
        DatasetSpec(name="x", channels=1, image_size=8, load=_load_random, classes=(4, 2))
    with pytest.raises(ValueError, match=r"DatasetSpec 'x' channels must be an integer >= 1, got 0"):
        DatasetSpec(name="x", channels=0, image_size=8, load=_load_random)
    with pytest.raises(ValueError, match=r"DatasetSpec 'x' load must be a function"):
        DatasetSpec(name="x", channels=1, image_size=8, load=None)
    with pytest.raises(ValueError, match=r"unknown dataset 'x'"):
        unregister("x")


def _wrong_shape(options: DatasetOptions) -> dict[str, ClassSplit]:
    splits = _load_random(DatasetOptions(options.root, 12, options.download, options.split_seed))
    return splits


def _two_splits(options: DatasetOptions) -> dict[str, ClassSplit]:
    splits = _load_random(options)
    del splits["test"]
    return splits


@pytest.mark.parametrize(
    ("load", "message"),
    [
        (_wrong_shape, r"yields images of shape \(1, 12, 12\), but its DatasetSpec .* give .* \(1, 8, 8\)"),
        (_two_splits, r"returned \['train', 'val'\]: it must return a dict with a ClassSplit under each of"),
    ],
)
def test_a_loader_that_breaks_its_promise_is_named(random_dataset, load, message: str) -> None:
    register(DatasetSpec(name=NAME, channels=1, image_size=8, load=load), replace=True)
    dm = FewShotDataModule(dataset=NAME, ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match=message):
        dm.setup()


# ---------------------------------------------------------------------------------------------------------------------
# the import graph of the data modules
# ---------------------------------------------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = path.relative_to(DATA_PACKAGE.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The data modules that ``path`` imports anywhere (lazy imports in functions included)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return found & modules


def _import_graph() -> dict[str, set[str]]:
    paths = sorted(DATA_PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (the modules in order), or ``None``."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_data_modules_import_each_other_without_a_cycle() -> None:
    graph = _import_graph()
    names = {name.removeprefix("lightning_hypergrad.data") for name in graph}
    assert {".datasets.digits", ".datasets.folder", ".registry", ".sources", ".tasks", "._learn2learn"} <= names
    assert "lightning_hypergrad.data.registry" in graph["lightning_hypergrad.data.datasets.omniglot"]
    assert "lightning_hypergrad.data._learn2learn" in graph["lightning_hypergrad.data.tasks"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    # the cycle finder finds one when there is one
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_data_modules_read_no_private_lightning_attribute() -> None:
    for path in sorted(DATA_PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Name, ast.Attribute)):
                owner = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
                assert not (owner == "trainer" and node.attr.startswith("_")), f"{path.name}: trainer.{node.attr}"
                assert node.attr != "fit_loop", f"{path.name} reads the trainer's fit loop"


# ---------------------------------------------------------------------------------------------------------------------
# public Lightning API: resuming mid-epoch and the multi-process sampler check
# ---------------------------------------------------------------------------------------------------------------------


def _fit(folder: Path, ckpt_path: Path | None = None) -> list[torch.Tensor]:
    """8 steps, 5 batches per epoch, a checkpoint in ``folder`` after every step; the query images trained on."""
    dm = FewShotDataModule("digits", ways=2, shots=1, queries=2, meta_batch_size=2, train_batches=5, seed=3)
    model = BatchRecorder()
    trainer = Trainer(
        max_steps=8,
        accelerator="cpu",
        logger=False,
        callbacks=[ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1)],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


def _check_saved_states(folder: Path, steps: range) -> None:
    """The data module's state in the checkpoint after each step: the epoch and the batches done in it."""
    for step in steps:
        epoch, done = divmod(step, 5)
        if done == 0:  # the checkpoint after an epoch's last batch: the next epoch starts from its first batch
            epoch, done = epoch - 1, 0
        saved = torch.load(folder / f"epoch={epoch}-step={step}.ckpt", weights_only=False)["FewShotDataModule"]
        assert saved == {"seed": 3, "epoch": epoch, "batches_done": done}, step


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
@pytest.mark.filterwarnings("ignore:The dirpath has changed from")
def test_a_resumed_run_continues_with_the_next_batch_of_the_epoch(tmp_path: Path) -> None:
    """Resumed after steps 3 (epoch 0) and 6 (epoch 1, 1 batch done), a run trains on the batches an uninterrupted
    run would, and its own checkpoints hold the same states."""
    uninterrupted = _fit(tmp_path / "uninterrupted")
    assert len(uninterrupted) == 8
    _check_saved_states(tmp_path / "uninterrupted", range(1, 9))
    for step in (3, 6):
        checkpoint = tmp_path / "uninterrupted" / f"epoch={(step - 1) // 5}-step={step}.ckpt"
        resumed = _fit(tmp_path / f"resumed{step}", ckpt_path=checkpoint)
        assert len(resumed) == 8 - step
        assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[step:]))
        _check_saved_states(tmp_path / f"resumed{step}", range(step + 1, 9))


def test_lightnings_distributed_sampler_is_refused_naming_the_setting() -> None:
    dm = FewShotDataModule("digits", ways=2, shots=1, queries=1, meta_batch_size=2, train_batches=3)
    ours = dm.train_dataloader()
    # what Lightning does with use_distributed_sampler on: the data module's sampler, wrapped and sharded
    lightnings = torch.utils.data.DataLoader(
        ours.dataset, batch_size=None, sampler=DistributedSamplerWrapper(ours.sampler, num_replicas=2, rank=0)
    )
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, global_step=0, train_dataloader=lightnings)
    with pytest.raises(ValueError, match=r"set trainer.use_distributed_sampler: false"):
        iter(lightnings)
    # with use_distributed_sampler off, Lightning keeps the data module's loader: each process gets its share
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, global_step=0, train_dataloader=None)
    ours = dm.train_dataloader()
    dm.trainer.train_dataloader = ours
    batches = list(ours)
    assert len(batches) == 3 and batches[0]["support_x"].shape[0] == 1  # half of each meta-batch of 2 tasks
    assert ours.dataset.shard == (1, 2)
