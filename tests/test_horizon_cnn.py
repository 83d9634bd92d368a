"""The horizon study's CNN part: its training problem against torch's own training, its hypergradient against finite
differences, its data split, and the tiny form of its resumable runner on generated images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lightning_hypergrad as lh
from lightning_hypergrad import InnerModel
from lightning_hypergrad.inner_loop import StepMode, unroll
from studies.common import omniglot_root
from studies.horizon.__main__ import main
from studies.horizon.cnn import (
    CNNSettings,
    batch_order,
    character_indices,
    knot_weights,
    load_splits,
    network,
    synthetic_splits,
    train_and_measure,
    training_problem,
)

TINY = CNNSettings(characters=3, size=9, width=2, steps=7, batch=4, momentum=0.9, knots=3)


def _hyperparameters(settings: CNNSettings, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    log_lr = (-2.5 + 0.5 * torch.rand(3, settings.knots, generator=g)).to(dtype).requires_grad_()
    log_wd = (-4.0 + torch.rand(3, generator=g)).to(dtype).requires_grad_()
    return [log_lr, log_wd]


def test_knot_weights_interpolate_from_the_first_knot_to_the_last():
    weights = knot_weights(9, 3)
    torch.testing.assert_close(weights.sum(1), torch.ones(9))
    torch.testing.assert_close(weights[0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(weights[4], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(weights[-1], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(weights[2], torch.tensor([0.5, 0.5, 0.0]))
    assert knot_weights(5, 1).eq(1).all()


def test_the_bilevel_inner_loop_is_torchs_own_training():
    """w_T of the problem's inner loop (the estimators' trajectory) equals the parameters that torch.optim.SGD reaches
    with one parameter group per layer and the knots' rate at each step: same batches, weight decay, momentum."""
    splits = synthetic_splits(TINY)
    order = batch_order(len(splits.train[1]), TINY, 3)
    h = _hyperparameters(TINY)
    problem = training_problem(splits, TINY, 11, order, h)
    trajectory = unroll(problem, h, lambda t: StepMode.CONSTANT)
    reference = train_and_measure(splits, TINY, 11, order, h[0], h[1])
    net = network(TINY, 11)
    inner = InnerModel(net, init="fixed")
    x, y = splits.test
    loss = torch.nn.functional.cross_entropy(inner(trajectory.params, x), y)
    torch.testing.assert_close(float(loss), reference["test_loss"], rtol=1e-5, atol=1e-6)
    assert trajectory.params[0].shape == net.conv0.weight.shape


