"""The quality study's Greedy-variants mode (``python -m studies.quality --variants``) and its training loop."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

from studies.quality import variants
from studies.quality.variants import BASELINE, SettingResult, overall

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_quality(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """``python -m studies.quality *args``, in this process, from the repository root."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["python -m studies.quality", *args])
    try:
        runpy.run_module("studies.quality", run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        assert exit.code in (0, None), f"python -m studies.quality exited with {exit.code}"


def result(cosines: dict[str, list[float]], setting=(0, 0.9, 10)) -> SettingResult:
    step, momentum, steps = setting
    r = SettingResult(step, momentum, steps, 0.9, {0.9: 1.0}, 5, 1)
    r.cosines = {k: list(v) for k, v in cosines.items()}
    r.norm_ratios = {k: [1.0] * len(v) for k, v in cosines.items()}
    return r


def test_win_rate_and_target() -> None:
    """Wins are strict (a tie is no win); the target needs every setting's mean at least T1-T2's and 60% wins."""
    results = [
        result({BASELINE: [0.5, 0.5, 0.5], "a": [0.6, 0.5, 0.7], "b": [0.9, 0.9, -0.5]}),
        result({BASELINE: [0.5, 0.5], "a": [0.6, 0.6], "b": [0.9, 0.9]}, setting=(0, 0.0, 10)),
    ]
    a, b = overall(results, "a"), overall(results, "b")
    assert (a.paired_wins, a.paired_total, a.settings_at_least) == (4, 5, 2) and a.meets_target
    assert math.isclose(a.margin, (0.6 - 0.5 + 0.1) / 2)
    assert (b.paired_wins, b.settings_at_least) == (4, 1) and b.failed_settings == ((0, 0.9, 10),)
    assert not b.meets_target  # 80% of the tasks, but below T1-T2 on average in one setting
    text = variants.verdict([overall(results, s) for s in (BASELINE, "a", "b")])
    assert (
        "Met by: a." in text and "- b: below t1t2 in 1 of 2 settings, 0 of them by more than 2 standard errors" in text
    )


def test_auto_greedy_never_evaluated_on_its_reference_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tasks that choose the discount are not evaluated; every estimator sees the same evaluation tasks."""
    from studies.quality.protocol import build_model, choose_data, heldout_tasks, make_datamodule

    data = choose_data("digits")
    datamodule = make_datamodule(data, 3, 1, seed=0)
    tasks = heldout_tasks(datamodule, 3, torch.device("cpu"))
    model = build_model(datamodule.image_shape, 0, torch.device("cpu"))
    chosen_on, evaluated = [], []

    def fake_choose(model_, reference, optimizer, steps):
        chosen_on.extend(id(t) for t in reference)
        return 0.5, {0.5: 1.0}

    make_problem = model.make_problem

    def recording(task):
        evaluated.append(id(task))
        return make_problem(task)

    monkeypatch.setattr(variants, "choose_gamma", fake_choose)
    monkeypatch.setattr(model, "make_problem", recording)
    r = variants.measure_setting(model, 0, tasks, 1, 0.9, 5)
    assert chosen_on == [id(tasks[0])] and set(evaluated) == {id(t) for t in tasks[1:]}
    assert all(len(c) == 2 for c in r.cosines.values()) and r.auto_gamma == 0.5
    assert r.cosines["auto_greedy"] == r.cosines["greedy(0.5)"]  # auto_greedy is Greedy at the chosen discount
    assert r.tail == 5 and all(c > 1 - 1e-6 for c in r.cosines["greedy_tail(0.9, 5)"])  # K = T: RMD itself


def test_variants_tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run_quality(monkeypatch, "--variants", "--quick", "--dataset", "digits", "--shots", "1", "--queries", "15",
                "--tasks", "3", "--out", str(tmp_path))  # fmt: skip
    saved = json.loads((tmp_path / "variants_1shot.json").read_text())
    meta = saved["meta"]
    assert (meta["shots"], meta["queries"], meta["reference_tasks"], meta["evaluation_tasks"]) == (1, 15, 1, 2)
    assert [(s["momentum"], s["T"]) for s in saved["settings"]] == [(0.9, 5), (0.9, 10), (0.0, 5), (0.0, 10)]
    for setting in saved["settings"]:
        assert setting["auto_gamma"] in variants.AUTO_GRID
        assert set(setting["estimators"]) == set(variants.VARIANTS)
        assert all(e["n_tasks"] == 2 for e in setting["estimators"].values())
    assert saved["overall"]["t1t2"]["paired_wins"] == 0
    assert {"meets_target", "win_rate_vs_t1t2", "settings_at_least_t1t2"} <= set(saved["overall"]["auto_greedy"])
    table = (tmp_path / "variants_1shot.md").read_text()
    assert "| momentum_greedy(0.9) |" in table and "| auto_greedy's γ |" in table and "Target:" in table
    assert (tmp_path / "variants_1shot_backbone_step0.pt").is_file()
    (tmp_path / "variants_1shot.png").unlink()
    run_quality(monkeypatch, "--variants", "--replot", "--dataset", "digits", "--shots", "1", "--out", str(tmp_path))
    assert (tmp_path / "variants_1shot.png").is_file()
    assert json.loads((tmp_path / "variants_1shot.json").read_text()) == saved  # the records round-trip
    assert (tmp_path / "variants_1shot.md").read_text() == table


def test_quality_trains_with_meta_gradient(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The study's training loop reads ``meta_gradient``'s MetaGradient (one outer step, measured after it)."""
    run_quality(monkeypatch, "--quick", "--tasks", "1", "--dataset", "digits", "--train-steps", "1",
                "--out", str(tmp_path))  # fmt: skip
    records = json.loads((tmp_path / "quality.json").read_text())
    assert {r["checkpoint_step"] for r in records} == {1}
    from studies.quality.protocol import build_model, choose_data, make_datamodule

    trained = torch.load(tmp_path / "backbone_step1.pt")
    image_shape = make_datamodule(choose_data("digits"), 1, 1, seed=0).image_shape
    initial = build_model(image_shape, 0, torch.device("cpu")).state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in initial.items() if v.is_floating_point())  # a step taken
