"""The scale study (``python -m studies.scale``): its growth fits on known numbers, and its runner on a tiny CNN.

- the fit recovers ``a + b T`` and ``a + b sqrt(T)`` from exact synthetic peaks and prefers the right model, and the
  largest T within a budget solves the fit;
- the runner, on generated images and a tiny network: the records' fields, the float64 agreement with ``rmd``
  (higher's too where the peers import), the horizons of ``--sublinear-steps`` for the checkpointed forms only, resuming
  without measuring again, the skip of a run predicted too long, and the refusals (other settings, an ``--out`` that
  cannot be written, ``--device cuda`` without a GPU), each one line.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest

from studies.common import REPOSITORY
from studies.peers.study import import_peers
from studies.scale import study
from studies.scale.growth import best_fit, fit, largest_steps

MIB = 2**20
TINY = ["--data", "synthetic", "--characters", "3", "--size", "9", "--width", "2", "--batch", "4"]
SQRT_FORM = "mixed_rmd(checkpoint_every='sqrt')"


# ------------------------------------------------------------------------------------------------ the fits
def test_the_fit_recovers_linear_growth_and_rejects_the_sqrt_model():
    steps = [10, 100, 1000]
    peaks = [5 * MIB + 0.8 * MIB * t for t in steps]
    chosen, fits = best_fit(steps, peaks)
    assert chosen is not None and chosen.model == "linear"
    assert chosen.a == pytest.approx(5 * MIB, rel=1e-9) and chosen.b == pytest.approx(0.8 * MIB, rel=1e-9)
    assert chosen.residual < 1e-9 and fits["sqrt"].residual > 0.1


def test_the_fit_recovers_sqrt_growth_and_rejects_the_linear_model():
    steps = [10, 100, 1000, 3000, 10000]
    peaks = [4 * MIB + 1.2 * MIB * math.sqrt(t) for t in steps]
    chosen, fits = best_fit(steps, peaks)
    assert chosen is not None and chosen.model == "sqrt"
    assert chosen.a == pytest.approx(4 * MIB, rel=1e-9) and chosen.b == pytest.approx(1.2 * MIB, rel=1e-9)
    assert chosen.residual < 1e-9 and fits["linear"].residual > 0.1


def test_the_largest_horizon_within_a_budget_solves_the_fit():
    budget = 16 * 2**30
    linear = fit("linear", [10, 100, 1000], [10.5 * MIB + MIB * t for t in (10, 100, 1000)])
    assert largest_steps(linear, budget) == 16 * 1024 - 11  # 16 GiB - 10.5 MiB, whole MiB steps
    root = fit("sqrt", [10, 100, 1000], [4 * MIB + 1.2 * MIB * math.sqrt(t) for t in (10, 100, 1000)])
    bound = largest_steps(root, budget)
    assert root.predict(bound) <= budget < root.predict(bound + 1)
    flat = fit("linear", [10, 100, 1000], [MIB, MIB, MIB])
    assert largest_steps(flat, budget) is None  # no growth: no bound


def test_two_points_fit_either_model_so_no_choice_is_made():
    chosen, fits = best_fit([10, 100], [MIB, 2 * MIB])
    assert chosen is None and set(fits) == {"linear", "sqrt"}
    with pytest.raises(ValueError, match="two or more"):
        fit("linear", [10], [MIB])
    with pytest.raises(ValueError, match="unknown growth model"):
        fit("cubic", [10, 100], [MIB, MIB])


# ------------------------------------------------------------------------------------------------ the runner
def _peer_rows() -> list[str]:
    found, _ = import_peers(REPOSITORY / ".peers")
    return ["higher"] if "higher" in found else []


def _args(out: Path, *more: str) -> list[str]:
    methods = ["rmd", SQRT_FORM, *_peer_rows()]
    return ["run", *TINY, "--steps", "2", "4", "--sublinear-steps", "8", "--check-steps", "3", "--repeats", "1",
            "--peers-dir", str(REPOSITORY / ".peers"), "--out", str(out), "--methods", *methods, *more]  # fmt: skip


def test_the_runner_records_each_method_and_horizon_and_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "scale"
    assert study.main(_args(out)) == 0
    methods = ["rmd", SQRT_FORM, *_peer_rows()]
    expected = {(m, t) for m in methods for t in (2, 4)} | {(SQRT_FORM, 8)}  # --sublinear-steps: the sqrt form only
    records = {}
    for path in (out / "records").glob("*.json"):
        data = json.loads(path.read_text())
        records[(data["method"], data["T"])] = data
    assert set(records) == expected
    for (method, steps), r in records.items():
        assert isinstance(r["peak_bytes"], int) and r["peak_bytes"] > 0
        assert r["seconds"] > 0 and r["cpu_seconds"] >= 0 and r["timed_runs"] == 1
        assert r["metered_seconds"] > 0 and set(r["loadavg"]) == {"before", "after"}
        assert (
            r["settings"]["width"] == 2 and r["settings"]["dtype"] == "float32" and r["settings"]["data"] == "synthetic"
        )
        assert r["settings"]["memory"] == "allocator" and "device: cpu" in r["machine"]
        assert study.record_path(out, method, steps).exists()
    agreed = json.loads((out / "agreement.json").read_text())
    assert agreed["T"] == 3 and {row["method"] for row in agreed["rows"]} == set(methods) - {"rmd"}
    assert all(row["relative_difference"] <= study.TOLERANCE for row in agreed["rows"])
    text = (out / "scale.md").read_text()
    assert "| `rmd` |" in text and "largest T within 16 GiB" in text and "extrapolated" in text
    if _peer_rows():
        assert "| higher innerloop_ctx |" in text

    def no_measurement(*args, **kwargs):
        raise AssertionError("a record found was measured again")

    monkeypatch.setattr(study, "measure", no_measurement)
    capsys.readouterr()
    assert study.main(_args(out)) == 0
    assert f"{len(expected)} measurements found; 0 to do" in capsys.readouterr().err


def test_a_run_predicted_too_long_is_skipped_and_said_so(tmp_path):
    out = tmp_path / "scale"
    args = ["run", *TINY, "--steps", "2", "--sublinear-steps", "4", "--check-steps", "2", "--repeats", "1",
            "--out", str(out), "--methods", "rmd", SQRT_FORM, "--max-seconds", "1e-9"]  # fmt: skip
    assert study.main(args) == 0
    assert not study.record_path(out, SQRT_FORM, 4).exists()
    text = (out / "scale.md").read_text()
    assert f"`{SQRT_FORM}` at T = 4: not run (skipped: predicted" in text


def test_records_of_other_settings_are_refused_in_one_line(tmp_path):
    out = tmp_path / "scale"
    base = ["run", *TINY, "--steps", "2", "--sublinear-steps", "--check-steps", "2", "--repeats", "1",
            "--methods", "rmd", "--out", str(out)]  # fmt: skip
    assert study.main(base) == 0
    with pytest.raises(SystemExit) as refused:
        study.main([*base[:8], "3", *base[9:]])  # --width 3
    message = str(refused.value.code)
    assert "other settings" in message and "width" in message and "\n" not in message
    with pytest.raises(SystemExit, match="other settings"):
        study.main(["report", *base[1:8], "3", *base[9:]])


def test_an_out_that_cannot_be_written_and_a_missing_gpu_stop_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as stopped:
        study.main(["run", *TINY, "--out", str(blocker / "results")])
    assert stopped.value.code == 2 and "--out" in capsys.readouterr().err
    if not __import__("torch").cuda.is_available():
        with pytest.raises(SystemExit) as stopped:
            study.main(["run", *TINY, "--device", "cuda", "--out", str(tmp_path / "gpu")])
        assert stopped.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    for bad in (["--methods", "higher"], ["--steps", "0"], ["--methods", "rmd", "rmd"]):
        with pytest.raises(SystemExit) as stopped:
            study.main(["run", *TINY, "--out", str(tmp_path / "x"), *bad])
        assert stopped.value.code == 2


def test_the_command_names_the_options_that_differ_from_the_defaults():
    parser = study.build_parser()
    args = parser.parse_args(["report", "--out", "elsewhere", "--steps", "10", "100", "--methods", "rmd"])
    assert study.command(args) == "python -m studies.scale run --out elsewhere --steps 10 100 --methods rmd"
    assert study.command(parser.parse_args(["report"])) == "python -m studies.scale run"


def test_the_gpu_checks_rows_parse_as_this_studys_arguments():
    """``scripts/gpu_check.sh`` runs the same rows on CUDA (not runnable here): its arguments are this parser's."""
    text = (REPOSITORY / "scripts" / "gpu_check.sh").read_text().replace("\\\n", " ")
    (line,) = [x for x in text.splitlines() if "-m studies.scale" in x and not x.startswith("#")]
    words = shlex.split(line)
    args = study.build_parser().parse_args(words[words.index("studies.scale") + 1 :])
    assert (
        args.action == "run" and args.device == "cuda" and args.steps == [10, 100, 1000] and args.sublinear_steps == []
    )
    assert Path(args.out) != Path(study.OUT)  # CUDA's records apart from the CPU's
    assert study.meter_name(args) == "cuda" and set(args.methods) == set(study.METHODS)


