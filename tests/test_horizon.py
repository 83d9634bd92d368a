"""The horizon study's noisy quadratic model: its closed form against sampling and finite differences, its runner."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lightning_hypergrad as lh
from lightning_hypergrad.inner_loop import InnerStep, StepMode, unroll
from studies.horizon.__main__ import main
from studies.horizon.nqm import (
    DTYPE,
    NQM,
    expected_loss,
    expected_losses,
    greedy_schedule,
    optimal_schedule,
    sampled_problem,
    schedule_rates,
)

TRAJECTORIES = 20000


def _decaying(nqm: NQM, first: float, last: float) -> torch.Tensor:
    """Log learning rates at the knots, from ``first`` to ``last`` geometrically."""
    return torch.linspace(math.log(first), math.log(last), nqm.knots, dtype=DTYPE)


@pytest.mark.parametrize(("momentum", "knots"), [(0.0, 15), (0.6, 4)])
def test_expected_loss_matches_monte_carlo(momentum: float, knots: int) -> None:
    """The closed form of E[L(w_t)] at every step against 20000 trajectories of the estimators' own inner loop."""
    nqm = NQM(dims=8, steps=15, noise=2.0, momentum=momentum, knots=knots)
    log_knots = _decaying(nqm, 0.9, 0.2 * (1 - momentum)).requires_grad_()
    noise = nqm.sample_noise(torch.Generator().manual_seed(0), batch=(TRAJECTORIES,))
    problem = sampled_problem(nqm, log_knots, noise)
    sampled: list[torch.Tensor] = [nqm.loss(problem.init_params[0])]

    def record(step: InnerStep) -> None:
        sampled.append(nqm.loss(step.params[0]))

    unroll(problem, problem.hyperparameters, lambda t: StepMode.CONSTANT, on_step=record)
    losses = torch.stack(sampled)  # (T + 1, trajectories)
    mean, error = losses.mean(1), losses.std(1) / math.sqrt(TRAJECTORIES)
    exact = expected_losses(nqm, schedule_rates(nqm, log_knots.detach()))
    assert torch.all((mean - exact).abs() <= 4 * error + 1e-9), (mean - exact) / error
    # without noise the closed form is the one deterministic trajectory (the mean's recursion alone), to rounding
    quiet = NQM(dims=8, steps=15, noise=0.0, momentum=momentum, knots=knots)
    noiseless = expected_losses(quiet, schedule_rates(nqm, log_knots.detach()))
    path = [nqm.loss(problem.init_params[0][0])]
    zero = sampled_problem(quiet, log_knots, torch.zeros(15, 8, dtype=DTYPE))
    unroll(
        zero, zero.hyperparameters, lambda t: StepMode.CONSTANT, on_step=lambda s: path.append(nqm.loss(s.params[0]))
    )
    assert torch.allclose(torch.stack(path), noiseless, rtol=1e-12, atol=0)
    assert exact[-1] - noiseless[-1] > 20 * error[-1]  # and the noise matters: many standard errors at the end


@pytest.mark.parametrize(("momentum", "knots"), [(0.0, 7), (0.5, 3)])
def test_expected_loss_gradient_matches_finite_differences(momentum: float, knots: int) -> None:
    nqm = NQM(dims=6, steps=7, noise=0.7, momentum=momentum, knots=knots)
    log_knots = _decaying(nqm, 0.8, 0.1) + 0.1 * torch.randn(
        knots, generator=torch.Generator().manual_seed(1), dtype=DTYPE
    )
    x = log_knots.clone().requires_grad_()
    (grad,) = torch.autograd.grad(expected_loss(nqm, schedule_rates(nqm, x)), x)
    eps = 1e-6
    for k in range(knots):
        up, down = log_knots.clone(), log_knots.clone()
        up[k] += eps
        down[k] -= eps
        fd = (expected_loss(nqm, schedule_rates(nqm, up)) - expected_loss(nqm, schedule_rates(nqm, down))) / (2 * eps)
        assert abs(float(grad[k]) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd))), (k, float(grad[k]), float(fd))


