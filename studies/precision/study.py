"""The precision study: what bf16 (Lightning's ``bf16-mixed``) does to each estimator's hypergradient, and its cost.

Run from the repository root::

    python -m studies.precision run      # the missing records, then the report (about 10 minutes on one thread)
    python -m studies.precision run --only-timing   # redo the timings only (e.g. on a quiet machine)
    python -m studies.precision report   # the report from the records found

For each problem (:mod:`studies.precision.problems`: ``fewshot``, the paper's model on the bundled digits; ``cnn``,
the horizon study's CNN at a short horizon), each estimator (a spec string) and each seed, one record holds the
hypergradient's norm in float64, float32 and bf16 and the comparisons (:mod:`studies.precision.measure`): the cosine
and norm ratio of bf16's to float32's, and of float32's to float64's as the yardstick of what precision costs. An
estimator that refuses a problem, or whose hypergradient is zero there, is recorded as skipped with the reason.

Timing (seed 0 of each problem): seconds per hypergradient in float32 and in bf16, side by side in ``--rounds``
interleaved rounds in this one process on one thread (:func:`~studies.precision.measure.time_pair`), with the load
averages of ``/proc/loadavg`` before and after; ``run --only-timing`` redoes every timing record (overwriting those
of the same problem settings) and touches nothing else.

Once: what each of Lightning's ``trainer.precision`` settings does to a training step on the CPU, and whether the
study's bf16 equals ``bf16-mixed``'s (:mod:`studies.precision.lightning_check`).

Records (JSON, each written atomically, so that an interrupted run resumes where it stopped):
``<out>/<problem>/<estimator>-seed<s>.json``, ``<out>/timing/<problem>/<estimator>.json`` and ``<out>/lightning.json``;
rerunning skips the records found; a record made with other settings is refused. ``report`` writes
``<out>/precision.md`` from the records and starts no work. Every run uses one thread (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from studies.common import (
    FolderBusy,
    Progress,
    StudyParser,
    estimator_spec,
    folder_lock,
    log,
    machine_description,
    require_positive,
    writable_folder,
    write_json,
    write_text,
)
from studies.precision.measure import MEASURED, measure, pair_key, time_pair
from studies.precision.problems import CNNProblem, CNNProblemSettings, FewShotProblem, FewShotSettings, cnn_splits

PROG = "python -m studies.precision"
OUT = "studies/precision/results"
PROBLEMS = ("fewshot", "cnn")
DEFAULT_ESTIMATORS = (
    "fo",
    "t1t2",
    "t1t2_fd",
    "greedy(0.99)",
    "greedy_fd(0.99)",
    "sama",
    "rmd",
    "rmd(checkpoint_every='sqrt')",
    "mixed_rmd",
    "truncated_rmd(5)",
    "cg(5)",
)
THREADS = 1
TIMING_SEED = 0
BF16 = (
    "torch.autocast(device_type='cpu', dtype=torch.bfloat16, cache_enabled=False) around the whole hypergradient "
    "call, as Lightning's bf16-mixed wraps training_step"
)
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")
"""The CPU's flags for bf16 and fp16 arithmetic that the records note (what CPU autocast can run natively)."""


