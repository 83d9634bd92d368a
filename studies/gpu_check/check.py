"""The GPU check: seconds per Lightning step, peak CUDA memory and the GPU's hypergradient against the CPU's.

    bash scripts/gpu_check.sh                          # on a CUDA machine: installs only if .venv is missing
    python -m studies.gpu_check                        # the same, with the environment already set up
    python -m studies.gpu_check --device cpu --dataset digits --steps 1 --rounds 1 --inner-steps 2   # tiny, on CPU

1. Seconds per training step of ``FewShotClassifier`` through Lightning (median over ``--rounds`` x ``--steps``
   steps, the first step of each fit excluded as warm-up) for each estimator (a spec string, see
   :func:`lightning_hypergrad.get_estimator`) and number of inner steps T, with the meta-batch's tasks run together
   (``batch_tasks=True``) and one by one (the default), in interleaved rounds (every configuration, then every one
   again) as in :mod:`studies.lightning_step.step_time`. Columns: the ratio to FO's time (same T and tasks) and the
   one-by-one time over the batched one. :class:`~lightning_hypergrad.callbacks.StepTimer` waits for the GPU at the
   start and end of each step, so the times hold the kernels, not only their launches.
2. The peak CUDA memory of each configuration: ``torch.cuda.max_memory_allocated()`` after each fit, reset with
   ``torch.cuda.reset_peak_memory_stats()`` before it (the largest over the rounds), in MiB.
3. ``|g_gpu - g_cpu| / |g_cpu|`` between the hypergradient (``model.meta_gradient(tasks).hypergrads``, flattened)
   computed on the GPU and on the CPU for the same meta-batch (the first training one) and the same initial weights
   (a seeded model built on the CPU and deep-copied to the GPU), per estimator and T, with the tasks batched, in
   float32 with TF32 off, float32 with torch's default TF32 settings (which let cuDNN's float32 convolutions use
   TF32 on GPUs that have it), and float64. Expected: float64 to about 1e-12, float32 without TF32 to about 1e-5.

4. bf16 against float32 on the GPU (CUDA only; :mod:`studies.precision.gpu`): on the precision study's few-shot
   problem (the digits at 28x28, meta-batch 4, seed 0), per estimator, the cosine and norm ratio of the bf16-autocast
   hypergradient (Lightning's ``bf16-mixed``) to float32's and of float32's to float64's (TF32 off), and the seconds
   per hypergradient in float32 and bf16 in 5 interleaved rounds; then what ``precision='bf16-mixed'`` and
   ``'16-mixed'`` do to one Lightning step on the GPU (``16-mixed``: refused by ``BilevelModule``, the line recorded).

Omniglot 5-way 10-shot, meta-batch 10 when the data is found (``--root``, else ``$OMNIGLOT_ROOT``, else
``../shared/data/omniglot``), else the digits (5-shot); the paper's inner loop (SGD 0.1, momentum 0.9) and 3 x 32
conv backbone. ``--device cpu`` runs the same on the CPU (the memory column says n/a, part 3 is skipped), so that the
check runs anywhere and in CI in a tiny form. The tables are written to ``gpu_check.json`` and ``gpu_check.md``
under ``--out``, with the machine's description. Before any work: an ``--out`` that cannot be written is refused,
and the check holds ``--out``'s ``.lock`` while it works (:func:`studies.common.run_alone`): a second check on the
same ``--out`` is refused while the first lives.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from studies.common import (
    Progress,
    StudyParser,
    estimator_spec,
    machine_description,
    omniglot_root,
    quiet,
    require_positive,
    run_alone,
    tasks_label,
    writable_folder,
    write_json,
    write_text,
)

if TYPE_CHECKING:  # imported in the functions: without CUDA, --device cuda exits before loading Lightning
    import lightning_hypergrad as lh
    from lightning_hypergrad.module import Task

PROG = "python -m studies.gpu_check"
DEFAULT_OUT = "studies/gpu_check/results"
DEFAULT_ESTIMATORS = ("fo", "t1t2", "greedy(0.99)", "rmd")
WAYS, META_BATCH, SEED = 5, 10, 0
MIB = 1024**2
BF16_ROUNDS = 5  # part 4's interleaved timing rounds
NO_CUDA = (
    f"{PROG}: --device cuda, but torch finds no CUDA device (torch.cuda.is_available() is False): run it on a CUDA "
    "machine, or pass --device cpu for the CPU form"
)
PRECISIONS = (  # (column, dtype, TF32 allowed as torch's defaults have it)
    ("float32", torch.float32, False),
    ("float32, torch's TF32 defaults", torch.float32, True),
    ("float64", torch.float64, False),
)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser and its arguments; the estimators stay as given (see :func:`canonical_specs`)."""
    parser = StudyParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="default: cuda")
    parser.add_argument("--dataset", choices=("omniglot", "digits"), default=None, help="default: omniglot if found")
    parser.add_argument("--root", default=None, help="the Omniglot folder (default: $OMNIGLOT_ROOT, else the usual)")
    parser.add_argument("--estimators", nargs="+", default=list(DEFAULT_ESTIMATORS), metavar="SPEC",
                        help=f"default: {' '.join(DEFAULT_ESTIMATORS)}")  # fmt: skip
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[10, 50], metavar="T", help="default: 10 50")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per fit (after one warm-up step); default: 4")
    parser.add_argument("--rounds", type=int, default=3, help="default: 3")
    parser.add_argument(
        "--out",
        type=writable_folder,
        default=DEFAULT_OUT,
        help=f"folder of gpu_check.json and gpu_check.md (default: {DEFAULT_OUT}); checked before any work",
    )
    args = parser.parse_args(argv)
    require_positive(parser, args, "steps", "rounds", "inner_steps")
    return parser, args


