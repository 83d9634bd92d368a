"""The precision study (``studies/precision``) on tiny problems: its records, its comparisons (which must catch a
wrong reference), its timing, and its command line (resume, refusal of other settings, ``--only-timing``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from studies.precision import study
from studies.precision.measure import MEASURED, PAIRS, comparison, measure, pair_key, time_pair
from studies.precision.problems import CNNProblem, CNNProblemSettings, FewShotProblem, FewShotSettings, cnn_splits

TINY_FEWSHOT = FewShotSettings(image_size=8, meta_batch=2, inner_steps=2)
TINY_CNN = CNNProblemSettings(data="synthetic", characters=3, steps=3)
AGREE = 0.999
"""float32's hypergradient must be this close (cosine) to float64's of the same problem."""


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_record_has_every_precision_and_comparison_and_float32_agrees_with_float64():
    record = measure(FewShotProblem(TINY_FEWSHOT, seed=0), "rmd")
    assert record["status"] == "done"
    for key in ("norms", "finite", "outer_loss", "seconds"):
        assert set(record[key]) == set(MEASURED)
    assert all(record["finite"].values()) and all(n > 0 for n in record["norms"].values())
    for a, b in PAIRS:
        assert set(record[pair_key(a, b)]) == {"cosine", "norm_ratio", "rel_error"}
    assert record["float32_vs_float64"]["cosine"] > AGREE
    assert record["float32_vs_float64"]["norm_ratio"] == pytest.approx(1, abs=1e-4)
    bf16 = record["bf16_vs_float32"]
    assert 0.9 < bf16["cosine"] < 1 and bf16["rel_error"] > 1e-5  # autocast did run, and bf16 is close


def test_the_agreement_check_catches_a_comparison_against_another_seed():
    same, other = FewShotProblem(TINY_FEWSHOT, seed=0), FewShotProblem(TINY_FEWSHOT, seed=1)
    g64, _ = same.hypergradient("greedy(0.99)", "float64")()
    g32, _ = same.hypergradient("greedy(0.99)", "float32")()
    wrong, _ = other.hypergradient("greedy(0.99)", "float32")()
    assert comparison(g32, g64)["cosine"] > AGREE
    assert comparison(wrong, g64)["cosine"] < 0.9  # another seed's hypergradient does not pass


def test_comparison_is_undefined_for_a_zero_vector():
    assert comparison(torch.zeros(3), torch.ones(3)) == {"cosine": None, "norm_ratio": pytest.approx(0), "rel_error": 1}
    assert comparison(torch.ones(3), torch.zeros(3)) == {"cosine": None, "norm_ratio": None, "rel_error": None}


def test_the_cnn_runs_sama_at_its_end_point_and_skips_what_cannot_be_compared():
    problem = CNNProblem(TINY_CNN, seed=0, splits=cnn_splits(TINY_CNN))
    assert measure(problem, "sama")["float32_vs_float64"]["cosine"] > AGREE  # needs the step after the last's rate
    refused = measure(problem, "cg(5)")
    assert refused["status"] == "skipped" and "cg(5) refuses this problem: ConjugateGradient" in refused["reason"]
    zero = measure(problem, "fo")
    assert zero["status"] == "skipped" and "exactly zero in every precision" in zero["reason"]
    assert zero["norms"] == {"float64": 0.0, "float32": 0.0, "bf16": 0.0}


def test_time_pair_interleaves_the_two_precisions_and_reads_the_load():
    timing = time_pair(FewShotProblem(TINY_FEWSHOT, seed=0), "t1t2", rounds=2)
    assert timing["status"] == "done" and timing["threads"] == 1
    assert [len(timing["seconds"][p]) for p in ("float32", "bf16")] == [2, 2]
    assert timing["ratio"] == pytest.approx(timing["median_seconds"]["bf16"] / timing["median_seconds"]["float32"])
    assert len(timing["round_ratios"]) == 2
    if Path("/proc/loadavg").exists():
        assert len(timing["loadavg_start"].split()) == 3 and len(timing["loadavg_end"].split()) == 3


def test_the_command_line_resumes_refuses_other_settings_and_redoes_only_the_timing(tmp_path, capsys):
    tiny = ["--out", str(tmp_path), "--image-size", "8", "--meta-batch", "2", "--inner-steps", "2", "--cnn-steps", "3",
            "--characters", "3", "--data", "synthetic", "--seeds", "1", "--rounds", "1",
            "--estimators", "fo", "rmd"]  # fmt: skip
    assert study.main(["run", *tiny]) == 0
    records = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    assert records == [
        "cnn/fo-seed0.json", "cnn/rmd-seed0.json", "fewshot/fo-seed0.json", "fewshot/rmd-seed0.json", "lightning.json",
        "timing/cnn/fo.json", "timing/cnn/rmd.json", "timing/fewshot/fo.json", "timing/fewshot/rmd.json",
    ]  # fmt: skip
    report = (tmp_path / "precision.md").read_text()
    assert "| `rmd` |" in report and "exactly zero in every precision" in report and "--cnn-steps 3" in report

    lightning = {row["setting"]: row for row in json.loads((tmp_path / "lightning.json").read_text())["rows"]}
    assert lightning["bf16-mixed"]["max_abs_diff_to_study"]["bf16"] == 0.0  # the study's bf16 is Lightning's
    assert lightning["32-true"]["max_abs_diff_to_study"]["float32"] == 0.0
    assert lightning["16-mixed"]["trainer_precision"] == "bf16-mixed"
    assert not lightning["16-true"]["ran"] and "16-true" in lightning["16-true"]["error"]

    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.json")}
    assert study.main(["run", *tiny]) == 0  # everything found: nothing redone
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.json")} == written

    assert study.main(["run", "--only-timing", *tiny]) == 0
    changed = {p.relative_to(tmp_path).parts[0] for p in written if p.stat().st_mtime_ns != written[p]}
    assert changed == {"timing"}

    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        study.main(["run", *tiny[:-3], "--estimators", "rmd", "--cnn-steps", "4"])
    message = str(refused.value.code)
    assert "cnn/rmd-seed0.json was made with other settings (problem.steps differ)" in message
    assert "\n" not in message


def test_the_gpu_checks_part_runs_on_any_device_and_makes_its_table():
    from studies.precision.gpu import bf16_on_device, bf16_table

    result = bf16_on_device(torch.device("cpu"), ["fo", "greedy(0.99)"], rounds=1, settings=TINY_FEWSHOT)
    assert [row["estimator"] for row in result["rows"]] == ["fo", "greedy(0.99)"]
    assert all(row["accuracy"]["float32_vs_float64"]["cosine"] > AGREE for row in result["rows"])
    lightning = {row["setting"]: row for row in result["lightning"]}
    assert (
        lightning["bf16-mixed"]["max_abs_diff_to_study_bf16"] == 0.0 and result["lightning_estimator"] == "greedy(0.99)"
    )
    table = bf16_table(result)
    assert table[2].startswith("| fo | ") and any(line.startswith("- `precision='16-mixed'`") for line in table)


def test_an_out_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the study started its work")

    monkeypatch.setattr(study, "run", no_work)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit) as stopped:
        study.main(["run", "--out", str(tmp_path / "file" / "results")])
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"cannot write the results into {tmp_path / 'file' / 'results'}: {tmp_path / 'file'} is a file" in line
