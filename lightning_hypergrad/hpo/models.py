"""Hyperparameter optimization of one network's training: weight decay, learning rates, sample weights.

Each module trains a small multilayer perceptron, an ``nn.Module`` whose parameters are the inner parameters ``w``
(wrapped in an :class:`~lightning_hypergrad.InnerModel`), on a training set and measures the outer loss on a
validation set; its own trainable parameters are the hyperparameters. The per-layer hyperparameters (weight decays,
learning rates) address the network's parameters by name (``layer0.weight``, ``layer1.*``), never by their position
in the flat list of inner parameters. With ``online=True`` (the default of :class:`LearningRateTuner` and
:class:`HyperCleaner`) the network keeps training from one outer step to the next, so a whole run is one training
of the network during which the hyperparameters are tuned.

The outer optimizer is Adam (``outer_optimizer="adam"``, the default of :class:`WeightDecayTuner` and
:class:`HyperCleaner`) or sign steps with adaptive sizes (``"rprop"``, the default of :class:`LearningRateTuner`;
see :class:`MLPProblem`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hypergrad._checks import check_choice, check_int, check_positive_number
from lightning_hypergrad.inner_model import InnerModel
from lightning_hypergrad.module import BilevelModule
from lightning_hypergrad.optim import SGD, DifferentiableOptimizer

OUTER_OPTIMIZERS = ("adam", "rprop")
RPROP_ETAS = (0.5, 2.0)
"""Rprop's factors: the step of an entry halves after its hypergradient changes sign and doubles after it keeps it."""
RPROP_MIN_FRACTION = 1e-3
"""The smallest Rprop step, as a fraction of ``max_outer_step``."""


