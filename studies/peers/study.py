"""The project's hypergradients side by side with learn2learn, higher and TorchOpt on the same problems.

Run from the repository root, after ``bash scripts/install_peers.sh`` (higher and TorchOpt into ``.peers/``, never
into the environment; learn2learn comes with the ``fewshot`` extra)::

    python -m studies.peers [--rounds 5] [--out studies/peers/results]

Problems (the cost study's networks, random data, fixed seeds):

``anil``
    The paper's setting: the 3 x 32 conv backbone (32x32 RGB images to 512 features) is the hyperparameter, a
    linear head 512 -> 5 starting at zero takes T = 10 steps of plain SGD (lr 0.1) on each task's support features;
    4 tasks of 5-way 10-shot. Peer: learn2learn's ``MAML`` wrapped around the head (``first_order`` False: the
    project's ``rmd``; True: its ``fo``); the backbone's gradient is compared.
``maml``
    Whole-network MAML: the cost study's small conv net (1x28x28 images, 10 classes) is the inner model, its
    initialization the hyperparameter; T = 5 steps of plain SGD (lr 0.05) on each of 4 tasks' support sets (50
    images), outer loss on the query sets (50). Peer: learn2learn's ``MAML`` around the whole net, both orders.
``hpo``
    Whole-network hyperparameter optimization: the same net, one log weight decay per parameter entry (the inner
    loss is the cross-entropy of a batch of 64 plus ``0.5 sum exp(lwd) w^2``), T = 10 and 100 steps of SGD (lr
    0.05, momentum 0.9), outer loss on a validation batch of 64. Peers: higher's ``innerloop_ctx`` (with
    ``torch.optim.SGD``) and TorchOpt's ``MetaSGD``, both exact; beside them the project's ``rmd``,
    ``rmd(checkpoint_every='sqrt')``, ``greedy(0.99)`` and ``t1t2`` (these two are estimates: no equality).

Measured: the largest relative difference of each exact hypergradient to the peer's, in float64 (``max |a - b| /
max |b|`` over all entries); then in float32, the seconds of one outer step (the hypergradient, from building the
problem to the gradients in ``.grad``; median of ``--rounds`` interleaved rounds, one torch thread) and its peak
memory (live tensor bytes, ``torch.profiler``), as ratios to the peer's. A peer that cannot be imported is left out,
with the reason in the table's notes; where the table in ``--out`` holds rows that the run would not write (a peer
missing here, an ``--hpo-steps`` left out), the run refuses to start, naming them and how to install the peers
(:func:`rows_kept`): it never replaces a table by one with fewer rows.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_hypergrad as lh
from studies.common import (
    StudyParser,
    machine_description,
    memory_meter,
    require_positive,
    writable_folder,
    write_json,
    write_text,
)
from studies.cost.estimators import Task, fewshot_backbone, task_features, whole_network

PEERS_DIR = ".peers"
INSTALL = "bash scripts/install_peers.sh"
PEERS = ("learn2learn", "higher", "torchopt")
DEVICE = torch.device("cpu")
"""Where the problems run (``--device``)."""


def _on(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(DEVICE, dtype) if x.is_floating_point() else x.to(DEVICE)


def import_peers(folder: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The peers that import (``folder`` first on the path where it exists), and why the others do not."""
    folder = Path(folder)
    if folder.is_dir() and str(folder.resolve()) not in sys.path:
        sys.path.insert(0, str(folder.resolve()))
    found, missing = {}, {}
    for name in PEERS:
        try:  # quietly: learn2learn's gym prints a banner and warns on import
            with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                found[name] = importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 (any import failure means: not available here)
            missing[name] = f"{name} does not import ({type(error).__name__}: {error}); install it with {INSTALL}"
    return found, missing


# ---------------------------------------------------------------------------------------------------------------------
# the problems
# ---------------------------------------------------------------------------------------------------------------------

Grads = list[Tensor]
Method = Callable[[], Grads]
"""One outer step's hypergradient: it computes and returns the gradients of the hyperparameters."""


@dataclass
class Case:
    """A problem and the ways to compute its hypergradient: the project's and the peers'."""

    problem: str
    steps: int
    ours: dict[str, Method]
    peers: dict[str, Method]
    exact: tuple[str, ...]
    """Our methods that compute the peers' hypergradient (compared for equality)."""
    pairs: dict[str, str]
    """Each of our methods -> the peer it is set beside."""


