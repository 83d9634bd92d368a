"""Exact reverse-mode differentiation (RMD) through the unrolled inner loop, and its truncation."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_hypergrad.estimators.base import AdjointEstimator, Estimate, add_grads, check_positive_int
from lightning_hypergrad.estimators.registry import Capabilities, register_estimator
from lightning_hypergrad.inner_loop import InnerStep, StepMode, StepRandomness, Trajectory, leaves, unroll
from lightning_hypergrad.optim.base import OptimizerState
from lightning_hypergrad.problem import BilevelProblem


class _ReverseMode(AdjointEstimator):
    """Reverse mode through the inner steps from :meth:`_first_differentiated_step` to T."""

    def _first_differentiated_step(self, problem: BilevelProblem) -> int:
        raise NotImplementedError

    def validate(self, problem: BilevelProblem) -> None:
        super().validate(problem)
        self._first_differentiated_step(problem)

    def _estimate(self, problem: BilevelProblem, h):
        start = self._first_differentiated_step(problem)
        if start == 1 or not problem.learned_init:
            # from step 1, a learned w_0 is part of the chain (unroll keeps it connected to h)
            trajectory = unroll(problem, h, lambda t: StepMode.CHAIN if t >= start else StepMode.CONSTANT)
            loss = problem.outer_loss(trajectory.params, h)
            grads = torch.autograd.grad(loss, h, allow_unused=True)
            return Estimate(list(grads), trajectory, loss.detach())
        # truncated with a learned w_0: the adjoint of w_{T-K} stands for that of w_0 (the steps before as identity)
        head = unroll(problem, h, lambda t: StepMode.CONSTANT, stop=start - 1)
        w_start = leaves(head.params)
        tail = unroll(problem, h, lambda t: StepMode.CHAIN, start=(start - 1, w_start, head.state.detached()))
        loss = problem.outer_loss(tail.params, h)
        found = torch.autograd.grad(loss, [*h, *w_start], allow_unused=True)
        adjoint = [torch.zeros_like(w) if g is None else g for w, g in zip(w_start, found[len(h) :])]
        trajectory = Trajectory(tail.params, tail.state, torch.cat([head.inner_losses, tail.inner_losses]))
        return Estimate(list(found[: len(h)]), trajectory, loss.detach(), init_adjoint=adjoint)


@register_estimator
class TruncatedRMD(_ReverseMode):
    """Reverse mode through the last ``K`` inner steps only (Shaban et al., 2019)::

        grad_alpha L_val(w_T) + sum_{t=T-K+1}^T g_T (prod_{k>t} A_k) B_t

    The first ``T - K`` steps run without a graph. Memory O(P K). ``K = T`` is exact RMD; ``K = 1`` is T1-T2.
    Spec string: ``truncated_rmd(K)``.

    With a learned initialization ``w_0(alpha)`` and ``K < T``, the initialization's term is
    ``lambda_{T-K} dw_0/dalpha``, where ``lambda_{T-K} = g_T A_T ... A_{T-K+1}`` is the exact adjoint of
    ``w_{T-K}``: the Jacobians of the first ``T - K`` steps taken as the identity, as FO takes them all (the adjoint
    of the optimizer's state at ``T - K`` is dropped). ``K = T`` is RMD's exact term.

    Args:
        truncate: ``K``, the number of last steps differentiated (at most T).

    Raises:
        ValueError: ``truncate`` < 1, or larger than the problem's number of steps.
    """

    name = "truncated_rmd"
    spec_args = ("truncate",)
    capabilities = Capabilities(
        computes="reverse mode through the last K steps",
        cost="~K/T x the loop",
        memory="O(PK)",
        example="truncated_rmd(5)",
        learned_init=True,
    )

    def products(self, inner_steps: int | None) -> int | None:
        return self.truncate if inner_steps is None else min(self.truncate, inner_steps)

    def __init__(self, truncate: int = 1, nonfinite: str = "warn") -> None:
        super().__init__(nonfinite)
        self.truncate = check_positive_int("TruncatedRMD", "truncate (K)", truncate)

    def _first_differentiated_step(self, problem: BilevelProblem) -> int:
        if self.truncate > problem.steps:
            raise ValueError(
                f"TruncatedRMD truncate (K={self.truncate}) exceeds the number of inner steps (T={problem.steps}); "
                "use K <= T, or RMD for the whole trajectory"
            )
        return problem.steps - self.truncate + 1


@register_estimator
class RMD(_ReverseMode):
    """The exact hypergradient (eq. 3-5) by reverse mode through all T inner steps (Franceschi et al., 2017)::

        d L_val / d alpha = grad_alpha L_val(w_T) + sum_{t=1}^T g_T (prod_{k=t+1}^T A_k) B_t

    Memory O(P T): the graph of every step is kept until the backward pass. About twice the cost of the loop.
    Spec string: ``rmd``.

    With ``checkpoint_every=K`` the same hypergradient (to rounding) is computed with checkpointing: a first pass of
    the inner loop without a graph stores ``(w_t, s_t)`` (parameters and optimizer state) at t = 0, K, 2K, ...;
    then, from the last segment to the first, each segment of K steps is run again from its stored start with a
    graph, and the adjoint of ``(w, s)`` at its end is propagated back through it to its start, the gradients with
    respect to ``h`` adding up. Memory O(P (T/K + K)) instead of O(P T) (``K = sqrt(T)``: O(P sqrt(T))), for one
    extra pass of the inner loop without a graph (the steps before the last segment): about 1.5x plain RMD's time.
    ``K >= T`` is one segment, plain RMD. Spec strings: ``rmd(checkpoint_every=5)``,
    ``rmd(checkpoint_every='sqrt')``. A segment's steps run again with the random state they first ran with
    (:class:`~lightning_hypergrad.inner_loop.StepRandomness`): with dropout in the model, the hypergradient is plain
    RMD's for the same seed.

    A learned initialization ``w_0(alpha)`` (MAML) is differentiated exactly, in both forms: the term
    ``g_T A_T ... A_1 dw_0/dalpha`` comes from the same backward pass (from the first segment's, when checkpointed).

    Args:
        checkpoint_every: ``None`` (plain RMD), the segment length ``K`` (an integer >= 1), ``"sqrt"``:
            ``K = ceil(sqrt(T))`` for each problem, or ``"auto"``: the ``K`` of least memory for each problem,
            ``ceil(sqrt(T B_state / B_graph))`` from the bytes of one step's ``(w, s)`` and of its graph (measured
            on step 1, one more step's cost); where a step's graph is larger than its ``(w, s)``, shorter
            segments than ``"sqrt"``'s at the same time.
        nonfinite: see :class:`HypergradEstimator`.

    Raises:
        ValueError: ``checkpoint_every`` is neither ``None``, an integer >= 1, ``"sqrt"`` nor ``"auto"``.
    """

    name = "rmd"
    spec_options = ("checkpoint_every", "nonfinite")
    capabilities = Capabilities(
        computes="exact, reverse mode through all T steps; `checkpoint_every=K`: each segment of K steps run "
        "again from a checkpoint of (w, s) (`'sqrt'`: K = ceil(sqrt(T)); `'auto'`: the K of least memory)",
        cost="~1x the loop; checkpointed ~2x the loop (1.2-1.4x RMD's time, measured)",
        memory="O(PT); checkpointed O(P(T/K+K))",
        example="rmd(checkpoint_every='sqrt')",
        learned_init=True,
        exact=True,
    )

    def products(self, inner_steps: int | None) -> int | None:
        return inner_steps

    def __init__(self, checkpoint_every: int | str | None = None, nonfinite: str = "warn") -> None:
        super().__init__(nonfinite)
        self.checkpoint_every = check_checkpoint_every("RMD", checkpoint_every, ("sqrt", "auto"))

    def _first_differentiated_step(self, problem: BilevelProblem) -> int:
        return 1

    def segment_length(
        self, steps: int, problem: BilevelProblem | None = None, h: list[Tensor] | None = None
    ) -> int | None:
        """``K`` for a problem of ``steps`` inner steps; ``None`` without checkpointing. ``"auto"`` needs the
        problem and its hyperparameters (it measures one step's graph: ``memory_optimal_segment``)."""
        if self.checkpoint_every == "auto":
            if problem is None or h is None:
                raise ValueError("RMD(checkpoint_every='auto') chooses K from the problem: pass problem and h")
            return memory_optimal_segment(problem, h)
        return segment_length(self.checkpoint_every, steps)

    def _estimate(self, problem: BilevelProblem, h):
        every = self.segment_length(problem.steps, problem, h)
        if every is None or every >= problem.steps:
            return super()._estimate(problem, h)
        return _checkpointed_rmd(problem, h, every)


def check_checkpoint_every(owner: str, value: object, words: tuple[str, ...] = ("sqrt",)) -> int | str | None:
    """``value`` checked as a ``checkpoint_every`` setting: ``None``, an integer >= 1 or one of ``words``."""
    valid = value is None or value in words
    valid |= isinstance(value, int) and not isinstance(value, bool) and value > 0
    if not valid:
        named = " or ".join(map(repr, words))
        raise ValueError(
            f"{owner} checkpoint_every must be None (no checkpointing), an integer >= 1 or {named}, got {value!r}"
        )
    return value  # type: ignore[return-value]


def segment_length(checkpoint_every: int | str | None, steps: int) -> int | None:
    """The segment length ``K`` that ``checkpoint_every`` gives for ``steps`` inner steps (``"sqrt"``:
    ``ceil(sqrt(T))``); ``None`` without checkpointing."""
    if checkpoint_every == "sqrt":
        return math.isqrt(steps - 1) + 1  # ceil(sqrt(T)) for T >= 1
    return checkpoint_every  # type: ignore[return-value]


def step_bytes(problem: BilevelProblem, h: list[Tensor]) -> tuple[int, int]:
    """``(state, graph)``: the bytes of one step's ``(w, s)``, and the bytes step 1's graph saves for its backward
    pass (built once, with the random state forked so that the global stream is left as it was, and freed)."""
    saved: dict[int, int] = {}

    def pack(x: Tensor) -> Tensor:
        try:
            storage = x.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without its own storage: its elements
            saved[id(x)] = x.numel() * x.element_size()
        # detached: a saved output kept with its grad_fn would hold its own node (a cycle autograd cannot free);
        # the step's backward needs the values only, and this graph is never differentiated twice
        return x.detach()

    devices = StepRandomness.of(problem, h).devices
    with torch.random.fork_rng(devices=devices), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        first = unroll(problem, h, lambda t: StepMode.CHAIN, stop=1)
    state = sum(x.numel() * x.element_size() for x in [*first.params, *first.state.tensors()])
    del first
    return state, sum(saved.values())


def memory_optimal_segment(problem: BilevelProblem, h: list[Tensor]) -> int:
    """The ``K`` that minimizes checkpointed RMD's memory, ``(T / K) B_state + K B_graph`` (the stored checkpoints
    and one segment's graphs): ``ceil(sqrt(T B_state / B_graph))``, within 1 and T (:func:`step_bytes`)."""
    if problem.steps == 1:  # one step: nothing to checkpoint, nothing to measure
        return 1
    state, graph = step_bytes(problem, h)
    return max(1, min(problem.steps, math.ceil(math.sqrt(problem.steps * state / max(graph, 1)))))


def _checkpointed_rmd(problem: BilevelProblem, h: list[Tensor], every: int) -> Estimate:
    """RMD by segments of ``every`` steps, each run again from its stored start (see :class:`RMD`)."""
    steps = problem.steps
    bounds = list(range(0, steps, every))  # segment starts; segment i runs steps bounds[i] + 1 .. bounds[i + 1]
    ends = bounds[1:] + [steps]
    checkpoints: dict[int, tuple[list[Tensor], OptimizerState]] = {}
    randomness = StepRandomness.of(problem, h, every)  # a segment's random draws, the same when it runs again

    def keep(step: InnerStep) -> None:
        if step.t % every == 0:
            checkpoints[step.t] = ([x.detach() for x in step.params], step.state.detached())

    # 1. no graph: the starts of segments 1, 2, ... (the last segment's steps are left to its own run below)
    head = unroll(problem, h, lambda t: StepMode.CONSTANT, on_step=keep, stop=bounds[-1], randomness=randomness)
    grads: list[Tensor | None] = [None] * len(h)
    adjoint: list[Tensor | None] = []
    tail_losses = head.inner_losses[:0]
    loss = final = None
    # 2. from the last segment to the first: run it with a graph, then propagate the adjoint to its start
    for t0, t1 in reversed(list(zip(bounds, ends))):
        if t0 == 0:
            start, inputs = None, []  # w_0 and s_0 are constants
        else:
            w0, s0 = checkpoints.pop(t0)
            start = (t0, leaves(w0), s0.detached(requires_grad=True))
            inputs = [*start[1], *start[2].tensors()]
        with randomness.replay(t0 + 1):  # the last segment runs for the first time here: nothing to replay
            segment = unroll(problem, h, lambda t: StepMode.CHAIN, start=start, stop=t1)
        if t1 == steps:
            loss = problem.outer_loss(segment.params, h)
            final, tail_losses = segment, segment.inner_losses
            outputs, grad_outputs = [loss], None
        else:
            pairs = [
                (y, g)
                for y, g in zip([*segment.params, *segment.state.tensors()], adjoint)
                if g is not None and y.requires_grad
            ]
            outputs, grad_outputs = [y for y, _ in pairs], [g for _, g in pairs]
        if not outputs:  # nothing flows back any more
            break
        found = torch.autograd.grad(outputs, [*h, *inputs], grad_outputs, allow_unused=True)
        add_grads(grads, found[: len(h)])
        adjoint = list(found[len(h) :])
        del segment, outputs, grad_outputs, found
    assert loss is not None and final is not None
    trajectory = Trajectory(
        [x.detach() for x in final.params], final.state.detached(), torch.cat([head.inner_losses, tail_losses])
    )
    return Estimate(grads, trajectory, loss.detach())
