"""The iMAML study's runner on generated data (scikit-learn's digits): records, resume, memory, report."""

from __future__ import annotations

import json

from studies.imaml.study import METHODS, main


def test_the_imaml_study_records_each_method_resumes_and_reports(tmp_path, capsys):
    args = ["--out", str(tmp_path)]
    assert main(["run", "--dataset", "digits", "--seeds", "0", "1", "--steps", "2", "--eval-tasks", "4", *args]) == 0
    records = sorted(tmp_path.glob("*_seed*.json"))
    assert [p.name for p in records] == sorted(f"{m}_seed{s}.json" for m in METHODS for s in (0, 1))
    for path in records:
        record = json.loads(path.read_text())
        assert 0.0 <= record["test_acc"] <= 1.0 and record["dataset"] == "digits" and record["steps"] == 2
    before = {p.name: p.stat().st_mtime_ns for p in records}
    main(["run", "--dataset", "digits", "--seeds", "0", "1", "--steps", "2", "--eval-tasks", "4", *args])
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*_seed*.json")} == before  # nothing run again
    assert main(["memory", "--dataset", "digits", "--t", "1", "3", *args]) == 0
    memory = json.loads((tmp_path / "memory.json").read_text())
    assert set(memory) == set(METHODS) and all(set(v) == {"1", "3"} for v in memory.values())
    # exact RMD keeps every step's graph: its memory grows with T; iMAML's solve keeps none
    assert memory["maml"]["3"] > memory["maml"]["1"]
    text = (tmp_path / "results.md").read_text()
    assert "| `imaml` (cg(5, normal=True)) | 2 |" in text and "paired vs maml" in text and "T = 3" in text
