"""Part 2 of the horizon study, the problem: a small CNN trained from scratch on Omniglot, tuned over its run.

The data: ``characters`` characters of Omniglot's background set, evenly spaced over its 964 (so most of its 30
alphabets appear), each a class; of each character's 20 drawings, drawings 0-11 are for training, 12-15 for
validation (the outer loss) and 16-19 for the test (touched only by the final fresh trainings). The images are
resized to ``size`` x ``size`` with strokes 1.0, as the few-shot pipeline does.

The network (:func:`network`): ``conv0`` (3x3, stride 2, ``width`` channels), ReLU, ``conv1`` (3x3, stride 2,
``2 width`` channels), ReLU, ``fc`` (linear to the classes); drawn from a seed alone (torch's default
initialization under a forked generator).

The inner loop (:func:`training_problem`): ``T`` steps of SGD with heavy-ball momentum on mini-batches, batch ``t``
being rows ``order[t]`` of the training set (an order fixed per training: :func:`batch_order`), from the network of
the initialization seed. The hyperparameters, one pair per layer (its weight and bias together):

- ``log_lr``: shape ``(layers, knots)``: the log learning rate of each layer at ``knots`` points evenly spread over
  the run, interpolated linearly in log space (``knots = 1``: a constant rate per layer);
- ``log_wd``: shape ``(layers,)``: the log L2 coefficient of each layer (SGD's ``weight_decay``).

The outer loss is the cross-entropy of ``w_T`` on the whole validation split.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hypergrad import BilevelProblem, InnerModel, OptimizerState
from lightning_hypergrad.optim import SGD

LAYERS = ("conv0", "conv1", "fc")
TRAIN_DRAWINGS, VAL_DRAWINGS, TEST_DRAWINGS = range(0, 12), range(12, 16), range(16, 20)


@dataclass(frozen=True)
class CNNSettings:
    """Everything a training depends on besides its hyperparameters and seeds."""

    characters: int = 50
    size: int = 28
    width: int = 8
    steps: int = 100
    batch: int = 32
    momentum: float = 0.9
    knots: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Splits:
    """The three splits as tensors: images ``(n, 1, size, size)`` and class labels ``(n,)``."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def character_indices(characters: int, total: int = 964) -> list[int]:
    """``characters`` indices evenly spaced over ``total`` (the first and the last included)."""
    if not 2 <= characters <= total:
        raise ValueError(f"characters must be in [2, {total}], got {characters}")
    return [round(i * (total - 1) / (characters - 1)) for i in range(characters)]


def load_splits(root: str | Path, settings: CNNSettings) -> Splits:
    """The background archive's chosen characters, split by drawing (see the module docstring)."""
    from lightning_hypergrad.data.sources import resize

    archive = Path(root) / "images_background.npz"
    if not archive.is_file():
        raise FileNotFoundError(
            f"no {archive}: give --root the folder of Omniglot's two NumPy archives (or set OMNIGLOT_ROOT)"
        )
    with np.load(archive) as data:
        drawings = data["images"]
        chosen = character_indices(settings.characters, len(drawings))
        drawings = drawings[chosen]  # (C, 20, 105, 105), True is background
    ink = torch.from_numpy(~drawings.reshape(-1, 1, *drawings.shape[2:])).float()
    images = resize(ink, settings.size).reshape(len(chosen), 20, 1, settings.size, settings.size)
    labels = torch.arange(len(chosen)).unsqueeze(1).expand(-1, 20)

    def take(drawn: range) -> tuple[Tensor, Tensor]:
        idx = list(drawn)
        return images[:, idx].reshape(-1, 1, settings.size, settings.size), labels[:, idx].reshape(-1).clone()

    return Splits(take(TRAIN_DRAWINGS), take(VAL_DRAWINGS), take(TEST_DRAWINGS))


def synthetic_splits(settings: CNNSettings, seed: int = 0) -> Splits:
    """Generated stand-in data of the same shapes (class prototypes plus noise), for tests without Omniglot."""
    g = torch.Generator().manual_seed(seed)
    prototypes = (torch.rand(settings.characters, 1, settings.size, settings.size, generator=g) > 0.8).float()

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(settings.characters).repeat_interleave(per_class)
        noise = 0.5 * torch.rand(len(labels), 1, settings.size, settings.size, generator=g)
        return (prototypes[labels] + noise).clamp(0, 1), labels

    return Splits(draw(len(TRAIN_DRAWINGS)), draw(len(VAL_DRAWINGS)), draw(len(TEST_DRAWINGS)))


def network(settings: CNNSettings, seed: int) -> nn.Sequential:
    """The CNN of the module docstring, drawn from ``seed`` (the global random state is left as it was)."""
    side = settings.size
    for _ in range(2):
        side = (side - 3) // 2 + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            OrderedDict(
                conv0=nn.Conv2d(1, settings.width, 3, stride=2),
                relu0=nn.ReLU(),
                conv1=nn.Conv2d(settings.width, 2 * settings.width, 3, stride=2),
                relu1=nn.ReLU(),
                flatten=nn.Flatten(),
                fc=nn.Linear(2 * settings.width * side * side, settings.characters),
            )
        )


