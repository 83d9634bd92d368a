"""The generalized greedy hypergradient (eq. 6 of the paper) and T1-T2, its limit as gamma -> 0."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_hypergrad.estimators.base import AdjointEstimator, Estimate, add_grads, check_gamma, weighted_step_vjp
from lightning_hypergrad.estimators.registry import Capabilities, register_estimator
from lightning_hypergrad.inner_loop import (
    InnerStep,
    StepMode,
    cuda_devices,
    leaves,
    random_state,
    same_random_state,
    set_random_state,
    unroll,
)
from lightning_hypergrad.optim.base import OptimizerState
from lightning_hypergrad.optim.sgd import SGD
from lightning_hypergrad.problem import BilevelProblem

FUSE_MAX_ENTRIES = 2**22
"""``fused="auto"`` fuses Greedy's per-step terms when the stored trajectory, ``T (2 P + S)`` numbers (the inner
parameters before and after each step and the optimizer's state), holds at most this many (16 MiB in float32)."""

FUSED_OPTIMIZERS = (SGD,)
"""The inner optimizers whose step the fused form batches over the steps: exactly these classes (a subclass may make
its step depend on the step's index, as a learning-rate schedule does, which one batched step cannot see)."""


FUSE_MAX_SAVED_BYTES = 64 * 2**20
"""The fused form batches as many steps at once as keep the graph of the batch within this many bytes saved for
backward (measured on the first step), so that its memory stays bounded where each step's graph is large."""


class _SavedBytes:
    """Counts the bytes of the tensors that autograd saves for backward (a ``saved_tensors_hooks`` pack hook)."""

    def __init__(self) -> None:
        self.bytes = 0

    def pack(self, tensor: Tensor) -> Tensor:
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor


def _fused_terms(problem: BilevelProblem, h, entries, state_before: OptimizerState) -> list[Tensor | None]:
    """``sum_t c_t g_t B_t`` over the stored steps ``entries`` ``(c_t, w_{t-1}, s_{t-1} tensors, w_t)`` at once."""
    h_const = [x.detach() for x in h]
    weights = torch.tensor([c for c, *_ in entries], dtype=entries[0][3][0].dtype, device=entries[0][3][0].device)
    before = leaves([torch.stack(ws) for ws in zip(*(e[1] for e in entries))])
    after = leaves([torch.stack(ws) for ws in zip(*(e[3] for e in entries))])
    state = state_before.replace([torch.stack(ss) for ss in zip(*(e[2] for e in entries))])
    outer = torch.vmap(lambda *w: problem.outer_loss(list(w), h_const))(*after)
    g = torch.autograd.grad(outer.sum(), after, materialize_grads=True)
    inner = torch.vmap(lambda *w: problem.inner_loss(list(w), h))(*before)
    grads = torch.autograd.grad(inner.sum(), before, create_graph=True, materialize_grads=True)
    stepped, _ = problem.optimizer.update(before, grads, state, h)
    weighted = sum(((gi * si).reshape(len(entries), -1).sum(1) * weights).sum() for gi, si in zip(g, stepped))
    return list(torch.autograd.grad(weighted, h, allow_unused=True))


class _RandomDraws(ValueError):
    """The inner loop drew random numbers, which the fused form cannot replay."""