# ---------------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = StudyParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "action",
        nargs="?",
        choices=("run", "report"),
        default="run",
        help="run: the missing records, then the report (default); report: the report only",
    )
    parser.add_argument(
        "--out", type=writable_folder, default=OUT, help=f"results folder (default {OUT}); checked before any work"
    )
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS), help="default: both")
    parser.add_argument(
        "--estimators", nargs="+", type=estimator_spec, default=list(DEFAULT_ESTIMATORS), metavar="SPEC",
        help=f"estimator spec strings (default: {' '.join(DEFAULT_ESTIMATORS)})",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3, help="seeds per problem and estimator (default 3)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    parser.add_argument(
        "--only-timing",
        action="store_true",
        help="redo the timing records only (overwriting those of the same problem settings); nothing else",
    )
    few, cnn = FewShotSettings(), CNNProblemSettings()
    parser.add_argument(
        "--image-size", type=int, default=few.image_size, help=f"fewshot: image side ({few.image_size})"
    )
    parser.add_argument("--meta-batch", type=int, default=few.meta_batch, help=f"fewshot: tasks ({few.meta_batch})")
    parser.add_argument(
        "--inner-steps", type=int, default=few.inner_steps, help=f"fewshot: inner steps T ({few.inner_steps})"
    )
    parser.add_argument("--cnn-steps", type=int, default=cnn.steps, help=f"cnn: horizon T ({cnn.steps})")
    parser.add_argument("--characters", type=int, default=cnn.characters, help=f"cnn: classes ({cnn.characters})")
    parser.add_argument(
        "--data", choices=("omniglot", "synthetic"), default=cnn.data,
        help="cnn: Omniglot (default), or generated images of the same shapes (no files needed)",
    )  # fmt: skip
    parser.add_argument(
        "--root", default=None, help="cnn: Omniglot's folder (default $OMNIGLOT_ROOT, else ../shared/data/omniglot)"
    )
    args = parser.parse_args(argv)
    require_positive(parser, args, "seeds", "rounds", "image_size", "meta_batch", "inner_steps")
    if args.cnn_steps < 2 or args.characters < 2:
        parser.error("--cnn-steps and --characters must be at least 2")
    if args.image_size < 8:
        parser.error(f"--image-size must be at least 8 (three 2x2 poolings), got {args.image_size}")
    if args.only_timing and args.action == "report":
        parser.error("--only-timing goes with run")
    args.estimators = list(dict.fromkeys(args.estimators))
    args.problems = list(dict.fromkeys(args.problems))
    return args


def fewshot_settings(args: argparse.Namespace) -> FewShotSettings:
    return FewShotSettings(image_size=args.image_size, meta_batch=args.meta_batch, inner_steps=args.inner_steps)


def cnn_settings(args: argparse.Namespace) -> CNNProblemSettings:
    return CNNProblemSettings(data=args.data, characters=args.characters, steps=args.cnn_steps)


def problem_settings(args: argparse.Namespace, problem: str) -> dict[str, Any]:
    return (fewshot_settings(args) if problem == "fewshot" else cnn_settings(args)).as_dict()


def record_settings(args: argparse.Namespace, problem: str) -> dict[str, Any]:
    """What an accuracy record depends on besides its estimator and seed (a record made with others is refused)."""
    return {"problem": problem_settings(args, problem), "precisions": list(MEASURED), "bf16": BF16, "threads": THREADS}


def timing_settings(args: argparse.Namespace, problem: str) -> dict[str, Any]:
    """What a timing record depends on (its number of rounds is a measurement setting, kept beside)."""
    return {"problem": problem_settings(args, problem), "seed": TIMING_SEED, "bf16": BF16, "threads": THREADS}


def lightning_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"problem": problem_settings(args, "fewshot"), "seed": 0, "threads": THREADS}


# ---------------------------------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------------------------------


def _name(spec: str) -> str:
    return spec.replace(" ", "")


def record_path(out: Path, problem: str, spec: str, seed: int) -> Path:
    return out / problem / f"{_name(spec)}-seed{seed}.json"


def timing_path(out: Path, problem: str, spec: str) -> Path:
    return out / "timing" / problem / f"{_name(spec)}.json"


def lightning_path(out: Path) -> Path:
    return out / "lightning.json"


