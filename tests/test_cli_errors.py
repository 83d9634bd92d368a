"""The command line reports an invalid setting as its message alone, and shows the traceback only when asked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMAND = str(Path(sys.executable).parent / "lightning-hypergrad")
QUICK = [
    "fit",
    "--config",
    str(ROOT / "configs" / "quickstart.yaml"),
    "--trainer.logger=false",
    "--trainer.max_steps=2",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.train_batches=2",
    "--data.init_args.val_tasks=2",
]


def run(*overrides: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "LIGHTNING_HYPERGRAD_DEBUG"}
    environment |= {"OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **env}
    command = [COMMAND, *QUICK, *overrides]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "override, message",
    [
        # refused when the data module is built
        ("--data.init_args.shots=0", "FewShotDataModule shots must be an integer >= 1, got 0: set it to 1 or more"),
        # refused when the module meets the data module, once fitting has started
        ("--model.init_args.meta_batch_size=3", "FewShotClassifier meta_batch_size=3 disagrees with the data module"),
        # a setting of Lightning's
        ("--trainer.max_epochs=-5", "`max_epochs` must be a non-negative integer or -1. You passed in -5."),
    ],
    ids=["at-build", "while-fitting", "lightning"],
)
def test_an_invalid_setting_is_reported_as_its_message_alone(tmp_path, override, message):
    result = run(override, cwd=tmp_path)
    assert result.returncode == 1
    assert f"error: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "LIGHTNING_HYPERGRAD_DEBUG=1" in result.stderr  # how to see more
    assert len(result.stderr.splitlines()) < 15, result.stderr


def test_the_debug_variable_shows_the_traceback(tmp_path):
    result = run("--data.init_args.shots=0", cwd=tmp_path, LIGHTNING_HYPERGRAD_DEBUG="1")
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "shots must be an integer >= 1, got 0" in result.stderr


def test_a_parse_error_shows_one_line_of_usage_not_every_option(tmp_path):
    result = run("--model.init_args.estimator.class_path=lightning_hypergrad.NoSuchEstimator", cwd=tmp_path)
    assert result.returncode == 2
    assert "NoSuchEstimator" in result.stderr and "Traceback" not in result.stderr
    assert "--trainer.max_epochs" not in result.stderr  # the full usage lists every option
    assert [line for line in result.stderr.splitlines() if line.startswith("usage:")] == [
        "usage: lightning-hypergrad [options] fit [options]"
    ]
