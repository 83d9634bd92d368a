"""Differentiable stochastic gradient descent (with momentum, Nesterov, dampening, weight decay)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_hypergrad.optim.base import DifferentiableOptimizer, OptimizerState, Setting, _check_number, axpy


class SGD(DifferentiableOptimizer):
    """SGD as ``torch.optim.SGD`` computes it, out of place.

    With numbers as settings one step reproduces ``torch.optim.SGD`` to the last bit::

        d = g + weight_decay * w
        v = d                                   (first step)
        v = momentum * v + (1 - dampening) * d  (later steps)
        d = d + momentum * v if nesterov else v
        w = w - lr * d

    Args:
        lr: learning rate, a number or a function of the hyperparameters (e.g. ``lambda h: h[0].exp()``).
        momentum: momentum factor (number or function).
        dampening: dampening of the momentum (number).
        weight_decay: L2 coefficient added to the gradient (number or function).
        nesterov: Nesterov momentum.

    Raises:
        ValueError: a setting out of its range, or Nesterov without momentum or with dampening.

    Example::

        >>> opt = SGD(lr=0.1, momentum=0.9)
        >>> w = [torch.zeros(2)]
        >>> state = opt.init(w)
        >>> w, state = opt.update(w, [torch.ones(2)], state, [])
        >>> w[0]
        tensor([-0.1000, -0.1000])
    """

    setting_names = ("lr", "momentum", "weight_decay")

    def __init__(
        self,
        lr: Setting = 0.1,
        momentum: Setting = 0.0,
        dampening: float = 0.0,
        weight_decay: Setting = 0.0,
        nesterov: bool = False,
    ) -> None:
        _check_number("SGD lr", lr, 0.0, float("inf"), high_open=True)
        _check_number("SGD momentum", momentum, 0.0, 1.0)
        _check_number("SGD dampening", dampening, 0.0, 1.0)
        _check_number("SGD weight_decay", weight_decay, 0.0, float("inf"), high_open=True)
        if nesterov and (not callable(momentum) and momentum == 0 or dampening != 0):
            raise ValueError("SGD nesterov=True needs momentum > 0 and dampening = 0")
        self.lr = lr
        self.momentum = momentum
        self.dampening = float(dampening)
        self.weight_decay = weight_decay
        self.nesterov = nesterov

    def uses_momentum(self) -> bool:
        """Whether the step keeps a momentum buffer (momentum is a function of the hyperparameters, or not 0)."""
        return callable(self.momentum) or self.momentum != 0

    def init(self, params: Sequence[Tensor]) -> OptimizerState:
        buffers = {"momentum_buffer": [torch.zeros_like(p) for p in params]} if self.uses_momentum() else {}
        return OptimizerState(0, buffers)

    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        state: OptimizerState,
        h: Sequence[Tensor],
    ) -> tuple[list[Tensor], OptimizerState]:
        n = len(params)
        lrs = self.setting_values("lr", h, n)
        wds = self.setting_values("weight_decay", h, n)
        mus = self.setting_values("momentum", h, n) if self.uses_momentum() else [0.0] * n
        new_params, new_bufs = [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            d = g
            if callable(self.weight_decay) or wds[i] != 0:
                d = axpy(d, p, wds[i])
            if self.uses_momentum():
                if state.step == 0:
                    buf = d
                else:
                    buf = axpy(state.buffers["momentum_buffer"][i] * mus[i], d, 1.0 - self.dampening)
                new_bufs.append(buf)
                d = axpy(d, buf, mus[i]) if self.nesterov else buf
            lr = lrs[i]
            new_params.append(axpy(p, d, -lr))
        buffers = {"momentum_buffer": new_bufs} if self.uses_momentum() else {}
        return new_params, OptimizerState(state.step + 1, buffers)

    def stationary_l2(self) -> float:
        if callable(self.weight_decay):
            raise ValueError("the SGD weight_decay is a hyperparameter")
        return float(self.weight_decay)
