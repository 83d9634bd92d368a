"""Seconds per outer step of ``compile_losses=True`` against eager and against the peers' first-order MAML.

Run from the repository root (higher and TorchOpt from ``.peers/``: ``bash scripts/install_peers.sh``)::

    python -m studies.compile run [--rounds 10] [--steps 1 5] [--queries 1] [--out studies/compile/results]
    python -m studies.compile report [--out studies/compile/results]

The protocol: Omniglot's canonical few-shot setting as MAML's paper runs it (Finn et al., 2017): 5-way 1-shot, a
meta-batch of 32 tasks, 28x28 grey images, the conv 4 x 64 network (:class:`~lightning_hypergrad.nets.ConvBackbone`
with depth 4 and width 64: four blocks of 3x3 convolution, batch norm, ReLU and 2x2 max pooling, 28 -> 14 -> 7 -> 3
-> 1, then a linear head to the 5 ways), plain SGD with learning rate 0.4 in the inner loop, T = 1 inner step (and
T = 5, ``--steps``). Query images: 1 per class, as MAML's reference code and learn2learn's ``maml_omniglot.py`` train
(two drawings per class, one to adapt, one to evaluate); ``--queries 15`` is the query set of the higher and TorchOpt
Omniglot examples. The images are random tensors of those shapes (the cost does not depend on the pixel values),
drawn once, the same tasks for every method.

What is timed: **one outer step's meta-gradient**: from the meta-batch's tasks to the mean first-order hypergradient
of the initialization (MAML) or of the backbone and the head's initialization (ANIL) over the 32 tasks, every task's
inner loop included; no outer optimizer step (an Adam update of the 0.11 M parameters is the same for every method
and a fraction of a millisecond). The methods:

``maml`` (whole-network first-order MAML; every method from the same initial weights)
    ours ``fo`` eager (the reference) and compiled (``lh.MAML(..., compile_losses=True)``); learn2learn's
    ``MAML(net, lr=0.4, first_order=True)`` (``clone``, ``adapt``, the query loss's ``backward`` per task, the
    gradients scaled by 1/32, as its examples); TorchOpt's functional API (``torchopt.sgd`` with
    ``update(..., inplace=False)`` and ``apply_updates``, as its ``maml_omniglot_vmap.py`` example, the network
    called through ``torch.func.functional_call``, the inner gradient taken without a graph: first order); higher's
    ``innerloop_ctx(net, opt, track_higher_grads=False)`` (the fast weights detached at every step, the query loss's
    gradient with respect to the last fast weights added to the initialization's, first-order MAML in higher); and
    ours ``t1t2_fd`` and ``sama``, eager and compiled (the problem has no other hyperparameter than the
    initialization, so they compute ``fo``'s hypergradient plus their finite-difference term, which is zero here,
    at their own cost).
``anil`` (``lh.FewShotClassifier``: the conv 4 x 64 backbone and the head's initialization are the hyperparameters,
the linear head is trained in the inner loop on the task's features, computed once per task from the support and
query images together)
    ours ``fo`` eager (the reference) and compiled; learn2learn's ``MAML(head, lr=0.4, first_order=True)`` with the
    backbone's features computed once per task, as its ANIL examples.

Rules of measurement: one process, one torch thread (``torch.set_num_threads(1)``); every method first runs once
(its gradient is then compared with ``fo``'s meta-gradient computed in float64 from the same weights and tasks: it
agrees when its cosine to it falls short of 1 by at most twice what ours ``fo`` eager's own float32 cosine does, and
never needs more than 0.999 (:func:`tolerance`); the first-order MAML peers equal ``fo`` up to float32; a method
that disagrees or fails is flagged in the record and not timed) and once more as a
warm-up; then ``--rounds`` interleaved rounds, each running every method of every problem and T once, in an order
rotated from round to round. Reported: the median and the interquartile range over the rounds of each method's
seconds, of its ratio to ours ``fo`` eager and of its ratio to the fastest peer of its problem, the ratios taken
round by round (paired); compile seconds apart: the first call of a compiled method less a warm call of its eager
twin, with Inductor's on-disk caches disabled (a cold compile; a method whose graphs an earlier one compiled, the
same hooks with another estimator or T = 5 after T = 1, reports only its own new graphs, near 0 where there are none);
``/proc/loadavg`` before and after. The record is ``compile.json`` (``compile_quick.json`` with ``--quick``);
``report`` writes ``compile.md`` from it with the issue's targets and whether each is met. Before any work: an
``--out`` that cannot be written is refused, and ``run`` holds ``--out``'s ``.compile.lock`` (``.compile_quick.lock``)
while it measures (:func:`studies.common.run_alone`): a second run on the same ``--out`` is refused while the first
lives.
"""

