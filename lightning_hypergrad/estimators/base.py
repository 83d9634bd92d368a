"""The interface shared by every hypergradient estimator."""

from __future__ import annotations

import inspect
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from lightning_hypergrad._checks import check_int
from lightning_hypergrad.estimators.registry import Capabilities, capable_names
from lightning_hypergrad.inner_loop import Trajectory, leaves, preserved_random_state
from lightning_hypergrad.optim.base import DifferentiableOptimizer, OptimizerState
from lightning_hypergrad.problem import BilevelProblem, check_dependence


@dataclass
class HypergradResult:
    """What an estimator returns for one bilevel problem.

    Attributes:
        hypergrads: the estimate of ``d L_val(w_T, alpha) / d alpha``, one tensor per hyperparameter tensor.
        params: the final inner parameters ``w_T`` (detached).
        inner_losses: ``L_train(w_{t-1})`` at each step t = 1..T, a 1-D tensor (detached, on the problem's device).
        loss: ``L_val(w_T)``, a 0-dim tensor on the problem's device (reading it does not wait for the device).
        state: the inner optimizer's final state ``s_T`` (detached), to carry on in online mode.
    """

    hypergrads: list[Tensor]
    params: list[Tensor]
    inner_losses: Tensor
    loss: Tensor
    state: OptimizerState | None = None

    @property
    def outer_loss(self) -> float:
        """``L_val(w_T)`` as a number (waits for the device)."""
        return float(self.loss)


@dataclass
class Estimate:
    """An estimator's raw output: gradients with respect to the leaves ``h`` the losses received."""

    grads: list[Tensor | None]
    trajectory: Trajectory
    outer_loss: Tensor
    #: for a learned initialization: the estimator's adjoint of ``w_0`` (``dL_val / dw_0`` as the estimator takes
    #: it), which the base class maps through ``init_params(h)``; ``None`` where ``grads`` already hold that term
    init_adjoint: list[Tensor] | None = None


def outer_grads(
    problem: BilevelProblem, params: Sequence[Tensor], h: Sequence[Tensor]
) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
    """``L_val(w, h)``, its gradient with respect to ``w`` and (where ``h`` requires grad) to ``h``."""
    w = leaves(params)
    with torch.enable_grad():
        loss = problem.outer_loss(w, h)
        wrt_h = [x for x in h if x.requires_grad]
        grads = torch.autograd.grad(loss, [*w, *wrt_h], allow_unused=True)
    g_w = [torch.zeros_like(p) if g is None else g for p, g in zip(w, grads)]
    g_h_iter = iter(grads[len(w) :])
    g_h = [next(g_h_iter) if x.requires_grad else None for x in h]
    return loss.detach(), g_w, g_h


def add_grads(total: list[Tensor | None], new: Sequence[Tensor | None], scale: float = 1.0) -> None:
    """``total += scale * new`` entry by entry, where ``None`` stands for zero."""
    for i, g in enumerate(new):
        if g is None:
            continue
        g = g if scale == 1.0 else g * scale
        total[i] = g if total[i] is None else total[i] + g


def _features(problem: BilevelProblem) -> list[Tensor]:
    """``problem.features()``, checked to be a list or tuple of tensors (a message names ``features`` otherwise)."""
    out = problem.features()
    if isinstance(out, (list, tuple)) and all(isinstance(x, Tensor) for x in out):
        return list(out)
    if isinstance(out, (list, tuple)):
        kinds = ", ".join(sorted({type(x).__name__ for x in out if not isinstance(x, Tensor)}))
        got = f"a {type(out).__name__} holding {kinds}"
    else:
        got = f"{type(out).__name__} {out!r}"[:120]
    raise TypeError(
        f"features() must return a list of tensors computed from the hyperparameters (the losses receive it as h), "
        f"got {got}; return e.g. [backbone(x_support), backbone(x_query)]"
    )


