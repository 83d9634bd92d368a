"""Whole-network MAML with the exact (second-order) meta-gradient: peak memory and seconds per outer step of our exact
methods against higher and TorchOpt, side by side in one process.

Run from the repository root (higher and TorchOpt from ``.peers/``: ``bash scripts/install_peers.sh``)::

    python -m studies.scale.maml run [--steps 1 5 20] [--rounds 5] [--meta-batch 32] [--width 64] [--quick]
    python -m studies.scale.maml report [--out studies/scale/results_maml] [--quick]

The problem is the compile study's protocol (:class:`studies.compile.study.Protocol`): Omniglot's canonical few-shot
setting, 5-way 1-shot, 1 query image per class, a meta-batch of 32 tasks of random 28 x 28 images (drawn once, the
same for every method), the conv 4 x 64 network (``--width``), plain SGD with learning rate 0.4 in the inner loop,
at T = 1, 5 and 20 inner steps (``--steps``). What is timed: one outer step's meta-gradient, the mean over the
meta-batch of the exact (second-order) hypergradient of the initialization, every task's inner loop included, no
outer optimizer update. The methods, every one from the same initial weights:

- ours: ``lh.MAML``'s ``meta_gradient(tasks, estimator)`` with ``rmd``, ``rmd(checkpoint_every='sqrt')``,
  ``mixed_rmd`` and ``mixed_rmd(checkpoint_every='sqrt')``, and ``rmd`` once more on a copy of the model without
  the query accuracy it computes for its logs (:data:`BARE`: the peers compute none);
- ``higher``: ``innerloop_ctx(net, SGD(lr), copy_initial_weights=False, track_higher_grads=True)`` per task, the T
  differentiable steps, then the query loss's ``backward`` into the initial weights (its MAML Omniglot example), the
  gradients divided by the number of tasks;
- ``torchopt``: TorchOpt's functional API (``torchopt.sgd``, ``update(..., inplace=False)``, ``apply_updates(...,
  inplace=False)``), the network called through ``torch.func.functional_call``, the inner gradient taken with
  ``create_graph=True``, the query loss's ``backward`` into the initial weights, divided by the number of tasks.

Batch norm: ``lh.MAML``'s inner model normalizes every call with the statistics of the batch it is given and neither
reads nor updates the running statistics (:mod:`lightning_hypergrad.inner_model`); the peers get a copy of the same
network whose batch norm layers track no running statistics, in training mode, which computes the same function.

Before any timing every method's meta-gradient is compared in float64 with ``rmd``'s on a small protocol (meta-batch
2, width 8, T = 2): the study refuses to time where one differs by more than 1e-10 of the largest entry, and records
it. In float32 at the measured protocol each method's cosine to ``rmd``'s meta-gradient is recorded.

Per T, each method: a first call (the warm-up, and its float32 gradient), then the peak memory of one meta-gradient
(:class:`studies.common.LiveTensorPeak`: the peak of live tensor bytes created during the call, counted operation by
operation, no event log), then ``--rounds`` interleaved rounds, each running every method of that T once in an order
rotated from round to round (:func:`studies.compile.study.time_rounds`), on one torch thread. Reported: the median and
interquartile range of the seconds, and of the per-round (paired) ratios to ``rmd`` and to the fastest peer. A method
is skipped at a T where its median seconds at its largest smaller T, times the ratio of the horizons, exceed
``--max-seconds`` (120), said so in the record. ``/proc/loadavg`` before and after.

The record is ``maml.json`` (``maml_quick.json`` with ``--quick``), written atomically; ``report`` writes ``maml.md``
from it, with the issue's target: at T = 1, ours fastest exact form no slower than the fastest peer. Before any work
an ``--out`` that cannot be written is refused, and ``run`` holds ``--out``'s ``.maml.lock`` (``.maml_quick.lock``)
while it measures (:func:`studies.common.run_alone`).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import lightning_hypergrad as lh
from studies.common import (
    Progress,
    StudyParser,
    log,
    machine_description,
    memory_meter,
    report_from_record,
    require_positive,
    run_alone,
    writable_folder,
    write_json,
    write_text,
)
from studies.compile.report import _fmt, protocol_text
from studies.compile.study import (
    Case,
    Method,
    Protocol,
    _copy,
    _timed,
    _version,
    agreement,
    higher_maml,
    loadavg,
    make_tasks,
    ours_model,
    summarize,
    time_rounds,
    torchopt_maml,
)
from studies.peers.study import PEERS_DIR, import_peers
from studies.scale.study import OURS, mib, relative_difference

PROG = "python -m studies.scale.maml"
OUT = "studies/scale/results_maml"
PEERS = {
    "higher": "higher innerloop_ctx(track_higher_grads=True)",
    "torchopt": "TorchOpt sgd (functional, create_graph=True)",
}
BARE = "rmd, no task metric"
"""``rmd`` on a copy of the model that computes no task metric: ``lh.MAML`` also computes each task's query accuracy
after its inner loop, for its logs (from the outer loss's query logits where they can be reused, else with one more
forward pass of the query set), which the peers' loops do not; this row computes what they compute."""
METHODS = (*OURS, BARE, *PEERS)
REFERENCE = "rmd"
TOLERANCE = 1e-10
"""The largest difference to ``rmd``'s meta-gradient in float64, relative to its largest entry, before any timing."""
CHECK = {"meta_batch": 2, "width": 8, "steps": (2,)}
"""The small protocol of the float64 agreement check."""
DEFAULTS = {"steps": (1, 5, 20), "rounds": 5}
QUICK = {"meta_batch": 2, "width": 4, "steps": (1, 2), "rounds": 2}
PEER_TARGET = 1.0
"""At T = 1, ours fastest exact form at most this many times the fastest peer's seconds per outer step."""
OUTER_STEP = (
    "one meta-gradient: the mean exact (second-order) hypergradient of the initialization over the meta-batch's "
    "tasks, every task's inner loop included, no outer optimizer update"
)
PROBLEM = "maml"


