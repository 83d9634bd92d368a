"""The one inner loop that every estimator drives.

Each step ``t`` computes ``w_t, s_t = Phi(w_{t-1}, s_{t-1}, h)`` in one of three modes, chosen per step by the
estimator:

- ``CONSTANT``: nothing is differentiated; no autograd graph survives the step.
- ``LOCAL``: the step is differentiable with respect to its own inputs (``w_{t-1}``, ``s_{t-1}``, fresh leaves)
  and to ``h``; the graph lives until the estimator's ``on_step`` hook has used it (Greedy, T1-T2, FMD).
- ``CHAIN``: the step is differentiable and connected to the graph of the previous step (reverse mode).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_hypergrad.optim.base import OptimizerState
from lightning_hypergrad.problem import BilevelProblem, leaves  # noqa: F401 (leaves: imported from here too)


class StepMode(enum.Enum):
    """How the inner loop differentiates one step (see the module docstring)."""

    CONSTANT = "constant"
    LOCAL = "local"
    CHAIN = "chain"


@dataclass
class InnerStep:
    """What one inner step saw and produced; handed to the estimator's ``on_step`` hook.

    Attributes:
        t: the step's index, 1 to T.
        mode: how the step was computed.
        params_before: ``w_{t-1}``; leaves that require grad in ``LOCAL`` mode.
        state_before: ``s_{t-1}``; its tensors are leaves that require grad in ``LOCAL`` mode.
        params: ``w_t``, connected to ``h`` (and to the inputs) unless the mode is ``CONSTANT``.
        state: ``s_t``.
        loss: ``L_train(w_{t-1}, h)`` (the step's own loss, see ``BilevelProblem.inner_step_loss``), detached.
        grads: ``grad_w L_train(w_{t-1}, h)``, the gradient the step took (detached in ``CONSTANT`` mode).
    """

    t: int
    mode: StepMode
    params_before: list[Tensor]
    state_before: OptimizerState
    params: list[Tensor]
    state: OptimizerState
    loss: Tensor
    grads: list[Tensor] | None = None


@dataclass
class Trajectory:
    """The end of an inner loop: ``w_T`` and ``s_T`` (connected to the graph after ``CHAIN`` steps)."""

    params: list[Tensor]
    state: OptimizerState
    inner_losses: Tensor


def unroll(
    problem: BilevelProblem,
    h: Sequence[Tensor],
    mode: Callable[[int], StepMode],
    on_step: Callable[[InnerStep], None] | None = None,
    state_requires_grad: bool = False,
    start: tuple[int, Sequence[Tensor], OptimizerState] | None = None,
    stop: int | None = None,
) -> Trajectory:
    """Run the ``T`` inner steps of ``problem`` from its initial parameters (or steps ``t0 + 1`` to ``stop``).

    Args:
        problem: the bilevel problem.
        h: the hyperparameter leaves the losses and the optimizer's settings receive.
        mode: the mode of each step ``t`` (1 to T).
        on_step: called after each step, while its graph is alive.
        state_requires_grad: in ``LOCAL`` mode, make ``s_{t-1}`` leaves that require grad too (forward mode
            differentiates with respect to the state; the other estimators need not pay for it).
        start: ``(t0, w_t0, s_t0)``: start after step ``t0`` from these parameters and state, taken as they are
            (leaves that require grad stay connected, so that a gradient can be taken with respect to them);
            ``None``: from ``problem``'s initial parameters and state, ``t0 = 0``. A learned ``w_0``
            (``problem.learned_init``) is computed from ``h`` and stays connected to it where step 1 is ``CHAIN``.
        stop: the last step run (default T). The trajectory's ``inner_losses`` are those of steps ``t0 + 1`` to
            ``stop``.
    """
    opt = problem.optimizer
    h_const = [x.detach() for x in h]
    if start is None:
        first = 1
        # a learned w_0 stays connected to h where the first step is chained (reverse mode differentiates it)
        connect = problem.learned_init and mode(1) is StepMode.CHAIN
        w: list[Tensor] = [p if connect else p.detach() for p in problem.initial(h if connect else h_const)]
        state = problem.init_state.detached() if problem.init_state is not None else opt.init(w)
    else:
        first, w, state = start[0] + 1, list(start[1]), start[2]
    losses: list[Tensor] = []
    with torch.enable_grad():
        for t in range(first, (problem.steps if stop is None else stop) + 1):
            step_mode = mode(t)
            step_loss = problem.step_loss(t)
            if step_mode is StepMode.CONSTANT:
                w_in, s_in = leaves(w), state.detached()
                loss = step_loss(w_in, h_const)
                grads = torch.autograd.grad(loss, w_in, materialize_grads=True)
                with torch.no_grad():
                    w_new, s_new = opt.update(w_in, grads, s_in, h_const)
            else:
                if step_mode is StepMode.LOCAL:
                    w_in, s_in = leaves(w), state.detached(requires_grad=state_requires_grad)
                else:
                    w_in = [x if x.requires_grad else x.detach().requires_grad_() for x in w]
                    s_in = state
                loss = step_loss(w_in, h)
                grads = torch.autograd.grad(loss, w_in, create_graph=True, materialize_grads=True)
                w_new, s_new = opt.update(w_in, grads, s_in, h)
            losses.append(loss.detach())
            if on_step is not None:
                on_step(InnerStep(t, step_mode, w_in, s_in, w_new, s_new, loss.detach(), list(grads)))
            if step_mode is StepMode.CHAIN:
                w, state = w_new, s_new
            else:
                w, state = [x.detach() for x in w_new], s_new.detached()
    return Trajectory(w, state, torch.stack(losses) if losses else torch.zeros(0))
