"""The estimator registry: names, capabilities, the messages and the README table read from it, and a new estimator
added by one file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lightning_hypergrad as lh
from lightning_hypergrad.estimators import registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_hypergrad" / "estimators"

TOY = textwrap.dedent(
    '''
    """A toy estimator for the registry's test: FO's hypergradient times a factor."""

    from lightning_hypergrad.estimators.first_order import FO
    from lightning_hypergrad.estimators.registry import Capabilities, register_estimator


    @register_estimator
    class ToyScaledFO(FO):
        name = "toy_scaled_fo"
        spec_args = ("factor",)
        capabilities = Capabilities(computes="FO times a factor", cost="none", memory="O(P+H)",
                                    example="toy_scaled_fo(2.0)")

        def __init__(self, factor: float = 2.0, nonfinite: str = "warn") -> None:
            super().__init__(nonfinite)
            self.factor = float(factor)

        def _estimate(self, problem, h):
            estimate = super()._estimate(problem, h)
            estimate.grads = [None if g is None else self.factor * g for g in estimate.grads]
            return estimate
    '''
)

CHECK = textwrap.dedent(
    """
    import sys, torch
    import lightning_hypergrad as lh
    from lightning_hypergrad.estimators import estimator_table
    assert "toy_scaled_fo" in lh.list_estimators(), lh.list_estimators()
    assert "toy_scaled_fo" not in lh.list_estimators(learned_init=True)
    estimator = lh.get_estimator("toy_scaled_fo(3.0)")
    assert str(estimator) == "toy_scaled_fo(3.0)"
    assert "| `toy_scaled_fo(2.0)` | `ToyScaledFO(factor=2.0)` | FO times a factor |" in estimator_table()
    a = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
    problem = lh.BilevelProblem(inner_loss=lambda w, h: (w[0] ** 2).sum(), outer_loss=lambda w, h: (w[0] * h[0]).sum(),
                                hyperparameters=[a], init_params=[torch.ones(1, dtype=torch.float64)],
                                optimizer=lh.SGD(lr=0.25), steps=2)
    # FO: d/da (w_2 a) with w_2 = (1 - 0.5)^2 = 0.25 held constant
    assert abs(float(estimator(problem).hypergrads[0]) - 3.0 * 0.25) < 1e-12
    print("toy ok")
    """
)


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "WANDB_MODE": "offline"}


def test_a_toy_estimator_in_one_new_file_appears_in_the_list_the_cli_and_the_readme_table(tmp_path):
    toy = PACKAGE / "toy_scaled_fo.py"
    assert not toy.exists()
    toy.write_text(TOY)
    try:
        result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=_env(), timeout=300)
        assert result.returncode == 0 and "toy ok" in result.stdout, result.stderr[-3000:]
        command = [
            sys.executable, "-m", "lightning_hypergrad", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--trainer.max_steps=1", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
            "--trainer.callbacks=[]", "--data.init_args.train_batches=1", "--data.init_args.val_tasks=2",
            "--data.init_args.test_tasks=2", "--model.init_args.estimator=toy_scaled_fo(2.0)",
        ]  # fmt: skip
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        saved = list(tmp_path.glob("lightning-hypergrad/*/checkpoints/*.yaml")) + list(tmp_path.rglob("config.yaml"))
        assert any("toy_scaled_fo(2.0)" in p.read_text() for p in saved), saved
    finally:
        toy.unlink()


def test_the_readme_table_is_the_one_generated_from_the_capabilities():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert registry.replace_table(readme) == readme, (
        "the README's estimator table is out of date: run python -m lightning_hypergrad.estimators --readme README.md"
    )


def test_list_estimators_filters_by_the_declared_capabilities():
    names = lh.list_estimators()
    assert names == sorted(names) and {"fo", "t1t2", "greedy", "rmd", "cg", "neumann", "fmd"} <= set(names)
    for capability in ("learned_init", "optimizer_settings", "batchable", "exact"):
        having = set(lh.list_estimators(**{capability: True}))
        lacking = set(lh.list_estimators(**{capability: False}))
        assert having | lacking == set(names) and not having & lacking
        for name in having:
            assert getattr(registry.registered()[name].capabilities, capability) is True
    assert set(lh.list_estimators(exact=True)) == {"rmd", "fmd", "mixed_rmd"}
    assert "cg" not in lh.list_estimators(optimizer_settings=True)
    with pytest.raises(ValueError, match="unknown capability 'fast'"):
        lh.list_estimators(fast=True)


def test_the_refusal_of_a_learned_initialization_lists_the_capable_estimators_from_the_registry():
    with pytest.raises(ValueError, match="Use one of") as raised:
        lh.get_estimator("cg(5)").check_learned_init()
    listed = raised.value.args[0].split("Use one of ")[1]
    for name in lh.list_estimators(learned_init=True):
        assert name in listed
    for name in lh.list_estimators(learned_init=False):
        assert f"{name}(" not in listed and f" {name}," not in listed


def test_register_estimator_refuses_a_class_without_capabilities_or_with_a_taken_name():
    class NoCapabilities(lh.FO):
        name = "no_capabilities"

    with pytest.raises(TypeError, match="must declare its own `capabilities"):
        registry.register_estimator(NoCapabilities)

    class Taken(lh.FO):
        name = "greedy"
        capabilities = lh.FO.capabilities

    with pytest.raises(ValueError, match="'greedy' is taken"):
        registry.register_estimator(Taken)


def test_the_base_estimator_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        lh.HypergradEstimator()


@pytest.mark.parametrize("name", ["fo", "t1t2", "greedy", "truncated_rmd", "cg", "neumann"])
def test_products_count_the_papers_jvps(name):
    estimator = lh.get_estimator(name)
    expected = {"fo": 0, "t1t2": 1, "greedy": 7, "truncated_rmd": 1, "cg": 11, "neumann": 21}[name]
    assert estimator.products(7) == expected


def test_the_package_imports_without_torch_until_a_name_is_used():
    code = "import sys, lightning_hypergrad; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert isinstance(lh.SGD(lr=0.1), lh.DifferentiableOptimizer) and torch is not None