def add_init_term(problem: BilevelProblem, h: Sequence[Tensor], estimate: Estimate) -> None:
    """``estimate.grads += init_adjoint . d init_params(h) / dh`` for a learned initialization (one VJP)."""
    if not problem.learned_init or estimate.init_adjoint is None:
        return
    with torch.enable_grad():
        w0 = problem.initial(h)
    pairs = [(w, g) for w, g in zip(w0, estimate.init_adjoint) if w.requires_grad and g is not None]
    if pairs:
        found = torch.autograd.grad([w for w, _ in pairs], h, [g for _, g in pairs], allow_unused=True)
        add_grads(estimate.grads, found)


class HypergradEstimator(ABC):
    """Computes (or estimates) the hypergradient ``d L_val(w_T(alpha), alpha) / d alpha`` of a bilevel problem.

    Calling an estimator on a :class:`~lightning_hypergrad.BilevelProblem` is its one public operation. A subclass
    declares its spec ``name`` and :class:`~lightning_hypergrad.estimators.registry.Capabilities`, is registered with
    :func:`~lightning_hypergrad.estimators.registry.register_estimator`, and implements :meth:`_hypergrads` (most
    derive from :class:`AdjointEstimator` and implement its ``_estimate`` instead). The base class checks the
    problem against the capabilities, maps the result to the hyperparameters, checks it and, on request,
    accumulates it into ``.grad``.

    Args:
        nonfinite: what to do with a hypergradient that has NaN or infinite entries: ``"warn"`` (a warning,
            and nothing is accumulated) or ``"raise"``.
    """

    #: the short name of the estimator: the head of its spec string (``greedy`` in ``greedy(0.99)``)
    name: ClassVar[str] = ""
    #: the constructor arguments that the spec string always holds, in order (``0.99`` in ``greedy(0.99)``)
    spec_args: ClassVar[tuple[str, ...]] = ()
    #: further constructor arguments, printed as ``key=value`` where they differ from their defaults
    spec_options: ClassVar[tuple[str, ...]] = ("nonfinite",)
    #: what the estimator supports and costs (the registry, the refusals and the README's table read it)
    capabilities: ClassVar[Capabilities]

    @property
    def batchable(self) -> bool:
        """Whether the tasks of a meta-batch can run as one stacked problem (``capabilities.batchable``)."""
        return self.capabilities.batchable

    def products(self, inner_steps: int | None) -> int | None:
        """Jacobian- (or Hessian-) vector products per problem, as the paper counts them.

        ``None`` where the count is not a number of products (forward mode: one per hyperparameter entry) and,
        when ``inner_steps`` is ``None``, where the count is the number of inner steps.
        """
        return None

    def __init__(self, nonfinite: Literal["warn", "raise"] = "warn") -> None:
        if nonfinite not in ("warn", "raise"):
            raise ValueError(f"nonfinite={nonfinite!r} is not one of 'warn', 'raise'")
        self.nonfinite = nonfinite

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.spec_args + self.spec_options if k != "nonfinite")
        return f"{type(self).__name__}({args})"

    def __str__(self) -> str:
        """The estimator's spec string, e.g. ``greedy(0.99)``: :func:`~lightning_hypergrad.get_estimator` parses it.

        Every script, record, log key and plot label names an estimator by this string.
        """
        defaults = inspect.signature(type(self).__init__).parameters
        parts = [_spec_value(getattr(self, key)) for key in self.spec_args]
        for key in self.spec_options:
            value = getattr(self, key)
            if value != defaults[key].default:
                parts.append(f"{key}={_spec_value(value)}")
        if not parts:
            return self.name
        return f"{self.name}({', '.join(parts)})"

    def check_learned_init(self) -> None:
        """Raise ``ValueError`` if this estimator defines no hypergradient for a learned initialization."""
        if not self.capabilities.learned_init:
            raise ValueError(
                f"{type(self).__name__} cannot differentiate a learned initialization (init_params that depend on the "
                f"hyperparameters, as in MAML): {self.capabilities.learned_init_refusal}. Use one of "
                f"{capable_names('learned_init')} (fo is first-order MAML)"
            )

    def validate(self, problem: BilevelProblem) -> None:
        """Raise ``ValueError`` if this estimator cannot handle ``problem``."""
        if problem.learned_init:
            self.check_learned_init()
        self.check_optimizer(problem.optimizer)

    def check_optimizer(self, optimizer: DifferentiableOptimizer) -> None:
        """Raise ``ValueError`` if this estimator cannot differentiate through ``optimizer``'s settings that are
        functions of the hyperparameters (a learned learning rate)."""
        settings = optimizer.hyper_settings()
        if settings and not self.capabilities.optimizer_settings:
            raise ValueError(
                f"{type(self).__name__} cannot differentiate through the inner optimizer's own settings "
                f"({', '.join(settings)}): the implicit function theorem sees only the inner optimum, which does "
                f"not depend on them. Use one of {capable_names('optimizer_settings')} for optimizer hyperparameters."
            )

    def __call__(
        self, problem: BilevelProblem, *, accumulate: bool = False, check: bool = True, check_finite: bool = True
    ) -> HypergradResult:
        """Compute the hypergradient of ``problem``.

        Args:
            problem: the bilevel problem.
            accumulate: add the hypergradients to the ``.grad`` of the hyperparameters (so that the problems of
                a meta-batch sum up).
            check: check that every hyperparameter reaches a loss or a setting (costs one forward of each loss).
            check_finite: check the hypergradient for NaN or infinite entries (``nonfinite``; one wait for the
                device). ``False`` leaves the check to the caller (:class:`BilevelModule` checks once per step);
                ``accumulate`` then adds whatever was computed.

        Raises:
            ValueError: the estimator cannot handle the problem, or a hyperparameter is unused.
            FloatingPointError: a non-finite hypergradient with ``nonfinite="raise"``.
        """
        self.validate(problem)
        with torch.enable_grad():
            h = _features(problem) if problem.features is not None else problem.hyperparameters
            h_leaf = leaves(h)
            if check:
                second = (str(self), capable_names("double_backward", having=False))
                with preserved_random_state(h_leaf):  # the check's random draws (dropout) leave the stream as it was
                    check_dependence(problem, h, h_leaf, second if self.capabilities.double_backward else None)
            try:
                hypergrads, estimate = self._hypergrads(problem, h, h_leaf)
            except RuntimeError as error:
                self._explain_double_backward(error)
                raise
        finite = self._check_finite(hypergrads) if check_finite else True
        if accumulate and finite:
            for a, g in zip(problem.hyperparameters, hypergrads):
                a.grad = g.detach().clone() if a.grad is None else a.grad + g.detach()
        return HypergradResult(
            hypergrads=[g.detach() for g in hypergrads],
            params=[p.detach() for p in estimate.trajectory.params],
            inner_losses=estimate.trajectory.inner_losses,
            loss=estimate.outer_loss.detach(),
            state=estimate.trajectory.state.detached(),
        )

    @abstractmethod
    def _hypergrads(
        self, problem: BilevelProblem, h: Sequence[Tensor], h_leaf: list[Tensor]
    ) -> tuple[list[Tensor], Estimate]:
        """The hypergradients of ``problem.hyperparameters`` and the raw :class:`Estimate` (``h`` are the tensors
        the losses receive, ``h_leaf`` detached leaf copies of them)."""

    @staticmethod
    def _to_hyperparameters(
        problem: BilevelProblem, h: Sequence[Tensor], grads: Sequence[Tensor | None], retain_graph: bool = False
    ) -> list[Tensor]:
        """Gradients with respect to ``h`` mapped to the hyperparameters (through ``problem.features`` if set)."""
        if problem.features is None:
            return [torch.zeros_like(a) if g is None else g for a, g in zip(problem.hyperparameters, grads)]
        pairs = [(x, g) for x, g in zip(h, grads) if g is not None and x.requires_grad]
        mapped: Sequence[Tensor | None] = [None] * len(problem.hyperparameters)
        if pairs:
            mapped = torch.autograd.grad(
                [x for x, _ in pairs],
                problem.hyperparameters,
                [g for _, g in pairs],
                allow_unused=True,
                retain_graph=retain_graph,
            )
        return [torch.zeros_like(a) if g is None else g for a, g in zip(problem.hyperparameters, mapped)]

    def _explain_double_backward(self, error: RuntimeError) -> None:
        """Raise one clear line where a model without a second derivative stopped a second-order estimator."""
        text = str(error)
        signs = ("once_differentiable", "double backward", "twice", "second order", "derivative for")
        if not self.capabilities.double_backward or not any(sign in text for sign in signs):
            return
        raise RuntimeError(
            f"{self} differentiates through the inner gradient (double backward), which the model does not support "
            f"({text.splitlines()[0][:160]}); use an estimator without double backward: "
            f"{capable_names('double_backward', having=False)}"
        ) from error

    def _check_finite(self, hypergrads: Sequence[Tensor]) -> bool:
        if bool(torch.stack([torch.isfinite(g).all() for g in hypergrads]).all()):  # one host sync
            return True
        bad = [i for i, g in enumerate(hypergrads) if not bool(torch.isfinite(g).all())]
        message = (
            f"{type(self).__name__}: the hypergradient of hyperparameters{bad} has NaN or infinite entries, so it was "
            "not accumulated; the inner loop has probably diverged: lower the inner optimizer's learning rate or the "
            "number of inner steps (steps/T)"
        )
        if self.nonfinite == "raise":
            raise FloatingPointError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return False