def mlp(sizes: Sequence[int], init_seed: int) -> nn.Sequential:
    """The multilayer perceptron ``sizes[0] -> ... -> sizes[-1]``: ``layer{i}`` (``nn.Linear``), ReLU between them.

    Its weights are drawn from a generator seeded with ``init_seed`` (uniform in ``+-1/sqrt(fan_in)``, as
    ``nn.Linear`` initializes them; per layer the weight then the bias), not from the global random state: the
    network depends on ``init_seed`` alone, and building a module leaves the global random state untouched.
    """
    generator = torch.Generator().manual_seed(init_seed)
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    last = len(sizes) - 2
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = 1.0 / math.sqrt(fan_in)
        weight = (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound
        bias = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
        layer = nn.utils.skip_init(nn.Linear, fan_in, fan_out)  # no draw of its own: the weights are set here
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        modules[f"layer{i}"] = layer
        if i < last:
            modules[f"relu{i}"] = nn.ReLU()
    return nn.Sequential(modules)


class MLPProblem(BilevelModule):
    """A multilayer perceptron trained on ``x_train``/``y_train`` and judged on ``x_val``/``y_val``.

    The network is :func:`mlp` (``nn.Linear`` layers ``layer0``, ``layer1``, ... with ReLU between), drawn once from
    ``init_seed`` and wrapped as ``self.inner_model = InnerModel(network, init="fixed")``: its weights are the
    inner loop's starting point, constants (buffers, saved in checkpoints), so every run, estimator and process
    starts from the same network, and the module's parameters are its hyperparameters alone. The losses receive the
    network bound to the current inner parameters (``model(x)``). A subclass adds hyperparameters and uses them in
    :meth:`inner_loss` or in the inner optimizer's settings, addressing the network's parameters by name
    (:attr:`layer_names`, :meth:`~lightning_hypergrad.InnerModel.select`).

    The outer optimizer steps the hyperparameters (all of them in log or logit form) with the hypergradient:

    - ``"adam"``: Adam with learning rate ``outer_lr`` (as :class:`BilevelModule`).
    - ``"rprop"``: sign steps with a size per entry that adapts (``torch.optim.Rprop``, the iRprop- variant): each
      entry moves by ``-step * sign(hypergradient)``; its step starts at ``outer_lr``, doubles while the sign stays
      the same, halves after the sign changes (and that outer step leaves the entry where it is), and stays within
      ``[max_outer_step / 1000, max_outer_step]``. Only the sign of the hypergradient is used, so its size, which
      falls by orders of magnitude while the network trains, does not set the step, and the first step
      (``outer_lr``) is forgotten after a few outer steps; what remains is ``max_outer_step``, the largest change
      of a log hyperparameter in one outer step (0.1: the learning rate changes by at most a factor
      ``e^0.1 = 1.105`` per outer step).

    Args:
        in_features: inputs of the network.
        classes: outputs of the network.
        hidden: widths of the hidden layers (``[]``: a linear classifier).
        init_seed: the seed of the network's initial weights.
        outer_optimizer: ``"adam"`` or ``"rprop"`` (see above).
        max_outer_step: the largest Rprop step (``"rprop"`` only); ``outer_lr``, the first step, may not exceed it.
        **kwargs: the arguments of :class:`BilevelModule`.

    Raises:
        ValueError: a setting out of its range (the message names it).
    """

    def __init__(
        self,
        in_features: int = 64,
        classes: int = 10,
        hidden: Sequence[int] = (64,),
        init_seed: int = 0,
        outer_optimizer: str = "adam",
        max_outer_step: float = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        check_choice("outer_optimizer", outer_optimizer, OUTER_OPTIMIZERS, owner=name)
        check_positive_number("max_outer_step", max_outer_step, owner=name)
        if outer_optimizer == "rprop" and self.outer_lr > max_outer_step:
            raise ValueError(
                f"{name} outer_lr={self.outer_lr} (Rprop's first step) exceeds max_outer_step={max_outer_step}; "
                "lower outer_lr or raise max_outer_step"
            )
        self.outer_optimizer = outer_optimizer
        self.max_outer_step = float(max_outer_step)
        check_int("in_features", in_features, owner=name)
        check_int("classes", classes, owner=name)
        if not isinstance(hidden, (list, tuple)):
            raise ValueError(
                f"{name} hidden must be a list of layer widths (e.g. [64], or [] for none), got {hidden!r}"
            )
        for width in hidden:
            check_int("hidden width", width, owner=name)
        self.sizes = [in_features, *hidden, classes]
        self.inner_model = InnerModel(mlp(self.sizes, init_seed), init="fixed")

    @property
    def layers(self) -> int:
        """The number of linear layers."""
        return len(self.sizes) - 1

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The names of the linear layers in the network, input first (``("layer0", "layer1")``): the prefixes of
        their parameters' names (``layer0.weight``, ``layer0.bias``) in :attr:`InnerModel.names`."""
        return tuple(f"layer{i}" for i in range(self.layers))

    def inner_loss(self, model, h, task):
        return F.cross_entropy(model(task["x_train"]), task["y_train"])

    def outer_loss(self, model, h, task):
        return F.cross_entropy(model(task["x_val"]), task["y_val"])

    def task_metrics(self, model, h, task):
        return {"acc": (model(task["x_val"]).argmax(-1) == task["y_val"]).float().mean()}

    def configure_optimizers(self):
        if self.outer_optimizer == "adam":
            return super().configure_optimizers()
        bounds = (self.max_outer_step * RPROP_MIN_FRACTION, self.max_outer_step)
        return torch.optim.Rprop(self.parameters(), lr=self.outer_lr, etas=RPROP_ETAS, step_sizes=bounds)


class WeightDecayTuner(MLPProblem):
    """Learns an L2 penalty per layer (or per weight) of a network trained on a small training set.

    ``L_train(w) = CE(train) + sum_l exp(a_l) / 2 * ||W_l||^2`` over the weight matrices ``W_l`` (the parameters
    ``layer{l}.weight``; biases are not penalized); ``a`` (the log weight decay) is the hyperparameter and ``L_val``
    is the cross-entropy on the validation set. The penalty is part of the inner loss, so every estimator applies,
    the implicit ones included.

    Args:
        per: ``"layer"`` (one weight decay per weight matrix) or ``"weight"`` (one per entry of each matrix).
        init_weight_decay: the starting weight decay, the same everywhere.
        **kwargs: the arguments of :class:`MLPProblem` and :class:`BilevelModule`.
    """

    def __init__(self, per: str = "layer", init_weight_decay: float = 1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        if per not in ("layer", "weight"):
            raise ValueError(f"WeightDecayTuner per must be 'layer' or 'weight', got {per!r}")
        if not isinstance(init_weight_decay, (int, float)) or not init_weight_decay > 0:
            raise ValueError(f"WeightDecayTuner init_weight_decay must be a number > 0, got {init_weight_decay!r}")
        self.save_hyperparameters(ignore=["estimator", "inner_optimizer"])
        self.per = per
        start = math.log(init_weight_decay)
        #: the names of the penalized parameters, one per entry of ``log_weight_decay``
        self.penalized = tuple(f"{layer}.weight" for layer in self.layer_names)
        initial = self.inner_model.named(self.inner_model.parameter_tensors())
        shapes = [() if per == "layer" else initial[name].shape for name in self.penalized]
        self.log_weight_decay = nn.ParameterList([nn.Parameter(torch.full(s, start)) for s in shapes])

    def weight_decays(self) -> list[Tensor]:
        """The current weight decay of each layer (a scalar, or one per weight)."""
        return [a.detach().exp() for a in self.log_weight_decay]

    def inner_loss(self, model, h, task):
        penalty = sum(0.5 * (a.exp() * model[name] ** 2).sum() for name, a in zip(self.penalized, h))
        return super().inner_loss(model, h, task) + penalty

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        for i, decay in enumerate(self.weight_decays()):
            self.log(f"hparams/weight_decay{i}", decay.mean())
        return out


class LearningRateTuner(MLPProblem):
    """Learns the inner SGD's learning rate of each layer, and optionally its momentum, during one training run.

    The learning rate of layer ``l`` (both its parameters, ``layer{l}.*``) is ``exp(a_l)`` and the momentum is
    ``sigmoid(b)``: the hyperparameters ``a`` and ``b`` are log and logit parametrized, so they stay in range whatever
    the outer optimizer does. In online mode (the default) the network trains on from one outer step to the next,
    and the learning rates used over the run form a schedule, learned from the validation loss. The implicit
    estimators (Neumann, CG) refuse these hyperparameters: they see only the inner optimum, which does not depend on
    the learning rate.

    The outer optimizer is Rprop by default (see :class:`MLPProblem`): ``a`` and ``b`` move by sign steps of
    adaptive size, at most ``max_outer_step`` per outer step, the first of size ``outer_lr``. The hypergradient of a
    log learning rate shrinks by orders of magnitude as the network trains while keeping its sign for most of the
    run, so with Adam the distance the rate travels is about ``outer_lr`` times the number of outer steps and the
    result depends on ``outer_lr``; with sign steps it does not, and depends on ``max_outer_step`` instead
    (``docs/hpo.md`` measures both).

    Args:
        init_lr: the starting learning rate of every layer.
        momentum: the momentum, fixed; with ``learn_momentum`` the starting momentum.
        learn_momentum: learn the momentum as well.
        outer_optimizer: ``"rprop"`` (default) or ``"adam"``.
        outer_lr: Rprop's first step (Adam's learning rate with ``"adam"``).
        **kwargs: the arguments of :class:`MLPProblem` and :class:`BilevelModule` (``inner_optimizer`` is built
            here and may not be given).
    """

    def __init__(
        self,
        init_lr: float = 0.01,
        momentum: float = 0.0,
        learn_momentum: bool = False,
        online: bool = True,
        outer_optimizer: str = "rprop",
        outer_lr: float = 0.03,
        **kwargs,
    ) -> None:
        if kwargs.get("inner_optimizer") is not None:
            raise ValueError(
                "LearningRateTuner builds its inner SGD from its hyperparameters; remove inner_optimizer (set "
                "init_lr and momentum instead)"
            )
        if not isinstance(init_lr, (int, float)) or not init_lr > 0:
            raise ValueError(f"LearningRateTuner init_lr must be a number > 0, got {init_lr!r}")
        if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"LearningRateTuner momentum must be in [0, 1), got {momentum!r}")
        if learn_momentum and momentum == 0:
            raise ValueError("LearningRateTuner learn_momentum=True needs a starting momentum in (0, 1), got 0")
        super().__init__(online=online, outer_optimizer=outer_optimizer, outer_lr=outer_lr, **kwargs)
        self.save_hyperparameters(ignore=["estimator", "inner_optimizer"])
        self.log_lr = nn.Parameter(torch.full((self.layers,), math.log(init_lr)))
        self.learn_momentum = bool(learn_momentum)
        if self.learn_momentum:
            self.logit_momentum = nn.Parameter(torch.tensor(math.log(momentum / (1 - momentum))))
        self.inner_optimizer = self._make_optimizer(momentum)

    def _make_optimizer(self, momentum: float) -> DifferentiableOptimizer:
        # h is [log_lr] or [log_lr, logit_momentum], in the order the parameters were registered; each inner
        # parameter takes the rate of its layer, found by name (the entry of log_lr of each of InnerModel.names)
        layer = self.inner_model.select({f"{name}.*": i for i, name in enumerate(self.layer_names)})

        def lr(h: Sequence[Tensor]) -> list[Tensor]:
            rates = h[0].exp()
            return [rates[i] for i in layer]

        def learned_momentum(h: Sequence[Tensor]) -> Tensor:
            return torch.sigmoid(h[1])

        return SGD(lr=lr, momentum=learned_momentum if self.learn_momentum else momentum)

    def learning_rates(self) -> Tensor:
        """The current learning rate of each layer."""
        return self.log_lr.detach().exp()

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        for i, lr in enumerate(self.learning_rates()):
            self.log(f"hparams/lr{i}", lr)
        if self.learn_momentum:
            self.log("hparams/momentum", torch.sigmoid(self.logit_momentum.detach()))
        return out


class HyperCleaner(MLPProblem):
    """Data hypercleaning: learns a weight in (0, 1) for every training example, from a clean validation set.

    ``L_train(w) = sum_i sigmoid(c_i) * CE_i(w) / n`` over the ``n`` training examples; the logits ``c`` are the
    hyperparameters and ``L_val`` is the cross-entropy on the validation set. Examples whose labels are wrong should
    end with low weights: when the data holds ``corrupted`` (see :class:`DigitsHPODataModule`), the area under the
    ROC curve of the weights for telling clean from corrupted examples is logged as ``auc`` (1: every clean example
    weighs more than every corrupted one; 0.5: chance).

    Args:
        train_size: the number of training examples; ``None`` takes the data module's ``train_size``.
        init_weight: the starting weight of every example, in (0, 1).
        **kwargs: the arguments of :class:`MLPProblem` and :class:`BilevelModule` (``hidden`` defaults to ``[]``:
            a linear classifier, as in Franceschi et al. 2017).
    """

    def __init__(
        self,
        train_size: int | None = None,
        init_weight: float = 0.5,
        hidden: Sequence[int] = (),
        online: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(hidden=hidden, online=online, **kwargs)
        if train_size is not None:
            check_int("train_size", train_size, owner="HyperCleaner")
        if not isinstance(init_weight, (int, float)) or not 0 < init_weight < 1:
            raise ValueError(f"HyperCleaner init_weight must be in (0, 1), got {init_weight!r}")
        self.save_hyperparameters(ignore=["estimator", "inner_optimizer"])
        self.init_weight = float(init_weight)
        self.register_parameter("sample_logits", None)
        self.train_size = train_size
        if train_size is not None:
            self._build()

    def _build(self) -> None:
        start = math.log(self.init_weight / (1 - self.init_weight))
        self.sample_logits = nn.Parameter(torch.full((self.train_size,), start))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.settings_from_data("train_size")
        if self.sample_logits is None:
            self._build()

    def sample_weights(self) -> Tensor:
        """The current weight of each training example."""
        return torch.sigmoid(self.sample_logits.detach())

    def inner_loss(self, model, h, task):
        losses = F.cross_entropy(model(task["x_train"]), task["y_train"], reduction="none")
        if losses.shape != h[0].shape:
            raise ValueError(
                f"HyperCleaner has {h[0].numel()} sample weights but the task has {losses.numel()} training examples"
            )
        return (torch.sigmoid(h[0]) * losses).mean()

    def task_metrics(self, model, h, task):
        metrics = super().task_metrics(model, h, task)
        if "corrupted" in task and bool(task["corrupted"].any()) and not bool(task["corrupted"].all()):
            metrics["auc"] = auc(torch.sigmoid(h[0]), ~task["corrupted"])
        return metrics


def auc(scores: Tensor, positive: Tensor) -> Tensor:
    """The area under the ROC curve of ``scores`` for ``positive`` examples: the probability that a random positive
    scores above a random negative (ties count one half), by the Mann-Whitney statistic."""
    scores = scores.detach().double().reshape(-1)
    positive = positive.reshape(-1).bool()
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return (greater + 0.5 * ties) / (pos.numel() * neg.numel())