def _tasks(generator: torch.Generator, n: int, shape: tuple[int, ...], ways: int, shots: int, queries: int):
    tasks = []
    for _ in range(n):
        ys = torch.arange(ways).repeat_interleave(shots)
        yq = torch.arange(ways).repeat_interleave(queries)
        xs = torch.randn(len(ys), *shape, generator=generator)
        xq = torch.randn(len(yq), *shape, generator=generator)
        tasks.append((xs, ys, xq, yq))
    return tasks


def _grads(params: Sequence[Tensor]) -> Grads:
    out = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return out


def anil_case(peers: dict[str, Any], dtype: torch.dtype, steps: int = 10, lr: float = 0.1) -> Case:
    torch.manual_seed(0)
    backbone = fewshot_backbone().to(DEVICE, dtype).train()
    generator = torch.Generator().manual_seed(1)
    tasks = [Task(*(_on(x, dtype) for x in t)) for t in _tasks(generator, 4, (3, 32, 32), 5, 10, 10)]
    head_init = [
        torch.zeros(5, backbone.out_features, dtype=dtype, device=DEVICE),
        torch.zeros(5, dtype=dtype, device=DEVICE),
    ]
    params = list(backbone.parameters())

    def ours(spec: str) -> Method:
        estimator = lh.get_estimator(spec)

        def run() -> Grads:
            for task in tasks:
                problem = lh.BilevelProblem(
                    inner_loss=lambda w, h, y=task.y_support: F.cross_entropy(F.linear(h[0], w[0], w[1]), y),
                    outer_loss=lambda w, h, y=task.y_query: F.cross_entropy(F.linear(h[1], w[0], w[1]), y),
                    hyperparameters=params,
                    init_params=head_init,
                    optimizer=lh.SGD(lr=lr),
                    steps=steps,
                    features=lambda task=task: task_features(backbone, task),
                )
                estimator(problem, accumulate=True, check=False)
            return _grads(params)

        return run

    def l2l(first_order: bool) -> Method:
        head = nn.Linear(backbone.out_features, 5).to(DEVICE, dtype)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
        maml = peers["learn2learn"].algorithms.MAML(head, lr=lr, first_order=first_order)

        def run() -> Grads:
            for task in tasks:
                support, query = task_features(backbone, task)
                learner = maml.clone()
                for _ in range(steps):
                    learner.adapt(F.cross_entropy(learner(support), task.y_support))
                F.cross_entropy(learner(query), task.y_query).backward()
            for p in head.parameters():
                p.grad = None
            return _grads(params)

        return run

    peer_methods = {}
    if "learn2learn" in peers:
        peer_methods = {"learn2learn MAML(head)": l2l(False), "learn2learn MAML(head, first_order)": l2l(True)}
    return Case(
        "anil",
        steps,
        {"rmd": ours("rmd"), "fo": ours("fo")},
        peer_methods,
        ("rmd", "fo"),
        {"rmd": "learn2learn MAML(head)", "fo": "learn2learn MAML(head, first_order)"},
    )


def maml_case(peers: dict[str, Any], dtype: torch.dtype, steps: int = 5, lr: float = 0.05) -> Case:
    torch.manual_seed(0)
    net = whole_network().to(DEVICE, dtype)
    generator = torch.Generator().manual_seed(2)
    tasks = [tuple(_on(x, dtype) for x in t) for t in _tasks(generator, 4, (1, 28, 28), 10, 5, 5)]
    inner = lh.InnerModel(net, init="learned")
    params = list(net.parameters())

    def ours(spec: str) -> Method:
        estimator = lh.get_estimator(spec)

        def run() -> Grads:
            for xs, ys, xq, yq in tasks:
                problem = lh.BilevelProblem(
                    inner_loss=lambda w, h, xs=xs, ys=ys: F.cross_entropy(inner(w, xs), ys),
                    outer_loss=lambda w, h, xq=xq, yq=yq: F.cross_entropy(inner(w, xq), yq),
                    hyperparameters=params,
                    init_params=inner.init_params(params),
                    optimizer=lh.SGD(lr=lr),
                    steps=steps,
                )
                estimator(problem, accumulate=True, check=False)
            return _grads(params)

        return run

    def l2l(first_order: bool) -> Method:
        maml = peers["learn2learn"].algorithms.MAML(net, lr=lr, first_order=first_order)

        def run() -> Grads:
            for xs, ys, xq, yq in tasks:
                learner = maml.clone()
                for _ in range(steps):
                    learner.adapt(F.cross_entropy(learner(xs), ys))
                F.cross_entropy(learner(xq), yq).backward()
            return _grads(params)

        return run

    peer_methods = {}
    if "learn2learn" in peers:
        peer_methods = {"learn2learn MAML": l2l(False), "learn2learn MAML(first_order)": l2l(True)}
    return Case(
        "maml",
        steps,
        {"rmd": ours("rmd"), "fo": ours("fo")},
        peer_methods,
        ("rmd", "fo"),
        {"rmd": "learn2learn MAML", "fo": "learn2learn MAML(first_order)"},
    )