# ---------------------------------------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------------------------------------


def batch_statistics_copy(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """A copy of ``module`` (the same weights; ``memo`` maps each original tensor's id to its copy) whose batch norm
    layers normalize with each batch's statistics and keep no running statistics, in training mode: the function
    that ``lh.MAML``'s inner model computes."""
    net = _copy(module, memo)
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            m.track_running_stats = False
    return net.train()


def higher_exact(higher: Any, net: nn.Module, targets: list[Tensor], tasks: list, steps: int, lr: float) -> Callable:
    """higher's second-order MAML: the compile study's :func:`~studies.compile.study.higher_maml` with
    ``track_higher_grads=True``."""
    return higher_maml(higher, net, targets, tasks, steps, lr, track_higher_grads=True)


def torchopt_exact(
    torchopt: Any, net: nn.Module, targets: list[Tensor], tasks: list, steps: int, lr: float
) -> Callable:
    """TorchOpt's functional API with the inner gradient taken with ``create_graph=True`` (second order): the compile
    study's :func:`~studies.compile.study.torchopt_maml`, second order."""
    return torchopt_maml(torchopt, net, targets, tasks, steps, lr, create_graph=True)


def ours_exact(model: lh.BilevelModule, tasks: list, spec: str) -> Callable[[], list[Tensor]]:
    estimator = lh.get_estimator(spec)

    def run() -> list[Tensor]:
        return model.meta_gradient(tasks, estimator).hypergrads

    return run


def in_dtype(tasks: list[dict[str, Tensor]], dtype: torch.dtype) -> list[dict[str, Tensor]]:
    return [{k: v.to(dtype) if v.is_floating_point() else v for k, v in task.items()} for task in tasks]


def maml_case(
    protocol: Protocol, steps: int, tasks: list, peers: dict[str, Any], dtype: torch.dtype = torch.float32
) -> Case:
    """Every method's meta-gradient at ``steps`` as a case (``rmd`` first, the reference), from the same initial
    weights (the protocol's seed) in ``dtype``; ``tasks`` already in ``dtype``."""
    torch.manual_seed(protocol.seed)
    model = ours_model(PROBLEM, protocol, steps, compile_losses=False).to(dtype)
    methods = [Method(spec, "ours", ours_exact(model, tasks, spec), estimator=spec) for spec in OURS]
    bare = copy.deepcopy(model)
    bare.task_metrics = lh.BilevelModule.task_metrics.__get__(bare)  # none: the module's default
    methods.append(Method(BARE, "ours", ours_exact(bare, tasks, REFERENCE), estimator=REFERENCE))
    builders = {"higher": higher_exact, "torchopt": torchopt_exact}
    for peer, build in builders.items():
        if peer not in peers:
            continue
        memo: dict[int, Any] = {}
        net = batch_statistics_copy(model.inner_model.module, memo)
        targets = [memo[id(p)] for p in model.hyperparameters()]
        methods.append(Method(peer, "peer", build(peers[peer], net, targets, tasks, steps, protocol.inner_lr)))
    return Case(PROBLEM, steps, methods)


# ---------------------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------------------


def check_agreement(peers: dict[str, Any]) -> dict[str, Any]:
    """Every method's meta-gradient against ``rmd``'s in float64 on the small protocol :data:`CHECK`: the largest
    entry of their difference over the largest entry of ``rmd``'s; ``failures`` names those above
    :data:`TOLERANCE`."""
    protocol = replace(Protocol(), **CHECK)
    steps = protocol.steps[0]
    case = maml_case(protocol, steps, in_dtype(make_tasks(protocol), torch.float64), peers, torch.float64)
    reference = [g.detach().clone() for g in case.methods[0].run()]
    rows = []
    for method in case.methods[1:]:
        try:
            difference = relative_difference([g.detach() for g in method.run()], reference)
        except Exception as error:  # noqa: BLE001 (a method that fails is recorded as disagreeing, not fatal)
            rows.append({"method": method.name, "relative_difference": None,
                         "error": f"{type(error).__name__}: {error}".splitlines()[0]})  # fmt: skip
            continue
        rows.append({"method": method.name, "relative_difference": difference})
    failures = []
    for row in rows:
        if row.get("error"):
            failures.append(f"{row['method']}: {row['error']}")
        elif not row["relative_difference"] <= TOLERANCE:
            failures.append(f"{row['method']} differs from {REFERENCE} by {row['relative_difference']:.1e} of its "
                            "largest entry")  # fmt: skip
    return {"protocol": protocol.as_record(), "T": steps, "dtype": "float64", "reference": REFERENCE,
            "tolerance": TOLERANCE, "rows": rows, "failures": failures}  # fmt: skip


def predicted_seconds(rows: list[dict[str, Any]], method: str, steps: int) -> tuple[float, int] | None:
    """The median seconds of ``method`` at its largest T below ``steps`` that was timed, times the ratio of the
    horizons, and that T; ``None`` where there is none."""
    below = [r for r in rows if r["method"] == method and r["T"] < steps and r["status"] == "timed"]
    if not below:
        return None
    done = max(below, key=lambda r: r["T"])
    return done["summary"]["median"] * steps / done["T"], done["T"]


def skip_reason(rows: list[dict[str, Any]], method: str, steps: int, max_seconds: float) -> str | None:
    """Why ``method`` is not run at ``steps`` (``None``: it is): skipped at a smaller T already, or predicted
    (:func:`predicted_seconds`) to take more than ``max_seconds`` per call."""
    earlier = [r["T"] for r in rows if r["method"] == method and r["T"] < steps and r["status"] == "skipped"]
    if earlier:
        return f"skipped at T = {max(earlier)} already"
    prediction = predicted_seconds(rows, method, steps)
    if prediction is not None and prediction[0] > max_seconds:
        return f"predicted {prediction[0]:.0f} s per call (from T = {prediction[1]}) > --max-seconds {max_seconds:g}"
    return None


def _row(method: Method, steps: int) -> dict[str, Any]:
    """A method's row at one T (``name``: the compile study's key, taken off after its summaries)."""
    return {"method": method.name, "name": method.name, "label": PEERS.get(method.name, method.name),
            "who": method.who, "T": steps, "status": "timed", "reason": None, "first_call_seconds": None,
            "peak_bytes": None, "agreement": None}  # fmt: skip


def measure_case(
    case: Case, rows: list[dict[str, Any]], rounds: int, max_seconds: float, progress: Progress
) -> dict[str, dict[str, Any]]:
    """One T: each method's first call (its float32 gradient's agreement with ``rmd``'s), its peak memory, then the
    interleaved rounds and their summaries; ``rows`` holds the smaller T's rows (for the skips)."""
    meter = memory_meter(torch.device("cpu"), "live")
    these: dict[str, dict[str, Any]] = {}
    reference: list[Tensor] | None = None
    for method in case.methods:
        key = case.key(method)
        row = these[key] = _row(method, case.steps)
        why = skip_reason(rows, method.name, case.steps, max_seconds)
        if why is not None:
            row.update(status="skipped", reason=why)
            progress.step(f"{key}: skipped ({why})", work=2)
            continue
        try:
            row["first_call_seconds"], grads = _timed(method.run)
            row["peak_bytes"] = int(meter.measure(method.run))
        except Exception as error:  # noqa: BLE001 (a method that fails is recorded and left out, not fatal)
            row.update(status="failed", reason=f"{type(error).__name__}: {error}".splitlines()[0])
            progress.step(f"{key}: failed ({row['reason']})", work=2)
            continue
        if method.name == REFERENCE:
            reference = grads
        row["agreement"] = agreement(grads, reference) if reference is not None else None
        cosine = row["agreement"]["cosine"] if row["agreement"] else None
        progress.step(f"{key}: {mib(row['peak_bytes'])} MiB, first call {row['first_call_seconds']:.2f} s, cosine "
                      f"to {REFERENCE} {'n/a' if cosine is None else f'{cosine:.6f}'}", work=2)  # fmt: skip
    time_rounds([case], these, rounds, progress)
    summarize([case], these)
    for row in these.values():  # the compile study's names: of the method, of the ratio to its first method
        row.pop("name")
        if "ratio_to_ours_eager" in row:
            row["ratio_to_rmd"] = row.pop("ratio_to_ours_eager")
    return these


def fastest_peers(rows: list[dict[str, Any]]) -> dict[str, str | None]:
    """The fastest timed peer at each T (by median seconds), ``"T=1" -> name``."""
    out: dict[str, str | None] = {}
    for steps in sorted({r["T"] for r in rows}):
        peers = [r for r in rows if r["T"] == steps and r["who"] == "peer" and r["status"] == "timed"]
        out[f"T={steps}"] = min(peers, key=lambda r: r["summary"]["median"])["method"] if peers else None
    return out


def record_path(out: str | Path, quick: bool) -> Path:
    """The record in ``out``: ``maml.json``, or ``maml_quick.json`` for ``--quick``."""
    return Path(out) / ("maml_quick.json" if quick else "maml.json")


def run_study(
    protocol: Protocol, rounds: int, max_seconds: float, out: Path, quick: bool, peers_dir: str
) -> tuple[dict[str, Any], int]:
    """Checks the agreement, measures, writes the record and the report; returns the record and the exit status (1
    where the float64 agreement failed, nothing then timed, or where a method failed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_before = loadavg()
        started = time.perf_counter()
        peers, missing = import_peers(peers_dir)
        peers = {k: v for k, v in peers.items() if k in PEERS}
        missing = {k: v for k, v in missing.items() if k in PEERS}
        for reason in missing.values():
            log(f"note: {reason}: left out")
        log(f"maml: float64 agreement with {REFERENCE} (meta-batch {CHECK['meta_batch']}, width {CHECK['width']}, "
            f"T = {CHECK['steps'][0]})")  # fmt: skip
        check = check_agreement(peers)
        rows: list[dict[str, Any]] = []
        refused = None
        if check["failures"]:
            refused = "the float64 agreement with rmd failed: " + "; ".join(check["failures"]) + "; nothing timed"
        else:
            tasks = make_tasks(protocol)
            count = len(OURS) + 1 + len(peers)
            units = len(protocol.steps) * (count + rounds)
            progress = Progress(units, work=len(protocol.steps) * 2 * count * (1 + rounds))
            for steps in protocol.steps:
                case = maml_case(protocol, steps, tasks, peers)
                rows += list(measure_case(case, rows, rounds, max_seconds, progress).values())
        record = {
            "study": "scale_maml",
            "quick": quick,
            "protocol": protocol.as_record(),
            "rounds": rounds,
            "max_seconds": max_seconds,
            "threads": 1,
            "dtype": "float32",
            "outer_step": OUTER_STEP,
            "reference": REFERENCE,
            "peers": {k: PEERS[k] for k in peers},
            "meter": memory_meter(torch.device("cpu"), "live").description,
            "check": check,
            "refused": refused,
            "rows": rows,
            "fastest_peer": fastest_peers(rows),
            "failures": [f"{r['method']} T={r['T']}: {r['reason']}" for r in rows if r["status"] == "failed"],
            "missing_peers": missing,
            "versions": {name: _version(name) for name in ("torch", "higher", "torchopt")},
            "machine": machine_description("cpu"),
            "loadavg": {"before": load_before, "after": loadavg()},
            "seconds_total": time.perf_counter() - started,
        }
    finally:
        torch.set_num_threads(threads)
    path = record_path(out, quick)
    write_json(path, record)
    text = markdown(record)
    write_text(path.with_suffix(".md"), text)
    print(text)
    if refused:
        log(f"error: {refused}")
    for line in record["failures"]:
        log(f"error: {line}")
    return record, 1 if refused or record["failures"] else 0


# ---------------------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------------------


def _name(method: str) -> str:
    """A method as the report names it: a peer by its label, ours by its spec in code."""
    return PEERS.get(method, f"`{method}`")


def target(record: dict[str, Any]) -> dict[str, Any]:
    """The issue's target: at T = 1, ours fastest exact form (by median seconds) over the fastest peer, paired round
    by round, at most :data:`PEER_TARGET`; ``met`` is ``None`` where it could not be measured (``why``)."""
    rows = [r for r in record["rows"] if r["T"] == 1 and r["status"] == "timed"]
    ours = [r for r in rows if r["who"] == "ours"]
    peer = record["fastest_peer"].get("T=1")
    out: dict[str, Any] = {"ours": None, "peer": peer, "value": None, "met": None, "why": None}
    if record["refused"] or not rows:
        out["why"] = "not measured (" + ("the float64 agreement failed" if record["refused"] else "no T = 1") + ")"
    elif not ours or peer is None:
        out["why"] = "not measured (" + ("none of ours timed" if not ours else "no peer timed") + ")"
    else:
        best = min(ours, key=lambda r: r["summary"]["median"])
        out.update(ours=best["method"], value=best["ratio_to_fastest_peer"])
        out["met"] = bool(out["value"]["median"] <= PEER_TARGET)
    return out


def target_line(record: dict[str, Any]) -> str:
    """``MAML T = 1: ours fastest exact form / fastest peer <= 1.0: met ...`` or ``missed by X%``."""
    t = target(record)
    head = f"MAML T = 1: ours fastest exact form / fastest peer <= {PEER_TARGET:g}"
    if t["met"] is None:
        return f"{head}: {t['why']}"
    value = t["value"]
    ratio = f"`{t['ours']}` / {PEERS[t['peer']]}: {_fmt(value, 3)} (median [IQR] of the per-round ratios)"
    if t["met"]:
        faster = round(100 * (1 - value["median"]))
        return f"{head}: **met** ({ratio}, " + (f"{faster}% faster)" if faster else "level with it)")
    return f"{head}: **missed** by {100 * (value['median'] - PEER_TARGET):.0f}% ({ratio})"


def timing_table(record: dict[str, Any]) -> list[str]:
    """The table of every (T, method): peak MiB, seconds per outer step, the paired ratios to ``rmd`` and to the
    fastest peer, the float32 cosine to ``rmd`` (docs/scale.md shows it too)."""
    lines = [
        f"| T | method | peak MiB | s / outer step | / `{record['reference']}` | / fastest peer | cosine to "
        f"`{record['reference']}` (float32) |",
        "|---:|---|---:|---|---|---|---:|",
    ]
    for row in record["rows"]:
        name = _name(row["method"])
        cosine = (row.get("agreement") or {}).get("cosine")
        cosine_text = "-" if cosine is None else f"{cosine:.6f}"
        if row["status"] != "timed":
            lines.append(f"| {row['T']} | {name} | - | {row['status']}: {row['reason']} | - | - | - |")
            continue
        lines.append(
            f"| {row['T']} | {name} | {mib(row['peak_bytes'])} | {_fmt(row['summary'], 4)} | "
            f"{_fmt(row.get('ratio_to_rmd'), 2)} | {_fmt(row.get('ratio_to_fastest_peer'), 2)} | {cosine_text} |"
        )
    return lines


def markdown(record: dict[str, Any]) -> str:
    p, check = record["protocol"], record["check"]
    lines = ["# Whole-network MAML, exact meta-gradient: peak memory and seconds per outer step against the peers", ""]
    if record["quick"]:
        lines += ["**`--quick`: a smoke test of the study on tiny sizes, not a measurement.**", ""]
    lines += [
        f"{protocol_text(p)}, float32, {record['threads']} torch thread. Timed: "
        f"{record['outer_step']}. {record['rounds']} interleaved rounds per T after a warm-up call and the memory "
        "call, order rotated per round; median [IQR] over the rounds; ratios paired round by round (< 1: faster). "
        f"Peak memory: {record['meter']}; MiB = 2^20 bytes.",
        "",
        f"Machine: {record['machine']}. /proc/loadavg before: `{record['loadavg']['before']}`, after: "
        f"`{record['loadavg']['after']}` (the times are indicative where the load exceeds the cores). Versions: "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v)
        + ".",
        "",
        f"## Agreement with `{check['reference']}` (float64, meta-batch {check['protocol']['meta_batch']}, width "
        f"{check['protocol']['width']}, T = {check['T']}; tolerance {check['tolerance']:.0e})",
        "",
        "| method | largest difference / largest entry |",
        "|---|---:|",
    ]
    for row in check["rows"]:
        value = row["error"] if row.get("error") else f"{row['relative_difference']:.1e}"
        lines.append(f"| {_name(row['method'])} | {value} |")
    if record["refused"]:
        lines += ["", f"**Refused: {record['refused']}.**"]
    lines += ["", "## Peak memory and seconds per outer step", "", *timing_table(record)]
    fastest = ", ".join(f"{k}: {PEERS.get(v, '-') if v else '-'}" for k, v in record["fastest_peer"].items())
    lines += ["", f"Fastest peer per T: {fastest or '-'}.", "", "## The issue's target", "", "- " + target_line(record)]
    if record["failures"]:
        lines += ["", "**Methods that failed (not timed):**", ""] + [f"- {line}" for line in record["failures"]]
    if record["missing_peers"]:
        lines += ["", "Left out: " + "; ".join(record["missing_peers"].values()) + "."]
    return "\n".join(lines) + "\n"


def write_report(out: Path, quick: bool = False) -> int:
    return report_from_record(record_path(out, quick), markdown, f"{PROG} run")


# ---------------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = StudyParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="check, measure, then write the record and the report")
    run.add_argument("--steps", type=int, nargs="+", default=None, help="inner steps T (default 1 5 20; --quick: 1 2)")
    run.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5; --quick: 2)")
    run.add_argument("--meta-batch", type=int, default=None, help="tasks per outer step (default 32; --quick: 2)")
    run.add_argument("--width", type=int, default=None, help="channels of the conv blocks (default 64; --quick: 4)")
    run.add_argument("--max-seconds", type=float, default=120.0,
                     help="skip a method at a T predicted to take more seconds per call (default 120)")  # fmt: skip
    run.add_argument("--quick", action="store_true", help="a smoke test: meta-batch 2, width 4, T = 1 2, 2 rounds")
    run.add_argument("--peers-dir", default=PEERS_DIR, help="where higher and TorchOpt are installed (.peers)")
    run.add_argument("--out", type=writable_folder, default=OUT,
                     help=f"where the record and the report go (default {OUT})")  # fmt: skip
    report = commands.add_parser("report", help="write maml.md from the record")
    report.add_argument("--out", type=writable_folder, default=OUT, help=f"the record's folder (default {OUT})")
    report.add_argument("--quick", action="store_true", help="the --quick record (maml_quick.json)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.command == "report":
        return write_report(out, args.quick)
    preset = QUICK if args.quick else {**DEFAULTS, "meta_batch": Protocol.meta_batch, "width": Protocol.width}
    for name in ("steps", "rounds", "meta_batch", "width"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    require_positive(parser, args, "steps", "rounds", "meta_batch", "width")
    if args.max_seconds <= 0:
        parser.error("--max-seconds must be above 0")
    protocol = replace(Protocol(), meta_batch=args.meta_batch, width=args.width, steps=tuple(sorted(set(args.steps))))
    try:
        with run_alone(out, f".{record_path(out, args.quick).stem}.lock"):  # a second run would measure the same
            _, status = run_study(protocol, args.rounds, args.max_seconds, out, args.quick, args.peers_dir)
    except KeyboardInterrupt:
        log("interrupted: nothing recorded")
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