def canonical_specs(parser: argparse.ArgumentParser, names: Sequence[str]) -> list[str]:
    """The canonical spec strings of ``names`` (see :func:`lightning_hypergrad.get_estimator`), each once."""
    specs = []
    for name in names:
        try:
            specs.append(estimator_spec(name))
        except argparse.ArgumentTypeError as error:
            parser.error(f"argument --estimators: {error}")
    return list(dict.fromkeys(specs))


# ------------------------------------------------------------------------------------------------ 1-2: the steps


def step_rows(
    configs: list[tuple[str, int, bool]],
    times: dict[tuple[str, int, bool], list[float]],
    peaks: dict[tuple[str, int, bool], int | None],
) -> list[dict[str, Any]]:
    medians = {config: statistics.median(seconds) for config, seconds in times.items()}
    rows = []
    for config in configs:
        name, steps, batched = config
        fo = medians.get(("fo", steps, batched))
        other = medians.get((name, steps, not batched))
        rows.append({
            "estimator": name,
            "inner_steps": steps,
            "tasks": tasks_label(batched),
            "seconds_per_step": medians[config],
            "ratio_to_fo": medians[config] / fo if fo else None,
            "one_by_one_over_batched": other / medians[config] if batched and other else None,
            "peak_cuda_mib": peaks[config] / MIB if peaks[config] is not None else None,
            "durations": times[config],
        })  # fmt: skip
    return rows