def hpo_case(peers: dict[str, Any], dtype: torch.dtype, steps: int, lr: float = 0.05, momentum: float = 0.9) -> Case:
    torch.manual_seed(0)
    net = whole_network().to(DEVICE, dtype)
    generator = torch.Generator().manual_seed(3)
    x, xv = (_on(torch.randn(64, 1, 28, 28, generator=generator), dtype) for _ in range(2))
    y, yv = (_on(torch.randint(0, 10, (64,), generator=generator), dtype) for _ in range(2))
    init = [p.detach().clone() for p in net.parameters()]
    log_wd = [torch.full_like(p, -7.0).requires_grad_() for p in init]
    inner = lh.InnerModel(net, init="fixed")

    def penalty(ws: Sequence[Tensor], lwd: Sequence[Tensor]) -> Tensor:
        return 0.5 * sum((a.exp() * w.square()).sum() for w, a in zip(ws, lwd))

    def ours(spec: str) -> Method:
        estimator = lh.get_estimator(spec)

        def run() -> Grads:
            problem = lh.BilevelProblem(
                inner_loss=lambda w, h: F.cross_entropy(inner(w, x), y) + penalty(w, h),
                outer_loss=lambda w, h: F.cross_entropy(inner(w, xv), yv),
                hyperparameters=log_wd,
                init_params=init,
                optimizer=lh.SGD(lr=lr, momentum=momentum),
                steps=steps,
            )
            estimator(problem, accumulate=True, check=False)
            return _grads(log_wd)

        return run

    def fresh_net() -> nn.Module:
        model = whole_network().to(DEVICE, dtype)
        with torch.no_grad():
            for p, w in zip(model.parameters(), init):
                p.copy_(w)
        return model

    def higher_run() -> Grads:
        model = fresh_net()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        with peers["higher"].innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fmodel(x), y) + penalty(list(fmodel.parameters()), log_wd))
            F.cross_entropy(fmodel(xv), yv).backward()
        return _grads(log_wd)

    def torchopt_run() -> Grads:
        model = fresh_net()
        opt = peers["torchopt"].MetaSGD(model, lr=lr, momentum=momentum)
        for _ in range(steps):
            opt.step(F.cross_entropy(model(x), y) + penalty(list(model.parameters()), log_wd))
        F.cross_entropy(model(xv), yv).backward()
        return _grads(log_wd)

    peer_methods = {}
    if "higher" in peers:
        peer_methods["higher innerloop_ctx"] = higher_run
    if "torchopt" in peers:
        peer_methods["TorchOpt MetaSGD"] = torchopt_run
    reference = next(iter(peer_methods), "")
    exact = ("rmd", "rmd(checkpoint_every='sqrt')", "mixed_rmd", "mixed_rmd(checkpoint_every='sqrt')")
    specs = (*exact, "greedy(0.99)", "t1t2")
    return Case(
        "hpo",
        steps,
        {spec: ours(spec) for spec in specs},
        peer_methods,
        exact,
        {spec: reference for spec in specs},
    )