from __future__ import annotations

import copy
import gc
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_hypergrad as lh
from studies.common import (
    Progress,
    StudyParser,
    log,
    machine_description,
    run_alone,
    writable_folder,
    write_json,
    write_text,
)
from studies.compile.report import markdown, median_iqr, record_path, write_report
from studies.peers.study import PEERS_DIR, import_peers

OUT = "studies/compile/results"
AGREEMENT = 0.999
"""A cosine to the float64 meta-gradient above which a method's meta-gradient always agrees (:func:`tolerance`)."""
FLOAT32_FACTOR = 2.0
"""How many times float32's own shortfall from the float64 meta-gradient a method may fall short (:func:`tolerance`):
the float32 reference's cosine to it is 0.9999 at T = 1 but 0.995 at T = 5 (whole-network MAML, batch norm), so one
fixed threshold is either too loose for the one or stricter than float32 itself for the other."""
REFERENCE = "ours fo eager"
OUTER_STEP = (
    "one meta-gradient: the mean first-order hypergradient over the meta-batch's tasks, every task's inner loop "
    "included, no outer optimizer update"
)


@dataclass(frozen=True)
class Protocol:
    """The problem every method solves (the canonical Omniglot protocol by default)."""

    ways: int = 5
    shots: int = 1
    queries: int = 1
    meta_batch: int = 32
    image_shape: tuple[int, int, int] = (1, 28, 28)
    depth: int = 4
    width: int = 64
    inner_lr: float = 0.4
    steps: tuple[int, ...] = (1, 5)
    seed: int = 0

    def as_record(self) -> dict[str, Any]:
        out = asdict(self)
        out["image_shape"], out["steps"] = list(self.image_shape), list(self.steps)
        return out


QUICK = {"meta_batch": 4, "width": 8, "steps": (1,)}
QUICK_ROUNDS = 2


@dataclass
class Method:
    """One way to compute a case's meta-gradient: ``run()`` returns it, one tensor per hyperparameter of ours."""

    name: str
    who: str  # "ours" or "peer"
    run: Callable[[], Sequence[Tensor]] | None
    estimator: str | None = None
    compiled: bool = False
    twin: str | None = None
    """The eager version of a compiled method."""
    skip: str | None = None
    """Why the method is not run (``run`` is then ``None``)."""


@dataclass
class Case:
    """A problem at one T and the methods that compute its meta-gradient; the first method is the reference."""

    problem: str
    steps: int
    methods: list[Method] = field(default_factory=list)
    exact: Callable[[], Sequence[Tensor]] | None = None
    """``fo``'s meta-gradient in float64 (:func:`float64_fo`), against which :func:`prepare` checks every method
    (every case of this study has it; the scale study's MAML cases, measured by their own code, do not)."""

    def key(self, method: Method | str) -> str:
        return f"{self.problem} T={self.steps}: {method if isinstance(method, str) else method.name}"


# ---------------------------------------------------------------------------------------------------------------------
# the tasks and the methods
# ---------------------------------------------------------------------------------------------------------------------


