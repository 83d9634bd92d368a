"""Learn one weight decay per pixel for a linear classifier of scikit-learn's digits, in plain PyTorch."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import lightning_hypergrad as lh

x, y = (torch.tensor(a) for a in load_digits(return_X_y=True))
x_train, y_train, x_val, y_val = x[:200].float() / 16, y[:200], x[200:700].float() / 16, y[200:700]
log_wd = torch.full((64,), -3.0, requires_grad=True)  # the hyperparameters: a log weight decay per pixel
outer_optimizer = torch.optim.Adam([log_wd], lr=0.1)
inner = lh.InnerModel(nn.Linear(64, 10), init="zeros")  # w: its parameters (inner.names), from w_0 = 0


def inner_loss(w, h):  # L_train: training loss plus the per-pixel L2 penalty; h = [log_wd]
    penalty = 0.5 * (h[0].exp() * inner.named(w)["weight"] ** 2).sum()  # weight [10, 64]: a column per pixel
    return F.cross_entropy(inner(w, x_train), y_train) + penalty


def outer_loss(w, h):  # L_val: validation loss of the weights after the inner loop
    return F.cross_entropy(inner(w, x_val), y_val)


problem = lh.BilevelProblem(
    inner_loss, outer_loss, hyperparameters=[log_wd], init_params=inner.init_params([log_wd]),
    optimizer=lh.SGD(lr=0.5, momentum=0.9), steps=30,
)  # fmt: skip
estimator = lh.get_estimator("greedy(0.99)")  # or "fo", "t1t2", "rmd", "neumann(10)", "cg(10)", "fmd", ...
history = []
for step in range(40):
    outer_optimizer.zero_grad()
    result = estimator(problem, accumulate=True)  # adds the hypergradient to log_wd.grad
    outer_optimizer.step()
    history.append(result.outer_loss)
    if step % 10 == 0 or step == 39:
        print(f"outer step {step:2d}  validation loss {result.outer_loss:.4f}")