def test_a_run_whose_meter_would_not_fit_in_memory_is_skipped():
    """The CPU meter keeps every allocation event: a run predicted to need over half the memory available is not
    started (predicted linearly in T from the largest T done)."""
    records = {("m", 10): {"T": 10, "metered_cpu_seconds": 1.0, "metered_resident_bytes": 2**30}}
    why = study.skip_reason(records, "m", 100, max_seconds=1e9, available=4 * 2**30)
    assert why is not None and "10.0 GiB" in why and "4.0 GiB available" in why
    assert study.skip_reason(records, "m", 15, max_seconds=1e9, available=4 * 2**30) is None  # 1.5 GiB fits
    assert study.skip_reason(records, "m", 100, max_seconds=1e9, available=None) is None  # unknown: run
    assert "CPU s" in study.skip_reason(records, "m", 100, max_seconds=5, available=None)
    assert study.skip_reason(records, "other", 100, max_seconds=5, available=2**20) is None  # nothing to predict from


@pytest.mark.skipif(not hasattr(getattr(__import__("studies.common").common, "_LIBC", None), "malloc_trim"),
                    reason="needs glibc's malloc_trim (Linux)")  # fmt: skip
def test_resident_growth_counts_memory_an_earlier_run_freed():
    """An earlier run's freed heap (200,000 blocks of 1 KiB, as the profiler's event log is made of) must not hide
    the growth of the next run that reuses it: the skip predictor reads this growth (it once let a run OOM)."""
    import ctypes

    from studies.common import _LIBC

    malloc, free = _LIBC.malloc, _LIBC.free
    malloc.restype, free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]

    def churn() -> list[int]:
        blocks = [malloc(1024) for _ in range(200_000)]
        for block in blocks:
            ctypes.memset(block, 1, 1024)
        return blocks

    earlier = churn()
    pin = malloc(1024)  # above the freed blocks: glibc does not give them back by itself (the top is in use)
    for block in earlier:
        free(block)
    before = study.resident_before()
    if before is None:
        pytest.skip("needs Linux's /proc/self/clear_refs and status")
    blocks = churn()
    try:
        assert study._status_bytes("VmHWM") - before > 150 * MIB
    finally:
        for block in [*blocks, pin]:
            free(block)