def step_table(rows: list[dict[str, Any]]) -> list[str]:
    def number(value: float | None, digits: str) -> str:
        return "n/a" if value is None else format(value, digits)

    lines = [
        "| estimator | T | tasks | s/step | ratio to FO | one by one / batched | peak CUDA MiB |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = row["one_by_one_over_batched"]
        lines.append(
            f"| {row['estimator']} | {row['inner_steps']} | {row['tasks']} | {row['seconds_per_step']:.4f} | "
            f"{number(row['ratio_to_fo'], '.2f')} | {'' if ratio is None else format(ratio, '.2f')} | "
            f"{number(row['peak_cuda_mib'], '.1f')} |"
        )
    return lines


# ---------------------------------------------------------------------------------------- 3: GPU against CPU


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """float32 matrix products and cuDNN convolutions in full float32 precision (no TF32) inside the block."""
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved_flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32  # torch before 2.9
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved_flags


def cast(task: Task, dtype: torch.dtype, device: torch.device) -> Task:
    """The task on ``device``, its floating-point tensors (the images) in ``dtype``."""
    return {
        k: v.to(device, dtype if v.is_floating_point() else v.dtype) if isinstance(v, Tensor) else v
        for k, v in task.items()
    }


def flat_hypergradient(model: lh.FewShotClassifier, tasks: list[Task]) -> Tensor:
    """``model.meta_gradient(tasks).hypergrads`` flattened into one vector, on the CPU."""
    return torch.cat([g.detach().reshape(-1) for g in model.meta_gradient(tasks).hypergrads]).cpu()


def compare_devices(
    tasks: list[Task], image_shape: tuple[int, int, int], estimators: list[str], inner_steps: list[int],
    device: torch.device,
) -> list[dict[str, Any]]:  # fmt: skip
    """``|g_gpu - g_cpu| / |g_cpu|`` for every estimator and T, in each of :data:`PRECISIONS`."""
    import lightning_hypergrad as lh

    rows = []
    progress = Progress(len(inner_steps) * len(estimators), work=len(estimators) * sum(inner_steps))
    for steps in inner_steps:
        for name in estimators:
            row: dict[str, Any] = {"estimator": name, "inner_steps": steps}
            for dtype in dict.fromkeys(dtype for _, dtype, _ in PRECISIONS):
                torch.manual_seed(SEED)
                model = lh.FewShotClassifier(
                    ways=WAYS, image_shape=image_shape, estimator=name, inner_steps=steps, batch_tasks=True
                )
                model = model.to(dtype).train()
                initial = copy.deepcopy(model)  # meta_gradient moves batch norm's running statistics
                g_cpu = flat_hypergradient(model, [cast(task, dtype, torch.device("cpu")) for task in tasks])
                on_device = [cast(task, dtype, device) for task in tasks]
                for column, precision, tf32 in PRECISIONS:
                    if precision == dtype:
                        with contextlib.nullcontext() if tf32 else tf32_off():
                            g_gpu = flat_hypergradient(copy.deepcopy(initial).to(device), on_device)
                        row[column] = float(torch.linalg.vector_norm(g_gpu - g_cpu) / torch.linalg.vector_norm(g_cpu))
            errors = ", ".join(f"{c} {row[c]:.1e}" for c, _, _ in PRECISIONS)
            progress.step(f"GPU against CPU: {name}, T = {steps}: {errors}", steps)
            rows.append(row)
    return rows


def comparison_table(rows: list[dict[str, Any]]) -> list[str]:
    columns = [column for column, _, _ in PRECISIONS]
    lines = ["| estimator | T | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for row in rows:
        lines.append(
            f"| {row['estimator']} | {row['inner_steps']} | " + " | ".join(f"{row[c]:.1e}" for c in columns) + " |"
        )
    return lines


# --------------------------------------------------------------------------------------------------- the check


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the check, prints its tables, writes them under ``--out`` and returns the record."""
    parser, args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(NO_CUDA)
    estimators = canonical_specs(parser, args.estimators)
    with run_alone(args.out):  # a second check on the same --out would measure the same
        return run_check(args, estimators, argv)


def run_check(args: argparse.Namespace, estimators: list[str], argv: Sequence[str] | None) -> dict[str, Any]:
    """Times, compares and writes the check's tables under ``--out``; returns the record."""
    import lightning_hypergrad as lh
    from lightning_hypergrad.module import split_meta_batch

    started = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    root = omniglot_root(args.root)
    found = os.path.exists(os.path.join(os.path.expanduser(root), "images_background.npz"))
    dataset = args.dataset or ("omniglot" if found else "digits")
    shots = 10 if dataset != "digits" else 5
    inner_steps = list(dict.fromkeys(args.inner_steps))
    configs = [(name, t, batched) for t in inner_steps for batched in (True, False) for name in estimators]
    with quiet():
        data = lh.FewShotDataModule(
            dataset=dataset, root=root if dataset == "omniglot" else None, ways=WAYS, shots=shots, queries=shots,
            meta_batch_size=META_BATCH, train_batches=args.steps + 1, val_tasks=1,
        )  # fmt: skip
        data.setup("fit")
        from studies.lightning_step.step_time import time_configs

        times, peaks = time_configs(data, configs, args.steps, args.rounds, device)
        steps = step_rows(configs, times, peaks)
        skipped = None
        comparison: list[dict[str, Any]] | None = None
        if device.type == "cuda":
            tasks = split_meta_batch(next(iter(data.train_dataloader())))
            comparison = compare_devices(tasks, data.image_shape, estimators, inner_steps, device)
        else:
            skipped = "--device cpu: the GPU-against-CPU comparison needs a CUDA device (skipped)"
        bf16: dict[str, Any] | None = None
        bf16_skipped = None
        if device.type == "cuda":
            from studies.precision.gpu import bf16_on_device

            bf16 = bf16_on_device(device, estimators, rounds=BF16_ROUNDS, exact_float32=tf32_off)
        else:
            bf16_skipped = "--device cpu: bf16 on the GPU needs a CUDA device (skipped; the CPU's: studies.precision)"
    seconds = time.perf_counter() - started
    machine = machine_description(device)
    lines = [
        "# GPU check",
        "",
        f"{dataset}, {WAYS}-way {shots}-shot, meta-batch {META_BATCH}; {machine}; "
        f"median of {args.rounds} x {args.steps} steps per configuration (first step of each fit excluded); "
        f"the check took {seconds:.0f} s",
        "",
        "## Seconds per training step and peak CUDA memory",
        "",
        *step_table(steps),
        "",
        "## GPU against CPU: |g_gpu - g_cpu| / |g_cpu| of the hypergradient (same meta-batch, same initial weights)",
        "",
        *(comparison_table(comparison) if comparison is not None else [skipped]),
    ]
    if comparison is not None:
        lines += ["", f"CPU side: {machine_description('cpu')}"]
    lines += ["", "## bf16 against float32 on the GPU (the precision study's few-shot problem, seed 0)", ""]
    if bf16 is not None:
        from studies.precision.gpu import bf16_table

        lines += bf16_table(bf16)
    else:
        lines.append(str(bf16_skipped))
    report = "\n".join(lines)
    print("\n" + report)
    record = {
        "machine": machine,
        "cpu_machine": machine_description("cpu") if comparison is not None else None,
        "settings": {
            "device": args.device,
            "dataset": dataset,
            "root": root if dataset == "omniglot" else None,
            "ways": WAYS,
            "shots": shots,
            "queries": shots,
            "meta_batch_size": META_BATCH,
            "seed": SEED,
            "estimators": estimators,
            "inner_steps": inner_steps,
            "steps": args.steps,
            "rounds": args.rounds,
            "argv": list(sys.argv[1:] if argv is None else argv),
        },
        "seconds": seconds,
        "steps": steps,
        "cpu_vs_gpu": comparison,
        "cpu_vs_gpu_skipped": skipped,
        "bf16": bf16,
        "bf16_skipped": bf16_skipped,
    }
    out = Path(args.out)
    write_json(out / "gpu_check.json", record)
    write_text(out / "gpu_check.md", report + "\n")
    print(f"\nwrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return record
