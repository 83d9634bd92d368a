"""A resumed run is the same experiment: the checkpoint holds the run's settings and ``fit --ckpt_path`` keeps them.

The defect this guards against: a run fitted with ``t1t2`` and inner lr 0.05, resumed with the README's
``--config configs/quickstart.yaml --ckpt_path last``, went on with the config's ``Greedy(0.99)`` and lr 0.1
without a word.
"""

from __future__ import annotations

from pathlib import Path

import torch
from test_resume import NO_WANDB, QUICKSTART, SMALL, fit, run

from lightning_hypergrad.cli import cli
from lightning_hypergrad.cli.checkpoints import SETTINGS_KEY

OTHER_METHOD = ["--model.init_args.estimator=t1t2", "--model.init_args.inner_optimizer.init_args.lr=0.05"]
FOLDER = Path("lightning-hypergrad") / "quickstart" / "checkpoints"


def _started(tmp_path: Path) -> Path:
    fit(tmp_path, *NO_WANDB, *OTHER_METHOD, "--trainer.max_steps=2")
    (last,) = (tmp_path / FOLDER).glob("last-*.ckpt")
    return last


def test_checkpoints_hold_the_estimator_and_the_inner_optimizer(tmp_path):
    stored = torch.load(_started(tmp_path), weights_only=True)[SETTINGS_KEY]
    model = stored["model"]["init_args"]
    assert model["estimator"] == "t1t2"
    assert model["inner_optimizer"]["init_args"]["lr"] == 0.05
    assert stored["data"]["init_args"]["meta_batch_size"] == 2


def test_a_resumed_fit_continues_with_the_checkpoints_method(tmp_path, monkeypatch, capsys):
    _started(tmp_path)
    monkeypatch.chdir(tmp_path)
    resumed = cli(["fit", *QUICKSTART, *SMALL, *NO_WANDB, "--ckpt_path", "last", "--trainer.max_steps=2"])
    assert str(resumed.model.estimator) == "t1t2"
    assert resumed.model.inner_optimizer.lr == 0.05
    err = capsys.readouterr().err
    assert "continuing with the checkpoint's settings where the config differs" in err
    assert "model.estimator: 't1t2' (config: Greedy(gamma=0.99" in err
    assert "model.inner_optimizer.lr: 0.05 (config: 0.1)" in err


def test_a_resumed_fit_given_another_method_is_refused_naming_each_difference(tmp_path):
    _started(tmp_path)
    before = sorted(p.name for p in (tmp_path / FOLDER).iterdir())
    changed = ["--model.init_args.estimator=fo", "--model.init_args.inner_optimizer.init_args.lr=0.5"]
    refused = run(
        ["fit", *QUICKSTART, *SMALL, *NO_WANDB, "--ckpt_path", "last", "--trainer.max_steps=4", *changed], tmp_path
    )
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    assert "model.estimator: 'fo' (checkpoint: 't1t2')" in refused.stderr
    assert "model.inner_optimizer.lr: 0.5 (checkpoint: 0.05)" in refused.stderr
    assert "start a new run (drop --ckpt_path)" in refused.stderr and "--resume_with_changes true" in refused.stderr
    assert sorted(p.name for p in (tmp_path / FOLDER).iterdir()) == before  # nothing written, nothing lost
    allowed = run(
        ["fit", *QUICKSTART, *SMALL, *NO_WANDB, "--ckpt_path", "last", "--trainer.max_steps=3", *changed[:1],
         "--resume_with_changes=true"],
        tmp_path,
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "--resume_with_changes: the run goes on with settings that differ" in allowed.stderr
    assert "model.estimator: 'fo' (checkpoint: 't1t2')" in allowed.stderr


def test_validate_uses_the_settings_as_given_and_names_the_inner_optimizers(tmp_path):
    last = _started(tmp_path)
    given = ["--model.init_args.inner_optimizer.init_args.lr=0.5"]
    result = run(["validate", *QUICKSTART, *SMALL, *NO_WANDB, "--ckpt_path", str(last), *given], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "used as given, these settings differ from the checkpoint's" in result.stderr
    assert "model.inner_optimizer.lr: 0.5 (checkpoint: 0.05)" in result.stderr


def test_the_python_api_warns_when_a_checkpoint_was_written_with_another_method(tmp_path):
    import pytest
    from lightning_cases import loader, quiet_trainer, random_meta_batch

    import lightning_hypergrad as lh

    batch = random_meta_batch()
    first = lh.FewShotClassifier(ways=3, image_shape=(1, 8, 8), estimator="t1t2", inner_steps=2)
    quiet_trainer(max_steps=1, enable_checkpointing=True, default_root_dir=tmp_path).fit(first, loader(batch, batch))
    (path,) = tmp_path.rglob("*.ckpt")
    assert torch.load(path, weights_only=False)["lightning_hypergrad"]["method"]["estimator"] == "t1t2"
    other = lh.FewShotClassifier(
        ways=3, image_shape=(1, 8, 8), estimator="fo", inner_optimizer=lh.SGD(lr=0.5), inner_steps=2
    )
    with pytest.warns(UserWarning, match=r"estimator: fo \(checkpoint: t1t2\); inner_optimizer: SGD\(lr=0.5"):
        quiet_trainer(max_steps=2).fit(other, loader(batch, batch), ckpt_path=path)
