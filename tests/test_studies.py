"""Every study's documented command (docs/studies.md) runs in a tiny form, writing only into a temporary folder.

The commands run as ``python -m studies.<name>`` would run them (``runpy``, in this process where that is safe; the
cost study in a subprocess, as it tunes glibc's allocator for the whole process).
"""

from __future__ import annotations

import json
import math
import os
import re
import runpy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import lightning_hypergrad as lh
from studies.common import atomic_path, quiet_trainer, quiet_trainer_args, write_json

ROOT = Path(__file__).resolve().parents[1]
STUDIES = (
    "table2", "cost", "quality", "hpo", "ddp", "lightning_step", "trace", "horizon", "peers", "imaml", "precision",
    "compile", "scale", "maml_omniglot",
)  # fmt: skip


def results_snapshot() -> dict[str, tuple[int, int]]:
    """Every file under ``studies/*/results`` with its size and modification time."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in ROOT.glob("studies/*/results/**/*") if p.is_file()
    }


@pytest.fixture(autouse=True)
def checkout_untouched() -> Iterator[None]:
    """No study run by a test writes into the published results."""
    threads = torch.get_num_threads()
    before = results_snapshot()
    yield
    torch.set_num_threads(threads)
    assert results_snapshot() == before


def run_module(monkeypatch: pytest.MonkeyPatch, name: str, *args: str) -> None:
    """``python -m studies.<name> *args``, in this process, from the repository root."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [f"python -m studies.{name}", *args])
    try:
        runpy.run_module(f"studies.{name}", run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        assert exit.code in (0, None), f"python -m studies.{name} exited with {exit.code}"


def spec_strings(names: set[str | None]) -> bool:
    """Whether every name is its estimator's canonical spec string."""
    return all(name is not None and str(lh.get_estimator(name)) == name for name in names)


def test_every_study_is_a_package_with_a_command_and_the_package_imports_none() -> None:
    for name in STUDIES:
        assert (ROOT / "studies" / name / "__main__.py").is_file(), name
    assert not (ROOT / "lightning_hypergrad" / "experiments").exists()
    assert not (ROOT / "benchmarks").exists() and not (ROOT / "results").exists()
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, lightning_hypergrad; print(sorted(m for m in sys.modules if 'studies' in m))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert loaded.strip() == "[]"


def test_common_helpers(tmp_path: Path) -> None:
    write_json(tmp_path / "a" / "record.json", {"method": "greedy(0.99)"})
    assert json.loads((tmp_path / "a" / "record.json").read_text()) == {"method": "greedy(0.99)"}
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a" / "b.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["record.json"]  # nothing half-written is left
    trainer = quiet_trainer(max_steps=1)
    assert trainer.logger is None and not trainer.checkpoint_callback and trainer.max_steps == 1
    assert quiet_trainer_args()[:2] == ["--trainer.logger", "false"]


def test_table2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    args = ["run", "--dataset", "digits", "--ways", "3", "--methods", "greedy(0.99)", "--steps", "2"]
    run_module(monkeypatch, "table2", *args, "--meta-batch", "1", "--eval-tasks", "2", "--seeds", "1", "--shots", "1",
               "--out", str(tmp_path))  # fmt: skip
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert record["method"] == "greedy(0.99)" and record["steps_run"] == 2
    assert (tmp_path / "runs" / "digits-3way-greedy(0.99)-seed0.json").is_file()
    assert "| greedy(0.99) | 10 |" in (tmp_path / "table2.md").read_text(encoding="utf-8")


def test_cost(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "studies.cost", "--out", str(tmp_path), "--inner-steps", "1", "--meta-batch", "1"]
    command += ["--repeats", "1", "--estimators", "greedy(0.99)", "neumann(10)", "--device", "cpu", "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((tmp_path / "estimators_cpu.json").read_text())
    assert {r["estimator"] for r in records} == {"greedy(0.99)", "neumann(10)", "plain_step"}
    assert {r["problem"] for r in records} == {"fewshot", "whole_network"}
    assert all(r["peak_bytes"] > 0 and r["seconds_per_step"] > 0 for r in records)
    assert "| greedy(0.99) |" in (tmp_path / "cost.md").read_text()
    assert (tmp_path / "memory_vs_T.png").is_file() and (tmp_path / "time_vs_T.png").is_file()
    assert "(19488 entries)" in done.stdout  # FewShotClassifier's backbone: no convolution bias


def test_cost_backbone_is_the_library_one(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_hypergrad.fewshot import ConvBackbone
    from studies.cost.estimators import DEFAULT_ESTIMATORS, fewshot_backbone, parse_args, select_estimators

    backbone = fewshot_backbone()
    assert isinstance(backbone, ConvBackbone) and backbone.out_features == 512
    assert all(m.bias is None for m in backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert select_estimators(None) == list(DEFAULT_ESTIMATORS) and spec_strings(set(DEFAULT_ESTIMATORS))
    given = parse_args(["--estimators", "Greedy(0.990)", "greedy(0.99)"]).estimators
    assert select_estimators(given) == ["greedy(0.99)"]
    with pytest.raises(SystemExit):
        parse_args(["--estimators", "greedy0.99"])
    assert "argument --estimators: unknown estimator 'greedy0.99'" in capsys.readouterr().err


def test_cost_checkpointed_rmd(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "studies.cost.checkpointed_rmd", "--out", str(tmp_path), "--inner-steps", "4"]
    command += ["--repeats", "1", "--device", "cpu", "--threads", "1", "--memory", "saved"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((tmp_path / "checkpointed_rmd.json").read_text())
    expected = [("rmd", 4, 4), ("rmd(checkpoint_every='sqrt')", 4, 2)]
    assert [(r["estimator"], r["T"], r["K"]) for r in records] == expected
    assert spec_strings({r["estimator"] for r in records})
    assert all(r["peak_bytes"]["saved"] > 0 and r["seconds_per_step"] > 0 for r in records)
    assert records[1]["peak_bytes"]["saved"] < records[0]["peak_bytes"]["saved"]
    assert "| 4 | 2 |" in (tmp_path / "checkpointed_rmd.md").read_text()


def test_quality(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run_module(monkeypatch, "quality", "--quick", "--tasks", "1", "--dataset", "digits", "--out", str(tmp_path))
    records = json.loads((tmp_path / "quality.json").read_text())
    assert spec_strings({r["estimator"] for r in records})
    assert {r["estimator"]: r["gamma"] for r in records}["t1t2"] == 0.0
    assert (tmp_path / "backbone_step0.pt").is_file()  # written by every run, ignored by git
    ignored = subprocess.run(["git", "check-ignore", "-q", "studies/quality/results/backbone_step0.pt"], cwd=ROOT)
    assert ignored.returncode == 0
    for plot in ("cosine_vs_gamma.png", "cosine_vs_T.png"):
        (tmp_path / plot).unlink()
    run_module(monkeypatch, "quality", "--replot", "--out", str(tmp_path))  # the plots again, from the records
    assert (tmp_path / "cosine_vs_gamma.png").is_file() and (tmp_path / "cosine_vs_T.png").is_file()


def test_quality_greedy_variants(tmp_path: Path) -> None:
    from studies.quality.greedy_variants import main

    out = tmp_path / "greedy_variants.md"
    main(["--tasks", "2", "--steps", "5", "--out", str(out)])
    table = out.read_text()
    assert "| greedy_tail(0.9, 5) |" in table and "| momentum_greedy(0.9) | " in table and "mu=0.9, T=5" in table
    from studies.quality.greedy_variants import table as from_record

    record = json.loads(out.with_suffix(".json").read_text())  # the record the published table is generated from
    assert len(record["cosines_to_rmd"]["t1t2"][0]["cosines"]) == 2 and table.endswith(from_record(record))
    # one estimator computed two ways (momentum_greedy(g) at momentum 0 is greedy(g)): rounding ties, never wins
    cells = lambda values: [{"momentum": 0.0, "T": 5, "cosines": values}]  # noqa: E731
    tied = {
        "tasks": 2,
        "lr": 0.1,
        "cosines_to_rmd": {
            "t1t2": cells([0.9, 0.9]),
            "greedy(0.99)": cells([0.5, 0.6]),
            "momentum_greedy(0.99)": cells([0.5 + 1e-16, 0.6 + 2e-16]),
        },
    }
    assert "| momentum_greedy(0.99) | 0.550 +- 0.071 [0/2, 0/2] |" in from_record(tied)


def test_hpo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run_module(monkeypatch, "hpo", "--examples", "lr_schedule", "--estimators", "greedy(0.9)", "--lr-starts", "0.1",
               "--lr-outer-lrs", "--grid", "0.1", "--steps", "2", "--out", str(tmp_path))  # fmt: skip
    records = json.loads((tmp_path / "comparison.json").read_text())
    assert [(r["estimator"], r.get("variant")) for r in records] == [
        ("greedy(0.9)", None),
        ("greedy(0.9)", "start0.1"),
        ("fo", "fixed_lr0.1"),
        (None, "plain_sgd_lr0.1"),
    ]
    assert all(r["outer_steps"] == 2 for r in records if r["estimator"] is not None)
    table = (tmp_path / "comparison.md").read_text()
    assert "| greedy(0.9) start0.1 |" in table and "| 0 | config |" in table


def test_ddp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The all-reduce wait for real; the scaling rounds on a stand-in for examples/ddp_fewshot.py that accepts only
    the example's own flags (the example itself, on 1 and 2 processes, is tests/test_reliability.py's)."""
    from studies.ddp import scaling

    flags = set(re.findall(r'add_argument\(\s*"(--[a-z-]+)"', scaling.EXAMPLE.read_text()))
    assert {"--devices", "--meta-batch", "--steps", "--width", "--inner-steps", "--broadcast-buffers"} <= flags
    stand_in = tmp_path / "ddp_fewshot.py"
    stand_in.write_text(
        "import sys\n"
        f"unknown = {{a for a in sys.argv[1:] if a.startswith('--')}} - set({sorted(flags)!r})\n"
        "assert not unknown, unknown\n"
        "devices = int(sys.argv[sys.argv.index('--devices') + 1])\n"
        "print(f'processes: {devices}, median seconds per step: {0.02 if devices == 1 else 0.011:.4f}')\n"
    )
    monkeypatch.setattr(scaling, "EXAMPLE", stand_in)
    out = tmp_path / "out"
    run_module(monkeypatch, "ddp", "--out", str(out), "--rounds", "2", "--broadcast-buffers", "--repeats", "1",
               "--allreduce-rounds", "1", "--busy", "0.001", "--numel", "8")  # fmt: skip
    record = json.loads((out / "scaling_width32_broadcast.json").read_text())
    assert record["settings"]["json"] == str(out / "scaling_width32_broadcast.json")
    assert record["settings"]["broadcast_buffers"] and record["settings"]["rounds"] == 2
    assert [r["ratio"] for r in record["rounds"]] == [pytest.approx(0.55)] * 2
    lines = (out / "allreduce_wait.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["process 0", "process 1"]


def test_lightning_step(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run_module(monkeypatch, "lightning_step", "--dataset", "digits", "--steps", "1", "--rounds", "1",
               "--estimators", "fo", "Greedy(0.99)", "--inner-steps", "2", "--tasks", "both")  # fmt: skip
    printed = capsys.readouterr().out
    assert "| fo | 2 | batched |" in printed and "| greedy(0.99) | 2 | one by one |" in printed and "digits" in printed


TRACE_TINY = ["--dataset", "digits", "--shots", "2", "--queries", "2", "--meta-batch", "2", "--eval-tasks", "4"]


def test_trace_run_records_every_step_and_applies_its_changes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run_module(monkeypatch, "trace", "run", *TRACE_TINY, "--steps", "3", "--method", "neumann(10)", "--clip", "5",
               "--freeze-last-norm", "--out", str(tmp_path))  # fmt: skip
    run_module(monkeypatch, "trace", "run", *TRACE_TINY, "--steps", "3", "--method", "fo", "--precision", "64",
               "--out", str(tmp_path))  # fmt: skip
    frozen = json.loads((tmp_path / "run-digits-3way-2shot-neumann(10)-seed0-3steps-clip5-frozen.json").read_text())
    free = json.loads((tmp_path / "run-digits-3way-2shot-fo-seed0-3steps-float64.json").read_text())
    assert (frozen["dtype"], free["dtype"]) == ("float32", "float64")
    assert [row["step"] for row in frozen["trace"]] == [0, 1, 2] and 0.0 <= frozen["test_acc"] <= 1.0
    assert all(row["hypergrad_norm"] <= 5.0 * (1 + 1e-5) for row in frozen["trace"])
    # frozen: the last batch norm keeps its initial scale 1 and shift 0; trained by Adam, it moves at once
    assert {(row["last_norm_scale"], row["last_norm_shift"]) for row in frozen["trace"]} == {(1.0, 0.0)}
    assert free["trace"][0]["last_norm_scale"] != 1.0 and free["trace"][0]["adam_second_moment_max"] > 0


def test_trace_init_compares_the_hypergradients(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run_module(monkeypatch, "trace", "init", *TRACE_TINY, "--seeds", "2", "--methods", "t1t2", "--out", str(tmp_path))
    record = json.loads((tmp_path / "init-digits-3way-2shot-2seeds.json").read_text())
    assert sorted(record["seeds"]) == ["0", "1"]
    for cells in record["seeds"].values():
        assert sorted(cells) == ["fo", "rmd", "t1t2"]
        assert cells["fo"]["cos_fo"] == pytest.approx(1.0) and cells["rmd"]["cos_rmd"] == pytest.approx(1.0)
        assert cells["fo"]["correction_cos_fo"] == 0.0
        assert cells["rmd"]["cos_fo"] == pytest.approx(cells["fo"]["cos_rmd"])
        assert all(cell["norm"] > 0 for cell in cells.values())
    # the meta-batch and the initialization are those of a training run's first step (computed through Lightning)
    run_module(monkeypatch, "trace", "run", *TRACE_TINY, "--steps", "1", "--method", "fo", "--out", str(tmp_path))
    (first,) = json.loads((tmp_path / "run-digits-3way-2shot-fo-seed0-1steps.json").read_text())["trace"]
    assert record["seeds"]["0"]["fo"]["norm"] == pytest.approx(first["hypergrad_norm"], rel=1e-5)


def test_trace_correction_scale_trains_with_fo_plus_the_scaled_correction(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    s = 3.0
    run_module(monkeypatch, "trace", "run", *TRACE_TINY, "--steps", "1", "--method", "t1t2", "--correction-scale",
               str(s), "--out", str(tmp_path))  # fmt: skip
    record = json.loads((tmp_path / "run-digits-3way-2shot-t1t2-seed0-1steps-correction3.json").read_text())
    assert (record["method"], record["correction_scale"]) == ("t1t2", s)
    # init computes FO and T1-T2 separately on the same first meta-batch: |FO + s (T1T2 - FO)| from their norms
    # and cosine, |f|^2 (1 - s)^2 + 2 s (1 - s) f.t + s^2 |t|^2
    run_module(monkeypatch, "trace", "init", *TRACE_TINY, "--seeds", "1", "--methods", "t1t2", "--out", str(tmp_path))
    cells = json.loads((tmp_path / "init-digits-3way-2shot-1seeds.json").read_text())["seeds"]["0"]
    f, t = cells["fo"]["norm"], cells["t1t2"]["norm"]
    dot = f * t * cells["t1t2"]["cos_fo"]
    expected = math.sqrt(f**2 * (1 - s) ** 2 + 2 * s * (1 - s) * dot + s**2 * t**2)
    assert abs(expected - t) > 0.01 * t  # the scale changes the norm here, so the check can tell
    assert record["trace"][0]["hypergrad_norm"] == pytest.approx(expected, rel=1e-4)


def test_trace_rejects_bad_changes_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from studies.trace.trace import main

    out = ["--out", str(tmp_path)]
    assert main(["run", *TRACE_TINY, "--method", "fmd", "--correction-scale", "2", *out]) == 2
    assert "--correction-scale" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", *TRACE_TINY, "--method", "t1t2", "--correction-scale", "-1", *out])
    assert "--correction-scale must be" in capsys.readouterr().err
    for command, option in (("run", "--method"), ("init", "--methods")):
        with pytest.raises(SystemExit):
            main([command, *TRACE_TINY, option, "greedy0.99", *out])
        assert f"argument {option}: unknown estimator 'greedy0.99'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cost_adapter(capsys: pytest.CaptureFixture[str]) -> None:
    from studies.cost import adapter

    pair = adapter.problems(3)
    a, b = (lh.get_estimator("rmd")(pair[k]).hypergrads[0] for k in ("module", "flat"))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # the two forms are one problem
    adapter.main(["--estimators", "fo", "--inner-steps", "2", "--rounds", "1"])
    assert "| 2 | fo |" in capsys.readouterr().out
