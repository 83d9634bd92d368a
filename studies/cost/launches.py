"""Launch counts: the ATen operations one outer step of few-shot meta-learning dispatches, one by one and batched.

Run from the repository root::

    python -m studies.cost.launches [--steps 10 50] [--meta-batch 10] [--rounds 5] [--out studies/cost/results]

On a GPU every operation that computes is a kernel launch, and the few-shot head's operations are so small that a
step costs about what its launches cost; on a CPU the same count is deterministic, so it is measured here. The
problem is the cost study's ``fewshot`` one (:func:`studies.cost.estimators.make_fewshot_step`: the 3 x 32 conv
backbone, a linear head, 5-way 10-shot tasks of random 32x32 images, SGD with momentum 0.9) three ways: one by one
(``fewshot``: one estimator call per task); batched (``FewShotClassifier(batch_tasks=True)``: the tasks' inner loops
stacked) with the backbone once per task (``batch_backbone=False``, the default on a CPU); and batched with one
backbone call over every task's images, batch norm per task (``batch_backbone=True``, the default on a GPU).

Counted with a ``TorchDispatchMode`` over one outer step after a warm-up one (the forward, the estimator, the
backward passes and the outer Adam step): ``ops``, every ATen operation that reaches the dispatcher, and
``compute ops``, those less the ones that only make views or detach (view, detach, select, expand, transpose, ...),
which launch nothing on a GPU. Beside them, the CPU seconds per outer step (median of ``--rounds`` interleaved
rounds, one torch thread) for the ratio of the two paths' times.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from studies.common import StudyParser, machine_description, run_alone, writable_folder, write_json, write_text
from studies.cost.estimators import Job, interleaved_seconds_per_step, make_fewshot_batched_step, make_fewshot_step

SPECS = ("fo", "t1t2", "greedy(0.99)", "rmd")
VIEW_OPS = frozenset(
    "view detach select expand transpose unsqueeze squeeze _unsafe_view alias t as_strided permute slice split unbind "
    "reshape _reshape_alias split_with_sizes narrow unfold diagonal lift_fresh".split()
)
"""Operations that make a view or detach: metadata only, no kernel on a GPU."""


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched within the block: all of them and those that compute."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.compute_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func.__name__.split(".")[0] not in VIEW_OPS:
            self.compute_ops += 1
        return func(*args, **(kwargs or {}))


PATHS = {
    "one by one": make_fewshot_step,
    "batched, backbone per task": partial(make_fewshot_batched_step, batch_backbone=False),
    "batched": partial(make_fewshot_batched_step, batch_backbone=True),
}
"""How the outer step runs the meta-batch (see the module docstring)."""


def count_ops(make_step: Callable[[], Callable[[], None]]) -> tuple[int, int]:
    """``(ops, compute ops)`` of one outer step of a fresh configuration, after a warm-up step."""
    step = make_step()
    step()
    counter = OpCounter()
    with counter:
        step()
    return counter.ops, counter.compute_ops


def measure(
    specs: Sequence[str], steps_list: Sequence[int], meta_batch: int, rounds: int, device: str = "cpu"
) -> list[dict[str, Any]]:
    cpu = torch.device(device)
    rows = []
    for steps in steps_list:
        jobs = []
        for spec in specs:
            for path, make in PATHS.items():
                jobs.append(Job(path, spec, steps, partial(make, spec, steps, meta_batch, cpu), rounds))
        seconds = interleaved_seconds_per_step(jobs, cpu)
        for job, secs in zip(jobs, seconds):
            ops, compute = count_ops(job.make_step)
            rows.append(
                {
                    "estimator": job.estimator,
                    "T": steps,
                    "path": job.problem,
                    "ops": ops,
                    "compute_ops": compute,
                    "seconds": secs,
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]], meta_batch: int) -> str:
    lines = [
        f"Per outer step, meta-batch {meta_batch}: ATen operations dispatched (all, and compute: less views and "
        "detaches), and CPU seconds (one torch thread, median of interleaved rounds); each batched path also as a "
        "share of the one-by-one figure.",
        "",
        "| estimator | T | path | ops | share | compute ops | share | s / outer step | time ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["estimator"], r["T"], r["path"]): r for r in rows}
    for estimator, steps in dict.fromkeys((r["estimator"], r["T"]) for r in rows):
        one = by[(estimator, steps, "one by one")]
        for path in PATHS:
            r = by[(estimator, steps, path)]
            lines.append(
                f"| `{estimator}` | {steps} | {path} | {r['ops']} | {r['ops'] / one['ops']:.3f} | {r['compute_ops']} | "
                f"{r['compute_ops'] / one['compute_ops']:.3f} | {r['seconds']:.3f} | "
                f"{r['seconds'] / one['seconds']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = StudyParser(prog="python -m studies.cost.launches", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50], help="inner steps T (default 10 50)")
    parser.add_argument("--meta-batch", type=int, default=10, help="tasks per outer step (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--estimators", nargs="+", default=list(SPECS), help="spec strings (default: 4)")
    parser.add_argument(
        "--out", type=writable_folder, default="studies/cost/results", help="where launches.md/.json go (checked first)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.meta_batch < 2 or args.rounds < 1 or any(t < 1 for t in args.steps):
        parser.error("--meta-batch must be at least 2, --rounds and --steps at least 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    name = "launches" if args.device == "cpu" else f"launches_{args.device}"
    with run_alone(out, f".{name}.lock"):  # a second run on the same --out would count the same
        rows = measure(args.estimators, args.steps, args.meta_batch, args.rounds, args.device)
        machine = machine_description(args.device)
        text = markdown(rows, args.meta_batch) + f"\n\nMachine: {machine}.\n"
        write_text(out / f"{name}.md", "# Launch counts\n\n" + text)
        write_json(out / f"{name}.json", {"meta_batch": args.meta_batch, "rows": rows, "machine": machine})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
