"""Bad checkpoint files get one line naming the file and what is wrong (and, for a damaged ``last``, what to use)."""

from __future__ import annotations

import pytest
import torch
from lightning_cases import loader, quiet_trainer, random_meta_batch
from test_resume import NO_WANDB, QUICKSTART, SMALL, fit, run

import lightning_hypergrad as lh
from lightning_hypergrad.cli.checkpoints import read_checkpoint


def test_a_folder_a_text_file_and_a_pickled_list_are_named_for_what_they_are(tmp_path):
    (tmp_path / "a.ckpt").write_text("hello")
    torch.save([1, 2, 3], tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match=r"is a folder, not a checkpoint file: give one of its \.ckpt files such as a"):
        read_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"a\.ckpt cannot be read as a checkpoint \(it is not the zip archive"):
        read_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=r"b\.ckpt is not a Lightning checkpoint: it holds a list, no 'state_dict'"):
        read_checkpoint(tmp_path / "b.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "c.ckpt")
    assert read_checkpoint(tmp_path / "c.ckpt") == {"state_dict": {}}


def test_a_truncated_last_checkpoint_names_the_intact_ones_of_its_run(tmp_path):
    fit(tmp_path, *NO_WANDB, "--trainer.max_steps=4", "--checkpoint.every_n_train_steps=2")
    folder = tmp_path / "lightning-hypergrad" / "quickstart" / "checkpoints"
    (last,) = folder.glob("last-*.ckpt")
    run_name = last.stem[len("last-") :]
    with open(last, "r+b") as f:  # cut short, as by a kill or a full disk while it was written
        f.truncate(last.stat().st_size // 2)
    result = run(["fit", *QUICKSTART, *SMALL, *NO_WANDB, "--ckpt_path", "last", "--trainer.max_steps=6"], tmp_path)
    assert result.returncode == 1, result.stderr[-1500:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{last.name} cannot be read as a checkpoint (" in lines[0] and "the file is damaged" in lines[0]
    assert (
        f"intact checkpoints of the same run, newest first: lightning-hypergrad/quickstart/checkpoints/{run_name}-"
        in lines[0]
    )
    assert "epoch=0-step=4.ckpt (resume with --ckpt_path <file>)" in lines[0]


def test_another_models_checkpoint_is_one_line_naming_the_weights(tmp_path):
    batch = random_meta_batch()
    first = lh.FewShotClassifier(ways=3, image_shape=(1, 8, 8), width=8, inner_steps=1)
    quiet_trainer(max_steps=1, enable_checkpointing=True, default_root_dir=tmp_path).fit(first, loader(batch))
    (path,) = tmp_path.rglob("*.ckpt")
    other = lh.FewShotClassifier(ways=3, image_shape=(1, 8, 8), width=4, inner_steps=1)
    with pytest.raises(ValueError, match=r"was written by another model than FewShotClassifier .* have other shapes"):
        quiet_trainer(max_steps=2).fit(other, loader(batch, batch), ckpt_path=path)
    maml = lh.MAML(ways=3, image_shape=(1, 8, 8), width=8, inner_steps=1, estimator="fo")
    with pytest.raises(ValueError, match=r"weights are not in it \(inner_model\.module\.0\.0\.weight"):
        quiet_trainer(max_steps=2).fit(maml, loader(batch, batch), ckpt_path=path)
