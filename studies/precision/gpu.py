"""bf16 against float32 on a CUDA device: the GPU check's part of the precision study (``python -m studies.gpu_check``).

On the few-shot problem of :mod:`studies.precision.problems` (seed 0, its default settings) on ``device``, for each
estimator: the cosine and norm ratio of bf16's hypergradient (``torch.autocast('cuda', dtype=torch.bfloat16)``, as
Lightning's ``bf16-mixed``) to float32's and of float32's to float64's, computed inside ``exact_float32`` (the GPU
check passes its context that turns TF32 off, so that float32 is float32); and the seconds per hypergradient in
float32 and in bf16, side by side in interleaved rounds with torch's default TF32 settings (what a user's run gets),
the device waited for at both ends of each call. Then one Lightning training step with ``precision='bf16-mixed'``
and one with ``precision='16-mixed'`` on the device: what each does (the refusal's line where it is refused) and,
where a step ran, its hypergradient against the study's bf16 one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from studies.precision.lightning_check import ESTIMATOR, lightning_step
from studies.precision.measure import measure, pair_key, time_pair
from studies.precision.problems import FewShotProblem, FewShotSettings

LIGHTNING_SETTINGS = ("bf16-mixed", "16-mixed")
SEED = 0


def bf16_on_device(
    device: torch.device,
    estimators: list[str],
    rounds: int = 5,
    exact_float32: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    settings: FewShotSettings | None = None,
) -> dict[str, Any]:
    """The rows of each estimator and of each Lightning setting of :data:`LIGHTNING_SETTINGS` (see the module)."""
    problem = FewShotProblem(settings or FewShotSettings(), SEED, device)
    rows = []
    for spec in estimators:
        with exact_float32():
            record = measure(problem, spec)
        timing = time_pair(problem, spec, rounds)
        rows.append({"estimator": spec, "accuracy": record, "timing": timing})
    spec = ESTIMATOR if ESTIMATOR in estimators else estimators[0]
    with exact_float32():
        study_bf16, _ = problem.hypergradient(spec, "bf16")()
    lightning = []
    for setting in LIGHTNING_SETTINGS:
        row = lightning_step(problem, setting, spec, accelerator=device.type)
        applied = row.pop("hypergrad")
        row["max_abs_diff_to_study_bf16"] = None if applied is None else float((applied - study_bf16).abs().max())
        lightning.append(row)
    return {
        "problem": "fewshot",
        "settings": problem.settings.as_dict(),
        "seed": SEED,
        "rounds": rounds,
        "rows": rows,
        "lightning_estimator": spec,
        "lightning": lightning,
    }


def bf16_table(result: dict[str, Any]) -> list[str]:
    """The rows of :func:`bf16_on_device` as Markdown lines."""
    lines = [
        "| estimator | bf16 vs float32: cosine | norm ratio | float32 vs float64: cosine | norm ratio | float32 ms | "
        "bf16 ms | time bf16 / float32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        accuracy, timing = row["accuracy"], row["timing"]
        if accuracy["status"] == "done":
            bf, f32 = accuracy[pair_key("bf16", "float32")], accuracy[pair_key("float32", "float64")]
            cells = [
                f"{bf['cosine']:.5f}",
                f"{bf['norm_ratio']:.4f}",
                f"{f32['cosine']:.8f}",
                f"{f32['norm_ratio']:.6f}",
            ]
        else:
            cells = [f"skipped: {accuracy['reason']}", "", "", ""]
        if timing["status"] == "done":
            medians = timing["median_seconds"]
            cells += [f"{1000 * medians['float32']:.1f}", f"{1000 * medians['bf16']:.1f}", f"{timing['ratio']:.2f}"]
        else:
            cells += ["", "", "n/a"]
        lines.append(f"| {row['estimator']} | " + " | ".join(cells) + " |")
    lines.append("")
    for row in result["lightning"]:
        if row["ran"]:
            outcome = (
                f"ran as {row['trainer_precision']}; its hypergradient's max abs diff to the study's bf16 one: "
                f"{row['max_abs_diff_to_study_bf16']:.2g}"
            )
        else:
            outcome = f"refused: {row['error']}"
        warned = "".join(f" (warns: {w})" for w in row["warnings"])
        lines.append(f"- `precision='{row['setting']}'` ({result['lightning_estimator']}): {outcome}{warned}")
    return lines