def test_the_exact_hypergradient_equals_finite_differences_of_torchs_training(float64_default):
    """RMD on the CNN problem (float64) against central differences of the validation loss of torch's training."""
    settings = CNNSettings(characters=3, size=9, width=2, steps=6, batch=4, momentum=0.9, knots=2)
    splits = synthetic_splits(settings)
    order = batch_order(len(splits.train[1]), settings, 2)
    h = _hyperparameters(settings, torch.float64)
    got = lh.RMD()(training_problem(splits, settings, 4, order, h)).hypergrads
    sqrt = lh.get_estimator("rmd(checkpoint_every='sqrt')")(training_problem(splits, settings, 4, order, h))
    for a, b in zip(got, sqrt.hypergrads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

    def val_loss(log_lr, log_wd):
        return train_and_measure(splits, settings, 4, order, log_lr, log_wd, measured=("val",))["val_loss"]

    eps = 1e-5
    for which in range(2):
        base = [x.detach().clone() for x in h]
        for index in range(base[which].numel()):
            up, down = [x.clone() for x in base], [x.clone() for x in base]
            up[which].view(-1)[index] += eps
            down[which].view(-1)[index] -= eps
            numeric = (val_loss(*up) - val_loss(*down)) / (2 * eps)
            assert got[which].reshape(-1)[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_short_horizon_estimators_differ_from_exact_on_the_cnn():
    """Greedy's and T1-T2's hypergradients are estimates (not the exact one) here: their cosine to RMD is below 1."""
    splits = synthetic_splits(TINY)
    order = batch_order(len(splits.train[1]), TINY, 0)
    exact = lh.RMD()(training_problem(splits, TINY, 0, order, _hyperparameters(TINY))).hypergrads
    flat_exact = torch.cat([g.reshape(-1) for g in exact])
    for spec in ("t1t2", "greedy(0.9)"):
        got = lh.get_estimator(spec)(training_problem(splits, TINY, 0, order, _hyperparameters(TINY))).hypergrads
        flat = torch.cat([g.reshape(-1) for g in got])
        assert float(torch.nn.functional.cosine_similarity(flat, flat_exact, dim=0)) < 0.999


def test_character_indices_are_evenly_spread_and_distinct():
    chosen = character_indices(50)
    assert chosen[0] == 0 and chosen[-1] == 963 and len(set(chosen)) == 50
    with pytest.raises(ValueError, match="characters must be in"):
        character_indices(1)


def test_the_omniglot_splits_hold_each_character_in_every_split():
    root = Path(omniglot_root())
    if not (root / "images_background.npz").is_file():
        pytest.skip(f"the Omniglot archives are not at {root} (set OMNIGLOT_ROOT); generated data covers the rest")
    settings = CNNSettings(characters=5, size=14)
    splits = load_splits(root, settings)
    for (images, labels), per in ((splits.train, 12), (splits.val, 4), (splits.test, 4)):
        assert images.shape == (5 * per, 1, 14, 14)
        assert torch.bincount(labels).tolist() == [per] * 5
        assert 0 < images.mean() < 0.5  # strokes are 1.0 on a background of 0
    assert not torch.equal(splits.train[0][:4], splits.test[0][:4])


def _tiny_command(out: Path, *extra: str) -> list[str]:
    return [
        "cnn",
        "--data",
        "synthetic",
        "--out",
        str(out),
        "--steps",
        "4",
        "12",
        "--characters",
        "3",
        "--size",
        "9",
        "--width",
        "2",
        "--batch",
        "4",
        "--outer-steps",
        "3",
        "--cosine-every",
        "2",
        "--eval-every",
        "2",
        "--eval-seeds",
        "2",
        "--seeds",
        "1",
        "--memory",
        "saved",
        "--methods",
        "t1t2",
        "truncated_rmd(5)",
        "greedy(0.9)",
        "rmd",
        "random_search",
        *extra,
    ]


def test_the_tiny_study_runs_resumes_and_reports(tmp_path):
    assert main(_tiny_command(tmp_path)) == 0
    folders = sorted(p.name for p in (tmp_path / "cnn").iterdir())
    assert folders == ["T12-knots1", "T4-knots1"]
    assert not (tmp_path / "cnn" / "T4-knots1" / "truncated_rmd(5)-seed0.json").exists()  # K >= T: left out
    record = json.loads((tmp_path / "cnn" / "T12-knots1" / "greedy(0.9)-seed0.json").read_text())
    assert len(record["outer_losses"]) == 3 and [c[0] for c in record["cosines"]] == [1, 2]
    assert len(record["evaluation"]) == 2 and {e["seed"] for e in record["evaluation"]} == {1000, 1001}
    assert record["peak_bytes"] > 0
    rs = json.loads((tmp_path / "cnn" / "T12-knots1" / "random_search-seed0.json").read_text())
    assert rs["search_seconds"] >= rs["budget_seconds"] > 0 and rs["trials"] >= 1
    text = (tmp_path / "cnn.md").read_text()
    assert "## T = 12" in text and "`greedy(0.9)`" in text and (tmp_path / "cnn.png").stat().st_size > 0
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "cnn").rglob("*.json")}
    assert main(_tiny_command(tmp_path)) == 0  # resumes: every run found, nothing redone
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cnn").rglob("*.json")} == written


def test_records_of_other_settings_are_refused(tmp_path):
    assert main(_tiny_command(tmp_path, "--methods", "t1t2")) == 0
    with pytest.raises(SystemExit, match="other settings .*outer_steps"):
        main([*_tiny_command(tmp_path, "--methods", "t1t2"), "--outer-steps", "4"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "random_search", "t1t2"], "random_search must come last"),
        (["--methods", "random_search"], "needs at least one hypergradient method"),
        (["--knots", "5"], "must not exceed the shortest horizon"),
        (["--lr-init", "2"], "--lr-init must be in"),
        (["--methods", "neumann(3)"], "--methods neumann"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as stopped:
        main([*_tiny_command(tmp_path), *extra])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cnn").exists()
