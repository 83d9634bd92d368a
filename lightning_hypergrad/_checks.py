"""Argument checks shared by the package: one message format for every setting a user can get wrong."""

from __future__ import annotations

import math


def check_int(name: str, value: object, minimum: int | None = 1, *, owner: str = "") -> int:
    """``value`` if it is an integer (not a bool) of at least ``minimum``; otherwise a ``ValueError`` naming it.

    Args:
        name: the setting as the user writes it (e.g. ``"inner_steps (T)"``).
        value: what the user gave.
        minimum: the smallest accepted value; ``None``: any integer.
        owner: the class the setting belongs to, put before the name in the message.
    """
    label = f"{owner} {name}" if owner else name
    if isinstance(value, bool) or not isinstance(value, int):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{label} must be an integer{bound}, got {value!r}: set it to a whole number")
    if minimum is not None and value < minimum:
        raise ValueError(f"{label} must be an integer >= {minimum}, got {value!r}: set it to {minimum} or more")
    return value


def check_positive_number(name: str, value: object, *, owner: str = "") -> float:
    """``value`` as a float if it is a finite number > 0; otherwise a ``ValueError`` naming it."""
    label = f"{owner} {name}" if owner else name
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number > 0, got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...], *, owner: str = "") -> str:
    """``value`` if it is one of ``choices``; otherwise a ``ValueError`` listing them."""
    label = f"{owner} {name}" if owner else name
    if value not in choices:
        raise ValueError(f"{label} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value  # type: ignore[return-value]
