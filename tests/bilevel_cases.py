"""Small bilevel problems with independent reference computations, shared by the tests."""

from __future__ import annotations

import torch
from torch import Tensor

import lightning_hypergrad as lh


class Ridge:
    """Ridge regression: inner ``0.5 mean((Xw - y)^2) + 0.5 exp(a) |w|^2``, outer ``0.5 mean((X_v w - y_v)^2)``.

    The hyperparameter is ``a``, the log ridge strength. Everything is float64.
    """

    def __init__(self, n: int = 30, d: int = 6, seed: int = 0, log_ridge: float = -1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, d, generator=g, dtype=torch.float64)
        self.y = torch.randn(n, generator=g, dtype=torch.float64)
        self.Xv = torch.randn(n, d, generator=g, dtype=torch.float64)
        self.yv = torch.randn(n, generator=g, dtype=torch.float64)
        self.w0 = 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
        self.a = torch.tensor(log_ridge, dtype=torch.float64, requires_grad=True)
        self.n, self.d = n, d

    def inner_loss(self, w, h):
        return 0.5 * ((self.X @ w[0] - self.y) ** 2).mean() + 0.5 * h[0].exp() * (w[0] ** 2).sum()

    def outer_loss(self, w, h):
        return 0.5 * ((self.Xv @ w[0] - self.yv) ** 2).mean()

    def problem(self, steps: int, lr: float = 0.1, momentum: float = 0.0) -> lh.BilevelProblem:
        return lh.BilevelProblem(
            self.inner_loss, self.outer_loss, [self.a], [self.w0], lh.SGD(lr=lr, momentum=momentum), steps
        )

    # closed forms, by matrix algebra on (A, b) only
    def _hessian(self) -> Tensor:
        lam = self.a.detach().exp()
        return self.X.T @ self.X / self.n + lam * torch.eye(self.d, dtype=torch.float64)

    def _val_grad(self, w: Tensor) -> Tensor:
        return self.Xv.T @ (self.Xv @ w - self.yv) / self.n

    def unrolled_hypergrad(self, steps: int, lr: float, momentum: float = 0.0) -> float:
        """d L_val(w_T) / d a for heavy-ball ``v_t = mu v_{t-1} + g_t, w_t = w_{t-1} - lr v_t`` (v_1 = g_1)."""
        H, b = self._hessian(), self.X.T @ self.y / self.n
        lam = self.a.detach().exp()
        w, v = self.w0.clone(), torch.zeros(self.d, dtype=torch.float64)
        dw, dv = torch.zeros(self.d, dtype=torch.float64), torch.zeros(self.d, dtype=torch.float64)
        for t in range(steps):
            g, dg = H @ w - b, H @ dw + lam * w  # d/da of (A + e^a I) w - b
            if t == 0:
                v, dv = g, dg
            else:
                v, dv = momentum * v + g, momentum * dv + dg
            w, dw = w - lr * v, dw - lr * dv
        return float(self._val_grad(w) @ dw)

    def implicit_hypergrad(self) -> float:
        """d L_val(w*(a)) / d a at the exact ridge solution (implicit function theorem)."""
        H, b = self._hessian(), self.X.T @ self.y / self.n
        lam = self.a.detach().exp()
        w_star = torch.linalg.solve(H, b)
        return float(-self._val_grad(w_star) @ torch.linalg.solve(H, lam * w_star))


class MLPTask:
    """A small nonlinear problem: a one-hidden-layer MLP with cross-entropy, float64.

    Hyperparameters (chosen per test): ``log_wd`` (per-input-feature log weight decay on the first layer, inside
    the inner loss), ``log_lr`` (the inner learning rate), and ``temp`` (an outer-loss temperature used directly
    by the outer loss, so that the direct term is exercised).
    """

    def __init__(self, features: int = 4, hidden: int = 5, classes: int = 3, n: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        dt = torch.float64
        self.x = torch.randn(n, features, generator=g, dtype=dt)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.xv = torch.randn(n, features, generator=g, dtype=dt)
        self.yv = torch.randint(0, classes, (n,), generator=g)
        self.w0 = [
            0.5 * torch.randn(hidden, features, generator=g, dtype=dt),
            0.1 * torch.randn(hidden, generator=g, dtype=dt),
            0.5 * torch.randn(classes, hidden, generator=g, dtype=dt),
        ]
        self.log_wd = torch.full((features,), -2.0, dtype=dt).add(0.1 * torch.arange(features)).requires_grad_()
        self.log_lr = torch.tensor(-1.5, dtype=dt, requires_grad=True)
        self.temp = torch.tensor(0.2, dtype=dt, requires_grad=True)

    @staticmethod
    def logits(w, x):
        return torch.tanh(x @ w[0].T + w[1]) @ w[2].T

    def inner_loss(self, w, h):
        """``h = [log_wd, ...]``."""
        ce = torch.nn.functional.cross_entropy(self.logits(w, self.x), self.y)
        return ce + 0.5 * (h[0].exp() * w[0] ** 2).sum()

    def outer_loss(self, w, h):
        """``h = [log_wd, temp]`` or ``[log_wd]``; with ``temp`` the logits are scaled by ``exp(temp)``."""
        scale = h[1].exp() if len(h) > 1 else 1.0
        return torch.nn.functional.cross_entropy(scale * self.logits(w, self.xv), self.yv)

    def problem(self, steps: int, optimizer=None, hyperparameters=None, outer_loss=None) -> lh.BilevelProblem:
        return lh.BilevelProblem(
            self.inner_loss,
            outer_loss or self.outer_loss,
            hyperparameters if hyperparameters is not None else [self.log_wd, self.temp],
            self.w0,
            optimizer or lh.SGD(lr=0.3, momentum=0.9),
            steps,
        )


def central_difference(f, x: Tensor, eps: float = 1e-6) -> Tensor:
    """The gradient of the scalar ``f(x)`` by central finite differences, entry by entry."""
    grad = torch.zeros_like(x)
    flat = grad.view(-1)
    for i in range(x.numel()):
        delta = torch.zeros_like(x)
        delta.view(-1)[i] = eps
        flat[i] = (f(x + delta) - f(x - delta)) / (2 * eps)
    return grad


def flat(tensors) -> torch.Tensor:
    """The tensors as one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: torch.Tensor, like) -> list[torch.Tensor]:
    """``vector`` cut into tensors shaped like ``like`` (the inverse of :func:`flat`)."""
    out, offset = [], 0
    for t in like:
        out.append(vector[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def features_problem_factory(steps: int):
    """A problem whose losses see the hyperparameters through ``features`` (scaled inputs), and its hyperparameter.

    Returns ``(make, scale)``: ``make()`` builds the same fresh ``BilevelProblem`` each call (SGD 0.2, momentum 0.5,
    ``steps`` inner steps on an :class:`MLPTask`); ``scale`` (4 entries, float64) scales the training inputs
    through ``features`` and, squared, the validation inputs.
    """
    g = torch.Generator().manual_seed(5)
    scale = torch.rand(4, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    task = MLPTask()
    x_raw = task.x.clone()

    def inner(w, h):
        return torch.nn.functional.cross_entropy(task.logits(w, h[0]), task.y)

    def outer(w, h):
        return torch.nn.functional.cross_entropy(task.logits(w, task.xv * h[1]), task.yv)

    def make():
        return lh.BilevelProblem(
            inner,
            outer,
            [scale],
            task.w0,
            lh.SGD(lr=0.2, momentum=0.5),
            steps,
            features=lambda: [x_raw * scale, scale**2],
        )

    return make, scale
