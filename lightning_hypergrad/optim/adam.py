"""Differentiable Adam and AdamW."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_hypergrad.optim.base import DifferentiableOptimizer, OptimizerState, Setting, _check_number, axpy


def _sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose derivative is finite at 0 (taken as 0 there instead of infinity).

    The value is exactly ``x.sqrt()``; only the derivative at 0 differs, which keeps ``0 * inf`` from turning a
    differentiated Adam step into NaN where a gradient entry is exactly zero.
    """
    if not x.requires_grad:
        return x.sqrt()
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


class Adam(DifferentiableOptimizer):
    """Adam as ``torch.optim.Adam`` computes it (with L2 weight decay added to the gradient), out of place.

    With numbers as settings one step matches ``torch.optim.Adam`` to 1e-6::

        d = g + weight_decay * w
        m = beta1 * m + (1 - beta1) * d;  v = beta2 * v + (1 - beta2) * d^2
        w = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Args:
        lr: learning rate (number or function of the hyperparameters).
        betas: coefficients of the running averages (numbers).
        eps: added to the denominator (number).
        weight_decay: L2 coefficient (number or function).

    Raises:
        ValueError: a setting out of its range.
    """

    setting_names = ("lr", "weight_decay")
    decoupled = False

    def __init__(
        self,
        lr: Setting = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: Setting = 0.0,
    ) -> None:
        name = type(self).__name__
        _check_number(f"{name} lr", lr, 0.0, float("inf"), high_open=True)
        _check_number(f"{name} betas[0]", betas[0], 0.0, 1.0, high_open=True)
        _check_number(f"{name} betas[1]", betas[1], 0.0, 1.0, high_open=True)
        _check_number(f"{name} eps", eps, 0.0, float("inf"), high_open=True)
        _check_number(f"{name} weight_decay", weight_decay, 0.0, float("inf"), high_open=True)
        self.lr = lr
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = weight_decay

    def init(self, params: Sequence[Tensor]) -> OptimizerState:
        return OptimizerState(
            0,
            {"exp_avg": [torch.zeros_like(p) for p in params], "exp_avg_sq": [torch.zeros_like(p) for p in params]},
        )

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
        beta1, beta2 = self.betas
        step = state.step + 1
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        new_params, exp_avgs, exp_avg_sqs = [], [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            use_wd = callable(self.weight_decay) or wds[i] != 0
            if use_wd and self.decoupled:
                p = p * (1 - lrs[i] * wds[i])
            elif use_wd:
                g = axpy(g, p, wds[i])
            m = torch.lerp(state.buffers["exp_avg"][i], g, 1 - beta1)
            v = torch.addcmul(state.buffers["exp_avg_sq"][i] * beta2, g, g, value=1 - beta2)
            denom = _sqrt(v) / bias_correction2_sqrt + self.eps
            new_params.append(axpy(p, m / denom, -lrs[i] / bias_correction1))
            exp_avgs.append(m)
            exp_avg_sqs.append(v)
        return new_params, OptimizerState(step, {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs})

    def stationary_l2(self) -> float:
        if callable(self.weight_decay):
            raise ValueError(f"the {type(self).__name__} weight_decay is a hyperparameter")
        return float(self.weight_decay)


class AdamW(Adam):
    """AdamW (decoupled weight decay, ``w <- w (1 - lr * weight_decay)`` before the Adam step), out of place.

    Matches ``torch.optim.AdamW`` to 1e-6 with numbers as settings. Same arguments as :class:`Adam`; the
    default weight decay is 0.01 as in torch.
    """

    decoupled = True

    def __init__(
        self,
        lr: Setting = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: Setting = 1e-2,
    ) -> None:
        super().__init__(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def stationary_l2(self) -> float:
        if callable(self.weight_decay) or self.weight_decay != 0:
            raise ValueError(
                "AdamW's decoupled weight decay has no inner objective whose stationary point the loop reaches; "
                "use Adam with weight_decay, or a penalty inside the inner loss"
            )
        return 0.0
