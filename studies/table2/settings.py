"""The paper's Table 2 protocol: its settings (read from ``configs/paper/<dataset>.yaml``), the methods and their
costs, the report's protocols and the names of the records.

The paper's settings (backbone, inner optimizer, T, outer learning rate, meta-batch, outer steps, shots, queries,
evaluation tasks, data folder) are read from the same config as the command line's (``--config``), and the
baselines' settings from ``configs/estimators/{fo,t1t2,neumann}.yaml``.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lightning_hypergrad.estimators import Greedy, HypergradEstimator, get_estimator
from studies.common import REPOSITORY, omniglot_root

PAPER_WAYS = (3, 4, 5)
"""The settings (N-way) of the paper's Table 2; the report always shows these columns."""
DATASETS = ("omniglot", "cifar100", "digits")
PAPER_CONFIGS = {"omniglot": "configs/paper/omniglot.yaml", "cifar100": "configs/paper/cifar100.yaml"}
"""The config of each dataset (relative to the repository root); ``digits``, a quick stand-in, uses Omniglot's."""
BASELINE_CONFIGS = ("configs/estimators/fo.yaml", "configs/estimators/t1t2.yaml", "configs/estimators/neumann.yaml")
"""The configs of the baselines that the report always shows (FO, T1-T2 and the paper's IFT, a Neumann series)."""
GREEDY_GAMMAS = (0.9, 0.99, 0.999)
"""The discounts of Greedy run by default; the report chooses one per setting on meta-validation."""

PAPER_RESULTS: dict[str, tuple[int, dict[int, tuple[float, float]]]] = {
    "fo": (0, {3: (43.48, 1.64), 4: (34.15, 1.28), 5: (28.59, 1.0)}),
    "t1t2": (1, {3: (42.96, 1.89), 4: (33.95, 1.53), 5: (27.59, 0.99)}),
    "neumann(10, scale=0.1)": (11, {3: (40.14, 2.26), 4: (33.23, 0.99), 5: (27.20, 1.12)}),
    "greedy(0.99)": (10, {3: (46.10, 1.95), 4: (36.94, 2.55), 5: (29.79, 1.33)}),
}
"""The paper's Table 2 (CIFAR-100, 10-shot, accuracy in percent +- 95% CI): spec -> (JVPs, ``{ways: (mean, ci95)}``)."""

PROTOCOLS = {
    "paper": ("val_acc", "(a) the paper's protocol: γ chosen on meta-validation, accuracy on the same meta-validation"),
    "clean": ("test_acc", "(b) clean protocol: γ chosen on meta-validation, accuracy on meta-test"),
}
"""Protocol name -> (the record field reported, title). Both choose Greedy's gamma by mean ``val_acc``."""

CHOSEN = "greedy-chosen"
"""The method name of the report's row "Greedy (gamma chosen on meta-validation)"."""
CHOSEN_LABEL = "greedy (γ chosen on meta-val)"

COMPARED_SETTINGS = ("shots", "queries", "steps", "meta_batch", "eval_tasks")
"""Settings that a record must share with the requested run to count as done."""

METHODS_HELP = (
    "methods are estimator spec strings (lightning_hypergrad.get_estimator): fo (first order, 0 JVPs), t1t2 (T1-T2, "
    "1 JVP), neumann(10, scale=0.1) (the paper's IFT, a Neumann series of 10 terms: 11 JVPs), greedy(0.99) "
    "(generalized greedy with discount gamma in (0, 1], T JVPs); also rmd, truncated_rmd(5), cg(10), fmd"
)


