"""Exact reverse mode without a second-order graph: the adjoint sweep by forward-over-reverse products.

RMD (:class:`~lightning_hypergrad.RMD`) differentiates the unrolled loop with ``create_graph=True``: every step keeps
the graph of its forward and backward pass (reverse-over-reverse), so memory grows with T times the activations.
Here the forward pass runs without any graph and stores only the inner parameters and the optimizer's state before
each step (or every K-th, segments recomputed without graphs); the reverse sweep then takes each step's adjoint
update from those stored values:

- ``Phi(w, s, d, h)`` is the optimizer's update (elementwise): one first-order vector-Jacobian product gives the
  adjoint's parts ``a_w``, ``a_s``, ``a_d`` and the settings' own term ``a_h``;
- the gradient ``d = grad_w L_train(w, h)`` enters through ``a_d``: one forward-over-reverse product,
  ``torch.func.jvp`` of ``w -> (grad_w L_train, grad_h L_train)`` along ``a_d``, gives both ``H a_d`` (the step's
  ``A_t^T`` part) and the mixed term ``(d^2 L_train / dh dw) a_d`` (its ``B_t^T`` part).

So ``lambda_{t-1} = a_w + H a_d``, the state's adjoint ``a_s``, and ``h`` receives ``a_h + mixed``: the exact
hypergradient (eq. 3), with the working memory of one step's forward-over-reverse product (MixFlow-MG, Kemaev et al.,
ICML 2025, for JAX). The losses must run under ``torch.func`` transforms (no ``.item()``, no in-place change of a
captured tensor).

``product="double_backward"`` takes the same two products by reverse-over-reverse on the step's own graph instead:
the step runs once with ``create_graph=True`` (which also gives ``d``), ``<a_d, d>`` is differentiated with respect to
``w`` and ``h``, and the graph is freed before the next step. Its working set is one step's second-order graph, not
T steps' as in RMD's; in PyTorch on a CPU it measured faster than the ``jvp`` (whose forward AD through the
backward of ``log_softmax`` and the convolutions runs partly as Python decompositions) and no larger.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_hypergrad.estimators.base import AdjointEstimator, Estimate, add_grads
from lightning_hypergrad.estimators.registry import Capabilities, register_estimator
from lightning_hypergrad.estimators.reverse import check_checkpoint_every, segment_length
from lightning_hypergrad.inner_loop import InnerStep, StepMode, StepRandomness, Trajectory, unroll
from lightning_hypergrad.optim.base import OptimizerState
from lightning_hypergrad.problem import BilevelProblem, leaves


def _zeros_for_none(values, like) -> list[Tensor]:
    return [torch.zeros_like(x) if v is None else v for v, x in zip(values, like)]


def adjoint_step(
    problem: BilevelProblem,
    t: int,
    w: list[Tensor],
    state: OptimizerState,
    h: list[Tensor],
    adjoint_w: list[Tensor],
    adjoint_s: list[Tensor],
    replay: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    product: str = "jvp",
) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
    """The adjoints of ``w_{t-1}`` and ``s_{t-1}`` and the step's term of ``h``, from ``w_{t-1}``, ``s_{t-1}``
    (each evaluation of the step's loss in a ``replay()`` block: with the random state the step first ran with).

    ``product``: ``"jvp"`` takes ``H a_d`` and the mixed term by forward-over-reverse, after a first-order gradient
    for ``d = grad_w L_train(w_{t-1})``; ``"double_backward"`` takes ``d`` with a graph and the products by
    reverse-over-reverse on this step's graph alone (freed on return)."""
    loss = problem.step_loss(t)
    h_const = [x.detach() for x in h]
    with torch.enable_grad():
        if product == "double_backward":
            with replay():
                _, d_graph, w_graph, h_graph = _gradient_with_graph(loss, w, h_const)
            gradient = [x.detach() for x in d_graph]
        else:
            w_in = leaves(w)
            with replay():
                gradient = list(torch.autograd.grad(loss(w_in, h_const), w_in, materialize_grads=True))
        a_w, a_s, a_d, total = _update_adjoints(problem, w, gradient, state, h, adjoint_w, adjoint_s)
        if product == "double_backward":
            hessian_a, mixed_a = _second_order_products(d_graph, a_d, w_graph, h_graph)
        else:
            hessian_a, mixed_a = _forward_over_reverse(loss, w, h_const, a_d, replay)
    add_grads(total, list(mixed_a))
    return [x + y for x, y in zip(a_w, hessian_a)], a_s, total


def _update_adjoints(
    problem: BilevelProblem,
    w: list[Tensor],
    d: list[Tensor],
    state: OptimizerState,
    h: list[Tensor],
    adjoint_w: list[Tensor],
    adjoint_s: list[Tensor],
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor | None]]:
    """One first-order VJP of the update ``Phi(w, s, d, h)``: the adjoint's parts ``a_w``, ``a_s``, ``a_d`` and the
    settings' own term of ``h`` (a learned learning rate's)."""
    w_in, d_in, s_in, h_in = leaves(w), leaves(d), state.detached(requires_grad=True), leaves(h)
    w_out, s_out = problem.optimizer.update(w_in, d_in, s_in, h_in)
    outputs = [*w_out, *s_out.tensors()]
    pairs = [(y, c) for y, c in zip(outputs, [*adjoint_w, *adjoint_s]) if y.requires_grad]
    inputs = [*w_in, *s_in.tensors(), *d_in, *h_in]
    found = torch.autograd.grad([y for y, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True)
    n, m = len(w_in), len(s_in.tensors())
    a_w = _zeros_for_none(found[:n], w_in)
    a_s = _zeros_for_none(found[n : n + m], s_in.tensors())
    a_d = _zeros_for_none(found[n + m : 2 * n + m], w_in)
    return a_w, a_s, a_d, list(found[2 * n + m :])


def _forward_over_reverse(
    loss: Callable, w: list[Tensor], h: list[Tensor], direction: list[Tensor], replay: Callable
) -> tuple[list[Tensor], list[Tensor | None]]:
    """``H a`` and ``d/dh <a, grad_w L>`` by ``torch.func.jvp`` of the gradient; by one step's double backward where
    forward AD cannot pass the loss."""

    def gradients(w_: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        return torch.func.grad(lambda a, b: loss(list(a), list(b)), argnums=(0, 1))(w_, tuple(h))

    w_primal = tuple(x.detach() for x in w)
    try:
        with replay():
            _, (hessian_a, mixed_a) = torch.func.jvp(gradients, (w_primal,), (tuple(direction),))
        return list(hessian_a), list(mixed_a)
    except RuntimeError as error:
        if not any(sign in str(error) for sign in _FORWARD_AD_GAPS):
            raise
    with replay():  # the loss has an operation forward AD cannot take through its backward
        return _by_double_backward(loss, w_primal, h, direction)


def _gradient_with_graph(
    loss: Callable, w: Sequence[Tensor], h: Sequence[Tensor]
) -> tuple[Tensor, tuple[Tensor, ...], list[Tensor], list[Tensor]]:
    """The step's loss and ``d = grad_w L(w, h)`` with its graph (``create_graph``), from fresh leaves of ``w`` and
    ``h``: ``(loss, d, w_leaves, h_leaves)``."""
    w_in, h_in = leaves(w), leaves(h)
    value = loss(w_in, h_in)
    return value, torch.autograd.grad(value, w_in, create_graph=True, materialize_grads=True), w_in, h_in


def _second_order_products(
    d: Sequence[Tensor], direction: list[Tensor], w: list[Tensor], h: list[Tensor]
) -> tuple[list[Tensor], list[Tensor | None]]:
    """``H a`` and ``d/dh <a, d>`` by one backward of ``<a, d>`` through the graph of ``d = grad_w L(w, h)``."""
    pairs = [(g, a) for g, a in zip(d, direction) if g.requires_grad]
    if not pairs:  # the gradient does not depend on w or h: no second-order term
        return [torch.zeros_like(x) for x in w], [None] * len(h)
    inner = sum((g * a).sum() for g, a in pairs)
    found = torch.autograd.grad(inner, [*w, *h], allow_unused=True)
    return _zeros_for_none(found[: len(w)], w), list(found[len(w) :])


PRODUCTS = ("jvp", "double_backward")
"""How :class:`MixedRMD` takes each step's second-order products: forward-over-reverse, or reverse-over-reverse on
the step's own graph."""

_FORWARD_AD_GAPS = ("ZeroTensors are immutable", "forward AD")
"""PyTorch's errors where forward-over-reverse does not reach (``F.mse_loss``'s backward writes into a constant's
zero tangent; ``F.huber_loss``'s backward has no forward derivative)."""


def _by_double_backward(
    loss: Callable, w: tuple[Tensor, ...], h: list[Tensor], direction: list[Tensor]
) -> tuple[list[Tensor], list[Tensor | None]]:
    """``H a`` and ``d/dh <a, grad_w L>`` by reverse-over-reverse for this step alone (its double-backward graph is
    freed on return): the products :func:`adjoint_step` takes by ``jvp``, where forward AD cannot. Refuses, as the
    second-order estimators do, a ``once_differentiable`` function on the way (autograd would drop its part)."""
    from lightning_hypergrad.problem import _once_differentiable_on_a_path

    with torch.enable_grad():
        value, grads, w_in, h_in = _gradient_with_graph(loss, w, h)
        if _once_differentiable_on_a_path(value, w_in):
            raise RuntimeError(
                "mixed_rmd: forward AD cannot pass the training loss and its fallback, double backward, cannot pass "
                "its once_differentiable function; use an estimator without double backward (fo, t1t2_fd, sama)"
            )
        return _second_order_products(grads, direction, w_in, h_in)


@register_estimator
class MixedRMD(AdjointEstimator):
    """The exact hypergradient (eq. 3) by a reverse sweep from stored ``(w, s)``, one step's second-order products
    at a time, without the T steps' second-order graph (see the module). Equal to :class:`~lightning_hypergrad.RMD`
    up to rounding (a test holds it to 1e-12 in float64); its memory is the stored ``(w, s)`` of the steps plus one
    step's working set, not T steps' graphs.

    Args:
        checkpoint_every: ``None``: store ``(w_{t-1}, s_{t-1})`` of every step (``T (P + S)`` numbers); ``K`` (or
            ``"sqrt"``, ``ceil(sqrt(T))``): store every K-th and recompute each segment's steps, without graphs, as
            the sweep reaches it (``(T/K + K)(P + S)`` numbers, one more forward pass of the loop).
        product: how each step's ``H a`` and mixed term are taken: ``"jvp"``, forward-over-reverse
            (``torch.func.jvp`` of the gradient, after a first-order gradient for the step's ``d``), or
            ``"double_backward"``, reverse-over-reverse on that step's own graph (its ``d`` from the same graph),
            freed before the next step. Both are exact; on a CPU ``"double_backward"`` measured faster and smaller
            (docs/scale.md).

    Raises:
        ValueError: ``checkpoint_every`` neither ``None``, an integer >= 1 nor ``"sqrt"``; ``product`` not one of
            ``PRODUCTS``.
    """

    name = "mixed_rmd"
    spec_options = ("checkpoint_every", "product", "nonfinite")
    capabilities = Capabilities(
        computes="exact as RMD, the reverse sweep from stored `(w, s)`, one step's products at a time (no T-step "
        "second-order graph); `checkpoint_every=K` stores every K-th; `product`: `'jvp'` (forward-over-reverse) or "
        "`'double_backward'` (the step's own graph)",
        cost="T HVPs + T mixed products (one `jvp` or one step's double backward each) + T update VJPs; "
        "checkpointed: one more forward pass",
        memory="O(T(P+S)) + one step; checkpointed O((T/K+K)(P+S))",
        example="mixed_rmd",
        learned_init=True,
        exact=True,
    )

    def __init__(
        self, checkpoint_every: int | str | None = None, product: str = "jvp", nonfinite: str = "warn"
    ) -> None:
        super().__init__(nonfinite)
        self.checkpoint_every = check_checkpoint_every("MixedRMD", checkpoint_every)
        if product not in PRODUCTS:
            raise ValueError(f"MixedRMD product must be one of {', '.join(map(repr, PRODUCTS))}, got {product!r}")
        self.product = product

    def products(self, inner_steps: int | None) -> int | None:
        return None if inner_steps is None else 2 * inner_steps

    def _estimate(self, problem: BilevelProblem, h: list[Tensor]) -> Estimate:
        steps = problem.steps
        every = min(segment_length(self.checkpoint_every, steps) or 1, steps)  # None: every step's (w, s) stored
        stored: dict[int, tuple[list[Tensor], OptimizerState]] = {}
        randomness = StepRandomness.of(problem, h, every)  # the sweep evaluates each step with its first draws

        def keep(step: InnerStep) -> None:  # (w_{t-1}, s_{t-1}) of the steps that start a segment
            if (step.t - 1) % every == 0:
                stored[step.t] = ([x.detach() for x in step.params_before], step.state_before.detached())

        trajectory = unroll(problem, h, lambda t: StepMode.CONSTANT, on_step=keep, randomness=randomness)
        w_T = leaves(trajectory.params)
        with torch.enable_grad():
            loss = problem.outer_loss(w_T, h)
            found = torch.autograd.grad(loss, [*w_T, *h], allow_unused=True)
        adjoint_w = _zeros_for_none(found[: len(w_T)], w_T)
        adjoint_s = [torch.zeros_like(x) for x in trajectory.state.tensors()]
        total: list[Tensor | None] = list(found[len(w_T) :])
        for start in sorted(stored, reverse=True):  # segments from the last: recompute its steps' inputs
            w, state = stored.pop(start)
            drew = start in randomness.states  # the segment drew random numbers: each step's state recorded anew
            inputs = []
            with randomness.replay(start):
                for t in range(start, min(start + every, steps + 1)):
                    inputs.append((t, w, state, randomness.now() if drew else None))
                    if t < min(start + every, steps + 1) - 1:
                        w, state = _step(problem, t, w, state, h)
            for t, w_t, s_t, drawn in reversed(inputs):
                replay = {} if drawn is None else {"replay": functools.partial(randomness.at, drawn)}
                adjoint_w, adjoint_s, term = adjoint_step(
                    problem, t, w_t, s_t, h, adjoint_w, adjoint_s, product=self.product, **replay
                )
                add_grads(total, term)
        trajectory = Trajectory([x.detach() for x in trajectory.params], trajectory.state, trajectory.inner_losses)
        return Estimate(total, trajectory, loss.detach(), init_adjoint=adjoint_w)


def _step(
    problem: BilevelProblem, t: int, w: list[Tensor], state: OptimizerState, h: list[Tensor]
) -> tuple[list[Tensor], OptimizerState]:
    """One inner step without a graph (a segment's recomputation)."""
    h_const = [x.detach() for x in h]
    with torch.enable_grad():
        w_in = leaves(w)
        d = torch.autograd.grad(problem.step_loss(t)(w_in, h_const), w_in, materialize_grads=True)
    with torch.no_grad():
        w_new, s_new = problem.optimizer.update(w_in, d, state.detached(), h_const)
    return [x.detach() for x in w_new], s_new.detached()
