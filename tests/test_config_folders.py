"""Every shipped config has a checkpoint folder of its own, and a checkpoint of another model class is refused.

The defects these guard against: ``configs/paper/omniglot.yaml`` and ``configs/maml/omniglot.yaml`` both wrote
``lightning-hypergrad/omniglot/checkpoints/``, so that ``--ckpt_path last`` took the other config's run and ended
in ``error: Problem with given class_path ...: 'str' object has no attribute 'copy'``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightning_hypergrad._configs import configs_folder, shipped_configs
from lightning_hypergrad.cli import cli
from lightning_hypergrad.cli.app import HypergradCLI
from lightning_hypergrad.cli.checkpoints import checkpoint_folder

SMALL = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.max_steps=1",
    "--data.init_args.train_batches=2",
    "--data.init_args.val_tasks=2",
    "--data.init_args.meta_batch_size=2",
    "--model.init_args.inner_steps=1",
    "--model.init_args.width=4",
]


def folder_of(*names: str) -> str:
    return checkpoint_folder([str(configs_folder() / f"{name}.yaml") for name in names], None, None)


def test_no_two_shipped_configs_share_a_checkpoint_folder():
    from lightning_hypergrad.cli.checkpoints import legacy_checkpoint_folder

    folders = {name: folder_of(name) for name in shipped_configs()}
    shared = {f: [n for n in folders if folders[n] == f] for f in folders.values()}
    assert {f: n for f, n in shared.items() if len(n) > 1} == {}
    assert folders["paper/omniglot"] != folders["maml/omniglot"]
    assert folders["quickstart"] == os.path.join("lightning-hypergrad", "quickstart", "checkpoints")  # as before
    assert folder_of("paper/omniglot", "estimators/t1t2") == os.path.join(
        "lightning-hypergrad", "paper-omniglot+t1t2", "checkpoints"
    )
    # a user's own file is named by its stem, and a config whose name changed knows its former folder
    assert checkpoint_folder(["mine/omniglot.yaml"], None, None) == os.path.join(
        "lightning-hypergrad", "omniglot", "checkpoints"
    )
    paper = [str(configs_folder() / "paper" / "omniglot.yaml")]
    assert legacy_checkpoint_folder(paper, None) == os.path.join("lightning-hypergrad", "omniglot", "checkpoints")
    assert legacy_checkpoint_folder([str(configs_folder() / "quickstart.yaml")], None) is None


def test_a_checkpoint_of_another_model_class_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(["fit", "--config", "quickstart", *SMALL])
    (checkpoint,) = Path("lightning-hypergrad", "quickstart", "checkpoints").glob("last-*.ckpt")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    other = ["--config", "hpo/lr_schedule", "--trainer.logger=false", "--trainer.max_steps=2"]
    built = []
    monkeypatch.setattr(HypergradCLI, "instantiate_classes", lambda self: built.append(self))
    for subcommand in ("fit", "validate"):
        with pytest.raises(ValueError) as refused:
            cli([subcommand, *other, "--ckpt_path", str(checkpoint)])
        assert str(refused.value) == (
            f"ckpt_path={checkpoint} was written by a run of lightning_hypergrad.FewShotClassifier, and this "
            "config's model is lightning_hypergrad.hpo.LearningRateTuner: give a checkpoint of this config's runs "
            "(in lightning-hypergrad/lr_schedule/checkpoints), or drop --ckpt_path to start a new run"
        )
        assert not built  # refused before the model, the data and the trainer are built
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("config", ["paper/omniglot", "maml/omniglot"])
def test_ckpt_path_last_of_one_omniglot_config_never_takes_the_others_run(config, tmp_path, monkeypatch):
    """The paper's and MAML's Omniglot configs (on the digits here): the run of the one is not the other's last."""
    monkeypatch.chdir(tmp_path)
    digits = ["--data.init_args.dataset=digits", "--data.init_args.root=null", "--data.init_args.shots=1"]
    other = "maml/omniglot" if config == "paper/omniglot" else "paper/omniglot"
    cli(["fit", "--config", other, *SMALL, *digits])
    ran = cli(["fit", "--config", config, *SMALL, *digits, "--ckpt_path", "last"])
    assert ran.trainer.ckpt_path is None  # a new run, not the other config's
    folders = sorted(p.parent.parent.name for p in tmp_path.rglob("last-*.ckpt"))
    assert folders == ["maml-omniglot", "paper-omniglot"]


def test_every_config_folder_is_a_package_of_the_wheel():
    """``python -m build`` warned "Package would be ignored" (40 lines each) for every folder of ``configs/`` that
    ``pyproject.toml`` did not list as a package: each is listed, so that the build is quiet and the wheel ships it."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    packages = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    configs = root / "configs"
    folders = {p.parent for p in configs.rglob("*.yaml")} - {configs}
    names = {"lightning_hypergrad.configs." + ".".join(folder.relative_to(configs).parts) for folder in folders}
    assert names and names <= packages, sorted(names - packages)
