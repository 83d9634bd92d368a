"""One Table 2 training run traced step by step, and the estimators' hypergradients compared at initialization.

Built to find out why some estimators stall on Omniglot 10-shot (results.md, section 1): the same data, model and
settings as :mod:`studies.table2` (read from ``configs/paper/<dataset>.yaml``), with one change at a time.

- ``run``: trains one (setting, method, seed) and records, at every outer step, the hypergradient's norm, the
  meta-batch's adapted query accuracy and loss, the mean scale and shift of the backbone's last batch norm and the
  largest entry of Adam's second moment; then the meta-test accuracy. Changes: ``--clip`` (the hypergradient's
  norm), ``--inner-weight-decay`` (the inner SGD's; pair it with ``"neumann(10, damping=...)"`` so that the series
  inverts the regularized problem's Hessian) and ``--freeze-last-norm`` (the last batch norm's scale and shift are
  no hyperparameters, so the features' scale cannot change) and ``--correction-scale s`` (the hypergradient is
  ``FO + s * (method - FO)``: the method's correction to FO scaled, its direct term kept).
- ``init``: on the first meta-batch of each seed, at initialization, every method's hypergradient: its norm, its
  cosine to FO's and to RMD's, and its correction to FO (the hypergradient minus FO's) as a cosine to FO.

Records go to ``studies/trace/results/`` (``--out``), one JSON file per command, named by its settings
(:func:`record_name`). Before any work: an ``--out`` that cannot be written is refused, and a command holds
``--out``'s ``.<record name>.lock`` while it works (:func:`studies.common.run_alone`): a second run of the same
command and settings on the same ``--out`` is refused while the first lives.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_hypergrad import SGD, FewShotClassifier, HypergradEstimator, get_estimator
from lightning_hypergrad.estimators.base import AdjointEstimator, Estimate, add_grads
from studies.common import (
    Progress,
    StudyParser,
    estimator_spec,
    quiet,
    quiet_trainer,
    require_positive,
    run_alone,
    writable_folder,
    write_json,
)
from studies.table2.run import CachedFewShotDataModule, paper_model, run_data
from studies.table2.settings import PaperSettings, default_config, file_stem, resolve_root

OUT = "studies/trace/results"


def _last_norm(model: FewShotClassifier) -> nn.BatchNorm2d:
    return [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)][-1]


class ScaledCorrection(AdjointEstimator):
    """``FO + scale * (estimator - FO)``: the estimator's correction to the direct term, scaled.

    A diagnostic, not an estimator to train with: it runs the inner loop twice (once for ``estimator``, once for
    FO). ``scale = 0`` is FO and ``scale = 1`` the estimator itself.
    """

    def __init__(self, estimator: HypergradEstimator, scale: float) -> None:
        super().__init__()
        own_mapping = type(estimator)._hypergrads is not AdjointEstimator._hypergrads
        if not isinstance(estimator, AdjointEstimator) or own_mapping:
            raise ValueError(
                f"--correction-scale combines gradients with respect to the features, which {estimator} does not "
                "compute (it maps to the hyperparameters itself); use a reverse-mode, greedy or implicit estimator"
            )
        self.estimator, self.scale = estimator, scale
        self.capabilities = estimator.capabilities  # it supports what the estimator does (not registered: no name)
        self.fo = get_estimator("fo")

    def __str__(self) -> str:
        return f"{self.estimator} with its correction x {self.scale:g}"

    def validate(self, problem) -> None:
        self.estimator.validate(problem)

    def _estimate(self, problem, h) -> Estimate:
        full = self.estimator._estimate(problem, h)
        direct = self.fo._estimate(problem, h)
        grads: list = [None] * len(full.grads)  # (1 - s) FO + s method, None standing for zero
        add_grads(grads, direct.grads, 1.0 - self.scale)
        add_grads(grads, full.grads, self.scale)
        return Estimate(grads, full.trajectory, full.outer_loss)


def _estimator(method: str, correction_scale: float | None = None) -> HypergradEstimator:
    estimator = get_estimator(method)
    return estimator if correction_scale is None else ScaledCorrection(estimator, correction_scale)


class Trace(L.Callback):
    """Records every outer step (see the module's docstring); freezes the last batch norm if asked."""

    def __init__(self, freeze_last_norm: bool, total_steps: int = 0) -> None:
        self.freeze_last_norm = freeze_last_norm
        self.steps: list[dict[str, float]] = []
        # progress: a line every tenth of the run (a unit: that many steps)
        self.total_steps = total_steps
        self.every = max(1, math.ceil(total_steps / 10))
        self.progress = Progress(math.ceil(total_steps / self.every)) if total_steps > 0 else None

    def on_fit_start(self, trainer: L.Trainer, pl_module: FewShotClassifier) -> None:
        if self.freeze_last_norm:  # no .grad reaches them: Adam leaves them as they are
            for p in _last_norm(pl_module).parameters():
                p.requires_grad_(False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        hypergrad = outputs["hypergrad"]
        metrics = trainer.callback_metrics
        optimizer = trainer.optimizers[0]
        second = [optimizer.state[p]["exp_avg_sq"] for p in pl_module.hyperparameters() if p in optimizer.state]
        norm = _last_norm(pl_module)
        self.steps.append(
            {
                "step": batch_idx,
                "hypergrad_norm": float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in hypergrad]))),
                "query_acc": float(metrics["train/acc"]),
                "outer_loss": float(metrics["train/outer_loss"]),
                "last_norm_scale": float(norm.weight.detach().mean()),
                "last_norm_shift": float(norm.bias.detach().mean()),
                "adam_second_moment_max": max((float(v.max()) for v in second), default=0.0),
            }
        )
        done = len(self.steps)
        if self.progress is not None and (done % self.every == 0 or done == self.total_steps):
            self.progress.step(
                f"trained {done} of {self.total_steps} steps: outer loss {self.steps[-1]['outer_loss']:.3f}"
            )


