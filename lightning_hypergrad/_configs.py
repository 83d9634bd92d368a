"""The configs that ship with the package, found by name from any folder: ``--config quickstart``.

In a checkout they are the repository's ``configs/``; an installed wheel carries the same files as
``lightning_hypergrad/configs/`` (``pyproject.toml`` maps the one onto the other).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def configs_folder() -> Path | None:
    """The folder of the shipped configs: the installed package's, else the checkout's; ``None`` when neither."""
    for folder in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if (folder / "quickstart.yaml").is_file():
            return folder
    return None


def shipped_configs() -> list[str]:
    """The shipped configs' names, as ``--config`` takes them (``quickstart``, ``hpo/weight_decay``, ...)."""
    folder = configs_folder()
    if folder is None:
        return []
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


def resolve_config(value: str) -> str:
    """``value`` itself when it is a file (or not a path at all: an inline YAML string), else the shipped config of
    that name, written with or without ``configs/`` and ``.yaml``.

    Raises:
        FileNotFoundError: a path that is no file and names no shipped config; the message lists those.
    """
    if Path(value).is_file() or any(c in value for c in ":\n{["):  # a file, or YAML given inline
        return value
    name = value.removeprefix("./").removeprefix("configs/")
    name = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    folder = configs_folder()
    if folder is not None and (folder / name).is_file():
        return str(folder / name)
    known = ", ".join(shipped_configs()) or "none found"
    raise FileNotFoundError(
        f"--config {value}: no such file, and no config of that name ships with lightning_hypergrad; give a path "
        f"to a YAML file, or one of the shipped configs by name ({known})"
    )


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with the value of every ``--config X`` / ``--config=X`` passed through :func:`resolve_config`
    (after the subcommand only: ``fit --config quickstart``)."""
    resolved = list(args)
    for i, arg in enumerate(resolved):
        if arg == "--config" and i + 1 < len(resolved):
            resolved[i + 1] = resolve_config(resolved[i + 1])
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + resolve_config(arg.partition("=")[2])
    return resolved