def make_tasks(protocol: Protocol) -> list[dict[str, Tensor]]:
    """The meta-batch: random images of the protocol's shapes, fixed by its seed."""
    generator = torch.Generator().manual_seed(protocol.seed)
    ways = torch.arange(protocol.ways)
    tasks = []
    for _ in range(protocol.meta_batch):
        support_y, query_y = ways.repeat_interleave(protocol.shots), ways.repeat_interleave(protocol.queries)
        tasks.append(
            {
                "support_x": torch.randn(len(support_y), *protocol.image_shape, generator=generator),
                "support_y": support_y,
                "query_x": torch.randn(len(query_y), *protocol.image_shape, generator=generator),
                "query_y": query_y,
            }
        )
    return tasks


def ours_model(kind: str, protocol: Protocol, steps: int, compile_losses: bool) -> lh.BilevelModule:
    """``lh.MAML`` (``kind="maml"``) or ANIL's ``lh.FewShotClassifier`` (``"anil"``) on the protocol, ``fo``."""
    settings: dict[str, Any] = dict(
        ways=protocol.ways,
        image_shape=protocol.image_shape,
        depth=protocol.depth,
        width=protocol.width,
        estimator="fo",
        inner_optimizer=lh.SGD(lr=protocol.inner_lr),
        inner_steps=steps,
        compile_losses=compile_losses,
    )
    if kind == "maml":
        return lh.MAML(**settings)
    return lh.FewShotClassifier(backbone="conv", head_init="learned", **settings)


def float64_fo(model: lh.BilevelModule, tasks: list[dict[str, Tensor]]) -> Callable[[], list[Tensor]]:
    """``fo``'s meta-gradient of a float64 copy of ``model`` (same weights) on the tasks in float64: the meta-gradient
    that the float32 methods approximate, each by its own rounding."""
    twin = copy.deepcopy(model).double()
    wide = [{k: v.double() if v.is_floating_point() else v for k, v in task.items()} for task in tasks]
    estimator = lh.get_estimator("fo")
    return lambda: twin.meta_gradient(wide, estimator).hypergrads


def ours_method(name: str, model: lh.BilevelModule, tasks: list, spec: str, compiled: bool, twin: str | None = None):
    estimator = lh.get_estimator(spec)

    def run() -> list[Tensor]:
        return model.meta_gradient(tasks, estimator).hypergrads

    return Method(name, "ours", run, estimator=str(estimator), compiled=compiled, twin=twin)


def _zero(params: Sequence[Tensor]) -> None:
    for p in params:
        p.grad = None


def _mean_grads(params: Sequence[Tensor], count: int) -> list[Tensor]:
    """The accumulated gradients divided by the number of tasks (zeros where a tensor got none)."""
    out = []
    for p in params:
        if p.grad is None:
            out.append(torch.zeros_like(p))
        else:
            p.grad.mul_(1.0 / count)
            out.append(p.grad)
    return out


def _copy(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """A copy of ``module``, the same weights; ``memo`` maps each original tensor's id to its copy."""
    return copy.deepcopy(module, memo)


def learn2learn_maml(l2l: Any, net: nn.Module, targets: list[Tensor], tasks: list, steps: int, lr: float) -> Callable:
    """learn2learn's first-order MAML around the whole network, as its ``maml_omniglot.py`` example."""
    maml = l2l.algorithms.MAML(net, lr=lr, first_order=True)

    def run() -> list[Tensor]:
        _zero(targets)
        for task in tasks:
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(task["support_x"]), task["support_y"]))
            F.cross_entropy(learner(task["query_x"]), task["query_y"]).backward()
        return _mean_grads(targets, len(tasks))

    return run