def batch_order(train_size: int, settings: CNNSettings, seed: int) -> Tensor:
    """The rows of each of the ``T`` mini-batches, shape ``(T, batch)``: epochs of a seeded permutation each."""
    g = torch.Generator().manual_seed(seed)
    needed = settings.steps * settings.batch
    rows = torch.cat([torch.randperm(train_size, generator=g) for _ in range(-(-needed // train_size))])
    return rows[:needed].reshape(settings.steps, settings.batch)


def knot_weights(steps: int, knots: int) -> Tensor:
    """``(T, knots)``: the linear interpolation weights of each step's log rate on the knots (rows sum to 1)."""
    if knots == 1:
        return torch.ones(steps, 1)
    where = torch.linspace(0, knots - 1, steps)
    left = where.floor().clamp(max=knots - 2).long()
    frac = where - left
    weights = torch.zeros(steps, knots)
    weights[torch.arange(steps), left] = 1 - frac
    weights[torch.arange(steps), left + 1] = frac
    return weights


class LayerScheduledSGD(SGD):
    """SGD with momentum whose learning rate and weight decay are per layer, the rate on a schedule of knots.

    ``h[0]`` is ``log_lr`` ``(layers, knots)``, ``h[1]`` is ``log_wd`` ``(layers,)``; ``layer_of[i]`` is the layer
    of inner parameter ``i``. The step index is the optimizer state's (``state.step``), so an estimator that reruns
    a segment from a stored state (checkpointed reverse mode) sees the same rates.
    """

    def __init__(self, layer_of: list[int], weights: Tensor, momentum: float) -> None:
        self.layer_of, self.weights = layer_of, weights
        super().__init__(lr=lambda h: h[0], momentum=momentum, weight_decay=lambda h: self._per_param(h[1].exp()))
        self._step = 0

    def _per_param(self, per_layer: Tensor) -> list[Tensor]:
        return [per_layer[layer] for layer in self.layer_of]

    def update(self, params, grads, state: OptimizerState, h):
        self._step = state.step
        return super().update(params, grads, state, h)

    def setting_values(self, name, h, n_params):
        if name == "lr":
            # past the schedule's end (an estimator's step from w_T, as SAMA's) the last step's rates hold
            rates = (h[0] @ self.weights[min(self._step, len(self.weights) - 1)].to(h[0])).exp()
            return self._per_param(rates)
        return super().setting_values(name, h, n_params)


def start_hyperparameters(settings: CNNSettings, lr: float, wd: float) -> tuple[Tensor, Tensor]:
    """``log_lr`` and ``log_wd`` at the constant ``lr`` and ``wd`` for every layer (leaves that require grad)."""
    log_lr = torch.full((len(LAYERS), settings.knots), math.log(lr), requires_grad=True)
    log_wd = torch.full((len(LAYERS),), math.log(wd), requires_grad=True)
    return log_lr, log_wd


def training_problem(
    splits: Splits, settings: CNNSettings, init_seed: int, order: Tensor, hyperparameters: list[Tensor]
) -> BilevelProblem:
    """One training of the network of ``init_seed`` on the batches ``order``, judged on the validation split."""
    inner = InnerModel(network(settings, init_seed), init="fixed")
    layer_of = [LAYERS.index(name.split(".")[0]) for name in inner.names]
    x, y = splits.train
    xv, yv = splits.val

    def batch_loss(w, h, t):
        rows = order[t - 1]
        return F.cross_entropy(inner(w, x[rows]), y[rows])

    return BilevelProblem(
        inner_loss=lambda w, h: F.cross_entropy(inner(w, x), y),
        outer_loss=lambda w, h: F.cross_entropy(inner(w, xv), yv),
        hyperparameters=hyperparameters,
        init_params=inner.init_params(hyperparameters),
        optimizer=LayerScheduledSGD(layer_of, knot_weights(settings.steps, settings.knots), settings.momentum),
        steps=settings.steps,
        inner_step_loss=batch_loss,
    )


def train_and_measure(
    splits: Splits,
    settings: CNNSettings,
    init_seed: int,
    order: Tensor,
    log_lr: Tensor,
    log_wd: Tensor,
    measured: tuple[str, ...] = ("train", "val", "test"),
) -> dict[str, float]:
    """A plain training (``torch.optim.SGD``, no graph) with these hyperparameters; loss and accuracy of the splits
    ``measured``.

    Independent of the bilevel machinery: torch's own optimizer with one parameter group per layer, the rate of
    each step set from the knots. A training that diverges gives infinite losses and the accuracy of chance.
    """
    net = network(settings, init_seed)
    log_lr, log_wd = log_lr.detach(), log_wd.detach()
    weights = knot_weights(settings.steps, settings.knots)
    groups = [
        {"params": list(getattr(net, layer).parameters()), "weight_decay": float(log_wd[i].exp())}
        for i, layer in enumerate(LAYERS)
    ]
    opt = torch.optim.SGD(groups, lr=1.0, momentum=settings.momentum)
    x, y = splits.train
    rates = (log_lr @ weights.T).exp()  # (layers, T)
    for t in range(settings.steps):
        for i, group in enumerate(opt.param_groups):
            group["lr"] = float(rates[i, t])
        rows = order[t]
        opt.zero_grad()
        F.cross_entropy(net(x[rows]), y[rows]).backward()
        opt.step()
    out: dict[str, float] = {}
    with torch.no_grad():
        for split in measured:
            xs, ys = getattr(splits, split)
            logits = net(xs)
            loss = float(F.cross_entropy(logits, ys))
            finite = math.isfinite(loss)
            out[f"{split}_loss"] = loss if finite else math.inf
            out[f"{split}_acc"] = float((logits.argmax(1) == ys).float().mean()) if finite else 1 / settings.characters
    return out