def _setup(args: argparse.Namespace, seed: int, steps: int) -> tuple[PaperSettings, CachedFewShotDataModule]:
    """The Table 2 runner's settings and data for ``args`` (the same tasks as its run with this seed)."""
    paper = PaperSettings.from_config(default_config(args.dataset))
    sizes = {"ways": args.ways, "shots": args.shots, "queries": args.queries, "meta_batch": args.meta_batch}
    root = resolve_root(args.dataset, args.root, paper)
    L.seed_everything(seed, verbose=False)  # as the runner's run_one: the backbone built next takes this seed
    return paper, run_data(args.dataset, root, **sizes, steps=steps, eval_tasks=args.eval_tasks, seed=seed)


def _model(
    args: argparse.Namespace, paper: PaperSettings, data, estimator: HypergradEstimator, **kwargs: Any
) -> FewShotClassifier:
    """The Table 2 runner's model (:func:`studies.table2.run.paper_model`) for ``args``."""
    return paper_model(paper, data, ways=args.ways, meta_batch=args.meta_batch, estimator=estimator, **kwargs)


def _setting_name(args: argparse.Namespace) -> str:
    return f"{args.dataset}-{args.ways}way-{args.shots}shot"


def _changes(args: argparse.Namespace) -> list[str]:
    """A ``run``'s changes to the setting, as its record's name and its last line say them."""
    changes = []
    if args.clip is not None:
        changes.append(f"clip{args.clip:g}")
    if args.inner_weight_decay:
        changes.append(f"wd{args.inner_weight_decay:g}")
    if args.freeze_last_norm:
        changes.append("frozen")
    if args.precision == 64:
        changes.append("float64")
    if args.correction_scale is not None:
        changes.append(f"correction{args.correction_scale:g}")
    return changes


