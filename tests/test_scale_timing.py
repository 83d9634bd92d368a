"""The CNN timing study (``python -m studies.scale.timing``): its judgement of the issue's targets on hand-made records
(met, missed by how much, no form within the memory bound, no memory recorded), and its runner on a tiny CNN (the
record's fields, the paired ratios, the refusals in one line)."""

from __future__ import annotations

import json

import pytest

from studies.scale import timing

MIB = 2**20
SQRT = "rmd(checkpoint_every='sqrt')"
TINY = ["--data", "synthetic", "--characters", "3", "--size", "9", "--width", "2", "--batch", "4"]


def row(method: str, steps: int, mib: float | None, to_rmd: float, to_sqrt: float, who: str = "ours") -> dict:
    return {"method": method, "who": who, "T": steps, "peak_bytes": None if mib is None else int(mib * MIB),
            "ratio_to_rmd": {"median": to_rmd}, "ratio_to_sqrt": {"median": to_sqrt}}  # fmt: skip


def record(*rows: dict) -> dict:
    return {"rows": list(rows)}


def test_a_target_is_met_by_a_form_within_both_bounds():
    judged = timing.judge(record(
        row("rmd", 100, 80.0, 1.0, 0.7), row(SQRT, 100, 15.0, 1.05, 1.0), row("mixed_rmd", 100, 26.0, 1.0, 0.9),
        row("higher", 100, 10.0, 0.5, 0.4, who="peer"),  # a peer never counts
    ))  # fmt: skip
    t100 = next(j for j in judged if j["T"] == 100)
    assert t100["met"] is True
    assert [c["method"] for c in t100["candidates"]] == [SQRT]  # 16 MiB is the bound: mixed_rmd's 26 is out
    assert t100["bound_bytes"] == pytest.approx(16 * MIB)


def test_a_missed_target_says_by_how_much():
    rec = record(row("rmd", 100, 80.0, 1.0, 0.7), row(SQRT, 100, 15.0, 1.43, 1.0))
    assert next(j for j in timing.judge(rec) if j["T"] == 100)["met"] is False
    line = next(x for x in timing.target_lines(rec) if x.startswith("- T = 100"))
    assert "**missed**, by 30% of the time bound" in line and "1.43x" in line  # (1.43 - 1.1) / 1.1


def test_the_t1000_target_asks_less_memory_than_the_sqrt_form_at_no_more_time():
    rec = record(row("rmd", 1000, 820.0, 1.0, 0.8), row(SQRT, 1000, 34.98, 1.25, 1.0),
                 row("rmd(checkpoint_every='auto')", 1000, 29.6, 1.24, 0.99))  # fmt: skip
    t1000 = next(j for j in timing.judge(rec) if j["T"] == 1000)
    assert [c["method"] for c in t1000["candidates"]] == ["rmd(checkpoint_every='auto')"]  # not the sqrt form itself
    assert t1000["met"] is True
    assert "< `rmd(checkpoint_every='sqrt')`'s (35.0 MiB)" in timing.target_lines(rec)[1]
    rec["rows"][2]["ratio_to_sqrt"]["median"] = 1.02
    assert next(j for j in timing.judge(rec) if j["T"] == 1000)["met"] is False


def test_no_memory_or_no_candidate_is_said():
    no_memory = record(row("rmd", 100, None, 1.0, 0.7), row(SQRT, 100, None, 1.4, 1.0))
    assert "not judged (no peak memory recorded" in timing.target_lines(no_memory)[0]
    none_small = record(row("rmd", 100, 80.0, 1.0, 0.7), row(SQRT, 100, 40.0, 1.0, 1.0))
    assert "no form of ours within the memory bound" in timing.target_lines(none_small)[0]


def test_the_runner_times_every_method_in_rounds_and_pairs_the_ratios(tmp_path):
    out = tmp_path / "timing"
    methods = ["rmd", SQRT, "rmd(checkpoint_every='auto')"]
    code = timing.main(["run", "--out", str(out), *TINY, "--steps", "2", "--rounds", "2",
                        "--memory-from", str(tmp_path / "none"), "--methods", *methods])  # fmt: skip
    assert code == 0
    data = json.loads((out / "timing.json").read_text())
    assert [r["method"] for r in data["rows"]] == methods
    for r in data["rows"]:
        assert len(r["seconds"]) == 2 and r["peak_bytes"] is None
        assert r["ratio_to_rmd"]["per_round"] == pytest.approx(
            [a / b for a, b in zip(r["seconds"], data["rows"][0]["seconds"])]
        )
    assert data["rows"][0]["ratio_to_rmd"]["median"] == 1.0 and data["rows"][1]["ratio_to_sqrt"]["median"] == 1.0
    assert data["command"].startswith("python -m studies.scale.timing run --out")
    assert "## The issue's targets" in (out / "timing.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", SQRT], "--methods must include rmd"),
        (["--methods", "rmd"], f"--methods must include {SQRT}"),
        (["--rounds", "0"], "--rounds"),
    ],
)
def test_bad_arguments_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        timing.main(["run", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