def torchopt_maml(
    torchopt: Any,
    net: nn.Module,
    targets: list[Tensor],
    tasks: list,
    steps: int,
    lr: float,
    create_graph: bool = False,
) -> Callable:
    """TorchOpt's functional API (``torchopt.sgd``, ``update(..., inplace=False)``, ``apply_updates``), as its
    functorch MAML example, with the inner gradient taken without a graph (first order), or with ``create_graph``
    through it (second order: the scale study's exact MAML); the query loss's ``backward`` into the initial weights
    per task, the mean over the tasks."""
    names = [name for name, _ in net.named_parameters()]
    params = tuple(p for _, p in net.named_parameters())
    optimizer = torchopt.sgd(lr=lr)

    def loss(weights: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(torch.func.functional_call(net, dict(zip(names, weights)), (x,)), y)

    def run() -> list[Tensor]:
        _zero(targets)
        for task in tasks:
            weights = params
            state = optimizer.init(weights)
            for _ in range(steps):
                support = loss(weights, task["support_x"], task["support_y"])
                grads = torch.autograd.grad(support, weights, create_graph=create_graph)
                updates, state = optimizer.update(grads, state, inplace=False)
                weights = torchopt.apply_updates(weights, updates, inplace=False)
            loss(weights, task["query_x"], task["query_y"]).backward()
        return _mean_grads(targets, len(tasks))

    return run


def higher_maml(
    higher: Any,
    net: nn.Module,
    targets: list[Tensor],
    tasks: list,
    steps: int,
    lr: float,
    track_higher_grads: bool = False,
) -> Callable:
    """higher's ``innerloop_ctx`` with ``track_higher_grads=False``: the query loss's gradient with respect to the
    last fast weights is added to the initialization's gradient (first-order MAML); with ``track_higher_grads`` the
    query loss's ``backward`` goes through the unrolled steps into the initial weights (second order: the scale
    study's exact MAML, as higher's MAML Omniglot example). The mean over the tasks."""
    inner_optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    params = list(net.parameters())

    def run() -> list[Tensor]:
        _zero(targets)
        for task in tasks:
            with higher.innerloop_ctx(
                net, inner_optimizer, copy_initial_weights=False, track_higher_grads=track_higher_grads
            ) as (fnet, diffopt):
                for _ in range(steps):
                    diffopt.step(F.cross_entropy(fnet(task["support_x"]), task["support_y"]))
                loss = F.cross_entropy(fnet(task["query_x"]), task["query_y"])
                if track_higher_grads:
                    loss.backward()
                    continue
                grads = torch.autograd.grad(loss, list(fnet.parameters()))
            for p, g in zip(params, grads):
                p.grad = g if p.grad is None else p.grad + g
        return _mean_grads(targets, len(tasks))

    return run


def learn2learn_anil(
    l2l: Any, backbone: nn.Module, head: nn.Module, targets: list[Tensor], tasks: list, steps: int, lr: float
) -> Callable:
    """learn2learn's first-order MAML around the head, the backbone's features computed once per task (its ANIL
    examples), support and query images in one backbone call (batch norm sees both, as ``FewShotClassifier``)."""
    maml = l2l.algorithms.MAML(head, lr=lr, first_order=True)

    def run() -> list[Tensor]:
        _zero(targets)
        for task in tasks:
            n_support = task["support_x"].shape[0]
            features = backbone(torch.cat([task["support_x"], task["query_x"]]))
            support, query = features[:n_support], features[n_support:]
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(support), task["support_y"]))
            F.cross_entropy(learner(query), task["query_y"]).backward()
        return _mean_grads(targets, len(tasks))

    return run


PEER_NAMES = {
    "learn2learn": "learn2learn MAML(first_order=True)",
    "torchopt": "TorchOpt sgd (functional, first order)",
    "higher": "higher innerloop_ctx(track_higher_grads=False)",
}
ANIL_PEER = "learn2learn MAML(head, first_order=True)"


def _compiled_twin(eager: lh.BilevelModule, kind: str, protocol: Protocol, steps: int) -> lh.BilevelModule:
    model = ours_model(kind, protocol, steps, compile_losses=True)
    model.load_state_dict(eager.state_dict())
    return model