def record_name(args: argparse.Namespace) -> str:
    """The name of the command's record in ``--out``, without ``.json``: ``run-<setting>-<method>-seed<s>-<T>steps``
    and the changes, or ``init-<setting>-<N>seeds``."""
    if args.command == "init":
        return f"init-{_setting_name(args)}-{args.seeds}seeds"
    words = [_setting_name(args), file_stem(args.method), f"seed{args.seed}", f"{args.steps}steps", *_changes(args)]
    return "run-" + "-".join(words)


def command_run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    changes = _changes(args)
    precision = {32: "32-true", 64: "64-true"}[args.precision]
    trace = Trace(args.freeze_last_norm, args.steps)
    with quiet():
        paper, data = _setup(args, args.seed, args.steps)
        inner = paper.optimizer()
        if args.inner_weight_decay:
            if not isinstance(inner, SGD):
                raise SystemExit(
                    f"python -m studies.trace: --inner-weight-decay sets the inner SGD's weight decay, but "
                    f"{paper.config} trains the head with {type(inner).__name__}"
                )
            settings = dict(paper.inner_optimizer[1])
            inner = SGD(lr=settings["lr"], momentum=settings.get("momentum", 0.0), weight_decay=args.inner_weight_decay)
        estimator = _estimator(args.method, args.correction_scale)
        model = _model(args, paper, data, estimator, inner_optimizer=inner, gradient_clip_val=args.clip)
        fit = quiet_trainer(
            max_epochs=1,
            max_steps=args.steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[trace],
            precision=precision,
        )
        fit.fit(model, datamodule=data)
        test = quiet_trainer(precision=precision).test(model, datamodule=data, verbose=False)[0]
    record = {
        "dataset": args.dataset,
        "ways": args.ways,
        "shots": args.shots,
        "queries": args.queries,
        "method": args.method,
        "correction_scale": args.correction_scale,
        "seed": args.seed,
        "steps": args.steps,
        "meta_batch": args.meta_batch,
        "eval_tasks": args.eval_tasks,
        "clip": args.clip,
        "inner_weight_decay": args.inner_weight_decay,
        "freeze_last_norm": args.freeze_last_norm,
        "precision": args.precision,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "test_acc": float(test["test/acc"]),
        "test_ci95": float(test["test/acc_ci95"]),
        "trace": trace.steps,
    }
    write_json(Path(args.out) / f"{record_name(args)}.json", record)
    for row in trace.steps[:: max(1, len(trace.steps) // 10)]:
        print(
            f"step {row['step']:4d}: |hypergrad| {row['hypergrad_norm']:9.3f}  query acc {row['query_acc']:.3f}  "
            f"outer loss {row['outer_loss']:7.3f}  last norm scale {row['last_norm_scale']:.4f} "
            f"shift {row['last_norm_shift']:+.4f}  Adam v max {row['adam_second_moment_max']:.3g}"
        )
    norms = [row["hypergrad_norm"] for row in trace.steps]
    print(
        f"{model.estimator} {' '.join(changes) or '(no change)'}: meta-test {100 * record['test_acc']:.2f}% on "
        f"{args.eval_tasks} tasks; |hypergrad| median {statistics.median(norms):.3g}, max {max(norms):.3g}"
    )
    return record


def _cosine(a: Tensor, b: Tensor) -> float:
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else 0.0


def command_init(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    methods = list(dict.fromkeys(["fo", "rmd", *args.methods]))
    seeds: dict[str, Any] = {}
    progress = Progress(args.seeds)
    for seed in range(args.seeds):
        with quiet():
            paper, data = _setup(args, seed, 1)
            model = _model(args, paper, data, get_estimator("fo"))
            data.setup("fit")
            tasks = model.split_tasks(next(iter(data.train_dataloader())))
            flat = {}
            for method in methods:
                grads = model.meta_gradient(tasks, get_estimator(method)).hypergrads
                flat[method] = torch.cat([g.flatten() for g in grads])
        fo, rmd = flat["fo"], flat["rmd"]
        seeds[str(seed)] = {
            name: {
                "norm": float(g.norm()),
                "cos_fo": _cosine(g, fo),
                "cos_rmd": _cosine(g, rmd),
                "correction_cos_fo": _cosine(g - fo, fo),
            }
            for name, g in flat.items()
        }
        progress.step(f"seed {seed}: the hypergradients of {', '.join(methods)} at initialization")
    record = {
        "dataset": args.dataset,
        "ways": args.ways,
        "shots": args.shots,
        "queries": args.queries,
        "meta_batch": args.meta_batch,
        "seeds": seeds,
    }
    write_json(Path(args.out) / f"{record_name(args)}.json", record)
    print("method: norm / cosine to FO / cosine to RMD / correction's cosine to FO, seed by seed")
    for name in seeds["0"]:
        cells = [seeds[s][name] for s in seeds]
        texts = [
            f"{c['norm']:.1f} / {c['cos_fo']:+.2f} / {c['cos_rmd']:+.2f} / {c['correction_cos_fo']:+.2f}" for c in cells
        ]
        print(f"{name:24s} " + "  ".join(texts))
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = StudyParser(prog="python -m studies.trace", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train one (setting, method, seed) and record every step")
    init = commands.add_parser("init", help="compare the estimators' hypergradients at initialization")
    for sub in (run, init):
        sub.add_argument("--dataset", default="omniglot", help="omniglot, cifar100 or digits (default omniglot)")
        sub.add_argument("--root", default=None, help="the data folder (default: as studies.table2 finds it)")
        sub.add_argument("--ways", type=int, default=3)
        sub.add_argument("--shots", type=int, default=10)
        sub.add_argument("--queries", type=int, default=10)
        sub.add_argument("--meta-batch", type=int, default=10)
        sub.add_argument("--eval-tasks", type=int, default=100)
        sub.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
        sub.add_argument("--out", type=writable_folder, default=OUT, help=f"where the record goes (default {OUT})")
    run.add_argument(
        "--method", type=estimator_spec, default="neumann(10)", help='an estimator spec string (default "neumann(10)")'
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--steps", type=int, default=100, help="outer steps (default 100)")
    run.add_argument("--clip", type=float, default=None, help="clip the hypergradient's norm at this value")
    run.add_argument("--inner-weight-decay", type=float, default=None, help="the inner SGD's weight decay")
    run.add_argument("--freeze-last-norm", action="store_true", help="the last batch norm's affine stays fixed")
    run.add_argument("--precision", type=int, choices=(32, 64), default=32, help="float32 (default) or float64")
    run.add_argument(
        "--correction-scale", type=float, default=None, help="train with FO + s * (method - FO) (default: the method)"
    )
    init.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, one meta-batch each (default 3)")
    init.add_argument(
        "--methods", nargs="+", type=estimator_spec, default=["t1t2", "greedy(0.5)", "greedy(0.99)", "neumann(10)"]
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ints = ("ways", "shots", "queries", "meta_batch", "eval_tasks", "threads")
    require_positive(parser, args, *ints, *(("steps",) if args.command == "run" else ("seeds",)))
    for name in ("clip", "inner_weight_decay"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    scale = getattr(args, "correction_scale", None)
    if scale is not None and not (scale >= 0 and math.isfinite(scale)):
        parser.error(f"--correction-scale must be a finite number >= 0, got {scale}")
    try:
        for method in [args.method] if args.command == "run" else args.methods:
            _estimator(method, getattr(args, "correction_scale", None))
    except ValueError as error:
        print(f"python -m studies.trace: {error}", file=sys.stderr)
        return 2
    with run_alone(args.out, f".{record_name(args)}.lock"):  # a second run of the same would do the same work
        if args.command == "run":
            command_run(args)
        else:
            command_init(args)
    return 0