def _instantiate(spec: dict[str, Any], where: str) -> Any:
    """The object that a config's ``{class_path, init_args}`` describes."""
    try:
        module_name, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
        return cls(**(spec.get("init_args") or {}))
    except (KeyError, AttributeError, ImportError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: cannot build {spec!r} ({error}); give a class_path and its init_args") from None


def _config_value(config: dict[str, Any], key: str, path: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"{path} has no {key}; the Table 2 runner reads the paper's settings from it")
        node = node[part]
    return node


def _meta_batch_key(config: dict[str, Any]) -> str:
    """Where the config sets the meta-batch: the data module's ``meta_batch_size``, else the model's."""
    model = (config.get("model") or {}).get("init_args") or {}
    data = (config.get("data") or {}).get("init_args") or {}
    if data.get("meta_batch_size") is None and model.get("meta_batch_size") is not None:
        return "model.init_args.meta_batch_size"
    return "data.init_args.meta_batch_size"


@functools.cache
def _read_yaml(path: str) -> dict[str, Any]:
    file = Path(path) if Path(path).is_file() else REPOSITORY / path
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(
            f"cannot read the config {path}: {error.strerror}; give an existing file to --config"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a config (a YAML mapping)")
    return data


@dataclass(frozen=True)
class PaperSettings:
    """The paper's protocol as a config holds it (the fields of a :class:`RunConfig` that do not vary per run)."""

    config: str
    dataset: str
    root: str | None
    depth: int
    width: int
    inner_optimizer: tuple[str, tuple[tuple[str, Any], ...]]
    inner_steps: int
    outer_lr: float
    meta_batch: int
    steps: int
    shots: int
    queries: int
    eval_tasks: int

    @classmethod
    def from_config(cls, path: str) -> PaperSettings:
        """Reads the model, data and trainer settings of the config at ``path`` (a ``lightning-hypergrad`` config).

        Raises:
            ValueError: the file is missing or lacks a setting, or its meta-validation and meta-test task counts
                differ (the runner evaluates both on ``eval_tasks``).
        """
        config = _read_yaml(path)
        data = _config_value(config, "data.init_args", path)
        optimizer = _config_value(config, "model.init_args.inner_optimizer", path)
        _instantiate(optimizer, f"{path}: model.init_args.inner_optimizer")
        val_tasks, test_tasks = (
            _config_value(config, f"data.init_args.{k}", path) for k in ("val_tasks", "test_tasks")
        )
        if val_tasks != test_tasks:
            raise ValueError(
                f"{path}: data.init_args.val_tasks ({val_tasks}) and test_tasks ({test_tasks}) differ; the Table 2 "
                "runner evaluates on as many meta-test as meta-validation tasks: set both to the same number"
            )
        return cls(
            config=path,
            dataset=_config_value(config, "data.init_args.dataset", path),
            root=data.get("root"),
            depth=_config_value(config, "model.init_args.depth", path),
            width=_config_value(config, "model.init_args.width", path),
            inner_optimizer=(optimizer["class_path"], tuple(sorted((optimizer.get("init_args") or {}).items()))),
            inner_steps=_config_value(config, "model.init_args.inner_steps", path),
            outer_lr=_config_value(config, "model.init_args.outer_lr", path),
            meta_batch=_config_value(config, _meta_batch_key(config), path),
            steps=_config_value(config, "trainer.max_steps", path),
            shots=_config_value(config, "data.init_args.shots", path),
            queries=_config_value(config, "data.init_args.queries", path),
            eval_tasks=val_tasks,
        )

    def optimizer(self) -> Any:
        """A fresh inner optimizer."""
        class_path, args = self.inner_optimizer
        return _instantiate({"class_path": class_path, "init_args": dict(args)}, self.config)

    def optimizer_setting(self, name: str) -> Any:
        """One of the inner optimizer's arguments (``lr``, ``momentum``), ``None`` when the config does not set it."""
        return dict(self.inner_optimizer[1]).get(name)


def default_config(dataset: str) -> str:
    """The config of ``dataset``'s protocol: ``configs/paper/<dataset>.yaml`` (digits: Omniglot's)."""
    return PAPER_CONFIGS.get(dataset, PAPER_CONFIGS["omniglot"])


@functools.cache
def baseline_methods() -> tuple[str, ...]:
    """The specs of the baselines in :data:`BASELINE_CONFIGS` (``fo``, ``t1t2``, ``neumann(10, scale=0.1)``)."""
    specs = []
    for path in BASELINE_CONFIGS:
        spec = _config_value(_read_yaml(path), "model.init_args.estimator", path)
        specs.append(str(_instantiate(spec, f"{path}: model.init_args.estimator")))
    return tuple(specs)


def default_methods() -> list[str]:
    """The methods run by default: the baselines, then Greedy with every gamma of :data:`GREEDY_GAMMAS`."""
    return [*baseline_methods(), *(str(Greedy(gamma)) for gamma in GREEDY_GAMMAS)]


def canonical(method: str) -> str:
    """The canonical spec of ``method`` (``greedy(0.990)`` -> ``greedy(0.99)``).

    Raises:
        ValueError: ``method`` is not an estimator spec (the message lists the known names).
    """
    return str(get_estimator(method))


def jvps(estimator: HypergradEstimator, inner_steps: int | None) -> int | None:
    """The ``jvps`` of a record and a table row: Jacobian- (or Hessian-) vector products per task, as the paper
    counts them, which each estimator declares (:meth:`~lightning_hypergrad.HypergradEstimator.products`).

    ``None`` for forward mode (one product per hyperparameter entry) and, when ``inner_steps`` is ``None``, for the
    estimators whose count is the number of inner steps.
    """
    return estimator.products(inner_steps)


def greedy_gamma(method: str) -> float | None:
    """Greedy's discount in ``method``, ``None`` for any other estimator (``momentum_greedy``, ``greedy_tail``
    included: the report gives them rows of their own, outside the choice of Greedy's gamma)."""
    estimator = get_estimator(method)
    return estimator.gamma if isinstance(estimator, Greedy) else None


def file_stem(method: str) -> str:
    """The method's spec as it appears in file names: without spaces (``neumann(10,scale=0.1)``), and with ``/``
    (``damping='1/lr'``), which would name a folder, as ``%2F``."""
    return method.replace(" ", "").replace("/", "%2F")


def record_name(dataset: str, ways: int, method: str, seed: int) -> str:
    """The file name of one run's record."""
    return f"{dataset}-{ways}way-{file_stem(method)}-seed{seed}.json"


def resolve_root(dataset: str, root: str | None, paper: PaperSettings) -> str | None:
    """The data folder as given: ``--root``, else (Omniglot) ``$OMNIGLOT_ROOT``, else the config's (same dataset).

    Never made absolute, so that the records hold the path as the command line or the config wrote it. ``digits``
    reads no files: ``None``, whatever the config says.
    """
    if dataset == "digits":
        return None
    if root is not None:
        return root
    configured = paper.root if paper.dataset == dataset else None
    if dataset == "omniglot":
        return omniglot_root(None) if configured is None or "OMNIGLOT_ROOT" in os.environ else configured
    return configured
