"""The interface of the differentiable inner optimizers.

An inner step is a pure function ``Phi(w_{t-1}, s_{t-1}, alpha) -> (w_t, s_t)``: it takes the parameters,
their gradients and the optimizer state, and returns new ones without mutating anything, so that autograd
can differentiate the step with respect to its inputs and to the hyperparameters.

A setting of an optimizer (learning rate, momentum, weight decay) is either a number or a function of the
hyperparameter tensors that returns a tensor (a scalar, or one tensor per inner parameter). In the second
case the setting is itself a hyperparameter, and the estimators that support it (Greedy, T1-T2, RMD, FMD)
differentiate through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

Setting = float | Callable[[Sequence[Tensor]], "Tensor | Sequence[Tensor]"]
"""A number, or a function of the hyperparameters returning a tensor or one tensor per inner parameter."""


@dataclass
class OptimizerState:
    """The state an inner optimizer carries from one step to the next.

    Attributes:
        step: how many steps were taken.
        buffers: named lists of tensors, one tensor per inner parameter (e.g. ``momentum_buffer``).
    """

    step: int = 0
    buffers: dict[str, list[Tensor]] = field(default_factory=dict)

    def tensors(self) -> list[Tensor]:
        """All tensors of the state, in a fixed order."""
        return [t for key in sorted(self.buffers) for t in self.buffers[key]]

    def replace(self, tensors: Sequence[Tensor]) -> OptimizerState:
        """A state with the same structure whose tensors are ``tensors`` (in the order of :meth:`tensors`)."""
        it = iter(tensors)
        buffers = {key: [next(it) for _ in self.buffers[key]] for key in sorted(self.buffers)}
        return OptimizerState(self.step, buffers)

    def detached(self, requires_grad: bool = False) -> OptimizerState:
        return self.replace([t.detach().requires_grad_(requires_grad) for t in self.tensors()])


def _check_number(name: str, value: object, low: float, high: float, *, high_open: bool = False) -> None:
    if callable(value) or isinstance(value, Tensor):
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a function of the hyperparameters, got {value!r}")
    if not (low <= value and (value < high if high_open else value <= high)):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name}={value} is out of range: expected a value in [{low}, {high}{bracket}")


class DifferentiableOptimizer(ABC):
    """An out-of-place optimizer whose step can be differentiated.

    Subclasses implement :meth:`init` and :meth:`update`. Settings that are callables are evaluated on the
    hyperparameters at every step.
    """

    #: names of the constructor arguments that are settings (numbers or functions of the hyperparameters)
    setting_names: tuple[str, ...] = ()

    def __repr__(self) -> str:
        """``SGD(lr=0.1, momentum=0.9, ...)``: every constructor argument (a function of the hyperparameters as
        ``<function>``), so that two optimizers with the same settings print the same."""
        import inspect

        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        args = ", ".join(
            f"{n}={'<function>' if callable(getattr(self, n, None)) else repr(getattr(self, n, None))}" for n in names
        )
        return f"{type(self).__name__}({args})"

    def hyper_settings(self) -> list[str]:
        """The names of the settings that are functions of the hyperparameters."""
        return [name for name in self.setting_names if callable(getattr(self, name))]

    @abstractmethod
    def init(self, params: Sequence[Tensor]) -> OptimizerState:
        """The state before the first step."""

    @abstractmethod
    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        state: OptimizerState,
        h: Sequence[Tensor],
    ) -> tuple[list[Tensor], OptimizerState]:
        """One step: new parameters and new state. Nothing is modified in place."""

    def stationary_l2(self) -> float:
        """The L2 coefficient that the optimizer adds to the inner objective at its fixed point.

        Used by the implicit-function estimators, which need the objective whose stationary point the inner
        loop reaches. Raises ``ValueError`` where no such objective exists.
        """
        return 0.0

    def setting_values(self, name: str, h: Sequence[Tensor], n_params: int) -> list[float | Tensor]:
        """The setting ``name`` for each of ``n_params`` inner parameter tensors (evaluated on ``h`` where it is a
        function of the hyperparameters); a subclass overrides it for settings of its own (a schedule)."""
        value = getattr(self, name)
        if callable(value):
            value = value(h)
        if isinstance(value, (list, tuple)):
            if len(value) != n_params:
                raise ValueError(
                    f"{type(self).__name__}.{name} returned {len(value)} values for {n_params} inner parameters; "
                    "return one tensor, or one per inner parameter"
                )
            return list(value)
        return [value] * n_params


def axpy(y: Tensor, x: Tensor, a: float | Tensor) -> Tensor:
    """``y + a * x``; with a number ``a`` it is the same kernel as torch's in-place optimizers use."""
    if isinstance(a, Tensor):
        return y + a * x
    return torch.add(y, x, alpha=a)
