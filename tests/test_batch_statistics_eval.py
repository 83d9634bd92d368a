"""``FewShotClassifier(eval_batch_norm=...)``: validation and test with batch norm on the running statistics
(``"running"``, the default) or on each task's batch statistics (``"batch"``, MAML's and learn2learn's protocol),
each against a hand computation of the backbone and of the head's inner loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_hypergrad as lh
from lightning_hypergrad.fewshot import MAML, FewShotClassifier
from lightning_hypergrad.nets import FCBackbone, TruncatedNormalLinear, batch_statistics

WAYS, SHOTS, QUERIES, STEPS, LR = 3, 2, 4, 3, 0.5


def _backbone(image_shape):
    """Flatten, a linear layer, batch norm with running statistics, ReLU: small enough to compute by hand."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU())
    net.out_features = 6
    return net


def _model(eval_batch_norm: str | None) -> FewShotClassifier:
    torch.manual_seed(0)
    settings = {} if eval_batch_norm is None else {"eval_batch_norm": eval_batch_norm}
    model = FewShotClassifier(
        ways=WAYS,
        image_shape=(1, 4, 4),
        backbone=_backbone,
        inner_optimizer=lh.SGD(lr=LR),
        inner_steps=STEPS,
        **settings,
    )
    norm = model.backbone[2]
    with torch.no_grad():  # running statistics far from any task's, and a scale and shift that are not 1 and 0
        norm.running_mean.copy_(torch.linspace(-1.0, 1.0, 6))
        norm.running_var.copy_(torch.linspace(0.2, 3.0, 6))
        norm.weight.copy_(torch.linspace(0.5, 1.5, 6))
        norm.bias.copy_(torch.linspace(-0.3, 0.3, 6))
    return model.eval()


def _task() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "support_x": torch.randn(WAYS * SHOTS, 1, 4, 4, generator=g),
        "support_y": torch.arange(WAYS).repeat_interleave(SHOTS),
        "query_x": torch.randn(WAYS * QUERIES, 1, 4, 4, generator=g),
        "query_y": torch.arange(WAYS).repeat_interleave(QUERIES),
    }


