"""``scripts/install.sh`` refuses a disk too small for the environment before it installs anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_install_stops_before_any_work_when_the_disk_is_too_small(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    env = {**os.environ, "VENV": str(venv), "HYPERGRAD_INSTALL_NEED_GB": str(10**9)}  # more than any disk holds
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr
    assert "GB free where" in result.stderr and "set VENV" in result.stderr, result.stderr
    assert not venv.exists()  # no environment created, nothing installed


def test_install_refuses_a_threshold_that_is_not_a_whole_number(tmp_path: Path) -> None:
    env = {**os.environ, "VENV": str(tmp_path / "venv"), "HYPERGRAD_INSTALL_NEED_GB": "6.5"}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "HYPERGRAD_INSTALL_NEED_GB must be a whole number" in result.stderr
    assert not (tmp_path / "venv").exists()
