"""What the wheel ships: every subpackage and every config, and ``--config <name>`` from any folder.

The wheel itself is built, installed into a fresh environment and run from another folder by
``scripts/check_install.sh`` (a CI step); these tests keep the lists it depends on honest.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lightning_hypergrad._configs import resolve_config, resolve_config_args, shipped_configs

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_is_in_the_wheel() -> None:
    """``pyproject.toml`` lists the packages (it maps ``configs/`` into the package): a new subpackage left out of
    the list would be missing from the wheel while every test in the checkout still passes."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "lightning_hypergrad").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"]["lightning_hypergrad.configs"] == "configs"


def test_every_config_is_shipped_by_the_package_data_patterns() -> None:
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["lightning_hypergrad.configs"]
    configs = ROOT / "configs"
    matched = {p for pattern in patterns for p in configs.glob(pattern)}
    assert matched == set(configs.rglob("*.yaml")), "a config nested deeper than the package-data patterns"
    assert shipped_configs() == sorted(p.relative_to(configs).with_suffix("").as_posix() for p in matched)
    assert {"quickstart", "hpo/weight_decay", "maml/omniglot"} <= set(shipped_configs())


def test_a_shipped_config_is_found_by_name_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    quickstart = ROOT / "configs" / "quickstart.yaml"
    for name in ("quickstart", "quickstart.yaml", "configs/quickstart.yaml", "./configs/quickstart.yaml"):
        assert Path(resolve_config(name)).resolve() == quickstart, name
    assert Path(resolve_config("hpo/weight_decay")).resolve() == ROOT / "configs" / "hpo" / "weight_decay.yaml"
    own = tmp_path / "quickstart.yaml"  # a file of the user's comes first, even with a shipped config's name
    own.write_text("seed_everything: 1\n")
    assert resolve_config("quickstart.yaml") == "quickstart.yaml"
    assert resolve_config("seed_everything: 3") == "seed_everything: 3"  # YAML given inline
    assert resolve_config_args(["fit", "--config=hpo/lr_schedule", "--config", "quickstart.yaml"]) == [
        "fit",
        "--config=" + str(ROOT / "configs" / "hpo" / "lr_schedule.yaml"),
        "--config",
        "quickstart.yaml",
    ]


def test_an_unknown_config_is_one_line_listing_the_shipped_ones(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "lightning_hypergrad", "fit", "--config", "quickstrat"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    first = done.stderr.strip().splitlines()[0]
    assert first.startswith("error: --config quickstrat: no such file") and "hpo/weight_decay, " in first
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_few_shot_install_command_is_the_same_in_the_readme_the_error_and_the_install_check() -> None:
    """One command for the few-shot extra: the README shows it, the missing-extra error gives it, and
    ``scripts/check_install.sh`` runs it (it reads it from the package) in a fresh environment."""
    from lightning_hypergrad.data._learn2learn import FEWSHOT_COMMAND, INSTALL_HINT

    assert FEWSHOT_COMMAND in (ROOT / "README.md").read_text()
    assert FEWSHOT_COMMAND in INSTALL_HINT
    assert "import FEWSHOT_COMMAND" in (ROOT / "scripts" / "check_install.sh").read_text()
