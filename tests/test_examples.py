"""The examples run as written, and the README shows the plain-PyTorch example as it is in examples/."""

from __future__ import annotations

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_pytorch_example_lowers_the_validation_loss(capsys):
    namespace = runpy.run_path(str(ROOT / "examples" / "plain_pytorch.py"), run_name="__main__")
    history = namespace["history"]
    assert len(history) == 40
    assert history[-1] < 0.8 * history[0]
    assert "validation loss" in capsys.readouterr().out


def test_readme_shows_the_plain_pytorch_example_verbatim():
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "plain_pytorch.py").read_text()
    body = example.split('"""', 2)[2].strip()
    assert body in readme
    assert len(example.splitlines()) < 40


def test_custom_module_example_lowers_the_validation_loss():
    import torch

    namespace = runpy.run_path(str(ROOT / "examples" / "custom_module.py"), run_name="example")
    task = namespace["digits_task"]()
    model = namespace["main"](steps=15)

    def validation_loss() -> float:  # after the inner loop from w_0, with the current hyperparameters
        params, h = model.adapt(task)
        return float(model.outer_loss(model.inner_model.bind(params), h, task))

    with torch.no_grad():
        after = validation_loss()
        model.log_wd.fill_(-3.0)  # back to the initial hyperparameters, same inner settings
        before = validation_loss()
    assert after < 0.9 * before
    assert len((ROOT / "examples" / "custom_module.py").read_text().splitlines()) < 60


def test_fewshot_example_runs_in_a_short_form():
    namespace = runpy.run_path(str(ROOT / "examples" / "fewshot.py"), run_name="example")
    metrics = namespace["main"](["--steps", "3", "--ways", "3", "--shots", "2"])
    assert 0.0 <= metrics["val/acc"] <= 1.0 and metrics["val/acc_ci95"] > 0