def test_rmd_on_sampled_trajectories_estimates_the_closed_form_gradient() -> None:
    """The exact hypergradient of sampled trajectories averages to the gradient of the expected final loss."""
    nqm = NQM(dims=5, steps=6, noise=1.5, momentum=0.3, knots=6)
    log_knots = _decaying(nqm, 0.7, 0.2).requires_grad_()
    (exact,) = torch.autograd.grad(expected_loss(nqm, schedule_rates(nqm, log_knots)), log_knots)
    generator = torch.Generator().manual_seed(2)
    batches = [  # 20 batches of 500 trajectories; each hypergradient is its batch's mean
        lh.RMD()(sampled_problem(nqm, log_knots, nqm.sample_noise(generator, batch=(500,)))).hypergrads[0]
        for _ in range(20)
    ]
    stacked = torch.stack(batches)
    mean, error = stacked.mean(0), stacked.std(0) / math.sqrt(len(batches))
    assert torch.all((mean - exact).abs() <= 4 * error), (mean - exact) / error


def test_optimal_schedule_beats_greedy_and_constant_rates() -> None:
    nqm = NQM(dims=30, steps=20, noise=1.0, knots=20)
    best = float(expected_loss(nqm, schedule_rates(nqm, optimal_schedule(nqm, 0.3))))
    greedy = greedy_schedule(nqm)
    assert best < float(expected_loss(nqm, greedy))
    for rate in (0.1, 0.3, 0.6, 1.0):
        assert best < float(expected_loss(nqm, torch.full((20,), rate, dtype=DTYPE)))
    # the greedy rate of step 1 minimizes the loss after step 1
    one = NQM(dims=30, steps=1, noise=1.0, knots=1)
    first = float(greedy_schedule(one)[0])
    at = lambda r: float(expected_loss(one, torch.tensor([r], dtype=DTYPE)))  # noqa: E731
    assert at(first) < min(at(first * 0.98), at(first * 1.02))


TINY = ["--dims", "12", "--steps", "10", "--outer-steps", "4", "--eval-every", "2", "--seeds", "2"]
TINY_METHODS = ["t1t2", "greedy(0.9)", "truncated_rmd(3)", "rmd", "rmd(checkpoint_every='sqrt')"]


def test_tiny_study_writes_records_and_report_and_resumes(tmp_path: Path) -> None:
    command = ["nqm", *TINY, "--methods", *TINY_METHODS, "--out", str(tmp_path)]
    assert main(command) == 0
    runs = tmp_path / "nqm"
    names = {f"{m}-seed{s}.json" for m in TINY_METHODS for s in (0, 1)}
    assert {p.name for p in runs.iterdir()} == names | {"optimum.json"}  # no temporary file left
    record = json.loads((runs / "rmd-seed1.json").read_text())
    assert record["method"] == "rmd" and record["seed"] == 1 and len(record["rates"]) == 10
    assert [x for x, _ in record["curve"]] == [0, 2, 4]
    checkpointed = json.loads((runs / "rmd(checkpoint_every='sqrt')-seed1.json").read_text())
    assert checkpointed["log_knots"] == pytest.approx(record["log_knots"], abs=1e-9)  # the same hypergradients
    table = (tmp_path / "nqm.md").read_text()
    assert "| `greedy(0.9)` |" in table and "| optimum (closed form) |" in table
    assert (tmp_path / "nqm.png").stat().st_size > 0

    # rerun: nothing is redone; a deleted record is redone alone, to the same numbers (the seed fixes the noise)
    stamps = {p.name: p.stat().st_mtime_ns for p in runs.iterdir()}
    (runs / "t1t2-seed0.json").rename(tmp_path / "t1t2-seed0.json")
    assert main(command) == 0
    after = {p.name: p.stat().st_mtime_ns for p in runs.iterdir()}
    assert after.keys() == stamps.keys()
    assert [n for n in after if after[n] != stamps[n]] == ["t1t2-seed0.json"]
    old, new = (json.loads(p.read_text()) for p in (tmp_path / "t1t2-seed0.json", runs / "t1t2-seed0.json"))
    assert new["expected_loss"] == old["expected_loss"] and new["log_knots"] == old["log_knots"]

    # the report alone, and records of other settings refused
    (tmp_path / "nqm.md").unlink()
    assert main([*command[:1], "report", *command[1:]]) == 0 and (tmp_path / "nqm.md").is_file()
    with pytest.raises(SystemExit, match="other settings"):
        main(["nqm", *TINY[:-1], "1", "--noise", "2", "--methods", "rmd", "--out", str(tmp_path)])
    assert {p.stat().st_mtime_ns for p in runs.iterdir()} == set(after.values())
