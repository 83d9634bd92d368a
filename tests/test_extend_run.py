"""Extending a finished run equals the uninterrupted run, bit for bit, for every shipped config.

The defect this guards against: with ``checkpoint.every_n_train_steps`` (the paper, MAML, iMAML and HPO configs) and
``max_steps`` at an epoch's end, the ``last`` checkpoint is written at the end of training, after the epoch has
completed; a run extended from it with ``--ckpt_path last`` and a larger ``max_steps`` ran an epoch without batches
first, so that it trained on the tasks of epoch 2 where the uninterrupted run trains on those of epoch 1 (15 of 17
tensors differed).

Each config runs on the bundled digits, 2 steps an epoch: an uninterrupted run of 4 steps, and a run of 2 steps
extended to 4 with ``--ckpt_path last``, in the same process (the command line's :func:`~lightning_hypergrad.cli.cli`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_hypergrad._configs import configs_folder, shipped_configs
from lightning_hypergrad.cli import cli

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]


def main_configs() -> list[str]:
    """The shipped configs that set a model and data (not those added to a main one: an estimator, DDP)."""
    folder = configs_folder()
    return [name for name in shipped_configs() if "data" in yaml.safe_load((folder / f"{name}.yaml").read_text())]


COMMON = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.deterministic=true",
    "--model.init_args.inner_steps=2",
]
FEW_SHOT = [  # 2 batches an epoch on the digits
    "--data.init_args.dataset=digits",
    "--data.init_args.root=null",
    "--data.init_args.train_batches=2",
    "--data.init_args.val_tasks=2",
    "--data.init_args.test_tasks=2",
    "--data.init_args.meta_batch_size=2",
    "--data.init_args.shots=2",
    "--data.init_args.queries=3",
    "--model.init_args.width=8",
]
HPO = [
    "--data.init_args.train_size=100",
    "--data.init_args.val_size=50",
    "--data.init_args.test_size=50",
    "--data.init_args.steps_per_epoch=2",
]


def small(config: str) -> list[str]:
    path = configs_folder() / f"{config}.yaml"
    data = yaml.safe_load(path.read_text())["data"]["class_path"]
    return ["--config", str(path), *COMMON, *(HPO if data.endswith("DigitsHPODataModule") else FEW_SHOT)]


def fit(cwd: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], *more: str) -> dict[str, Any]:
    """Fits in ``cwd``; the ``last`` checkpoint that the run wrote."""
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    ran = cli(["fit", *args, *more])
    path = next(c for c in ran.trainer.callbacks if hasattr(c, "last_model_path")).last_model_path
    assert path, "no last checkpoint written"
    return torch.load(path, weights_only=False, map_location="cpu")


def assert_same(a: Any, b: Any, where: str = "checkpoint") -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


COMPUTED = ("global_step", "epoch", "state_dict", "optimizer_states", "lr_schedulers", "lightning_hypergrad")
"""What a run computed: the step and epoch reached, the weights, the outer optimizer and schedulers, the module's own
state (online mode's carried inner model, the epoch whose end was handled)."""


def logging_step(checkpoint: dict[str, Any]) -> int:
    """Lightning's count of batches that stepped: the step its loggers log at (Lightning's first pass over a resumed
    epoch added one to it, so every logged point of the extended run came one step later)."""
    return checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]


@pytest.mark.parametrize("config", main_configs())
def test_a_finished_run_extended_with_ckpt_path_last_equals_the_uninterrupted_run(config, tmp_path, monkeypatch):
    args = small(config)
    uninterrupted = fit(tmp_path / "uninterrupted", monkeypatch, args, "--trainer.max_steps=4")
    first = fit(tmp_path / "extended", monkeypatch, args, "--trainer.max_steps=2")
    assert first["global_step"] == 2
    extended = fit(tmp_path / "extended", monkeypatch, args, "--trainer.max_steps=4", "--ckpt_path", "last")
    assert uninterrupted["global_step"] == extended["global_step"] == 4
    data = [key for key in uninterrupted if key.endswith("DataModule")]  # the data module's sampling state, if any
    for key in (*COMPUTED, *data):
        assert_same(uninterrupted[key], extended[key], key)
    assert logging_step(first) == 2 and logging_step(uninterrupted) == logging_step(extended) == 4
