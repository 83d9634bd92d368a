"""A resumed run is the same experiment: the one comparison of a run's model and data settings with those its
checkpoint holds (:func:`differences`), and what each subcommand does with the differences
(:func:`settle_with_checkpoint`).

- ``fit`` continues with the checkpoint's settings where the configs say otherwise (naming them on stderr), and
  refuses a ``--model.*`` or ``--data.*`` argument of the command line that differs from the checkpoint's, naming each
  difference and how to start a new run instead; ``--resume_with_changes true`` continues with them, saying so.
- ``validate`` and ``test`` use the settings as given and name those that differ (evaluating a trained backbone with
  another number of inner steps is a use).
- A checkpoint of another model class is refused before anything is built (:func:`check_model_class`).
- A checkpoint that holds no settings (one that the Python API wrote) is used as given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from jsonargparse import Namespace, dict_to_namespace

from lightning_hypergrad.cli.messages import notice

SECTIONS = ("model", "data")
"""The config sections whose settings make the experiment (the trainer's, such as ``max_steps``, do not)."""


class Difference(NamedTuple):
    """A setting of a run that its checkpoint holds with another value."""

    section: str
    """``model`` or ``data``."""
    name: str
    """``class_path`` (the whole section), or one of the section's ``init_args``."""
    ours: Any
    """The run's value (plain YAML)."""
    theirs: Any
    """The checkpoint's value (plain YAML)."""

    def describe(self, ours_first: bool = True) -> str:
        """``section.name: ours (checkpoint: theirs)``, or ``section.name: theirs (config: ours)``; for two instances
        of one class, each of their arguments that differs alone."""
        key = f"{self.section}.{self.name}"
        if ours_first:
            return _describe(key, self.ours, self.theirs, "checkpoint")
        return _describe(key, self.theirs, self.ours, "config")


def differences(ours: dict[str, Any], stored: dict[str, Any]) -> list[Difference]:
    """Each setting of the ``model`` and ``data`` sections (plain YAML values) that ``stored`` holds with another value
    than ``ours``.

    A setting is a section's ``class_path`` (another class: the section differs as a whole) or one of its
    ``init_args``, compared whole (an estimator with its arguments is one setting). A setting that ``stored`` lacks
    (added to the package since the checkpoint was written) is not compared.
    """
    found = []
    for section in SECTIONS:
        given, saved = ours.get(section) or {}, stored.get(section) or {}
        if given.get("class_path") != saved.get("class_path"):
            found.append(Difference(section, "class_path", given.get("class_path"), saved.get("class_path")))
            continue
        args, saved_args = given.get("init_args") or {}, saved.get("init_args") or {}
        found += [
            Difference(section, name, args[name], value)
            for name, value in saved_args.items()
            if name in args and not _same(args[name], value)
        ]
    return found


def check_model_class(path: Path, ours: dict[str, Any], stored: dict[str, Any], folder: str | None) -> None:
    """Refuses a checkpoint whose run trained another model class than this config's: its weights cannot be this
    model's, and its settings are not this model's arguments.

    Raises:
        ValueError: one line naming both classes, and what to give instead.
    """
    given = (ours.get("model") or {}).get("class_path")
    saved = (stored.get("model") or {}).get("class_path")
    if given is None or saved is None or given == saved:
        return
    where = f" (in {folder})" if folder else ""
    raise ValueError(
        f"ckpt_path={path} was written by a run of {saved}, and this config's model is {given}: give a checkpoint "
        f"of this config's runs{where}, or drop --ckpt_path to start a new run"
    )


def explicit_settings(args: Iterable[str]) -> set[tuple[str, str]]:
    """The ``(section, setting)`` pairs that ``--model.*`` / ``--data.*`` arguments of the command line ``args`` give
    (``"*"``: the whole section, as ``--model MAML`` gives it)."""
    found = set()
    for token in args:
        if not token.startswith("--"):
            continue
        parts = [p for p in token[2:].split("=", 1)[0].split(".") if p not in ("init_args", "dict_kwargs")]
        if parts[0] in SECTIONS:
            found.add((parts[0], parts[1] if len(parts) > 1 else "*"))
    return found


def settle_with_checkpoint(
    path: Path,
    config: Namespace,
    found: list[Difference],
    *,
    fitting: bool,
    explicit: set[tuple[str, str]],
    allow_changes: bool,
) -> None:
    """Settles the differences ``found`` between the parsed ``config`` (of the subcommand) and the checkpoint at
    ``path``, as the module's documentation says: for ``fit``, the checkpoint's settings replace those of the configs
    in ``config``, and those of the command line (``explicit``) are refused unless ``allow_changes``; for another
    subcommand, the settings are used as given. Each case is said on stderr.

    Raises:
        ValueError: ``fit`` with ``--model.*`` or ``--data.*`` arguments that differ from the checkpoint's, without
            ``allow_changes``; the message names each and how to start a new run instead.
    """
    if not found:
        return
    if not fitting:
        notice(
            f"ckpt_path={path}: used as given, these settings differ from the checkpoint's: "
            f"{'; '.join(d.describe() for d in found)}"
        )
        return
    given = [d for d in found if (d.section, d.name) in explicit or (d.section, "*") in explicit]
    taken = [d for d in found if d not in given]
    if given and not allow_changes:
        raise ValueError(
            f"ckpt_path={path}: a resumed run continues the checkpoint's experiment, and the command line sets "
            f"{'; '.join(d.describe() for d in given)}. To run these settings, start a new run (drop --ckpt_path); "
            "to continue the checkpoint's run with them anyway, add --resume_with_changes true"
        )
    for difference in taken:
        _set_setting(config, difference)
    if taken:
        notice(
            f"ckpt_path={path}: continuing with the checkpoint's settings where the config differs: "
            f"{'; '.join(d.describe(ours_first=False) for d in taken)}"
        )
    if given:
        notice(
            f"ckpt_path={path}: --resume_with_changes: the run goes on with settings that differ from the "
            f"checkpoint's, so it does not end as the checkpoint's run would have: "
            f"{'; '.join(d.describe() for d in given)}"
        )


def _set_setting(config: Namespace, difference: Difference) -> None:
    """Sets the setting of the parsed ``config`` to the checkpoint's value (``class_path``: the whole section)."""
    value = dict_to_namespace(difference.theirs) if isinstance(difference.theirs, dict) else difference.theirs
    if difference.name == "class_path":
        config[difference.section] = value
    else:
        config[difference.section]["init_args"][difference.name] = value


def _describe(key: str, value: Any, other: Any, other_name: str) -> str:
    """``key: value (other_name: other)``; for two instances of one class, each argument that differs alone."""
    if isinstance(value, dict) and isinstance(other, dict) and value.get("class_path") == other.get("class_path"):
        ours, theirs = value.get("init_args") or {}, other.get("init_args") or {}
        parts = [
            _describe(f"{key}.{name}", ours.get(name), theirs.get(name), other_name)
            for name in dict.fromkeys([*ours, *theirs])
            if not _same(ours.get(name), theirs.get(name))
        ]
        return "; ".join(parts)
    return f"{key}: {_short(value)} ({other_name}: {_short(other)})"


def _short(value: Any) -> str:
    """A setting as a short string: a class with arguments as ``Class(arg=value, ...)``."""
    if isinstance(value, dict) and "class_path" in value:
        args = ", ".join(f"{k}={_short(v)}" for k, v in (value.get("init_args") or {}).items())
        return f"{str(value['class_path']).rsplit('.', 1)[-1]}({args})"
    return repr(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b
