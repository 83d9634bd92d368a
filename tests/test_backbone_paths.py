"""A backbone or a head of the user's own, named by its dotted path: through the Python API, a config's string and the
command line (``--model.init_args.backbone mypkg.MyBackbone``), which refused it before (``backbone must be one of
'conv', 'conv4', 'resnet'``: only an undocumented ``{"class_path": ...}`` form worked)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from custom_nets import TinyBackbone, tiny_backbone, tiny_head
from torch import nn

from lightning_hypergrad import FewShotClassifier
from lightning_hypergrad.cli import cli

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")
ROOT = Path(__file__).resolve().parents[1]
ONE_STEP = [
    "fit",
    "--config",
    str(ROOT / "configs" / "quickstart.yaml"),
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.callbacks=[]",
    "--trainer.max_steps=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.limit_val_batches=0",
    "--data.init_args.train_batches=1",
    "--data.init_args.meta_batch_size=1",
    "--model.init_args.inner_steps=1",
]


def _model(**kwargs) -> FewShotClassifier:
    return FewShotClassifier(ways=3, image_shape=(1, 8, 8), inner_steps=1, **kwargs)


@pytest.mark.parametrize(
    "path, width", [("custom_nets.TinyBackbone", 4), ("custom_nets.tiny_backbone", 3)], ids=["class", "function"]
)
def test_backbone_accepts_a_dotted_path_to_a_class_or_a_function(path, width):
    model = _model(backbone=path)
    assert isinstance(model.backbone, TinyBackbone)
    assert model.backbone[0].out_channels == width
    assert model.backbone.out_features == width  # found by one forward pass: TinyBackbone sets none
    assert model.inner_model.module.in_features == width
    assert model.hparams.backbone == path  # the checkpoint keeps the path, load_from_checkpoint imports it again


def test_head_accepts_a_dotted_path_to_a_function():
    model = _model(head="custom_nets.tiny_head")
    assert isinstance(model.inner_model.module, nn.Linear) and model.inner_model.module.bias is None
    assert model.head_init == "fixed"  # as for any head but the default
    assert model.hparams.head == "custom_nets.tiny_head"


@pytest.mark.parametrize(
    "setting, path, error, message",
    [
        ("backbone", "no_such_package.Backbone", ValueError, r"backbone='no_such_package\.Backbone' cannot be"),
        ("backbone", "custom_nets.NoSuchBackbone", ValueError, r"has no attribute 'NoSuchBackbone'"),
        ("head", "custom_nets.no_such_head", ValueError, r"FewShotClassifier head='custom_nets\.no_such_head' cannot"),
        ("head", "custom_nets.NOT_CALLABLE", TypeError, r"head='custom_nets\.NOT_CALLABLE' is a int, not a class"),
        ("backbone", "vgg", ValueError, r"backbone must be one of 'conv', 'conv4', 'resnet', or the dotted path"),
    ],
)
def test_a_path_that_does_not_import_is_refused_naming_the_setting(setting, path, error, message):
    with pytest.raises(error, match=message):
        _model(**{setting: path})


def test_backbone_accepts_a_dotted_class_path_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = cli([*ONE_STEP, "--model.init_args.backbone", "custom_nets.TinyBackbone"])
    assert run.trainer.global_step == 1
    assert isinstance(run.model.backbone, TinyBackbone) and run.model.backbone.out_features == 4
    (checkpoint,) = tmp_path.glob("lightning-hypergrad/quickstart/checkpoints/last-*.ckpt")
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["hyper_parameters"]["backbone"] == "custom_nets.TinyBackbone"
    with warnings.catch_warnings():  # (the estimator is not among the hyperparameters: the module says so)
        warnings.simplefilter("ignore")
        restored = FewShotClassifier.load_from_checkpoint(checkpoint)  # the path is imported again
    assert isinstance(restored.backbone, TinyBackbone)
    assert torch.equal(restored.backbone[0].weight, run.model.backbone[0].weight)


def test_backbone_and_head_accept_a_dotted_function_path_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    given = ["--model.init_args.backbone=custom_nets.tiny_backbone", "--model.init_args.head=custom_nets.tiny_head"]
    run = cli([*ONE_STEP, *given])
    assert run.trainer.global_step == 1
    assert run.model.backbone_name is tiny_backbone and run.model.head_factory is tiny_head
    assert run.model.inner_model.module.in_features == 3 and run.model.inner_model.module.bias is None


def test_a_head_class_with_its_arguments_on_the_command_line_still_takes_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    head = ["--model.init_args.head=lightning_hypergrad.nets.MLPHead", "--model.init_args.head.hidden=[6]"]
    run = cli([*ONE_STEP[1:], *head], run=False)  # (run=False: no subcommand)
    head = run.model.head_factory(8, 5)  # (the model is built when fitting starts, from the data module's shapes)
    assert [layer.out_features for layer in head if isinstance(layer, nn.Linear)] == [6, 5]