def _by_hand(model: FewShotClassifier, task: dict[str, torch.Tensor], batch: bool) -> dict[str, float]:
    """The backbone with ``F.batch_norm`` (the batch's statistics, or the running ones), then the zero-initialized
    linear head trained by ``STEPS`` plain gradient steps on the support features; the query loss and accuracy."""
    linear, norm = model.backbone[1], model.backbone[2]
    with torch.no_grad():
        x = torch.cat([task["support_x"], task["query_x"]]).flatten(1)
        z = linear(x)
        if batch:
            z = F.batch_norm(z, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
        else:
            z = F.batch_norm(z, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        h = z.relu()
    support, query = h[: WAYS * SHOTS], h[WAYS * SHOTS :]
    weight = torch.zeros(WAYS, 6, requires_grad=True)
    bias = torch.zeros(WAYS, requires_grad=True)
    for _ in range(STEPS):
        loss = F.cross_entropy(support @ weight.T + bias, task["support_y"])
        gw, gb = torch.autograd.grad(loss, [weight, bias])
        weight, bias = weight - LR * gw, bias - LR * gb
    logits = (query @ weight.T + bias).detach()
    return {
        "outer_loss": float(F.cross_entropy(logits, task["query_y"])),
        "acc": float((logits.argmax(-1) == task["query_y"]).float().mean()),
    }


def _evaluated(model: FewShotClassifier, task: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: float(value) for key, value in model.evaluate_task(task).items()}


def test_batch_statistics_at_evaluation_equal_the_hand_computation_and_leave_the_running_statistics():
    model, task = _model("batch"), _task()
    assert model.hparams["eval_batch_norm"] == "batch"  # kept in checkpoints
    norm = model.backbone[2]
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    got = _evaluated(model, task)
    want = _by_hand(model, task, batch=True)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert got != pytest.approx(_by_hand(model, task, batch=False), rel=1e-3)  # the two protocols differ here
    for key, value in norm.state_dict().items():  # running statistics and their count untouched
        assert torch.equal(value, before[key]), key
    assert not model.training and not norm.training and norm.track_running_stats  # modes restored


def test_running_statistics_at_evaluation_by_default():
    model, task = _model(None), _task()
    assert model.eval_batch_norm == "running" and model.hparams["eval_batch_norm"] is None  # None: "running"
    got = _evaluated(model, task)
    assert got == pytest.approx(_by_hand(model, task, batch=False), rel=1e-6, abs=1e-7)
    assert got != pytest.approx(_by_hand(model, task, batch=True), rel=1e-3)


def test_training_is_the_same_under_both_settings():
    """In training the backbone always uses the batch's statistics and updates the running ones: the option only
    changes evaluation."""
    task = _task()
    models = [_model("running").train(), _model("batch").train()]
    steps = [m.meta_gradient([task]) for m in models]
    for a, b in zip(steps[0].hypergrads, steps[1].hypergrads):
        assert torch.equal(a, b)
    assert torch.equal(models[0].backbone[2].running_mean, models[1].backbone[2].running_mean)
    assert not torch.equal(models[1].backbone[2].running_mean, torch.linspace(-1.0, 1.0, 6))  # updated in training


def test_batch_statistics_context_restores_and_does_not_track():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    x = torch.randn(8, 3)
    with batch_statistics(net):
        out = net(x)
    torch.testing.assert_close(out, F.batch_norm(net[0](x), None, None, net[1].weight, net[1].bias, True, 0.0, 1e-5))
    assert int(net[1].num_batches_tracked) == 0 and not net[1].training and net[1].track_running_stats


def test_the_setting_is_checked_and_maml_takes_batch_statistics_only():
    with pytest.raises(ValueError, match=r"eval_batch_norm must be one of 'running', 'batch', got 'train'"):
        FewShotClassifier(ways=3, image_shape=(1, 4, 4), eval_batch_norm="train")
    with pytest.raises(ValueError, match=r"MAML's batch norm always uses each batch's statistics.*remove eval_batch"):
        MAML(ways=3, image_shape=(1, 4, 4), eval_batch_norm="running")
    assert MAML(ways=3, image_shape=(1, 8, 8), depth=1, width=2).eval_batch_norm == "batch"


def test_fc_backbone_is_learn2learns_omniglot_fc_layer_for_layer():
    l2l = pytest.importorskip("learn2learn", reason="learn2learn (the few-shot extra) is not installed")
    torch.manual_seed(0)
    ours = nn.Sequential(FCBackbone((1, 28, 28)), TruncatedNormalLinear(64, 5))
    theirs = l2l.vision.models.OmniglotFC(28 * 28, 5)
    blocks = theirs.features[1]
    assert len(blocks) == 4 and sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    with torch.no_grad():  # block k: our layers 3k + 1 (linear) and 3k + 2 (batch norm)
        for k, block in enumerate(blocks):
            for mine, their in ((ours[0][3 * k + 1], block.linear), (ours[0][3 * k + 2], block.normalize)):
                their.weight.copy_(mine.weight)
                their.bias.copy_(mine.bias)
            assert (ours[0][3 * k + 2].eps, ours[0][3 * k + 2].track_running_stats) == (block.normalize.eps, False)
        theirs.classifier.weight.copy_(ours[1].weight)
        theirs.classifier.bias.copy_(ours[1].bias)
    x = torch.rand(10, 1, 28, 28)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-7)
    weights = [p.detach() for name, p in ours.named_parameters() if name.endswith("weight") and p.dim() == 2]
    assert all(float(w.abs().max()) <= 0.02 and 0.008 < float(w.std()) < 0.011 for w in weights)
    assert all(float(b.detach().abs().max()) == 0 for name, b in ours.named_parameters() if name.endswith("bias"))


def test_the_setting_is_read_from_a_config(tmp_path, monkeypatch):
    from lightning_hypergrad.cli import cli

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    args = ["--config", str(config), "--trainer.logger", "false", "--trainer.callbacks", "[]"]
    parsed = cli([*args, "--model.init_args.eval_batch_norm", "batch"], run=False)
    assert isinstance(parsed.model, FewShotClassifier) and parsed.model.eval_batch_norm == "batch"
    assert cli(args, run=False).model.eval_batch_norm == "running"