def imaml_case(
    peers: dict[str, Any], dtype: torch.dtype, steps: int = 5, lr: float = 0.05, lam: float = 2.0, solves: int = 5
) -> Case:
    """iMAML on the cost study's small conv net (4 tasks, 10-way 5-shot, T = 5, lambda 2): ours (``lh.IMAML``'s
    configuration, ``cg(5, normal=True, tol=0.0)``) against TorchOpt's ``custom_root`` with ``solve_normal_cg`` (5
    iterations), written as TorchOpt's ``examples/iMAML`` does; ``minres(5)`` beside it."""
    from lightning_hypergrad.meta_gradient import TaskFamily, meta_gradient

    torch.manual_seed(0)
    net = whole_network().to(DEVICE, dtype)
    generator = torch.Generator().manual_seed(4)
    tasks = [tuple(_on(x, dtype) for x in t) for t in _tasks(generator, 4, (1, 28, 28), 10, 5, 5)]
    inner = lh.InnerModel(net, init="learned", proximal=lam)
    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]

    def ours(spec: str) -> Method:
        family = TaskFamily(
            inner_loss=lambda model, h, task: F.cross_entropy(model(task[0]), task[1]),
            outer_loss=lambda model, h, task: F.cross_entropy(model(task[2]), task[3]),
            hyperparameters=params,
            optimizer=lh.SGD(lr=lr),
            steps=steps,
            init=lambda task: inner.init_params(params),
            bind=inner.bind,
            proximal=lam,
        )
        estimator = lh.get_estimator(spec)

        def run() -> Grads:
            step = meta_gradient(family, tasks, estimator, check=False)
            return [g * len(tasks) for g in step.hypergrads]  # the sum over the tasks, as the peer accumulates

        return run

    def torchopt_run() -> Grads:
        torchopt = peers["torchopt"]

        def objective(ps, meta, xs, ys):
            pull = sum(0.5 * lam * ((a - b) ** 2).sum() for a, b in zip(ps, meta))
            return F.cross_entropy(torch.func.functional_call(net, dict(zip(names, ps)), (xs,)), ys) + pull

        @torchopt.diff.implicit.custom_root(
            torch.func.grad(objective, argnums=0),
            argnums=1,
            solve=torchopt.linear_solve.solve_normal_cg(maxiter=solves, atol=0.0),
        )
        def solve(ps, meta, xs, ys):
            ps = [p.detach().requires_grad_() for p in ps]
            with torch.enable_grad():
                for _ in range(steps):
                    grads = torch.autograd.grad(objective(ps, meta, xs, ys), ps)
                    ps = [(p - lr * g).detach().requires_grad_() for p, g in zip(ps, grads)]
            return tuple(ps)

        for xs, ys, xq, yq in tasks:
            start = tuple(p.detach().clone() for p in params)
            adapted = solve(start, tuple(params), xs, ys)
            out = torch.func.functional_call(net, dict(zip(names, adapted)), (xq,))
            F.cross_entropy(out, yq).backward()
        return _grads(params)

    peer_methods = {"TorchOpt iMAML (custom_root, normal CG)": torchopt_run} if "torchopt" in peers else {}
    reference = next(iter(peer_methods), "")
    specs = (f"cg({solves}, normal=True, tol=0.0)", f"minres({solves})")
    return Case("imaml", steps, {spec: ours(spec) for spec in specs}, peer_methods, specs[:1],
                {spec: reference for spec in specs})  # fmt: skip


