"""The bilevel problem that every estimator takes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_hypergrad._checks import check_int
from lightning_hypergrad.optim.base import DifferentiableOptimizer, OptimizerState

LossFn = Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]
"""``loss(params, h) -> scalar``: a loss of the inner parameters and of ``h`` (the hyperparameters, or the features)."""


@dataclass
class BilevelProblem:
    """One bilevel problem: ``min_alpha L_val(w_T(alpha), alpha)`` where ``w_T`` is ``T`` steps on ``L_train``.

    The loss functions must use the hyperparameters through their second argument, never by capturing the
    tensors of ``hyperparameters``: the estimators call them with copies (and, for forward mode, with tangents).

    Attributes:
        inner_loss: ``L_train(w, h)``, the loss the inner optimizer minimizes.
        outer_loss: ``L_val(w, h)``, the loss whose hypergradient is computed.
        hyperparameters: the hyperparameter tensors ``alpha`` (leaves that require grad, e.g. a module's parameters).
        init_params: the initial inner parameters ``w_0`` (not modified): tensors, constants of the problem; or a
            function ``init_params(h) -> tensors`` of the tensors ``h`` the losses receive, for an initialization that
            is learned (MAML's ``w_0``, see :meth:`initial`). Each estimator states what it computes for it
            (``supports_learned_init``); the others refuse such a problem before any work.
        optimizer: the differentiable inner optimizer ``Phi``.
        steps: the number of inner steps ``T``.
        features: optional; the part of the problem that depends on the hyperparameters alone (in meta-learning:
            the backbone's features of the task's images). Called once with no argument, it returns tensors
            computed from ``hyperparameters``; the loss functions and the optimizer's settings then receive these
            tensors as ``h`` instead of ``hyperparameters``. The estimators differentiate through it once per
            problem, whatever ``T`` is.
        init_state: optional; the inner optimizer's state at the start (e.g. the momentum buffers carried over
            from the previous outer step in online mode). ``None``: a fresh state. Treated as a constant, like
            ``init_params``.
        inner_step_loss: optional; ``L_train^t(w, h, t)``, the loss that step ``t`` (1 to T) descends, e.g. on the
            ``t``-th mini-batch of a training run. The inner loop then calls it in place of ``inner_loss`` at every
            step, with the step's index, however an estimator orders or repeats the steps (checkpointed reverse
            mode recomputes segments, truncated reverse mode replays the last ``K``), so it must depend on ``t``
            alone, never on how often it was called. ``inner_loss`` stays the objective whose stationary point
            the implicit estimators assume (e.g. the loss on the whole training set).
        hyperparameter_names: optional; a name per hyperparameter tensor (a module's parameter names), which the
            error messages use instead of indices.
    """

    inner_loss: LossFn
    outer_loss: LossFn
    hyperparameters: Sequence[Tensor]
    init_params: Sequence[Tensor] | Callable[[Sequence[Tensor]], Sequence[Tensor]]
    optimizer: DifferentiableOptimizer
    steps: int
    features: Callable[[], Sequence[Tensor]] | None = None
    init_state: OptimizerState | None = None
    inner_step_loss: Callable[[Sequence[Tensor], Sequence[Tensor], int], Tensor] | None = None
    hyperparameter_names: Sequence[str] | None = None

    def __post_init__(self) -> None:
        self.inner_loss = _scalar_loss("inner_loss", self.inner_loss)
        if self.inner_step_loss is not None and not callable(self.inner_step_loss):
            raise TypeError(
                "inner_step_loss must be a function loss(w, h, t) -> scalar tensor of the step t (1 to T), got "
                f"{type(self.inner_step_loss).__name__}"
            )
        self.outer_loss = _scalar_loss("outer_loss", self.outer_loss)
        check_int("steps (T, the number of inner steps)", self.steps)
        self.hyperparameters = list(self.hyperparameters)
        if not self.hyperparameters:
            raise ValueError("hyperparameters is empty: give at least one hyperparameter tensor")
        if self.hyperparameter_names is not None:
            self.hyperparameter_names = [str(n) for n in self.hyperparameter_names]
            if len(self.hyperparameter_names) != len(self.hyperparameters):
                raise ValueError(
                    f"hyperparameter_names has {len(self.hyperparameter_names)} names for "
                    f"{len(self.hyperparameters)} hyperparameter tensors; give one name per tensor (or none)"
                )
        if not callable(self.init_params):
            self.init_params = list(self.init_params)
            _check_init("init_params", self.init_params)
        for i, a in enumerate(self.hyperparameters):
            if not isinstance(a, Tensor) or not a.requires_grad:
                raise ValueError(
                    f"hyperparameters[{i}] must be a tensor that requires grad (e.g. nn.Parameter or "
                    f"torch.tensor(..., requires_grad=True)), got {type(a).__name__}"
                    + (" without requires_grad" if isinstance(a, Tensor) else "")
                )
        if not isinstance(self.optimizer, DifferentiableOptimizer):
            raise TypeError(
                "optimizer must be a differentiable inner optimizer such as lightning_hypergrad.SGD or "
                f"lightning_hypergrad.Adam, got {type(self.optimizer).__name__} (torch.optim optimizers update in "
                "place and cannot be differentiated)"
            )

    def step_loss(self, t: int) -> LossFn:
        """The loss that step ``t`` descends: ``inner_step_loss(w, h, t)``, or ``inner_loss`` without one."""
        if self.inner_step_loss is None:
            return self.inner_loss
        step_loss = self.inner_step_loss
        return _scalar_loss(f"inner_step_loss (step {t})", lambda w, h: step_loss(w, h, t))

    @property
    def learned_init(self) -> bool:
        """Whether ``w_0`` is a function of the hyperparameters (``init_params`` is callable)."""
        return callable(self.init_params)

    def initial(self, h: Sequence[Tensor]) -> list[Tensor]:
        """``w_0``: ``init_params``, or ``init_params(h)`` (connected to ``h``) for a learned initialization."""
        if not callable(self.init_params):
            return list(self.init_params)
        w0 = list(self.init_params(h))
        _check_init("init_params(h)", w0)
        return w0

    def describe(self, indices: Sequence[int]) -> str:
        """Hyperparameter tensors as a message names them: by name where given (``'meta_net.0.weight'``), else by
        index (``hyperparameters[0, 2]``)."""
        if self.hyperparameter_names is None:
            return f"hyperparameters{list(indices)}"
        return ", ".join(repr(self.hyperparameter_names[i]) for i in indices)


def _check_init(name: str, tensors: Sequence[Tensor]) -> None:
    if not tensors:
        raise ValueError(f"{name} is empty: give at least one inner parameter tensor")
    for i, w in enumerate(tensors):
        if not isinstance(w, Tensor) or not w.is_floating_point():
            raise ValueError(f"{name}[{i}] must be a floating-point tensor, got {type(w).__name__}")


def _scalar_loss(name: str, loss: LossFn) -> LossFn:
    """``loss``, checked on every call to return a tensor with one element (a message names it otherwise)."""
    if getattr(loss, "_checked_as", None) == name:
        return loss
    if not callable(loss):
        raise TypeError(f"{name} must be a function loss(w, h) -> scalar tensor, got {type(loss).__name__}")

    def checked(w: Sequence[Tensor], h: Sequence[Tensor]) -> Tensor:
        value = loss(w, h)
        if isinstance(value, Tensor) and value.numel() == 1:
            return value
        if isinstance(value, Tensor):
            got = f"a tensor of shape {tuple(value.shape)}"
            fix = "reduce it to one number, e.g. with .mean() or .sum()"
        else:
            got = f"{type(value).__name__} {value!r}"[:120]
            fix = "compute it with torch operations on w and h, so that it can be differentiated"
        raise TypeError(f"{name} must return a scalar tensor, but it returned {got}: {fix}")

    checked._checked_as = name  # type: ignore[attr-defined]
    return checked


def leaves(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Detached copies that require grad, so that a gradient can be taken with respect to them."""
    return [x.detach().requires_grad_() for x in tensors]


def _explain_dtypes(error: RuntimeError, w: Sequence[Tensor], h: Sequence[Tensor]) -> None:
    """Raise a ``TypeError`` naming the problem's dtypes where a loss failed on mixed floating-point dtypes."""
    text = str(error)
    if not any(key in text for key in ("dtype", "scalar type", "Double", "Float", "Half", "BFloat16")):
        return
    dtypes = lambda xs: ", ".join(sorted({str(x.dtype).replace("torch.", "") for x in xs}))  # noqa: E731
    raise TypeError(
        f"a loss failed on mixed dtypes ({text.splitlines()[0][:120]}): the inner parameters (init_params) are "
        f"{dtypes(w)} and h (the hyperparameters or features) {dtypes(h)}; give init_params, the hyperparameters and "
        "the data one dtype (e.g. .float() or .double())"
    ) from error


def _reachable_leaves(roots: Sequence[Tensor]) -> set[int]:
    """The ids of the leaf tensors that the autograd graphs of ``roots`` reach."""
    found: set[int] = set()
    stack = []
    for r in roots:
        if not isinstance(r, Tensor) or not r.requires_grad:
            continue
        if r.grad_fn is None:
            found.add(id(r))
        else:
            stack.append(r.grad_fn)
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def _flatten_settings(values: object) -> list[Tensor]:
    if isinstance(values, Tensor):
        return [values]
    if isinstance(values, (list, tuple)):
        return [v for v in values if isinstance(v, Tensor)]
    return []


def check_dependence(
    problem: BilevelProblem,
    h: Sequence[Tensor],
    h_leaf: Sequence[Tensor],
    double_backward: tuple[str, str] | None = None,
) -> None:
    """Raise if a hyperparameter reaches no loss and no optimizer setting, or a loss captures one directly.

    ``double_backward``: ``(estimator, alternatives)`` for an estimator that differentiates the inner gradient:
    also raise where that gradient cannot be differentiated (from the same evaluation of the losses).
    """
    with torch.enable_grad():
        w0 = problem.initial(h_leaf)
        w = leaves(w0)
        try:
            roots = [problem.inner_loss(w, h_leaf), problem.outer_loss(w, h_leaf)]
            if problem.inner_step_loss is not None:
                roots.append(problem.step_loss(1)(w, h_leaf))
        except RuntimeError as error:
            _explain_dtypes(error, w, h_leaf)
            raise
        if double_backward is not None:
            _check_double_backward(roots[-1] if problem.inner_step_loss is not None else roots[0], w, *double_backward)
        if problem.learned_init:
            roots += w0
        for name in problem.optimizer.hyper_settings():
            roots += _flatten_settings(getattr(problem.optimizer, name)(h_leaf))
    reached = _reachable_leaves(roots)
    captured = [i for i, a in enumerate(problem.hyperparameters) if id(a) in reached]
    if captured:
        # a hint where the captured tensors are a module's: a HyperModule's (it marks its parameters) or, by their
        # names, a submodule's
        from lightning_hypergrad.hyper_module import HYPER_MODULE_MARK

        hint = ""
        names = problem.hyperparameter_names
        marked = any(getattr(problem.hyperparameters[i], HYPER_MODULE_MARK, False) for i in captured)
        dotted = names is not None and any("." in names[i] for i in captured)
        if problem.features is not None and (marked or dotted):
            hint = (
                "; with `features`, the losses receive the features as h: call a module of the hyperparameters "
                "inside features() (directly) and return its output"
            )
        elif marked:
            hint = (
                "; a module hyperparameter is called with h through lightning_hypergrad.HyperModule: meta_net(h)(x) "
                "(not through its .module, nor the wrapped module itself)"
            )
        elif dotted:
            hint = (
                "; if they are the parameters of a module that a loss calls: a module hyperparameter is called with h "
                "through lightning_hypergrad.HyperModule: meta_net = HyperModule(net), then meta_net(h)(x)"
            )
        raise ValueError(
            f"the losses or the optimizer settings use {problem.describe(captured)} directly instead of the `h` "
            "argument they receive; write them as functions of that argument (with `features`, of the tensors "
            "`features()` returns), so that the estimators can differentiate them" + hint
        )
    used_h = [x for x, leaf in zip(h, h_leaf) if id(leaf) in reached]
    used = {id(x) for x in used_h} if problem.features is None else _reachable_leaves(used_h)
    unused = [i for i, a in enumerate(problem.hyperparameters) if id(a) not in used]
    if unused:
        raise ValueError(
            f"{problem.describe(unused)} affect neither the inner loss, the outer loss, the inner optimizer's "
            "settings nor the initialization, so their hypergradient is undefined; remove them from "
            "`hyperparameters` or make the losses depend on them"
        )


def _first_order_only(roots: Sequence[Tensor]) -> bool:
    """Whether the autograd graphs of ``roots`` hold a node that cannot be differentiated again (what a
    ``once_differentiable`` backward leaves behind a gradient taken with ``create_graph=True``)."""
    stack = [r.grad_fn for r in roots if isinstance(r, Tensor) and r.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in ("Error", "DelayedError"):
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def _once_differentiable(node: object) -> bool:
    """Whether ``node`` is the backward of a custom ``torch.autograd.Function`` marked ``once_differentiable``."""
    backward = getattr(getattr(node, "_forward_cls", None), "backward", None)
    code = getattr(backward, "__code__", None)
    return hasattr(backward, "__wrapped__") and code is not None and code.co_filename == _ONCE_FILE


_ONCE_FILE = torch.autograd.function.once_differentiable(lambda ctx, *grads: grads).__code__.co_filename


def _once_differentiable_on_a_path(loss: Tensor, w: Sequence[Tensor]) -> bool:
    """Whether a ``once_differentiable`` function lies on a path of ``loss``'s graph from ``w`` (its backward then
    carries ``grad_w loss``, which double backward cannot differentiate; autograd raises only where the incoming
    gradient itself requires grad, and otherwise drops the path)."""
    targets = {id(x) for x in w}
    leads: dict[object, bool] = {}
    stack = [(loss.grad_fn, False)]
    while stack:  # post-order, without recursion: a node leads to w if it is w's or one of its inputs leads there
        node, expanded = stack.pop()
        if node is None or (node in leads and not expanded):
            continue
        children = [fn for fn, _ in node.next_functions if fn is not None]
        if not expanded:
            leads[node] = False
            stack.append((node, True))
            stack.extend((fn, False) for fn in children if fn not in leads)
            continue
        variable = getattr(node, "variable", None)
        leads[node] = (variable is not None and id(variable) in targets) or any(leads.get(fn, False) for fn in children)
        if leads[node] and _once_differentiable(node):
            return True
    return False


def _check_double_backward(loss: Tensor, w: Sequence[Tensor], estimator: str, alternatives: str) -> None:
    """Raise ``RuntimeError`` where the gradient of the training ``loss`` cannot be differentiated (a
    ``once_differentiable`` function in it): autograd would drop those paths of a second-order hypergradient silently.
    """
    if not loss.requires_grad:
        return
    grads = torch.autograd.grad(loss, w, create_graph=True, allow_unused=True, retain_graph=True)
    if _first_order_only([g for g in grads if g is not None]) or _once_differentiable_on_a_path(loss, w):
        raise RuntimeError(
            f"{estimator} differentiates through the inner gradient (double backward), but the training loss uses a "
            "function whose backward cannot be differentiated (once_differentiable; autograd would drop its part of "
            f"the hypergradient silently); use an estimator without double backward: {alternatives}"
        )