def _ours_methods(
    kind: str, protocol: Protocol, steps: int, tasks: list, specs: Sequence[str], compile_on: bool
) -> tuple[lh.BilevelModule, list[Method]]:
    torch.manual_seed(protocol.seed)
    eager = ours_model(kind, protocol, steps, compile_losses=False)
    compiled = _compiled_twin(eager, kind, protocol, steps) if compile_on else None
    methods = []
    for spec in specs:
        methods.append(ours_method(f"ours {spec} eager", eager, tasks, spec, compiled=False))
        name = f"ours {spec} compiled"
        if compiled is None:
            methods.append(Method(name, "ours", None, estimator=spec, compiled=True, twin=f"ours {spec} eager",
                                  skip="--no-compile"))  # fmt: skip
        else:
            methods.append(ours_method(name, compiled, tasks, spec, compiled=True, twin=f"ours {spec} eager"))
    return eager, methods


def maml_case(protocol: Protocol, steps: int, tasks: list, peers: dict[str, Any], compile_on: bool) -> Case:
    """Whole-network first-order MAML: ours (``fo``, ``t1t2_fd``, ``sama``; eager and compiled) and the peers."""
    eager, methods = _ours_methods("maml", protocol, steps, tasks, ("fo", "t1t2_fd", "sama"), compile_on)
    fo = methods[:2]
    builders = {"learn2learn": learn2learn_maml, "torchopt": torchopt_maml, "higher": higher_maml}
    peer_methods = []
    for peer, build in builders.items():
        if peer not in peers:
            continue
        memo: dict[int, Any] = {}
        net = _copy(eager.inner_model.module, memo)
        targets = [memo[id(p)] for p in eager.hyperparameters()]
        peer_methods.append(Method(PEER_NAMES[peer], "peer", build(peers[peer], net, targets, tasks, steps,
                                                                  protocol.inner_lr)))  # fmt: skip
    return Case("maml", steps, [*fo, *peer_methods, *methods[2:]], exact=float64_fo(eager, tasks))


def anil_case(protocol: Protocol, steps: int, tasks: list, peers: dict[str, Any], compile_on: bool) -> Case:
    """ANIL: ours ``fo`` eager and compiled, and learn2learn's ``MAML`` around the head."""
    eager, methods = _ours_methods("anil", protocol, steps, tasks, ("fo",), compile_on)
    if "learn2learn" in peers:
        memo: dict[int, Any] = {}
        backbone = _copy(eager.backbone, memo)
        head = _copy(eager.inner_model.module, memo)
        targets = [memo[id(p)] for p in eager.hyperparameters()]
        run = learn2learn_anil(peers["learn2learn"], backbone, head, targets, tasks, steps, protocol.inner_lr)
        methods.append(Method(ANIL_PEER, "peer", run))
    return Case("anil", steps, methods, exact=float64_fo(eager, tasks))


def build_cases(protocol: Protocol, peers: dict[str, Any], compile_on: bool) -> list[Case]:
    """Every case of the study: whole-network MAML and ANIL at each T."""
    tasks = make_tasks(protocol)
    cases = []
    for steps in protocol.steps:
        cases.append(maml_case(protocol, steps, tasks, peers, compile_on))
        cases.append(anil_case(protocol, steps, tasks, peers, compile_on))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------------------


def agreement(grads: Sequence[Tensor], reference: Sequence[Tensor]) -> dict[str, Any]:
    """The cosine of two meta-gradients (all their tensors as one vector) and the largest entry of their difference
    over the largest entry of the reference; ``agrees``: cosine > :data:`AGREEMENT` (the verdict of a method is
    :func:`agrees`, against the float64 meta-gradient)."""
    if len(grads) != len(reference) or any(a.shape != b.shape for a, b in zip(grads, reference)):
        return {"cosine": None, "max_relative_difference": None, "agrees": False,
                "reason": "the tensors' count or shapes differ from the reference's"}  # fmt: skip
    a = torch.cat([g.detach().reshape(-1).double() for g in grads])
    b = torch.cat([g.detach().reshape(-1).double() for g in reference])
    norms = float(a.norm() * b.norm())
    cosine = float(a @ b) / norms if norms > 0 else float("nan")
    scale = float(b.abs().max())
    difference = float((a - b).abs().max()) / scale if scale > 0 else float("nan")
    return {"cosine": cosine, "max_relative_difference": difference, "agrees": bool(cosine > AGREEMENT)}


