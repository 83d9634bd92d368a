"""The core of the precision study: one estimator's hypergradient in three precisions, compared; and timed.

:func:`measure` computes the hypergradient of one estimator on one problem (:mod:`studies.precision.problems`) in
float64, float32 and bf16 and compares them pair by pair (:func:`comparison`): the cosine, the norm ratio and the
relative error of bf16's to float32's (what bf16 costs in accuracy), of float32's to float64's (the yardstick: what
float32 itself costs) and of bf16's to float64's. :func:`time_pair` times float32 and bf16 side by side.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Any

import torch
from torch import Tensor

from studies.precision.problems import synchronize

MEASURED = ("float64", "float32", "bf16")
"""The precisions of a record (see :data:`~studies.precision.problems.PRECISIONS`)."""
PAIRS = (("bf16", "float32"), ("float32", "float64"), ("bf16", "float64"))
"""The comparisons of a record, ``(a, b)``: ``a``'s hypergradient against ``b``'s (the reference)."""
TIMED = ("float32", "bf16")
"""The precisions that :func:`time_pair` times, side by side."""


def pair_key(a: str, b: str) -> str:
    """``bf16_vs_float32``: the record's key of a comparison."""
    return f"{a}_vs_{b}"


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def comparison(a: Tensor, b: Tensor) -> dict[str, float | None]:
    """``a`` against the reference ``b`` (flat vectors): ``cosine``, ``norm_ratio`` ``|a| / |b|`` and ``rel_error``
    ``|a - b| / |b|``; ``None`` where a value is undefined (a zero vector) or not finite."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = float(a.norm()), float(b.norm())
    cosine = float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan
    return {
        "cosine": _finite_or_none(cosine),
        "norm_ratio": _finite_or_none(na / nb) if nb > 0 else None,
        "rel_error": _finite_or_none(float((a - b).norm()) / nb) if nb > 0 else None,
    }


def _refusal(spec: str, error: ValueError) -> str:
    return f"{spec} refuses this problem: {str(error).splitlines()[0]}"


def measure(problem: Any, spec: str) -> dict[str, Any]:
    """The accuracy part of a record of ``spec`` on ``problem`` (a :class:`~studies.precision.problems.FewShotProblem`
    or :class:`~studies.precision.problems.CNNProblem`).

    Returns ``{"status": "done", ...}`` with, per precision, the hypergradient's ``norms``, whether it is ``finite``,
    the ``outer_loss`` and the ``seconds`` of the call (informal: timed once, with everything else the process does);
    and a :func:`comparison` per pair of :data:`PAIRS` (keys :func:`pair_key`). Or ``{"status": "skipped",
    "reason": ...}`` where the estimator refuses the problem (its error's first line) or its hypergradient is zero in
    every precision (nothing to compare).
    """
    grads: dict[str, Tensor] = {}
    out: dict[str, Any] = {"norms": {}, "finite": {}, "outer_loss": {}, "seconds": {}}
    for precision in MEASURED:
        try:
            call = problem.hypergradient(spec, precision)
            synchronize(problem.device)
            started = time.perf_counter()
            grads[precision], loss = call()
            synchronize(problem.device)
        except ValueError as error:
            return {"status": "skipped", "reason": _refusal(spec, error)}
        out["seconds"][precision] = time.perf_counter() - started
        out["norms"][precision] = _finite_or_none(float(grads[precision].norm()))
        out["finite"][precision] = bool(torch.isfinite(grads[precision]).all())
        out["outer_loss"][precision] = _finite_or_none(loss)
    if all(float(g.abs().max()) == 0.0 for g in grads.values()):
        return {
            "status": "skipped",
            "reason": f"{spec}'s hypergradient is exactly zero in every precision on this problem (its "
            "hyperparameters act only through the inner optimizer, which it does not differentiate): no direction "
            "to compare",
            **out,
        }
    for a, b in PAIRS:
        out[pair_key(a, b)] = comparison(grads[a], grads[b])
    return {"status": "done", **out}


def loadavg() -> str | None:
    """The first three fields of ``/proc/loadavg`` (the 1, 5 and 15 minute load averages), or ``None``."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def time_pair(problem: Any, spec: str, rounds: int) -> dict[str, Any]:
    """Seconds per hypergradient of ``spec`` on ``problem`` in float32 and in bf16, side by side.

    Each precision's call is built once and run once untimed (the warm-up, which also runs the package's one-time
    checks); then ``rounds`` rounds, each one call of each precision, their order alternating from round to round so
    that neither always runs first; ``gc.collect()`` before each call, outside the timed span (on CUDA the device is
    waited for at both ends). The load averages of ``/proc/loadavg`` are read before the first timed round and after
    the last. ``ratio``: the median bf16 time over the median float32 time; ``round_ratios``: each round's.
    """
    try:
        calls = {precision: problem.hypergradient(spec, precision) for precision in TIMED}
        for call in calls.values():
            call()
    except ValueError as error:
        return {"status": "skipped", "reason": _refusal(spec, error)}
    seconds: dict[str, list[float]] = {precision: [] for precision in TIMED}
    load_start = loadavg()
    for r in range(rounds):
        for precision in TIMED if r % 2 == 0 else TIMED[::-1]:
            gc.collect()
            synchronize(problem.device)
            started = time.perf_counter()
            calls[precision]()
            synchronize(problem.device)
            seconds[precision].append(time.perf_counter() - started)
    load_end = loadavg()
    medians = {precision: statistics.median(values) for precision, values in seconds.items()}
    return {
        "status": "done",
        "seconds": seconds,
        "median_seconds": medians,
        "ratio": medians["bf16"] / medians["float32"],
        "round_ratios": [b / f for f, b in zip(seconds["float32"], seconds["bf16"])],
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "threads": torch.get_num_threads(),
    }
