"""Greedy with its discount fitted online to the exact hypergradient (with :class:`HypergradCallback`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_hypergrad.estimators.base import Estimate, weighted_step_vjp
from lightning_hypergrad.estimators.greedy import Greedy
from lightning_hypergrad.estimators.registry import Capabilities, register_estimator
from lightning_hypergrad.inner_loop import InnerStep, StepMode, unroll
from lightning_hypergrad.problem import BilevelProblem


@register_estimator
class AutoGreedy(Greedy):
    """Greedy (eq. 6) whose discount ``gamma`` is chosen from ``grid`` by how close it comes to the exact hypergradient.

    On its own it is ``Greedy(gamma)``, at the same cost. With a :class:`~lightning_hypergrad.HypergradCallback`
    (which computes the exact RMD hypergradient every N training steps), the training step of a reference step also
    accumulates, in the same inner loop, the greedy sum of every discount of ``grid`` (Horner's rule per discount:
    ``S <- gamma S + v_t``, with ``v_t`` the step's one-step hypergradient; G sums, O(G H) memory), maps each to the
    hyperparameters (one backward through ``features`` per discount), and the callback sets ``gamma`` to the discount
    whose hypergradient has the largest cosine to the exact one (the direction is what an adaptive outer optimizer
    such as Adam uses; the norm is reported as ``hypergrad/norm_ratio``). It is used until the next reference step,
    logged as ``hypergrad/auto_gamma``, and saved in checkpoints. A run without reference steps keeps the ``gamma``
    it was built with.

    Cost on a reference step: the plain Greedy step plus G - 1 accumulations and G backward passes through the
    features (for a few-shot backbone, about G backbone backwards); nothing extra on the other steps.
    Spec string: ``auto_greedy(0.99)``; ``auto_greedy(0.99, grid=(0.5, 0.9))`` for another grid.

    Args:
        gamma: the discount used until the first reference step, in (0, 1].
        grid: the discounts to choose from, each in (0, 1].

    Raises:
        ValueError: ``gamma`` or a discount of ``grid`` outside (0, 1], or an empty ``grid``.
    """

    name = "auto_greedy"
    capabilities = Capabilities(
        computes="Greedy whose gamma `HypergradCallback` fits to RMD every N steps (best cosine over `grid`)",
        cost="as Greedy; G features backwards on reference steps",
        memory="O(P+GH)",
        example="auto_greedy(0.99)",
        learned_init_refusal="the grid's sums are mapped without the initialization's term",
    )
    spec_args = ("gamma",)
    spec_options = ("grid", "nonfinite")

    def __init__(
        self, gamma: float = 0.99, grid: Sequence[float] = (0.5, 0.9, 0.99, 0.999), nonfinite: str = "warn"
    ) -> None:
        super().__init__(gamma, nonfinite)
        grid = tuple(grid) if isinstance(grid, (list, tuple)) else grid
        if not isinstance(grid, tuple) or not grid:
            raise ValueError(f"AutoGreedy grid must be a non-empty list of discounts in (0, 1], got {grid!r}")
        for g in grid:
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g <= 1:
                raise ValueError(f"AutoGreedy grid holds {g!r}; every discount must be in (0, 1]")
        self.grid = tuple(float(g) for g in grid)
        self._sums: list[list[Tensor]] | None = None
        self._problems = 0

    # ------------------------------------------------------------------ driven by HypergradCallback
    def start_grid(self) -> None:
        """Accumulate the grid's hypergradients over the following calls (the tasks of one training step)."""
        self._sums = [[] for _ in self.grid]
        self._problems = 0

    def finish_grid(self) -> list[list[Tensor]] | None:
        """The mean over the recorded problems of each discount's hypergradient (``None`` if none); stops recording."""
        sums, n = self._sums, self._problems
        self._sums, self._problems = None, 0
        if sums is None or n == 0:
            return None
        return [[x / n for x in s] for s in sums]

    def state_dict(self) -> dict[str, float]:
        return {"gamma": self.gamma}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.gamma = float(state["gamma"])

    # ------------------------------------------------------------------ the estimate
    def _hypergrads(self, problem: BilevelProblem, h: Sequence[Tensor], h_leaf: list[Tensor]):
        if self._sums is None:
            return super()._hypergrads(problem, h, h_leaf)
        gammas = [*self.grid, self.gamma]
        sums, estimate = self._grid_estimate(problem, h_leaf, gammas)
        mapped = [self._to_hyperparameters(problem, h, s, retain_graph=i < len(sums) - 1) for i, s in enumerate(sums)]
        for total, m in zip(self._sums, mapped[:-1]):
            if total:
                for t, x in zip(total, m):
                    t.add_(x.detach())
            else:
                total.extend(x.detach().clone() for x in m)
        self._problems += 1
        return mapped[-1], estimate

    def _grid_estimate(
        self, problem: BilevelProblem, h: list[Tensor], gammas: list[float]
    ) -> tuple[list[list[Tensor | None]], Estimate]:
        """``sum_t gamma^(T-t) v_t`` for every ``gamma``, from one run of the inner loop (Horner's rule)."""
        steps = problem.steps
        sums: list[list[Tensor | None]] = [[None] * len(h) for _ in gammas]
        final: dict = {}

        def on_step(step: InnerStep) -> None:
            last = step.t == steps
            loss, v = weighted_step_vjp(problem, step.params, h, 1.0, last)
            for s, gamma in zip(sums, gammas):
                for i, g in enumerate(v):
                    if s[i] is not None:
                        s[i] = gamma * s[i] if g is None else gamma * s[i] + g
                    elif g is not None:
                        s[i] = g
            if last:
                final["loss"] = loss

        trajectory = unroll(problem, h, lambda t: StepMode.LOCAL, on_step)
        return sums, Estimate(sums[-1], trajectory, final["loss"])