def tolerance(reference_to_exact: dict[str, Any] | None) -> float:
    """The largest shortfall ``1 - cosine`` to the float64 meta-gradient that agrees: :data:`FLOAT32_FACTOR` times
    the float32 reference's own, and at least ``1 -`` :data:`AGREEMENT`."""
    cosine = None if reference_to_exact is None else reference_to_exact["cosine"]
    return max(1 - AGREEMENT, FLOAT32_FACTOR * (0.0 if cosine is None else 1 - cosine))


def agrees(to_exact: dict[str, Any] | None, allowed: float) -> bool:
    """Whether a method's meta-gradient, at ``to_exact`` (:func:`agreement`) from the float64 one, is within
    ``allowed`` (:func:`tolerance`)."""
    return to_exact is not None and to_exact["cosine"] is not None and 1 - to_exact["cosine"] <= allowed


def loadavg() -> str | None:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return None


def _timed(run: Callable[[], Sequence[Tensor]]) -> tuple[float, list[Tensor]]:
    start = time.perf_counter()
    grads = run()
    seconds = time.perf_counter() - start
    return seconds, [g.detach().clone() for g in grads]


def _dynamo_counts() -> dict[str, int]:
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return {}
    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def prepare(cases: list[Case], progress: Progress) -> dict[str, dict[str, Any]]:
    """Each method's first call, its agreement with the reference (and a compiled one's with its eager twin), a
    warm-up call, and its compile seconds; a method that disagrees or raises is not timed."""
    rows: dict[str, dict[str, Any]] = {}
    for case in cases:
        grads_of: dict[str, list[Tensor]] = {}
        exact = [g.detach().clone() for g in case.exact()]
        allowed = None
        for method in case.methods:
            key = case.key(method)
            row = {"problem": case.problem, "T": case.steps, "name": method.name, "who": method.who,
                   "estimator": method.estimator, "compiled": method.compiled, "twin": method.twin,
                   "status": "timed", "reason": None, "agreement": None, "twin_agreement": None,
                   "exact_agreement": None, "tolerance": None,
                   "first_call_seconds": None, "warm_call_seconds": None, "compile_seconds": None}  # fmt: skip
            rows[key] = row
            if method.skip is not None:
                row.update(status="skipped", reason=method.skip)
                progress.step(f"{key}: skipped ({method.skip})", work=2)
                continue
            try:
                row["first_call_seconds"], grads = _timed(method.run)
            except Exception as error:  # noqa: BLE001 (a method that fails is recorded and left out, not fatal)
                row.update(status="failed", reason=f"{type(error).__name__}: {error}".splitlines()[0])
                progress.step(f"{key}: failed ({row['reason']})", work=2)
                continue
            grads_of[method.name] = grads
            reference = grads_of.get(case.methods[0].name)
            row["agreement"] = agreement(grads, reference) if reference is not None else None
            if method.twin in grads_of:
                row["twin_agreement"] = agreement(grads, grads_of[method.twin])
            row["exact_agreement"] = agreement(grads, exact)
            if allowed is None:  # the reference, first: float32's own shortfall sets the tolerance
                allowed = tolerance(row["exact_agreement"])
            row["tolerance"] = allowed
            ok = agrees(row["exact_agreement"], allowed)
            why = (f"cosine {_cos(row['exact_agreement'])} to fo in float64, short of 1 by more than {allowed:.2g}"
                   f" ({FLOAT32_FACTOR:g}x float32's own)")  # fmt: skip
            if not ok:
                row.update(status="disagrees", reason=f"meta-gradient at {why}: not timed")
                progress.step(f"{key}: DISAGREES ({row['reason']})", work=2)
                continue
            row["warm_call_seconds"], _ = _timed(method.run)
            twin = rows.get(case.key(method.twin)) if method.twin else None
            if method.compiled and twin is not None and twin["warm_call_seconds"] is not None:
                row["compile_seconds"] = row["first_call_seconds"] - twin["warm_call_seconds"]
            extra = f", compile {row['compile_seconds']:.1f} s" if row["compile_seconds"] is not None else ""
            progress.step(f"{key}: cosine {_cos(row['agreement'])}, warm call {row['warm_call_seconds']:.3f} s{extra}",
                          work=2)  # fmt: skip
    return rows


