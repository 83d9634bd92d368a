"""A minimal BilevelModule: learn one weight decay per pixel of a linear digits classifier, with Lightning."""

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

import lightning_hypergrad as lh


class WeightDecayTuner(lh.BilevelModule):
    """Hyperparameters: a log weight decay per pixel. Inner parameters: a linear classifier trained T steps."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.log_wd = torch.nn.Parameter(torch.full((64,), -3.0))
        self.inner_model = lh.InnerModel(torch.nn.Linear(64, 10), init="zeros")  # each task starts at w_0 = 0

    def inner_loss(self, model, h, task):  # model: the classifier with the current w; h: [log_wd]
        penalty = 0.5 * (h[0].exp() * model["weight"] ** 2).sum()  # weight [10, 64]: a column per pixel
        return F.cross_entropy(model(task["x_train"]), task["y_train"]) + penalty

    def outer_loss(self, model, h, task):
        return F.cross_entropy(model(task["x_val"]), task["y_val"])

    def task_metrics(self, model, h, task):
        return {"acc": (model(task["x_val"]).argmax(-1) == task["y_val"]).float().mean()}


def digits_task() -> dict:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    return {"x_train": x[:200], "y_train": y[:200], "x_val": x[200:700], "y_val": y[200:700]}


def main(steps: int = 40) -> WeightDecayTuner:
    loader = DataLoader([[digits_task()]] * steps, batch_size=None)  # each batch is a meta-batch of one task
    model = WeightDecayTuner(
        estimator=lh.Greedy(gamma=0.99), inner_optimizer=lh.SGD(lr=0.5, momentum=0.9), inner_steps=30, outer_lr=0.1
    )
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, log_every_n_steps=5).fit(model, loader)
    return model


if __name__ == "__main__":
    main()
