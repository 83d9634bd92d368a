"""The growth of peak memory with T: ``a + b T`` against ``a + b sqrt(T)``, and the largest T within a budget.

Each model is fitted by least squares on the relative residuals (``(a + b f(T)) / peak - 1``, which weighs the
small and the large T alike, as a fit in log space would), and the better of the two by the root mean square of
those residuals is kept. Two points fit either model exactly, so a choice needs at least three.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

MODELS: dict[str, Callable[[float], float]] = {"linear": float, "sqrt": math.sqrt}
"""Each model's function of T: peak bytes = a + b f(T)."""


@dataclass(frozen=True)
class Fit:
    """``peak = a + b f(T)`` of ``model``, in bytes, and its rms relative residual over the points."""

    model: str
    a: float
    b: float
    residual: float
    points: int

    def predict(self, steps: float) -> float:
        return self.a + self.b * MODELS[self.model](steps)

    def as_dict(self) -> dict:
        return asdict(self)


def fit(model: str, steps: Sequence[float], peaks: Sequence[float]) -> Fit:
    """The fit of ``model`` to the points ``(steps[i], peaks[i])`` (at least two, peaks > 0).

    Raises:
        ValueError: an unknown model, fewer than two points, lengths that differ, or a peak not above 0.
    """
    if model not in MODELS:
        raise ValueError(f"unknown growth model {model!r}; choose one of {', '.join(MODELS)}")
    if len(steps) != len(peaks) or len(steps) < 2:
        raise ValueError(f"a fit needs two or more (T, peak) points of equal number, got {len(steps)}, {len(peaks)}")
    y = np.asarray(peaks, dtype=np.float64)
    if (y <= 0).any():
        raise ValueError("peaks must be above 0 to fit their relative residuals")
    f = np.asarray([MODELS[model](t) for t in steps], dtype=np.float64)
    design = np.stack([1 / y, f / y], axis=1)  # (a + b f) / y = 1
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(y), rcond=None)
    residual = float(np.sqrt(np.mean((design @ np.array([a, b]) - 1) ** 2)))
    return Fit(model, float(a), float(b), residual, len(y))


def best_fit(steps: Sequence[float], peaks: Sequence[float]) -> tuple[Fit | None, dict[str, Fit]]:
    """The better model by its residual (``None`` with fewer than three points: both fit exactly), and both fits."""
    fits = {model: fit(model, steps, peaks) for model in MODELS}
    if len(steps) < 3:
        return None, fits
    return min(fits.values(), key=lambda f: f.residual), fits


def largest_steps(fitted: Fit, budget: float) -> int | None:
    """The largest integer T whose predicted peak is within ``budget`` bytes (``None``: no growth, so no bound)."""
    if fitted.b <= 0:
        return None
    room = (budget - fitted.a) / fitted.b
    if room <= 0:
        return 0
    steps = math.floor(room if fitted.model == "linear" else room * room)
    while steps > 0 and fitted.predict(steps) > budget:  # rounding of the square
        steps -= 1
    return steps