def _cos(a: dict[str, Any] | None) -> str:
    return "n/a" if a is None or a["cosine"] is None else f"{a['cosine']:.6f}"


def rotated(items: list[str], round_index: int, rounds: int) -> list[str]:
    """``items`` rotated by ``round_index / rounds`` of their length: over the rounds each item takes positions
    spread over the whole order."""
    offset = (round_index * len(items)) // max(rounds, 1) % max(len(items), 1)
    return items[offset:] + items[:offset]


def time_rounds(cases: list[Case], rows: dict[str, dict[str, Any]], rounds: int, progress: Progress) -> list[list[str]]:
    """``rounds`` interleaved rounds of every timed method; each row gets its ``seconds``, one per round."""
    runs = {case.key(m): m.run for case in cases for m in case.methods if rows[case.key(m)]["status"] == "timed"}
    keys = list(runs)
    for key in keys:
        rows[key]["seconds"] = []
    orders = []
    for r in range(rounds):
        order = rotated(keys, r, rounds)
        orders.append(order)
        gc.collect()
        start = time.perf_counter()
        for key in order:
            begin = time.perf_counter()
            runs[key]()
            rows[key]["seconds"].append(time.perf_counter() - begin)
        progress.step(f"round {r + 1}/{rounds}: {len(order)} methods, {time.perf_counter() - start:.1f} s",
                      work=2 * len(order))  # fmt: skip
    return orders