def cases(peers: dict[str, Any], dtype: torch.dtype, hpo_steps: Sequence[int]) -> list[Case]:
    return [
        anil_case(peers, dtype),
        maml_case(peers, dtype),
        imaml_case(peers, dtype),
        *(hpo_case(peers, dtype, t) for t in hpo_steps),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------------------


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def relative_difference(a: Grads, b: Grads) -> float:
    num = max(float((x - y).abs().max()) for x, y in zip(a, b))
    den = max(float(y.abs().max()) for y in b)
    return num / den if den > 0 else num


def equality(peers: dict[str, Any], hpo_steps: Sequence[int]) -> list[dict[str, Any]]:
    """float64: each exact method of ours against the peers that compute the same hypergradient."""
    rows = []
    for case in cases(peers, torch.float64, hpo_steps):
        for method in case.exact:
            ours = case.ours[method]()
            for peer, run in case.peers.items():
                if case.problem != "hpo" and case.pairs[method] != peer:
                    continue
                rows.append(
                    {"problem": case.problem, "T": case.steps, "method": method, "peer": peer,
                     "relative_difference": relative_difference(ours, run())}
                )  # fmt: skip
    return rows


def timing(peers: dict[str, Any], hpo_steps: Sequence[int], rounds: int) -> list[dict[str, Any]]:
    """float32: seconds (median of interleaved rounds) and peak memory of every method of every case."""
    rows = []
    meter = memory_meter(DEVICE)
    for case in cases(peers, torch.float32, hpo_steps):
        methods = {**{f"ours:{k}": v for k, v in case.ours.items()}, **{f"peer:{k}": v for k, v in case.peers.items()}}
        peaks = {}
        for name, run in methods.items():
            run()  # warm-up
            peaks[name] = meter.measure(run)
        seconds: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(rounds):
            for name, run in methods.items():
                _synchronize()
                start = time.perf_counter()
                run()
                _synchronize()
                seconds[name].append(time.perf_counter() - start)
        for name in methods:
            who, method = name.split(":", 1)
            rows.append(
                {"problem": case.problem, "T": case.steps, "who": who, "method": method,
                 "seconds": statistics.median(seconds[name]), "peak_bytes": peaks[name],
                 "beside": case.pairs.get(method) if who == "ours" else None}
            )  # fmt: skip
    return rows


def markdown(eq: list[dict[str, Any]], times: list[dict[str, Any]], missing: dict[str, str]) -> str:
    lines = [
        "## Equality (float64): largest difference relative to the peer's largest entry",
        "",
        "| problem | T | ours | peer | relative difference |",
        "|---|---|---|---|---|",
    ]
    for r in eq:
        lines.append(f"| {r['problem']} | {r['T']} | `{r['method']}` | {r['peer']} | {r['relative_difference']:.1e} |")
    lines += [
        "",
        "## Time and memory (float32): one outer step, ours beside the peer (ratio: ours / peer)",
        "",
        "| problem | T | ours | s | MiB | peer | s | MiB | time ratio | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    peer_rows = {(r["problem"], r["T"], r["method"]): r for r in times if r["who"] == "peer"}
    for r in times:
        if r["who"] != "ours":
            continue
        p = peer_rows.get((r["problem"], r["T"], r["beside"]))
        if p is None:
            lines.append(
                f"| {r['problem']} | {r['T']} | `{r['method']}` | {r['seconds']:.4f} | {r['peak_bytes'] / 2**20:.1f} | "
                "(no peer) | - | - | - | - |"
            )
            continue
        lines.append(
            f"| {r['problem']} | {r['T']} | `{r['method']}` | {r['seconds']:.4f} | {r['peak_bytes'] / 2**20:.1f} | "
            f"{p['method']} | {p['seconds']:.4f} | {p['peak_bytes'] / 2**20:.1f} | {r['seconds'] / p['seconds']:.2f} | "
            f"{r['peak_bytes'] / max(p['peak_bytes'], 1):.2f} |"
        )
    others = [r for r in times if r["who"] == "peer" and r["problem"] == "hpo"]
    hpo_ref = {(r["problem"], r["T"]): r for r in times if r["who"] == "ours" and r["method"] == "rmd"}
    if others:
        lines += ["", "Every peer against the project's `rmd` on `hpo`:", ""]
        lines += ["| T | peer | s | MiB | `rmd` / peer time | `rmd` / peer memory |", "|---|---|---|---|---|---|"]
        for r in others:
            ours = hpo_ref.get((r["problem"], r["T"]))
            if ours:
                lines.append(
                    f"| {r['T']} | {r['method']} | {r['seconds']:.4f} | {r['peak_bytes'] / 2**20:.1f} | "
                    f"{ours['seconds'] / r['seconds']:.2f} | {ours['peak_bytes'] / max(r['peak_bytes'], 1):.2f} |"
                )
    if missing:
        lines += ["", "Left out: " + "; ".join(missing.values()) + "."]
    return "\n".join(lines)


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "(version unknown)"


def row_keys(table: dict[str, Any]) -> set[tuple[Any, ...]]:
    """The rows of a ``peers.json`` table, each by what it measures (problem, T, method and peer)."""
    rows = table.get("equality"), table.get("timing")
    keys = {("equality", r.get("problem"), r.get("T"), r.get("method"), r.get("peer")) for r in rows[0] or []}
    keys |= {("timing", r.get("problem"), r.get("T"), r.get("who"), r.get("method")) for r in rows[1] or []}
    return keys


def read_table(path: Path) -> dict[str, Any] | None:
    """The table of an earlier run at ``path`` (``None``: there is none), or ``SystemExit`` with one line where the
    file is no such table (it is not replaced)."""
    if not path.exists():
        return None
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SystemExit(
            f"error: {path} is no table of this study ({error}): move it away, or give another --out"
        ) from None
    rows = [table.get(k) for k in ("equality", "timing")] if isinstance(table, dict) else [None]
    if not all(isinstance(r, list) and all(isinstance(row, dict) for row in r) for r in rows):
        raise SystemExit(
            f"error: {path} is no table of this study (no 'equality' and 'timing' rows): move it away, or give "
            "another --out"
        )
    return table


def _peer_module(label: str) -> str:
    """The module of a peer's row label: ``higher innerloop_ctx`` -> ``higher``, ``TorchOpt MetaSGD`` ->
    ``torchopt``."""
    return str(label or "").split(" ")[0].lower()


def rows_kept(table: dict[str, Any] | None, missing: dict[str, str], hpo_steps: Sequence[int]) -> str | None:
    """Why a run would leave out rows of the earlier ``table`` (``None``: it would write them all again): the peers
    of its rows that do not import here, and its ``hpo`` horizons not in ``hpo_steps``."""
    if table is None:
        return None
    labels = [r.get("peer", "") for r in table["equality"]]
    labels += [r.get("method", "") for r in table["timing"] if r.get("who") == "peer"]
    gone = sorted({_peer_module(label) for label in labels} & set(missing))
    horizons = sorted(
        {str(r.get("T")) for r in table["equality"] + table["timing"] if r.get("problem") == "hpo"}
        - {str(t) for t in hpo_steps},
        key=str,
    )
    reasons = []
    if gone:
        reasons.append(
            f"{', '.join(gone)} {'does' if len(gone) == 1 else 'do'} not import here (install with {INSTALL})"
        )
    if horizons:
        reasons.append(f"its hpo rows of T = {', '.join(map(str, horizons))} are not in --hpo-steps")
    return "; ".join(reasons) or None


def main(argv: Sequence[str] | None = None) -> int:
    parser = StudyParser(prog="python -m studies.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--hpo-steps", type=int, nargs="+", default=[10, 100], help="T of the hpo problem (10 100)")
    parser.add_argument("--peers-dir", default=os.environ.get("PEERS_DIR", PEERS_DIR), help="(default .peers)")
    parser.add_argument(
        "--out", type=writable_folder, default="studies/peers/results", help="where peers.md and peers.json go"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    args = parser.parse_args(argv)
    require_positive(parser, args, "rounds", "hpo_steps", "threads")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    name = "peers" if DEVICE.type == "cpu" else f"peers_{DEVICE.type}"
    peers, missing = import_peers(args.peers_dir)
    earlier = read_table(out / f"{name}.json")
    lost = rows_kept(earlier, missing, args.hpo_steps)
    if lost is not None:
        print(
            f"error: {out / name}.json holds rows that this run would not write ({lost}): nothing was run; "
            "give another --out to write a table without them",
            file=sys.stderr,
        )
        return 1
    for reason in missing.values():
        print(f"note: {reason}: left out", file=sys.stderr)
    try:
        eq = equality(peers, args.hpo_steps)
        times = timing(peers, args.hpo_steps, args.rounds)
    except KeyboardInterrupt:
        print("interrupted: nothing written, the tables in --out are as they were", file=sys.stderr)
        return 130
    machine = machine_description(DEVICE)
    versions = ", ".join(f"{name} {_version(name)}" for name in peers)
    text = markdown(eq, times, missing) + f"\n\nPeers: {versions or 'none'}. Machine: {machine}.\n"
    table = {"equality": eq, "timing": times, "missing": missing, "machine": machine, "peers": versions}
    if earlier is not None and row_keys(earlier) - row_keys(table):  # not foreseen above: kept, the new one beside
        name += "-fewer-rows"
        print(
            f"error: the earlier table has rows that this one lacks: kept, this one written as {name}", file=sys.stderr
        )
    write_text(out / f"{name}.md", "# Side by side with the peers\n\n" + text)
    write_json(out / f"{name}.json", table)
    print(text)
    return 1 if name.endswith("-fewer-rows") else 0
