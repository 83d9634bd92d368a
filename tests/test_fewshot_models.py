"""Few-shot models with any head and backbone, MAML, and what batch norm inside the inner model does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning_cases import loader, quiet_trainer, random_meta_batch
from torch import nn

import lightning_hypergrad as lh
from lightning_hypergrad.fewshot import MAML, FewShotClassifier
from lightning_hypergrad.nets import CosineHead, MLPHead

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _bn_head(i, o):
    return MLPHead(i, o, hidden=[6], batch_norm=True)


def test_the_default_head_is_the_papers_zero_linear_head_and_the_flat_path_equals_it():
    """FewShotClassifier's module path against the paper's head written on positional tensors (float64)."""
    torch.manual_seed(0)
    model = FewShotClassifier(ways=3, image_shape=(1, 8, 8), estimator="rmd", inner_steps=4).double()
    task = {k: v[0].double() if v.is_floating_point() else v[0] for k, v in random_meta_batch(tasks=1).items()}
    got = model.meta_gradient([task]).hypergrads
    n = task["support_x"].shape[0]

    def features():
        out = model.backbone(torch.cat([task["support_x"], task["query_x"]]))
        return [out[:n], out[n:]]

    d = model.backbone.out_features
    problem = lh.BilevelProblem(
        lambda w, h: F.cross_entropy(h[0] @ w[0].T + w[1], task["support_y"]),
        lambda w, h: F.cross_entropy(h[1] @ w[0].T + w[1], task["query_y"]),
        list(model.parameters()),
        [torch.zeros(3, d, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)],
        lh.SGD(lr=0.1, momentum=0.9),
        4,
        features=features,
    )
    want = lh.RMD()(problem).hypergrads
    assert len(got) == len(want) == len(list(model.backbone.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)


def test_inner_batch_norm_uses_batch_statistics_in_every_mode_and_keeps_its_buffers():
    torch.manual_seed(0)
    model = FewShotClassifier(ways=3, image_shape=(1, 8, 8), head=_bn_head, inner_steps=3)
    buffers = {k: v.clone() for k, v in model.inner_model.state_dict().items()}
    batch = random_meta_batch(tasks=2)
    quiet_trainer(max_steps=2).fit(model, loader(batch, batch))
    after = model.inner_model.state_dict()
    for key, value in buffers.items():  # running statistics and the fixed w_0 alike: never changed
        assert torch.equal(after[key], value), key
    task = {k: v[0] for k, v in batch.items()}
    model.train()
    in_training = model.evaluate_task(task)
    model.eval()
    in_evaluation = model.evaluate_task(task)
    bn = model.inner_model.module[1]
    assert isinstance(bn, nn.BatchNorm1d) and bn.track_running_stats and not bn.training
    # the backbone's batch norm differs between modes; the head's does not: compare with the backbone frozen in eval
    model.backbone.eval()
    model.inner_model.train()
    frozen_train = model.evaluate_task(task)
    model.inner_model.eval()
    frozen_eval = model.evaluate_task(task)
    torch.testing.assert_close(frozen_train["outer_loss"], frozen_eval["outer_loss"], rtol=0, atol=0)
    assert in_training.keys() == in_evaluation.keys()


def test_checkpoints_hold_the_inner_models_buffers_and_restore_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = FewShotClassifier(ways=3, image_shape=(1, 8, 8), head=_bn_head, inner_steps=2)
    trainer = quiet_trainer(max_steps=1, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(model, loader(random_meta_batch()))
    path = next(tmp_path.rglob("*.ckpt"))
    saved = torch.load(path, weights_only=False)["state_dict"]
    for key, value in model.inner_model.state_dict().items():
        assert torch.equal(saved[f"inner_model.{key}"], value)
    restored = FewShotClassifier.load_from_checkpoint(path, head=_bn_head)
    task = {k: v[0] for k, v in random_meta_batch(seed=3).items()}
    model.eval(), restored.eval()
    torch.testing.assert_close(restored.evaluate_task(task)["outer_loss"], model.evaluate_task(task)["outer_loss"])


@pytest.mark.parametrize(
    "head, head_init",
    [
        (None, None),
        (_bn_head, None),
        (lambda i, o: CosineHead(i, o), "fixed"),
        (None, "learned"),
        (_bn_head, "learned"),
    ],
    ids=["linear-zeros", "mlp-bn-fixed", "cosine-fixed", "linear-learned", "mlp-bn-learned"],
)
def test_any_head_trains_and_only_a_learned_initialization_becomes_a_hyperparameter(head, head_init):
    torch.manual_seed(0)
    model = FewShotClassifier(ways=3, image_shape=(1, 8, 8), head=head, head_init=head_init, inner_steps=3)
    head_params = list(model.inner_model.module.parameters())
    assert bool(head_params) == (head_init == "learned")
    assert len(model.hyperparameters()) == len(list(model.backbone.parameters())) + len(head_params)
    before = [p.detach().clone() for p in model.parameters()]
    quiet_trainer(max_steps=1).fit(model, loader(random_meta_batch()))
    assert all(not torch.equal(b, a) for b, a in zip(before, model.parameters()))


@pytest.mark.parametrize("backbone, features", [("conv", 8), ("conv4", 64), ("resnet", 8 * 8)])
def test_backbones_by_name(backbone, features):
    torch.manual_seed(0)
    model = FewShotClassifier(ways=3, image_shape=(1, 8, 8), backbone=backbone, width=8, inner_steps=2)
    assert model.backbone.out_features == features
    quiet_trainer(max_steps=1).fit(model, loader(random_meta_batch()))


def test_a_custom_backbone_finds_its_feature_size():
    model = FewShotClassifier(
        ways=3, image_shape=(1, 8, 8), backbone=lambda shape: nn.Sequential(nn.Conv2d(shape[0], 5, 3), nn.Flatten())
    )
    assert model.backbone.out_features == 5 * 6 * 6
    with pytest.raises(ValueError, match="return flat features"):
        FewShotClassifier(ways=3, image_shape=(1, 8, 8), backbone=lambda shape: nn.Conv2d(shape[0], 5, 3))
    with pytest.raises(ValueError, match="backbone must be one of 'conv', 'conv4', 'resnet'"):
        FewShotClassifier(ways=3, image_shape=(1, 8, 8), backbone="vgg")


def test_maml_learns_the_whole_initialization_and_refuses_an_estimator_without_its_term():
    torch.manual_seed(0)
    model = MAML(ways=3, image_shape=(1, 8, 8), depth=2, width=4, estimator="fo", inner_steps=2)
    assert model.hyperparameters() == list(model.inner_model.module.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    quiet_trainer(max_steps=1).fit(model, loader(random_meta_batch()))
    assert all(not torch.equal(b, a) for b, a in zip(before, model.parameters()))
    calls = []
    refused = MAML(ways=3, image_shape=(1, 8, 8), depth=2, width=4, estimator="neumann(5)", inner_steps=2)
    refused.inner_loss = lambda *a: calls.append(1)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="cannot differentiate a learned initialization"):
        quiet_trainer(max_steps=1).fit(refused, loader(random_meta_batch()))
    assert not calls
    with pytest.raises(ValueError, match="MAML learns the whole initialization"):
        MAML(ways=3, head_init="zeros")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [str(BIN / "lightning-hypergrad"), "fit", *args, "--trainer.logger=false", "--trainer.max_steps=2"]
    command += ["--trainer.enable_progress_bar=false", "--data.init_args.val_tasks=4", "--data.init_args.test_tasks=4"]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": str(BIN)}
    )


def test_the_command_line_takes_a_head_and_the_maml_config(tmp_path):
    head = _cli(
        "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.callbacks=[]",
        "--model.init_args.head=lightning_hypergrad.nets.MLPHead", "--model.init_args.head.hidden=[16]",
        "--model.init_args.head.batch_norm=true", cwd=tmp_path,
    )  # fmt: skip
    assert head.returncode == 0, head.stderr[-2000:]
    assert "InnerModel" in head.stdout + head.stderr
    maml = _cli(
        "--config", str(ROOT / "configs" / "maml" / "omniglot.yaml"), "--trainer.callbacks=[]",
        "--data.init_args.dataset=digits", "--data.init_args.root=null", "--data.init_args.shots=5",
        "--data.init_args.meta_batch_size=2", "--model.init_args.inner_steps=2", cwd=tmp_path,
    )  # fmt: skip
    assert maml.returncode == 0, maml.stderr[-2000:]
