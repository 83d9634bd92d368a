"""The command line end to end: ``lightning-hypergrad``, ``lightning`` and ``python -m lightning_hypergrad``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICK = [
    "--config",
    str(ROOT / "configs" / "quickstart.yaml"),
    "--trainer.max_steps=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.train_batches=2",
    "--data.init_args.val_tasks=10",
    "--data.init_args.test_tasks=10",
]
LOGGED = [
    "train/outer_loss",
    "train/acc",
    "train/hypergrad_norm",
    "train/seconds_per_step",
    "hypergrad/cosine",
    "hypergrad/norm_ratio",
    "val/acc",
    "val/acc_ci95",
]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def wandb_run_dir(cwd: Path) -> Path:
    runs = sorted((cwd / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.parametrize("command", [["lightning-hypergrad"], ["lightning"]], ids=["lightning-hypergrad", "lightning"])
def test_quickstart_fits_end_to_end_and_logs_offline_to_wandb(tmp_path, command):
    result = run([str(BIN / command[0]), "fit", *QUICK], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = wandb_run_dir(tmp_path)
    records = next(run_dir.glob("run-*.wandb")).read_bytes()
    missing = [key for key in LOGGED if key.encode() not in records]
    assert not missing, f"keys not in the offline W&B run: {missing}"
    assert (run_dir / "files" / "lightning_config.yaml").is_file()
    assert list(tmp_path.glob("lightning-hypergrad/*/checkpoints/*.ckpt"))


def test_the_estimator_can_be_given_as_a_spec_string_on_the_command_line(tmp_path):
    result = run([str(BIN / "lightning-hypergrad"), "fit", *QUICK, "--model.init_args.estimator=greedy(0.9)"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = (wandb_run_dir(tmp_path) / "files" / "lightning_config.yaml").read_text()
    assert "estimator: greedy(0.9)" in saved


def test_python_m_prints_the_quickstart_config(tmp_path):
    result = run([sys.executable, "-m", "lightning_hypergrad", "fit", *QUICK, "--print_config"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class_path: lightning_hypergrad.Greedy" in result.stdout
    assert "gamma: 0.99" in result.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ("--data.init_args.ways=6", "ways"),
        ("--data.init_args.queries=200", "queries"),
        ("--model.init_args.estimator.class_path=lightning_hypergrad.NoSuchEstimator", "estimator"),
        ("--model.init_args.estimator.init_args.gamma=1.5", "gamma"),
        ("--model.init_args.estimator=greedy(1.5)", "gamma"),
        ("--model.init_args.estimator=greedy0.99", "unknown estimator 'greedy0.99'"),
        ("--model.init_args.inner_steps=0", "inner_steps"),
    ],
)
def test_invalid_configs_fail_before_training_naming_the_setting(tmp_path, override, message):
    result = run([str(BIN / "lightning-hypergrad"), "fit", *QUICK, override], tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Training:" not in result.stderr and not (tmp_path / "wandb").exists()