class _WeightedGreedy(AdjointEstimator):
    """``grad_alpha L_val(w_T) + sum_t c_t g_t B_t`` for step weights ``c_t`` given by :meth:`weight`.

    ``g_t = grad_w L_val(w_t, alpha)`` and ``B_t = dPhi(w_{t-1}, s_{t-1}, alpha) / d alpha`` with ``w_{t-1}`` and
    ``s_{t-1}`` held constant, so ``g_t B_t`` is one vector-Jacobian product of the step alone: no graph lives
    from one inner step to the next and the memory does not grow with T.

    A learned initialization ``w_0(alpha)`` (MAML) adds ``g_T B_0`` with ``B_0 = dw_0 / d alpha``. The exact
    hypergradient holds it as ``g_T A_T ... A_1 B_0``; eq. 6 is FO's direct term plus one term per step of ``Phi``,
    and ``w_0`` is not a step, so it keeps FO's reading of that term (every ``A_t`` taken as the identity: first-order
    MAML) rather than the greedy one ``gamma^T g_0 B_0``, which would judge the initialization by the validation loss
    at ``w_0`` itself. With ``alpha`` entering through ``w_0`` alone, every member of the family is first-order MAML.
    """

    #: whether the per-step terms may be computed in one batched call after the loop (see :class:`Greedy`)
    fused: bool | str = False

    def weight(self, t: int, steps: int) -> float:
        raise NotImplementedError

    def fuses(self, problem: BilevelProblem) -> bool:
        """Whether the per-step terms of ``problem`` are computed fused (one batched call) rather than streamed.

        ``fused=True`` or ``"auto"`` needs: no per-step loss (``inner_step_loss``: each step's batch differs), an
        inner optimizer of ``FUSED_OPTIMIZERS``, and more than one weighted step; ``"auto"`` also needs the stored
        trajectory to hold at most ``FUSE_MAX_ENTRIES`` numbers.
        """
        if self.fused is False or getattr(self, "_fusing_failed", False):
            return False
        steps = problem.steps
        if problem.inner_step_loss is not None or type(problem.optimizer) not in FUSED_OPTIMIZERS:
            return False
        if sum(self.weight(t, steps) != 0 for t in range(1, steps + 1)) < 2:
            return False
        if self.fused is True:
            return True
        init = problem.init_params if not problem.learned_init else None
        if init is None:
            return False
        params = sum(w.numel() for w in init)
        momentum = params if problem.optimizer.uses_momentum() else 0
        return steps * (2 * params + momentum) <= FUSE_MAX_ENTRIES

    def _estimate(self, problem: BilevelProblem, h):
        if self.fuses(problem):
            if self.fused is True:
                return self._fused_estimate(problem, h)
            devices = cuda_devices(h)
            before = random_state(devices)
            try:
                return self._fused_estimate(problem, h)
            except (RuntimeError, NotImplementedError, _RandomDraws):
                # a loss that vmap cannot batch (a data-dependent branch, an unsupported operation) or a model that
                # draws random numbers: streamed from now on, from the random state the fused try started with
                # (which raises again if the error was not vmap's)
                self._fusing_failed = True
                set_random_state(before, devices)
        return self._streamed_estimate(problem, h)

    def _fused_estimate(self, problem: BilevelProblem, h) -> Estimate:
        """The weighted sum of the per-step terms in one batched call after a loop without graphs.

        The loop stores ``w_{t-1}``, ``s_{t-1}`` and ``w_t`` of every weighted step. Then, over the stacked steps:
        ``g_t`` for all of them by one backward of the ``vmap``-ed outer loss, the steps ``Phi(w_{t-1}, s_{t-1}, h)``
        recomputed at once (the inner loss ``vmap``-ed, one gradient with a graph, one optimizer update on the
        stacked tensors), and ``sum_t c_t g_t B_t`` as one backward of ``sum_t c_t <g_t, Phi_t>`` to ``h``; in chunks
        of steps whose graph holds at most ``FUSE_MAX_SAVED_BYTES``. The direct term is one more backward of
        ``L_val(w_T, h)``. Equal to the streamed form up to rounding.
        """
        steps = problem.steps
        stored: dict[bool, list[tuple[float, list[Tensor], list[Tensor], list[Tensor]]]] = {True: [], False: []}
        template: dict[bool, OptimizerState] = {}

        def on_step(step: InnerStep) -> None:
            c = self.weight(step.t, steps)
            if c != 0:
                first = step.state_before.step == 0  # SGD's first step starts its buffer: batched apart
                template.setdefault(first, step.state_before)
                entry = (c, [w.detach() for w in step.params_before], step.state_before.tensors(), step.params)
                stored[first].append(entry)

        devices = cuda_devices(h)
        before = random_state(devices)
        trajectory = unroll(problem, h, lambda t: StepMode.CONSTANT, on_step)
        if not same_random_state(before, random_state(devices)):
            raise _RandomDraws(
                f"{self}: fused=True recomputes the inner steps in one batched call, which cannot replay the model's "
                "random draws (dropout); use fused='auto' (which streams such a model) or fused=False"
            )
        w_T = [w.detach() for w in trajectory.params]
        with torch.enable_grad():
            total: list[Tensor | None] = [None] * len(h)
            for first, entries in stored.items():
                if not entries:
                    continue
                # the first step alone, its graph's size measured; then chunks of steps within the budget
                saved = _SavedBytes()
                with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda x: x):
                    add_grads(total, _fused_terms(problem, h, entries[:1], template[first]))
                chunk = max(1, FUSE_MAX_SAVED_BYTES // max(saved.bytes, 1))
                for start in range(1, len(entries), chunk):
                    add_grads(total, _fused_terms(problem, h, entries[start : start + chunk], template[first]))
            w_leaf = leaves(w_T)
            loss = problem.outer_loss(w_leaf, h)
            wrt = [*h, *w_leaf] if problem.learned_init else list(h)
            found = torch.autograd.grad(loss, wrt, allow_unused=True)
            add_grads(total, found[: len(h)])
        init_adjoint = None
        if problem.learned_init:
            init_adjoint = [torch.zeros_like(w) if gw is None else gw for w, gw in zip(w_T, found[len(h) :])]
        return Estimate(total, trajectory, loss.detach(), init_adjoint=init_adjoint)

    def _streamed_estimate(self, problem: BilevelProblem, h) -> Estimate:
        steps = problem.steps
        total: list = [None] * len(h)
        final: dict = {}

        def on_step(step: InnerStep) -> None:
            if step.mode is StepMode.CONSTANT:
                return
            # One backward of L_val(Phi(w_{t-1}, s_{t-1}, h)) gives g_t B_t by the chain rule (and, at t = T, the
            # direct term too): the outer gradient and the vector-Jacobian product in a single pass.
            last = step.t == steps
            with_init = last and problem.learned_init
            loss, found = weighted_step_vjp(problem, step.params, h, self.weight(step.t, steps), last, with_init)
            add_grads(total, found[: len(h)])
            if last:
                final["loss"] = loss
                if with_init:  # g_T, for the initialization's term (c = 1 at t = T)
                    final["g_T"] = [
                        torch.zeros_like(w) if g is None else g for w, g in zip(step.params, found[len(h) :])
                    ]

        def mode(t: int) -> StepMode:
            return StepMode.LOCAL if self.weight(t, steps) != 0 else StepMode.CONSTANT

        trajectory = unroll(problem, h, mode, on_step)
        return Estimate(total, trajectory, final["loss"], init_adjoint=final.get("g_T"))


@register_estimator
class Greedy(_WeightedGreedy):
    """The generalized greedy hypergradient of the paper, eq. 6::

        d_alpha L_val(w_T, alpha; gamma) = grad_alpha L_val(w_T, alpha) + sum_{t=1}^T gamma^(T-t) g_t B_t

    with ``g_t = grad_{w_t} L_val(w_t, alpha)`` and ``B_t = dPhi(w_{t-1}, alpha) / d alpha``. It replaces the
    product of Jacobians ``prod_{k>t} A_k`` of the exact hypergradient by ``gamma^(T-t)`` and ``g_T`` by ``g_t``.
    Cost: the inner loop plus T vector-Jacobian products and T outer gradients; memory O(P + H).

    Two ways to compute the same sum (equal up to rounding; a test holds them to 1e-12 in float64):

    - streamed: each step's term is one backward right after the step, from its graph; nothing is stored, memory
      O(P + H) whatever T;
    - fused: the loop runs without graphs (as T1-T2's does), storing ``w_{t-1}``, ``s_{t-1}`` and ``w_t``; after it,
      all the terms come from one batched computation (``torch.vmap`` over the steps), which removes the per-step
      overhead of T separate backward passes where the inner parameters are small (a few-shot head), at
      O(T (2 P + S)) memory.

    Args:
        gamma: the discount, in (0, 1]. ``gamma = 1`` weights every step equally; ``gamma -> 0`` gives T1-T2
            (Proposition 4.1). The paper found 0.99 best.
        fused: ``"auto"`` (default): fused where the stored trajectory holds at most ``FUSE_MAX_ENTRIES``
            numbers (2^22: 16 MiB in float32), the inner optimizer is :class:`~lightning_hypergrad.SGD` itself (not
            a subclass, which may depend on the step), there is no per-step loss (``inner_step_loss``) and the
            initialization is not learned; else streamed. Should ``vmap`` fail on the losses, or the model draw
            random numbers (dropout, which one batched call cannot replay step by step), it streams from then on,
            from the random state it started with. ``True``: fused wherever the optimizer and the losses allow it
            (a learned initialization too; a model that draws random numbers is refused); ``False``: always
            streamed.

    Raises:
        ValueError: ``gamma`` outside (0, 1], or ``fused`` not one of ``True``, ``False``, ``"auto"``.

    Example::

        >>> Greedy(gamma=0.99)
        Greedy(gamma=0.99, fused='auto')
    """

    name = "greedy"
    spec_args = ("gamma",)
    spec_options = ("fused", "nonfinite")
    capabilities = Capabilities(
        computes="FO + `sum_t gamma^(T-t) g_t B_t` (eq. 6)",
        cost="T VJPs + T outer gradients; fused into one batched call after the loop where the inner parameters "
        "are small ([docs/scale.md](docs/scale.md#speed-on-one-device))",
        memory="O(P+H) streamed; fused: O(T(2P+S)), at most 2^22 numbers",
        example="greedy(0.99)",
        learned_init=True,
    )

    def __init__(self, gamma: float = 0.99, nonfinite: str = "warn", fused: bool | str = "auto") -> None:
        super().__init__(nonfinite)
        if fused not in (True, False, "auto"):
            raise ValueError(f"Greedy fused must be True, False or 'auto', got {fused!r}")
        self.fused = fused
        self.gamma = check_gamma(type(self).__name__, gamma)

    def products(self, inner_steps: int | None) -> int | None:
        return inner_steps

    def weight(self, t: int, steps: int) -> float:
        return self.gamma ** (steps - t)


@register_estimator
class T1T2(_WeightedGreedy):
    """T1-T2 (Luketina et al., 2016): the greedy term of the last step only::

        grad_alpha L_val(w_T, alpha) + g_T B_T

    Cost: the inner loop plus one vector-Jacobian product; memory O(P + H).
    """

    name = "t1t2"
    capabilities = Capabilities(
        computes="FO + `g_T B_T`",
        cost="1 VJP",
        memory="O(P+H)",
        example="t1t2",
        learned_init=True,
    )

    def products(self, inner_steps: int | None) -> int | None:
        return 1

    def weight(self, t: int, steps: int) -> float:
        return 1.0 if t == steps else 0.0
