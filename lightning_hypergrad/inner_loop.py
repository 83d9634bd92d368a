"""The one inner loop that every estimator drives.

Each step ``t`` computes ``w_t, s_t = Phi(w_{t-1}, s_{t-1}, h)`` in one of three modes, chosen per step by the
estimator:

- ``CONSTANT``: nothing is differentiated; no autograd graph survives the step.
- ``LOCAL``: the step is differentiable with respect to its own inputs (``w_{t-1}``, ``s_{t-1}``, fresh leaves)
  and to ``h``; the graph lives until the estimator's ``on_step`` hook has used it (Greedy, T1-T2, FMD).
- ``CHAIN``: the step is differentiable and connected to the graph of the previous step (reverse mode).

An estimator that runs steps more than once (checkpointed reverse mode, a reverse sweep) passes a
:class:`StepRandomness` to the first run, which records the random state where each stretch of steps starts, and runs
the stretch again with that state: a model that draws random numbers (dropout) sees the same draws in every run.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Sequence
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
    randomness: StepRandomness | None = None,
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
        randomness: records the random state where each stretch of steps starts, for the estimator to run it again
            with the same draws (see :class:`StepRandomness`); ``None``: nothing recorded.
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
            if randomness is not None:
                randomness.before(t)
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
    if randomness is not None:
        randomness.close()
    return Trajectory(w, state, torch.stack(losses) if losses else torch.zeros(0))


RandomState = tuple[Tensor, list[Tensor]]
"""The CPU generator's state and the states of some CUDA devices' generators."""


def cuda_devices(tensors: Sequence[Tensor]) -> list[int]:
    """The indices of the CUDA devices that ``tensors`` are on (whose generators a step on them draws from)."""
    return sorted({x.get_device() for x in tensors if isinstance(x, Tensor) and x.is_cuda})


def random_state(devices: Sequence[int]) -> RandomState:
    """The CPU generator's state and those of the CUDA ``devices``."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def set_random_state(state: RandomState, devices: Sequence[int]) -> None:
    """Set the generators to ``state`` (from :func:`random_state` with the same ``devices``)."""
    torch.set_rng_state(state[0])
    for device, cuda_state in zip(devices, state[1]):
        torch.cuda.set_rng_state(cuda_state, device)


def same_random_state(a: RandomState, b: RandomState) -> bool:
    """Whether two states are equal: nothing drew a random number between them."""
    return all(torch.equal(x, y) for x, y in zip([a[0], *a[1]], [b[0], *b[1]]))


def preserved_random_state(tensors: Sequence[Tensor]) -> contextlib.AbstractContextManager:
    """A block after which the generators (the CPU's, and those of the CUDA devices of ``tensors``) are as before."""
    return torch.random.fork_rng(devices=cuda_devices(tensors))


class StepRandomness:
    """The random state where each stretch of ``every`` inner steps started, to run the stretch again with the same
    draws.

    The first run of the steps records the state of the generators (the CPU's, and each CUDA device's that
    ``tensors`` are on) before steps 1, ``1 + every``, ``1 + 2 every``, ... and draws from the global random stream
    as usual; a stretch whose steps drew nothing keeps no state (a deterministic model costs no memory).
    :meth:`replay` runs a stretch again with its recorded state, in a fork that leaves the global stream where it
    was, as ``torch.utils.checkpoint`` does. So a model that draws random numbers (dropout) sees the same draws in
    every run of a step, and the random stream after an estimate is that of one pass of the loop.
    """

    def __init__(self, tensors: Sequence[Tensor], every: int = 1) -> None:
        self.devices = cuda_devices(tensors)
        self.every = every
        self.states: dict[int, RandomState] = {}
        self._open: int | None = None  # the stretch being run for the first time

    @classmethod
    def of(cls, problem: BilevelProblem, h: Sequence[Tensor], every: int = 1) -> StepRandomness:
        """For the steps of ``problem`` with ``h`` (the devices of ``h`` and of constant inner parameters)."""
        return cls([*h, *([] if problem.learned_init else problem.init_params)], every)

    def before(self, t: int) -> None:
        """Called before the first run of step ``t``: a stretch starts at ``t = 1 + k every``."""
        if (t - 1) % self.every == 0:
            self.close()
            self.states[t] = random_state(self.devices)
            self._open = t

    def close(self) -> None:
        """End the stretch being run: its state is dropped where nothing drew a random number since."""
        if self._open is not None and same_random_state(self.states[self._open], random_state(self.devices)):
            del self.states[self._open]
        self._open = None

    def replay(self, t: int) -> contextlib.AbstractContextManager:
        """A block that runs the stretch from step ``t`` again, with the state recorded before ``t`` (then
        forgotten; nothing to set where the stretch drew nothing, or has not run yet)."""
        return self.at(self.states.pop(t, None))

    @contextlib.contextmanager
    def at(self, state: RandomState | None) -> Iterator[None]:
        """A block that draws from ``state`` (``None``: from the global stream), the global stream kept as it was."""
        if state is None:
            yield
            return
        with torch.random.fork_rng(devices=self.devices):
            set_random_state(state, self.devices)
            yield

    def now(self) -> RandomState:
        """The generators' state now."""
        return random_state(self.devices)
