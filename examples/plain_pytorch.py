"""Learn one weight decay per pixel for a linear classifier of scikit-learn's digits, in plain PyTorch."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import lightning_hypergrad as lh

torch.manual_seed(0)
images, labels = load_digits(return_X_y=True)
x, y = torch.tensor(images / 16.0, dtype=torch.float32), torch.tensor(labels)
x_train, y_train, x_val, y_val = x[:200], y[:200], x[200:700], y[200:700]
log_wd = torch.full((64,), -3.0, requires_grad=True)  # the hyperparameters: one log weight decay per pixel
outer_optimizer = torch.optim.Adam([log_wd], lr=0.1)


def inner_loss(w, h):  # training loss plus the per-pixel L2 penalty
    return F.cross_entropy(x_train @ w[0] + w[1], y_train) + 0.5 * (h[0].exp()[:, None] * w[0] ** 2).sum()


def outer_loss(w, h):  # validation loss of the weights after the inner loop
    return F.cross_entropy(x_val @ w[0] + w[1], y_val)


estimator = lh.Greedy(gamma=0.99)  # or lh.FO(), lh.T1T2(), lh.RMD(), lh.Neumann(), lh.ConjugateGradient(), ...
inner_sgd, w0 = lh.SGD(lr=0.5, momentum=0.9), [torch.zeros(64, 10), torch.zeros(10)]  # inner optimizer, w_0
history = []
for step in range(40):
    problem = lh.BilevelProblem(
        inner_loss, outer_loss, hyperparameters=[log_wd], init_params=w0, optimizer=inner_sgd, steps=30
    )
    outer_optimizer.zero_grad()
    result = estimator(problem, accumulate=True)  # adds the hypergradient to log_wd.grad
    outer_optimizer.step()
    history.append(result.outer_loss)
    if step % 10 == 0 or step == 39:
        print(f"outer step {step:2d}  validation loss {result.outer_loss:.4f}")