class AdjointEstimator(HypergradEstimator):
    """An estimator that computes gradients with respect to the leaves ``h`` the losses receive
    (:meth:`_estimate`); the base maps them to the hyperparameters, adding a learned initialization's term."""

    def _hypergrads(
        self, problem: BilevelProblem, h: Sequence[Tensor], h_leaf: list[Tensor]
    ) -> tuple[list[Tensor], Estimate]:
        """The hypergradients of ``problem.hyperparameters`` and the raw :class:`Estimate`.

        :meth:`_estimate` on the leaves ``h_leaf``, the term of a learned initialization added, the
        gradients mapped to the hyperparameters (through ``problem.features`` if set).
        """
        estimate = self._estimate(problem, h_leaf)
        add_init_term(problem, h_leaf, estimate)
        return self._to_hyperparameters(problem, h, estimate.grads), estimate

    @abstractmethod
    def _estimate(self, problem: BilevelProblem, h: list[Tensor]) -> Estimate:
        """Gradients with respect to ``h`` (leaves), from one run of the inner loop."""


def _spec_value(value: object) -> str:
    return repr(float(value)) if isinstance(value, float) else repr(value)


def check_positive_int(owner: str, name: str, value: object) -> int:
    return check_int(name, value, owner=owner)


def check_gamma(owner: str, gamma: object) -> float:
    """``gamma`` as a float, checked to be a discount in (0, 1] (the message names ``owner``)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(
            f"{owner} gamma must be in (0, 1], got {gamma!r}: gamma = 1 weights every inner step equally and "
            "gamma -> 0 keeps the last step only (the T1T2 estimator)"
        )
    return float(gamma)


def weighted_step_vjp(
    problem: BilevelProblem,
    params: Sequence[Tensor],
    h: Sequence[Tensor],
    weight: float,
    last: bool,
    wrt_params: bool = False,
) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """One step's weighted greedy term ``c_t g_t B_t``: one backward of ``c_t L_val(w_t, h)``.

    ``params`` is ``w_t = Phi(w_{t-1}, s_{t-1}, h)`` computed with the step's graph to ``h`` (``w_{t-1}`` held
    constant), so the chain rule gives ``g_t B_t`` in one pass. At the last step (``last``), ``L_val`` also sees
    ``h`` directly (the direct term ``grad_alpha L_val(w_T)``); before it, a detached copy, so that the direct term
    is counted once. ``wrt_params`` also returns ``c_t g_t`` (the gradients with respect to ``params``, after those
    with respect to ``h``).

    Returns:
        ``L_val(w_t)`` (detached) and the gradients with respect to ``h`` (then ``params``), ``None`` where unused.
    """
    loss = problem.outer_loss(params, h if last else [x.detach() for x in h])
    wrt = [*h, *params] if wrt_params else list(h)
    found = torch.autograd.grad(loss if weight == 1 else weight * loss, wrt, allow_unused=True)
    return loss.detach(), found