def read_record(path: Path) -> dict[str, Any]:
    """A record, or ``SystemExit`` (one line) naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {path} is no JSON record ({error}); delete it to redo it") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise SystemExit(f"error: {path} is no record of this study (no settings); delete it to redo it")
    return data


def check_settings(path: Path, data: dict[str, Any], expected: dict[str, Any]) -> None:
    """``SystemExit`` (one line) naming the settings that differ when ``data`` was made with others."""
    if data["settings"] != expected:
        found = data["settings"]
        differ = sorted(k for k in {*expected, *found} if found.get(k) != expected.get(k))
        if "problem" in differ and isinstance(found.get("problem"), dict):
            inner, want = found["problem"], expected["problem"]
            differ.remove("problem")
            differ += sorted(f"problem.{k}" for k in {*want, *inner} if inner.get(k) != want.get(k))
        raise SystemExit(
            f"error: {path} was made with other settings ({', '.join(differ)} differ): use another --out, or delete "
            "the records to redo them"
        )


def machine() -> dict[str, Any]:
    """The machine's description and its CPU's bf16/fp16 flags."""
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith("flags")), "")
        flags = [flag for flag in CPU_FLAGS if flag in line.split()]
    except OSError:
        pass
    return {"description": machine_description("cpu"), "cpus": os.cpu_count(), "cpu_flags": flags}


# ---------------------------------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------------------------------


class Problems:
    """The problems of each seed, built on first use (the CNN's data loaded once)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.built: dict[tuple[str, int], Any] = {}
        self.splits: Any = None

    def get(self, problem: str, seed: int) -> Any:
        if (problem, seed) not in self.built:
            if problem == "fewshot":
                self.built[problem, seed] = FewShotProblem(fewshot_settings(self.args), seed)
            else:
                if self.splits is None:
                    self.splits = cnn_splits(cnn_settings(self.args), self.args.root)
                self.built[problem, seed] = CNNProblem(cnn_settings(self.args), seed, self.splits)
        return self.built[problem, seed]


def _refuse_other_settings(args: argparse.Namespace, out: Path) -> None:
    for problem in args.problems:
        for spec in args.estimators:
            if not args.only_timing:
                for seed in range(args.seeds):
                    path = record_path(out, problem, spec, seed)
                    if path.exists():
                        check_settings(path, read_record(path), record_settings(args, problem))
            path = timing_path(out, problem, spec)
            if path.exists():
                check_settings(path, read_record(path), timing_settings(args, problem))
    path = lightning_path(out)
    if not args.only_timing and path.exists():
        check_settings(path, read_record(path), lightning_settings(args))


def _summary(record: dict[str, Any]) -> str:
    if record["status"] != "done":
        return f"skipped ({record['reason'][:100]})"
    bf, f32 = record[pair_key("bf16", "float32")], record[pair_key("float32", "float64")]
    return f"bf16/f32 cosine {bf['cosine']:.4f}, norm ratio {bf['norm_ratio']:.4f}; f32/f64 cosine {f32['cosine']:.8f}"


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _refuse_other_settings(args, out)
    torch.set_num_threads(THREADS)
    problems = Problems(args)
    started = time.perf_counter()
    if not args.only_timing:
        if not lightning_path(out).exists() and "fewshot" in args.problems:
            log("lightning: one training step per trainer.precision setting")
            from studies.precision import lightning_check

            result = lightning_check.check(problems.get("fewshot", 0))
            write_json(lightning_path(out), {"settings": lightning_settings(args), **result, "machine": machine()})
        todo = [
            (problem, spec, seed)
            for problem in args.problems
            for spec in args.estimators
            for seed in range(args.seeds)
            if not record_path(out, problem, spec, seed).exists()
        ]
        total = len(args.problems) * len(args.estimators) * args.seeds
        log(f"accuracy: {total - len(todo)} of {total} records found; {len(todo)} to do")
        progress = Progress(len(todo))
        for problem, spec, seed in todo:
            record = {
                "problem": problem,
                "estimator": spec,
                "seed": seed,
                "settings": record_settings(args, problem),
                **measure(problems.get(problem, seed), spec),
                "machine": machine(),
            }
            write_json(record_path(out, problem, spec, seed), record)
            progress.step(f"{problem} {spec} seed {seed}: {_summary(record)}")
    timed = [
        (problem, spec)
        for problem in args.problems
        for spec in args.estimators
        if args.only_timing or not timing_path(out, problem, spec).exists()
    ]
    log(f"timing: {len(timed)} to do, {args.rounds} rounds each, {THREADS} thread")
    progress = Progress(len(timed))
    for problem, spec in timed:
        timing = time_pair(problems.get(problem, TIMING_SEED), spec, args.rounds)
        record = {
            "problem": problem,
            "estimator": spec,
            "settings": timing_settings(args, problem),
            "rounds": args.rounds,
            **timing,
            "machine": machine(),
        }
        write_json(timing_path(out, problem, spec), record)
        line = f"bf16/f32 time {timing['ratio']:.2f}" if timing["status"] == "done" else "skipped"
        progress.step(f"timing {problem} {spec}: {line}")
    log(f"run took {time.perf_counter() - started:.0f} s")
    return report(args)


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------


def _cosine(value: float) -> str:
    """A cosine to 5 decimals: ``0.99781``."""
    return f"{value:.5f}"


def _near_one(value: float) -> str:
    """A cosine that may be within 1e-4 of 1, as ``1 − 3e-09`` there (so that float32's distance to float64 shows),
    else to 4 decimals."""
    gap = 1.0 - value
    if gap < 1e-4:
        return "1" if gap <= 0 else f"1 − {gap:.0e}"
    return f"{value:.4f}"


def _spread(values: list[float], fmt: Any) -> str:
    """The median and, over two or more values, the range: ``0.9978 (0.9970 to 0.9985)``."""
    if not values:
        return "n/a"
    median = fmt(statistics.median(values))
    if len(values) < 2:
        return median
    return f"{median} ({fmt(min(values))} to {fmt(max(values))})"


def _ratio(value: float) -> str:
    return f"{value:.4f}"


def _load_records(args: argparse.Namespace, out: Path, problem: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for spec in args.estimators:
        for seed in range(args.seeds):
            path = record_path(out, problem, spec, seed)
            if path.exists():
                data = read_record(path)
                check_settings(path, data, record_settings(args, problem))
                found.setdefault(spec, []).append(data)
    return found


def _timing(args: argparse.Namespace, out: Path, problem: str, spec: str) -> dict[str, Any] | None:
    path = timing_path(out, problem, spec)
    if not path.exists():
        return None
    data = read_record(path)
    check_settings(path, data, timing_settings(args, problem))
    return data


def problem_table(args: argparse.Namespace, out: Path, problem: str) -> tuple[list[str], list[str], list[float]]:
    """The table of ``problem``, its skipped estimators (with reasons) and its load averages."""
    records = _load_records(args, out, problem)
    lines = [
        "| estimator | bf16 vs float32: cosine | norm ratio | float32 vs float64: cosine | norm ratio | "
        "float32 ms | bf16 ms | time bf16 / float32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    skipped: list[str] = []
    loads: list[float] = []
    for spec in args.estimators:
        runs = records.get(spec, [])
        timing = _timing(args, out, problem, spec)
        if timing is not None and timing["status"] == "done":
            ms = {p: f"{1000 * timing['median_seconds'][p]:.0f}" for p in ("float32", "bf16")}
            rounds = timing["round_ratios"]
            time_cell = f"{timing['ratio']:.2f} ({min(rounds):.2f} to {max(rounds):.2f})"
            loads += [float(load.split()[0]) for load in (timing["loadavg_start"], timing["loadavg_end"]) if load]
        else:
            ms, time_cell = {"float32": "", "bf16": ""}, "n/a"
        done = [r for r in runs if r["status"] == "done"]
        reasons = list(dict.fromkeys(r["reason"] for r in runs if r["status"] != "done"))
        if reasons:
            skipped.append(f"- `{spec}`: {'; '.join(reasons)}")
        if not done:
            cell = "skipped" if reasons else "no record"
            lines.append(f"| `{spec}` | {cell} | | | | {ms['float32']} | {ms['bf16']} | {time_cell} |")
            continue

        def values(pair: str, key: str, done: list[dict[str, Any]] = done) -> list[float]:
            return [r[pair][key] for r in done if r[pair][key] is not None]

        bf, f32 = pair_key("bf16", "float32"), pair_key("float32", "float64")
        seeds = "" if len(done) == args.seeds else f" ({len(done)} of {args.seeds} seeds)"
        cells = [
            _spread(values(pair, key), fmt)
            for pair, cosine in ((bf, _cosine), (f32, _near_one))
            for key, fmt in (("cosine", cosine), ("norm_ratio", _ratio))
        ]
        lines.append(f"| `{spec}`{seeds} | {' | '.join(cells)} | {ms['float32']} | {ms['bf16']} | {time_cell} |")
    return lines, skipped, loads


def lightning_table(out: Path, args: argparse.Namespace) -> list[str]:
    path = lightning_path(out)
    if not path.exists():
        return ["No record of the Lightning check (it runs with the `fewshot` problem)."]
    data = read_record(path)
    check_settings(path, data, lightning_settings(args))
    lines = [
        f"One training step of the `fewshot` model (seed 0, `{data['estimator']}`) through `Trainer(accelerator='cpu', "
        "precision=...).fit`; the hypergradient the step applied against the study's own.",
        "",
        "| `trainer.precision` | Lightning runs | BilevelModule | hypergradient | cosine to float32's | "
        "bit for bit the study's |",
        "|---|---|---|---|---:|---:|",
    ]
    for row in data["rows"]:
        ran = row["ran"]
        runs_as = row["trainer_precision"] or "refused"
        if row["warnings"]:
            runs_as += " (warns: " + " ".join(f"“{w}”" for w in row["warnings"]) + ")"
        module = "runs" if ran else f"refuses: “{row['error']}”"
        cosine = _near_one(row["vs_study_float32"]["cosine"]) if ran else ""
        same = []
        if ran:
            same = [p for p in ("float32", "bf16") if row["max_abs_diff_to_study"][p] == 0.0]
            same += ["float64"] if row["vs_study_float64"]["rel_error"] == 0.0 else []
        diff = ", ".join(same) or ("none" if ran else "")
        lines.append(
            f"| `{row['setting']}` | {runs_as} | {module} | {row['hypergrad_dtype'] or 'none'} | {cosine} | {diff} |"
        )
    fp16 = data["fp16_autocast"]
    lines.append("")
    if fp16["torch_cpu_autocast_float16"]:
        c = fp16["fp16_vs_float32"]
        lines.append(
            "torch's own CPU autocast does run float16 (`torch.autocast('cpu', dtype=torch.float16)`), which no "
            f"Lightning setting uses on the CPU: `{fp16['estimator']}`'s hypergradient in it, without loss scaling, "
            f"has cosine {_near_one(c['cosine'])} and norm ratio {c['norm_ratio']:.4f} to float32's, "
            f"{'finite' if fp16['finite'] else 'NOT finite'}, at {fp16['time_ratio']:.1f}x float32's time "
            "(one call each; this CPU has no native float16 arithmetic)."
        )
    else:
        lines.append(f"torch's CPU autocast does not run float16 here: {fp16['error']}.")
    return lines


def command(args: argparse.Namespace) -> str:
    """The ``run`` command of these records: the options that differ from their defaults."""
    defaults = parse_args([])
    parts = [f"{PROG} run"]
    for key in ("out", "problems", "estimators", "seeds", "rounds", "image_size", "meta_batch", "inner_steps",
                "cnn_steps", "characters", "data", "root"):  # fmt: skip
        value = getattr(args, key)
        if value != getattr(defaults, key):
            shown = " ".join(f'"{v}"' if "(" in str(v) else str(v) for v in value) if isinstance(value, list) else value
            parts.append(f"--{key.replace('_', '-')} {shown}")
    return " ".join(parts)


def report(args: argparse.Namespace) -> int:
    out = Path(args.out)
    title = {"fewshot": "Few-shot (the paper's model on the digits)", "cnn": "The horizon study's CNN"}
    sections, machines = [], set()
    for problem in args.problems:
        table, skipped, loads = problem_table(args, out, problem)
        settings = problem_settings(args, problem)
        sections += [
            f"## {title[problem]}",
            "",
            "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + f"; seeds 0 to {args.seeds - 1}.",
            "",
            *table,
            "",
        ]
        if skipped:
            sections += ["Skipped:", "", *skipped, ""]
        if loads:
            sections += [
                f"The 1-minute load average was {min(loads):.1f} to {max(loads):.1f} at the starts and ends of these "
                "timings (each timing's 1, 5 and 15 minute load averages before and after are in its record).",
                "",
            ]
        for path in [*(out / problem).glob("*.json"), *(out / "timing" / problem).glob("*.json")]:
            data = read_record(path)
            if "machine" in data:
                machines.add(json.dumps(data["machine"], sort_keys=True))
    described = [json.loads(m) for m in sorted(machines)]
    text = "\n".join([
        "# Precision study: bf16 against float32, float32 against float64",
        "",
        f"Command: `{command(args)}` (records in `{out.as_posix()}/`; with `report` for `run` it rewrites this file "
        "from the records alone). "
        "Cosines and norm ratios: the median over the seeds, with the range; "
        "norm ratio: |bf16| / |float32| and |float32| / |float64|. "
        f"bf16: {BF16}. Timing: seed 0, the median of the interleaved rounds, in ms per hypergradient "
        "(few-shot: the whole meta-batch), with the range of the rounds' ratios; one thread.",
        "",
        "Machine: " + "; ".join(
            f"{m['description']}"
            + (f"; {m['cpus']} CPUs" if m.get("cpus") else "")
            + f"; CPU flags: {', '.join(m['cpu_flags']) or 'none of ' + ', '.join(CPU_FLAGS)}"
            for m in described
        ) if described else "Machine: no records yet.",
        "",
        *sections,
        "## Lightning's precision settings on the CPU",
        "",
        *lightning_table(out, args),
        "",
    ])  # fmt: skip
    write_text(out / "precision.md", text)
    print(text)
    log(f"wrote {out / 'precision.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.action == "report":
        return report(args)
    try:
        with folder_lock(args.out):
            return run(args)
    except FolderBusy as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log("interrupted; the records written so far stay: rerun the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