def summarize(cases: list[Case], rows: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    """Medians and IQRs of the seconds and of the per-round ratios to ours ``fo`` eager and to the fastest peer;
    returns the fastest peer of each case (by median seconds, among the peers that agree)."""
    fastest: dict[str, str | None] = {}
    for case in cases:
        label = f"{case.problem} T={case.steps}"
        timed = [rows[case.key(m)] for m in case.methods if rows[case.key(m)]["status"] == "timed"]
        for row in timed:
            row["summary"] = median_iqr(row["seconds"])
        peers = [row for row in timed if row["who"] == "peer"]
        best = min(peers, key=lambda row: row["summary"]["median"]) if peers else None
        fastest[label] = best["name"] if best else None
        reference = rows[case.key(case.methods[0])]
        for row in timed:
            for name, base in (("ratio_to_ours_eager", reference), ("ratio_to_fastest_peer", best)):
                if base is None or base["status"] != "timed":
                    row[name] = None
                    continue
                per_round = [a / b for a, b in zip(row["seconds"], base["seconds"])]
                row[name] = {"per_round": per_round, **(median_iqr(per_round) or {})}
    return fastest


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def run_study(
    protocol: Protocol, rounds: int, out: Path, quick: bool, compile_on: bool, peers_dir: str, threads: int = 1
) -> tuple[dict[str, Any], int]:
    """Measures, writes the record and the report; returns the record and the exit status (1 where a method's
    meta-gradient disagreed or a method failed)."""
    torch.set_num_threads(threads)
    load_before = loadavg()
    peers, missing = import_peers(peers_dir)
    for reason in missing.values():
        log(f"note: {reason}: left out")
    if compile_on:
        import torch._dynamo as dynamo
        import torch._inductor.config as inductor

        dynamo.reset()
        dynamo.utils.counters.clear()
        inductor.force_disable_caches = True  # a cold compile, whatever earlier runs left in the on-disk caches
        warnings.filterwarnings("ignore", "dynamo_pgo force disabled")  # what disabling the caches implies
    cases = build_cases(protocol, peers, compile_on)
    count = sum(len(c.methods) for c in cases)
    progress = Progress(count + rounds, work=2 * count + 2 * count * rounds)
    started = time.perf_counter()
    rows = prepare(cases, progress)
    dynamo = _dynamo_counts() if compile_on else None
    orders = time_rounds(cases, rows, rounds, progress)
    fastest = summarize(cases, rows)
    problems = [row for row in rows.values() if row["status"] in ("disagrees", "failed")]
    record = {
        "study": "compile",
        "quick": quick,
        "compile": compile_on,
        "protocol": protocol.as_record(),
        "rounds": rounds,
        "outer_step": OUTER_STEP,
        "agreement_threshold": AGREEMENT,
        "agreement_rule": (
            f"1 - cosine to fo's float64 meta-gradient <= max({1 - AGREEMENT:g}, {FLOAT32_FACTOR:g} x that of "
            f"{REFERENCE})"
        ),
        "reference": REFERENCE,
        "methods": list(rows.values()),
        "fastest_peer": fastest,
        "orders": orders,
        "failures": [f"{row['problem']} T={row['T']}: {row['name']}: {row['reason']}" for row in problems],
        "dynamo": dynamo,
        "inductor_caches": "disabled (cold compile)" if compile_on else None,
        "missing_peers": missing,
        "versions": {name: _version(name) for name in ("torch", "learn2learn", "higher", "torchopt")},
        "machine": machine_description("cpu"),
        "loadavg": {"before": load_before, "after": loadavg()},
        "seconds_total": time.perf_counter() - started,
    }
    path = record_path(out, quick)
    write_json(path, record)
    text = markdown(record)
    write_text(path.with_suffix(".md"), text)
    print(text)
    for line in record["failures"]:
        log(f"error: {line}")
    return record, 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = StudyParser(prog="python -m studies.compile", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="measure, then write the record and the report")
    run.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 10; --quick: 2)")
    run.add_argument("--steps", type=int, nargs="+", default=None, help="inner steps T (default 1 5; --quick: 1)")
    run.add_argument("--queries", type=int, default=1, help="query images per class (default 1, MAML's protocol)")
    run.add_argument("--quick", action="store_true", help="a smoke test: meta-batch 4, width 8, T = 1, 2 rounds")
    run.add_argument("--no-compile", action="store_true", help="leave out the compiled methods (recorded skipped)")
    run.add_argument("--peers-dir", default=PEERS_DIR, help="where higher and TorchOpt are installed (.peers)")
    run.add_argument(
        "--out", type=writable_folder, default=OUT, help=f"where the record and the report go (default {OUT})"
    )
    report = commands.add_parser("report", help="write compile.md from the record")
    report.add_argument("--out", type=writable_folder, default=OUT, help=f"the record's folder (default {OUT})")
    report.add_argument("--quick", action="store_true", help="the --quick record (compile_quick.json)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.command == "report":
        return write_report(out, args.quick)
    protocol = Protocol(queries=args.queries)
    rounds = args.rounds if args.rounds is not None else (QUICK_ROUNDS if args.quick else 10)
    if args.quick:
        protocol = replace(protocol, **QUICK)
    if args.steps is not None:
        protocol = replace(protocol, steps=tuple(args.steps))
    if rounds < 1 or min(protocol.steps) < 1 or protocol.queries < 1:
        parser.error("--rounds, --steps and --queries must be at least 1")
    with run_alone(out, f".{record_path(out, args.quick).stem}.lock"):  # a second run would measure the same
        _, status = run_study(protocol, rounds, out, args.quick, not args.no_compile, args.peers_dir)
    return status


if __name__ == "__main__":
    sys.exit(main())
