"""Exact forward-mode differentiation (FMD) for hyperparameters with few entries."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_hypergrad.estimators._linalg import dot, jvp
from lightning_hypergrad.estimators.base import Estimate, HypergradEstimator, check_positive_int, outer_grads
from lightning_hypergrad.estimators.registry import Capabilities, register_estimator
from lightning_hypergrad.inner_loop import InnerStep, StepMode, unroll
from lightning_hypergrad.problem import BilevelProblem


@register_estimator
class FMD(HypergradEstimator):
    """The exact hypergradient (eq. 3-5) by forward mode: ``Z_t = A_t Z_{t-1} + B_t``, ``Z_t = dw_t / d alpha``.

    One tangent per hyperparameter entry is carried through the inner loop (and through the optimizer's
    state), so the cost is H Jacobian-vector products per step and the memory O((P + S) H). Suits a few
    hyperparameters (a learning rate, a handful of regularization strengths); no graph lives across steps.

    Args:
        max_entries: the largest number of hyperparameter entries accepted; above it, use RMD.

    A learned initialization ``w_0(alpha)`` is differentiated exactly: the tangents start at ``Z_0 = dw_0/dalpha``.

    Raises:
        ValueError: the hyperparameters have more than ``max_entries`` entries.
    """

    name = "fmd"
    capabilities = Capabilities(
        computes="exact, forward mode, one tangent per hyperparameter entry",
        cost="H JVPs per step",
        memory="O((P+S)H)",
        example="fmd",
        learned_init=True,
        exact=True,
    )
    spec_options = ("max_entries", "nonfinite")

    def __init__(self, max_entries: int = 64, nonfinite: str = "warn") -> None:
        super().__init__(nonfinite)
        self.max_entries = check_positive_int("FMD", "max_entries", max_entries)

    def validate(self, problem: BilevelProblem) -> None:
        super().validate(problem)
        entries = sum(a.numel() for a in problem.hyperparameters)
        if entries > self.max_entries:
            raise ValueError(
                f"FMD carries one tangent per hyperparameter entry, and this problem has {entries} entries > "
                f"max_entries={self.max_entries}; use RMD (or another reverse-mode estimator), or raise max_entries"
            )

    def _feature_tangents(self, problem: BilevelProblem, h: Sequence[Tensor], h_leaf: Sequence[Tensor]):
        """``dh / d alpha_j`` for every entry ``j`` of the hyperparameters, as lists shaped like ``h``."""
        units = []
        for a_index, a in enumerate(problem.hyperparameters):
            for j in range(a.numel()):
                unit = [torch.zeros_like(b) for b in problem.hyperparameters]
                unit[a_index].view(-1)[j] = 1
                units.append(unit)
        if problem.features is None:
            return units
        return jvp(list(h), problem.hyperparameters, units)

    def _hypergrads(self, problem: BilevelProblem, h, h_leaf):
        h_tangents = self._feature_tangents(problem, h, h_leaf)
        n = len(h_tangents)
        if problem.learned_init:  # Z_0 = dw_0 / d alpha_j
            with torch.enable_grad():
                z_w = [[x.detach() for x in z] for z in jvp(problem.initial(h_leaf), h_leaf, h_tangents)]
        else:
            z_w = [[torch.zeros_like(p) for p in problem.init_params] for _ in range(n)]
        z_s: list[list[Tensor]] | None = None

        def on_step(step: InnerStep) -> None:
            nonlocal z_w, z_s
            state_before = step.state_before.tensors()
            if z_s is None:
                z_s = [[torch.zeros_like(s) for s in state_before] for _ in range(n)]
            outputs = [*step.params, *step.state.tensors()]
            inputs = [*step.params_before, *state_before, *h_leaf]
            tangents = [[*z_w[j], *z_s[j], *h_tangents[j]] for j in range(n)]
            out = jvp(outputs, inputs, tangents)
            n_params = len(step.params)
            z_w = [[x.detach() for x in o[:n_params]] for o in out]
            z_s = [[x.detach() for x in o[n_params:]] for o in out]

        trajectory = unroll(problem, h_leaf, lambda t: StepMode.LOCAL, on_step, state_requires_grad=True)
        loss, g_w, g_h = outer_grads(problem, trajectory.params, h_leaf)
        g_h = [torch.zeros_like(x) if g is None else g for x, g in zip(h_leaf, g_h)]
        flat = torch.stack([dot(g_w, z_w[j]) + dot(g_h, h_tangents[j]) for j in range(n)])
        hypergrads, offset = [], 0
        for a in problem.hyperparameters:
            hypergrads.append(flat[offset : offset + a.numel()].view_as(a).to(a.dtype))
            offset += a.numel()
        return hypergrads, Estimate([], trajectory, loss)
