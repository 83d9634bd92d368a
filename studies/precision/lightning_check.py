"""What each of Lightning's ``trainer.precision`` settings does to a :class:`~lightning_hypergrad.FewShotClassifier`
training step on this machine, and whether the study's bf16 is Lightning's.

For each setting of :data:`SETTINGS`, one training step of the few-shot problem's model (seed 0, the estimator
:data:`ESTIMATOR`) on its meta-batch through ``Trainer(precision=...).fit``: the precision the trainer ended with,
the warnings that name the precision (the lines a user sees), the error that stopped it (its first line) or the
hypergradient the step applied (``outputs["hypergrad"]`` of ``training_step``), compared with the study's own
float32, float64 and bf16 hypergradients of the same model and tasks. ``bf16-mixed``'s must equal the study's bf16
one: that is the check that the study applies bf16 as Lightning does.

Besides Lightning: whether torch's CPU autocast runs float16 at all (``16-mixed`` would need it), and, with it, the
hypergradient in float16 autocast without loss scaling (what no Lightning setting gives on the CPU), compared with
float32's and timed against it (one call each after a warm-up; informal).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from studies.precision.measure import comparison
from studies.precision.problems import FewShotProblem, flat

SETTINGS = ("32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
"""The ``trainer.precision`` settings checked."""
ESTIMATOR = "greedy(0.99)"
"""The quickstart config's estimator."""
KEYWORDS = ("precision", "amp", "fp16", "bf16", "float16", "half")
"""A warning is kept when its text names one of these (case-insensitive)."""
FP16 = "fp16"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def lightning_step(
    problem: FewShotProblem, setting: str, spec: str = ESTIMATOR, accelerator: str = "cpu"
) -> dict[str, Any]:
    """One ``fit`` step with ``trainer.precision = setting`` on ``accelerator``: what happened, and the hypergradient
    it applied (``hypergrad``, flat, on the CPU; ``None`` where no step ran)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from studies.common import quiet, quiet_trainer

    class Capture(L.Callback):
        hypergrad: torch.Tensor | None = None
        dtype: str | None = None

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.hypergrad = flat(outputs["hypergrad"])
            self.dtype = str(outputs["hypergrad"][0].dtype).removeprefix("torch.")

    model, capture = problem.model(spec), Capture()
    row: dict[str, Any] = {"setting": setting, "trainer_precision": None, "error": None}
    with quiet(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer = quiet_trainer(
                accelerator=accelerator, max_steps=1, precision=setting, callbacks=[capture], num_sanity_val_steps=0
            )
            row["trainer_precision"] = str(trainer.precision)
            trainer.fit(model, train_dataloaders=DataLoader([problem.batch], batch_size=None))
        except Exception as error:  # noqa: BLE001 - the refusal is what is recorded
            row["error"] = _first_line(error)
    row["warnings"] = list(
        dict.fromkeys(
            str(w.message).strip().splitlines()[0] for w in caught if any(k in str(w.message).lower() for k in KEYWORDS)
        )
    )
    row["ran"] = capture.hypergrad is not None
    row["hypergrad_dtype"] = capture.dtype
    row["hypergrad"] = capture.hypergrad
    return row


def fp16_autocast(problem: FewShotProblem, spec: str = ESTIMATOR) -> dict[str, Any]:
    """Whether torch's CPU autocast runs float16, and if so ``spec``'s hypergradient in it against float32's."""
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            product = torch.ones(2, 2) @ torch.ones(2, 2)
        supported, error = product.dtype == torch.float16, None
    except (RuntimeError, ValueError) as failure:
        supported, error = False, _first_line(failure)
    out: dict[str, Any] = {"torch_cpu_autocast_float16": supported, "error": error}
    if not supported:
        return out
    seconds, grads = {}, {}
    for precision in ("float32", FP16):
        call = problem.hypergradient(spec, precision)
        call()
        started = time.perf_counter()
        grads[precision], _ = call()
        seconds[precision] = time.perf_counter() - started
    out["estimator"] = spec
    out["fp16_vs_float32"] = comparison(grads[FP16], grads["float32"])
    out["finite"] = bool(torch.isfinite(grads[FP16]).all())
    out["seconds"] = seconds
    out["time_ratio"] = seconds[FP16] / seconds["float32"]
    return out


def check(problem: FewShotProblem, spec: str = ESTIMATOR) -> dict[str, Any]:
    """The rows of :data:`SETTINGS` and the float16 autocast check, on ``problem`` (seed 0 in the study)."""
    study = {precision: problem.hypergradient(spec, precision)()[0] for precision in ("float64", "float32", "bf16")}
    rows = [lightning_step(problem, setting, spec) for setting in SETTINGS]
    applied = {row["setting"]: row.pop("hypergrad") for row in rows}
    for row in rows:
        g = applied[row["setting"]]
        if g is None:
            continue
        row["vs_study_float32"] = comparison(g, study["float32"])
        row["vs_study_float64"] = comparison(g, study["float64"])
        row["max_abs_diff_to_study"] = {p: float((g - study[p]).abs().max()) for p in ("float32", "bf16")}
        if row["setting"] == "16-mixed" and applied["bf16-mixed"] is not None:
            row["max_abs_diff_to_bf16_mixed"] = float((g - applied["bf16-mixed"]).abs().max())
    return {
        "estimator": spec,
        "settings_checked": list(SETTINGS),
        "rows": rows,
        "fp16_autocast": fp16_autocast(problem),
    }
