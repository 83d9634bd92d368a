"""Two variants of the greedy hypergradient that go beyond eq. 6 of the paper.

- :class:`MomentumGreedy`: Greedy whose step terms follow a perturbation of step t through the momentum buffer of
  SGD to ``w_T`` (with the loss Hessian neglected), instead of dropping the buffer after one step.
- :class:`GreedyTail`: reverse mode through the last K inner steps (exact) and greedy terms for the earlier ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_hypergrad._checks import check_int
from lightning_hypergrad.estimators.base import AdjointEstimator, Estimate, add_grads, check_gamma, weighted_step_vjp
from lightning_hypergrad.estimators.registry import Capabilities, register_estimator
from lightning_hypergrad.inner_loop import InnerStep, StepMode, unroll
from lightning_hypergrad.optim.sgd import SGD
from lightning_hypergrad.problem import BilevelProblem


def _geometric_sum(mu: float | Tensor, n: int) -> float | Tensor:
    """``1 + mu + ... + mu^(n-1)`` (``n`` at ``mu = 1``), for a number or entry by entry for a tensor."""
    if isinstance(mu, Tensor):
        return torch.where(mu == 1, torch.full_like(mu, float(n)), (1 - mu**n) / (1 - mu))
    return float(n) if mu == 1 else (1 - mu**n) / (1 - mu)


@register_estimator
class MomentumGreedy(AdjointEstimator):
    """Greedy with step weights that follow the momentum buffer of SGD to ``w_T``::

        grad_alpha L_val(w_T) + sum_{t=1}^T gamma^(T-t) (g_t du_t/dalpha + kappa_(T-t) g_t dv_t/dalpha)

        kappa_n = -lr mu^p (1 + mu + ... + mu^(n-1)),   p = 1 (heavy ball) or 2 (Nesterov)

    where ``u_t = w_t`` and ``v_t = b_t`` (the momentum buffer) are the two parts of the step
    ``Phi_t(w_{t-1}, b_{t-1}, alpha)``, differentiated with ``w_{t-1}`` and ``b_{t-1}`` held constant, and
    ``g_t = grad_w L_val(w_t)``. Plain Greedy keeps the first term only: it follows the perturbation of step t
    for that one step (``w_t`` depends on alpha through ``b_t``) and then drops the buffer, although ``b_t``
    keeps moving ``w`` at every later step.

    Derivation. torch's SGD step (after the first, which sets ``b_1 = d_1``), with ``d = grad L_train(w) +
    weight_decay w``::

        b_k = mu b_(k-1) + (1 - dampening) d_k
        w_k = w_(k-1) - lr b_k                   (heavy ball)
        w_k = w_(k-1) - lr (d_k + mu b_k)        (Nesterov, dampening = 0)

    Its Jacobian with respect to the state ``(w, b)``, with the Hessian of ``L_train`` (and the weight decay)
    neglected (the paper's "A ~ I": ``lr * Hessian`` small), is the same matrix at every step k >= 2::

        A = [[I, -lr mu^p I],
             [0,  mu I    ]]

    (the dampening multiplies only ``d_k``, whose derivative is the neglected Hessian). A perturbation
    ``(du, dv)`` of the state after step t becomes, after the ``n = T - t`` later steps,
    ``A^n (du, dv) = (du - lr mu^p (1 + ... + mu^(n-1)) dv, mu^n dv)``, and ``L_val`` sees its ``w`` part
    through ``g_T``. Replacing ``g_T`` by ``g_t`` and multiplying by the discount ``gamma^(T-t)``, as Greedy does,
    gives the formula above. Both parts of ``B_t = dPhi_t/dalpha`` are computed exactly, so the dampening, the
    first step (no dampening) and the way alpha enters are all accounted for:

    - alpha in the loss: ``dv = (1 - dampening) G`` with ``G = d(grad L_train)/dalpha`` and ``du = -lr dv``
      (heavy ball) or ``-lr (1 + mu) dv`` (Nesterov), so the term is Greedy's times
      ``(1 - mu^(n+1)) / (1 - mu)`` (heavy ball) or ``(1 - mu^(n+2)) / (1 - mu^2)`` (Nesterov), a factor
      that grows from 1 (at t = T) to ``1 / (1 - mu)`` (or ``1 / (1 - mu^2)``) for early steps;
    - alpha = the learning rate: ``dv = 0`` (the buffer does not depend on lr) and the term is Greedy's;
    - alpha = the momentum: ``dv = b_(t-1) dmu/dalpha``, which the buffer carries on like a loss perturbation.

    With momentum 0 there is no buffer and the estimator is exactly :class:`Greedy` (the same computation). The
    approximation is good where the inner loss is flat on the scale of ``1 / lr`` over the trajectory; where it
    is not, the true ``prod A_k`` contracts the buffer's contribution and these weights, which grow towards
    ``1 / (1 - mu)``, overshoot: lower gamma then counteracts them.

    Why its own estimator and not an option of Greedy: the extra term is not a reweighting of Greedy's
    ``g_t B_t`` (it contracts ``g_t`` with the buffer part of ``B_t``, which Greedy never uses), it needs SGD's
    settings and refuses other optimizers, and a name of its own keeps ``greedy(gamma)`` exactly the paper's.

    Cost: the inner loop plus, per step, one outer gradient and one vector-Jacobian product through the step
    (the same as Greedy; the outer gradient is a separate backward pass here). Memory O(P + H).
    Spec string: ``momentum_greedy(gamma)``.

    Args:
        gamma: the discount, in (0, 1].

    Raises:
        ValueError: ``gamma`` outside (0, 1]; at call time, an inner optimizer other than :class:`SGD`.
    """

    name = "momentum_greedy"
    spec_args = ("gamma",)
    capabilities = Capabilities(
        computes="Greedy whose terms also follow SGD's momentum buffer (step Jacobians taken as I)",
        cost="as Greedy",
        memory="O(P+H)",
        example="momentum_greedy(0.9)",
        learned_init_refusal="its momentum-following terms are derived for a constant initialization",
    )

    def products(self, inner_steps: int | None) -> int | None:
        return inner_steps

    def __init__(self, gamma: float = 0.99, nonfinite: str = "warn") -> None:
        super().__init__(nonfinite)
        self.gamma = check_gamma("MomentumGreedy", gamma)

    def validate(self, problem: BilevelProblem) -> None:
        super().validate(problem)
        if not isinstance(problem.optimizer, SGD):
            raise ValueError(
                f"MomentumGreedy follows the momentum buffer of SGD only; the inner optimizer is "
                f"{type(problem.optimizer).__name__}, whose state (e.g. Adam's moments and its per-entry step "
                "size, which depends on the gradients of every later step) has no step-independent propagation "
                "to weight the steps with. Use Greedy(gamma) for it (or RMD, TruncatedRMD or GreedyTail for "
                "exact terms)"
            )

    def _kappas(self, optimizer: SGD, h: list[Tensor], n_params: int, n: int) -> list[float | Tensor]:
        """``kappa_n`` for each inner parameter tensor (constants: the settings are evaluated on detached h)."""
        lrs = optimizer.setting_values("lr", h, n_params)
        mus = optimizer.setting_values("momentum", h, n_params)
        power = 2 if optimizer.nesterov else 1
        out: list[float | Tensor] = []
        for lr, mu in zip(lrs, mus):
            lr = lr.detach() if isinstance(lr, Tensor) else lr
            mu = mu.detach() if isinstance(mu, Tensor) else mu
            out.append(-lr * mu**power * _geometric_sum(mu, n))
        return out

    def _estimate(self, problem: BilevelProblem, h):
        steps = problem.steps
        optimizer = problem.optimizer
        uses_momentum = isinstance(optimizer, SGD) and optimizer.uses_momentum()
        total: list = [None] * len(h)
        h_const = [x.detach() for x in h]
        final: dict = {}

        def on_step(step: InnerStep) -> None:
            n = steps - step.t
            c = self.gamma**n
            if c == 0:
                return
            if not uses_momentum or n == 0:
                # Greedy's own term (kappa_0 = 0): one backward of L_val(Phi(w_{t-1}, s_{t-1}, h)), with the
                # direct term at t = T.
                last = n == 0
                loss, found = weighted_step_vjp(problem, step.params, h, c, last)
                add_grads(total, found)
                if last:
                    final["loss"] = loss
                return
            loss = problem.outer_loss(step.params, h_const)
            g = torch.autograd.grad(loss, step.params, retain_graph=True, materialize_grads=True)
            kappas = self._kappas(optimizer, h_const, len(g), n)
            buffers = step.state.buffers["momentum_buffer"]
            outputs, cotangents = [], []
            for w, b, g_i, kappa in zip(step.params, buffers, g, kappas):
                for out, cot in ((w, c * g_i), (b, (c * kappa) * g_i)):
                    if out.requires_grad:
                        outputs.append(out)
                        cotangents.append(cot)
            add_grads(total, torch.autograd.grad(outputs, h, cotangents, allow_unused=True))

        def mode(t: int) -> StepMode:
            return StepMode.LOCAL if self.gamma ** (steps - t) != 0 else StepMode.CONSTANT

        trajectory = unroll(problem, h, mode, on_step)
        return Estimate(total, trajectory, final["loss"])


@register_estimator
class GreedyTail(AdjointEstimator):
    """Reverse mode through the last ``K`` inner steps and Greedy's terms for the earlier ones::

        grad_alpha L_val(w_T) + sum_{t=1}^{T-K} gamma^(T-t) g_t B_t + sum_{t=T-K+1}^T g_T (prod_{k>t} A_k) B_t

    That is eq. 6 with its last K terms replaced by their exact values (the terms of
    :class:`TruncatedRMD` (K)), ``g_t = grad_w L_val(w_t)``. The greedy terms keep Greedy's own weights
    ``gamma^(T-t)`` and vectors ``g_t``, for three reasons: the limits hold exactly (``K = 0`` is Greedy,
    ``K = T`` is RMD, both the same computation); the terms of early steps are known as the loop runs, so
    memory stays O(P K) (weighting them by the exact vector ``g_T prod_{k>T-K} A_k`` at the tail's start would
    need every earlier ``B_t`` kept, O(P H T), or a second run of the loop); and the estimator interpolates in
    both arguments: gamma -> 0 gives ``TruncatedRMD(K)``. As Greedy's term of step T is already exact,
    ``K = 1`` equals Greedy for every gamma (and with gamma -> 0, T1-T2).

    Cost: the inner loop, plus T - K vector-Jacobian products and outer gradients (greedy part) and one
    backward through the last K steps. Memory O(P K + H). Spec string: ``greedy_tail(gamma, K)``.

    Args:
        gamma: Greedy's discount, in (0, 1].
        tail: ``K``, the number of last steps differentiated exactly (0 to T).

    Raises:
        ValueError: ``gamma`` outside (0, 1], ``tail`` not an integer >= 0, or (at call time) larger than T.
    """

    name = "greedy_tail"
    spec_args = ("gamma", "tail")
    capabilities = Capabilities(
        computes="exact through the last K steps, Greedy's terms before",
        cost="T-K VJPs + a backward through K steps",
        memory="O(PK)",
        example="greedy_tail(0.9, 5)",
        learned_init_refusal="its greedy head and exact tail are derived for a constant initialization",
    )

    def products(self, inner_steps: int | None) -> int | None:
        return inner_steps

    def __init__(self, gamma: float = 0.99, tail: int = 5, nonfinite: str = "warn") -> None:
        super().__init__(nonfinite)
        self.gamma = check_gamma("GreedyTail", gamma)
        self.tail = check_int("tail (K)", tail, minimum=0, owner="GreedyTail")

    def validate(self, problem: BilevelProblem) -> None:
        super().validate(problem)
        if self.tail > problem.steps:
            raise ValueError(
                f"GreedyTail tail (K={self.tail}) exceeds the number of inner steps (T={problem.steps}); "
                "use K <= T (K = T is RMD)"
            )

    def _estimate(self, problem: BilevelProblem, h):
        steps = problem.steps
        first_exact = steps - self.tail + 1
        total: list = [None] * len(h)
        final: dict = {}

        def on_step(step: InnerStep) -> None:
            if step.mode is not StepMode.LOCAL:
                return
            last = step.t == steps  # only with K = 0
            loss, found = weighted_step_vjp(problem, step.params, h, self.gamma ** (steps - step.t), last)
            add_grads(total, found)
            if last:
                final["loss"] = loss

        def mode(t: int) -> StepMode:
            if t >= first_exact:
                return StepMode.CHAIN
            return StepMode.LOCAL if self.gamma ** (steps - t) != 0 else StepMode.CONSTANT

        trajectory = unroll(problem, h, mode, on_step)
        if self.tail > 0:
            loss = problem.outer_loss(trajectory.params, h)
            add_grads(total, torch.autograd.grad(loss, h, allow_unused=True))
            final["loss"] = loss.detach()
        return Estimate(total, trajectory, final["loss"])
