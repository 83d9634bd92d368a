"""A missing part of the few-shot extra is named when the data module is built, before W&B or the model start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WITHOUT_GYM = """
import sys
sys.modules["gym"] = None  # learn2learn imports gym: as if it were not installed
sys.argv = ["lightning-hypergrad", "fit", "--config", {config!r}]
from lightning_hypergrad.cli import main
main()
"""


def test_fit_without_gym_stops_before_wandb_with_one_line_saying_how_to_install(tmp_path):
    code = WITHOUT_GYM.format(config=str(ROOT / "configs" / "quickstart.yaml"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "FewShotDataModule samples its tasks with learn2learn, the few-shot extra" in errors[0]
    assert "'gym'" in errors[0] and "pip install" in errors[0] and "scripts/install.sh" in errors[0]
    assert not (tmp_path / "wandb").exists()  # no W&B run left behind
    assert "Sanity Checking" not in result.stdout + result.stderr


def test_the_data_module_checks_the_extra_in_python_too(monkeypatch):
    from lightning_hypergrad.data import _learn2learn
    from lightning_hypergrad.data.fewshot import FewShotDataModule

    monkeypatch.setattr(_learn2learn, "_missing", lambda name: name == "gym")
    with pytest.raises(ImportError, match=r"'gym' cannot be found \(No module named 'gym'\): install it with"):
        FewShotDataModule(dataset="digits")
