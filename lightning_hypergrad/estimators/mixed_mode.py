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
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

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
) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
    """The adjoints of ``w_{t-1}`` and ``s_{t-1}`` and the step's term of ``h``, from ``w_{t-1}``, ``s_{t-1}``
    (each evaluation of the step's loss in a ``replay()`` block: with the random state the step first ran with)."""
    loss = problem.step_loss(t)
    h_const = [x.detach() for x in h]
    with torch.enable_grad():
        w_in = leaves(w)
        with replay():
            d = torch.autograd.grad(loss(w_in, h_const), w_in, materialize_grads=True)
        d_in = leaves(d)
        s_in = state.detached(requires_grad=True)
        h_in = leaves(h)
        w_out, s_out = problem.optimizer.update(w_in, d_in, s_in, h_in)
        outputs = [*w_out, *s_out.tensors()]
        cotangents = [*adjoint_w, *adjoint_s]
        pairs = [(y, c) for y, c in zip(outputs, cotangents) if y.requires_grad]
        inputs = [*w_in, *s_in.tensors(), *d_in, *h_in]
        found = torch.autograd.grad([y for y, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True)
    n, m = len(w_in), len(s_in.tensors())
    a_w = _zeros_for_none(found[:n], w_in)
    a_s = _zeros_for_none(found[n : n + m], s_in.tensors())
    a_d = _zeros_for_none(found[n + m : 2 * n + m], w_in)
    total: list[Tensor | None] = list(found[2 * n + m :])  # the settings' own term (a learned lr)

    def gradients(w_: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        return torch.func.grad(lambda a, b: loss(list(a), list(b)), argnums=(0, 1))(w_, tuple(h_const))

    w_primal = tuple(x.detach() for x in w)
    try:
        with replay():
            _, (hessian_a, mixed_a) = torch.func.jvp(gradients, (w_primal,), (tuple(a_d),))
    except RuntimeError as error:
        if not any(sign in str(error) for sign in _FORWARD_AD_GAPS):
            raise
        with replay():  # the loss has an operation forward AD cannot take through its backward
            hessian_a, mixed_a = _by_double_backward(loss, w_primal, h_const, a_d)
    add_grads(total, list(mixed_a))
    return [x + y for x, y in zip(a_w, hessian_a)], a_s, total


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
        w_in, h_in = leaves(w), leaves(h)
        value = loss(w_in, h_in)
        if _once_differentiable_on_a_path(value, w_in):
            raise RuntimeError(
                "mixed_rmd: forward AD cannot pass the training loss and its fallback, double backward, cannot pass "
                "its once_differentiable function; use an estimator without double backward (fo, t1t2_fd, sama)"
            )
        grads = torch.autograd.grad(value, w_in, create_graph=True, materialize_grads=True)
        inner = sum((g * a).sum() for g, a in zip(grads, direction))
        found = torch.autograd.grad(inner, [*w_in, *h_in], allow_unused=True, materialize_grads=False)
    return _zeros_for_none(found[: len(w_in)], w_in), list(found[len(w_in) :])


@register_estimator
class MixedRMD(AdjointEstimator):
    """The exact hypergradient (eq. 3) by a reverse sweep of forward-over-reverse products, without a second-order
    graph (see the module). Equal to :class:`~lightning_hypergrad.RMD` up to rounding (a test holds it to 1e-12 in
    float64); its memory is the stored ``(w, s)`` of the steps plus one step's working set, not T steps' graphs.

    Args:
        checkpoint_every: ``None``: store ``(w_{t-1}, s_{t-1})`` of every step (``T (P + S)`` numbers); ``K`` (or
            ``"sqrt"``, ``ceil(sqrt(T))``): store every K-th and recompute each segment's steps, without graphs, as
            the sweep reaches it (``(T/K + K)(P + S)`` numbers, one more forward pass of the loop).

    Raises:
        ValueError: ``checkpoint_every`` neither ``None``, an integer >= 1 nor ``"sqrt"``.
    """

    name = "mixed_rmd"
    spec_options = ("checkpoint_every", "nonfinite")
    capabilities = Capabilities(
        computes="exact as RMD, the reverse sweep by forward-over-reverse products from stored `(w, s)` (no "
        "second-order graph); `checkpoint_every=K` stores every K-th",
        cost="T HVPs + T mixed products (one `jvp` each) + T update VJPs; checkpointed: one more forward pass",
        memory="O(T(P+S)) + one step; checkpointed O((T/K+K)(P+S))",
        example="mixed_rmd",
        learned_init=True,
        exact=True,
    )

    def __init__(self, checkpoint_every: int | str | None = None, nonfinite: str = "warn") -> None:
        super().__init__(nonfinite)
        self.checkpoint_every = check_checkpoint_every("MixedRMD", checkpoint_every)

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
                adjoint_w, adjoint_s, term = adjoint_step(problem, t, w_t, s_t, h, adjoint_w, adjoint_s, **replay)
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
