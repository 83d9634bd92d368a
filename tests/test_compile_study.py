"""The compile study (``python -m studies.compile``) in its ``--quick`` form, without ``torch.compile``: the record's
fields, the agreement of every method's meta-gradient with ours ``fo`` eager, and a method that disagrees flagged
and left out of the timing. (``compile_losses`` itself is tested in ``tests/test_compile_losses.py``.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from studies.compile import report, study

pytestmark = [
    pytest.mark.usefixtures("study_from_the_root"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
]


def _quick(out: Path) -> tuple[int, dict]:
    status = study.main(["run", "--quick", "--no-compile", "--out", str(out)])
    return status, json.loads((out / "compile_quick.json").read_text())


def test_the_quick_run_records_every_method_agreeing_and_timed(tmp_path: Path) -> None:
    status, record = _quick(tmp_path)
    assert status == 0 and record["failures"] == []
    assert record["quick"] is True and record["compile"] is False and record["rounds"] == study.QUICK_ROUNDS
    protocol = record["protocol"]
    assert (protocol["meta_batch"], protocol["width"], protocol["steps"]) == (4, 8, [1])
    assert (protocol["ways"], protocol["shots"], protocol["image_shape"]) == (5, 1, [1, 28, 28])
    assert protocol["inner_lr"] == 0.4
    assert set(record["loadavg"]) == {"before", "after"} and record["outer_step"] == study.OUTER_STEP
    peers, _ = study.import_peers(study.PEERS_DIR)
    names = {(row["problem"], row["name"]) for row in record["methods"]}
    expected = {("maml", f"ours {s} {m}") for s in ("fo", "t1t2_fd", "sama") for m in ("eager", "compiled")}
    expected |= {("anil", "ours fo eager"), ("anil", "ours fo compiled")}
    expected |= {("maml", study.PEER_NAMES[p]) for p in peers}
    expected |= {("anil", study.ANIL_PEER)} if "learn2learn" in peers else set()
    assert names == expected
    for row in record["methods"]:
        if row["compiled"]:  # --no-compile: recorded, not run
            assert row["status"] == "skipped" and row["reason"] == "--no-compile" and "seconds" not in row
            continue
        assert row["status"] == "timed", row
        assert row["agreement"]["cosine"] > study.AGREEMENT and row["agreement"]["agrees"] is True
        assert 1 - row["exact_agreement"]["cosine"] <= row["tolerance"] == 1 - study.AGREEMENT  # float32 at T = 1
        if row["who"] == "peer":  # first-order MAML: equal to ours fo up to float32
            assert row["agreement"]["max_relative_difference"] < 1e-4
        assert len(row["seconds"]) == record["rounds"] and all(s > 0 for s in row["seconds"])
        assert row["summary"]["q1"] <= row["summary"]["median"] <= row["summary"]["q3"]
        assert len(row["ratio_to_ours_eager"]["per_round"]) == record["rounds"]
        if row["name"] == study.REFERENCE:
            assert row["ratio_to_ours_eager"]["median"] == 1.0
    if "learn2learn" in peers:
        assert record["fastest_peer"]["anil T=1"] == study.ANIL_PEER
    # every timed method ran once per round, in rotated orders
    timed = sum(row["status"] == "timed" for row in record["methods"])
    assert [len(order) for order in record["orders"]] == [timed] * record["rounds"]
    assert record["orders"][0] != record["orders"][1]
    # written atomically (no temporary file left), and report writes the same page again from the record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compile_quick.json", "compile_quick.md"]
    page = (tmp_path / "compile_quick.md").read_text()
    assert "not measured (--no-compile)" in page and "--quick" in page
    (tmp_path / "compile_quick.md").unlink()
    assert study.main(["report", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "compile_quick.md").read_text() == page


def test_a_method_whose_gradient_disagrees_is_flagged_and_not_timed(tmp_path, monkeypatch) -> None:
    real = study.build_cases

    def with_a_wrong_method(*args, **kwargs):
        cases = real(*args, **kwargs)
        reference = cases[0].methods[0].run
        wrong = study.Method("wrong sign", "peer", lambda: [-g for g in reference()])
        cases[0].methods.append(wrong)
        return cases

    monkeypatch.setattr(study, "build_cases", with_a_wrong_method)
    status, record = _quick(tmp_path)
    assert status == 1
    (row,) = [row for row in record["methods"] if row["name"] == "wrong sign"]
    assert row["status"] == "disagrees" and row["agreement"]["agrees"] is False
    assert row["agreement"]["cosine"] < study.AGREEMENT and row["exact_agreement"]["cosine"] < 0
    assert "to fo in float64" in row["reason"]
    assert "seconds" not in row and all("wrong sign" not in order for order in record["orders"])
    assert record["fastest_peer"]["maml T=1"] != "wrong sign"
    assert any("wrong sign" in line for line in record["failures"])
    assert "wrong sign" in (tmp_path / "compile_quick.md").read_text()


def test_an_unwritable_out_is_refused_before_any_work(tmp_path, monkeypatch, capsys) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(study, "build_cases", no_work)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(SystemExit) as exit:
        study.main(["run", "--quick", "--no-compile", "--out", str(blocked / "results")])
    assert exit.value.code == 2 and f"cannot write the results into {blocked / 'results'}" in capsys.readouterr().err


def test_rotation_and_quartiles() -> None:
    orders = [study.rotated(list("abcd"), r, 4) for r in range(4)]
    assert [order[0] for order in orders] == list("abcd")  # every method leads once
    assert report.median_iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == {"median": 3.0, "q1": 2.0, "q3": 4.0}
    assert report.median_iqr([2.0]) == {"median": 2.0, "q1": 2.0, "q3": 2.0} and report.median_iqr([]) is None


def test_the_targets_read_from_the_record() -> None:
    def row(name, who, seconds, twin=None, compiled=False):
        return {"problem": "maml", "T": 1, "name": name, "who": who, "status": "timed", "seconds": seconds,
                "twin": twin, "compiled": compiled}  # fmt: skip

    eager = row("ours fo eager", "ours", [2.0, 2.0, 2.0])
    compiled = row("ours fo compiled", "ours", [1.0, 1.0, 1.6], twin="ours fo eager", compiled=True)
    compiled["ratio_to_fastest_peer"] = report.median_iqr([0.5, 0.5, 0.8])
    peer = row("peer", "peer", [2.0, 2.0, 2.0])
    record = {"methods": [eager, compiled, peer], "fastest_peer": {"maml T=1": "peer"}}
    speed, versus_peer = report.targets(record)
    assert speed["value"]["median"] == 2.0 and speed["met"] is True
    assert versus_peer["value"]["median"] == 0.5 and versus_peer["met"] is True


def test_the_float64_meta_gradient_is_first_order_maml_of_the_same_weights_in_float64() -> None:
    """The reference the methods are checked against, against first-order MAML written out with torch.func: a float64
    copy of the model's weights (the model itself left in float32), one inner SGD step per task, the query loss's
    gradient at the adapted weights, averaged over the tasks."""
    protocol = study.Protocol(meta_batch=3, width=4, depth=2, steps=(1,))
    tasks = study.make_tasks(protocol)
    torch.manual_seed(0)
    model = study.ours_model("maml", protocol, steps=1, compile_losses=False)
    got = study.float64_fo(model, tasks)()
    net = model.inner_model.module
    names = [name for name, _ in net.named_parameters()]
    start = {name: p.detach().double() for name, p in net.named_parameters()}
    wide = copy.deepcopy(net).double().train()
    for m in wide.modules():  # batch statistics, nothing updated: how MAML calls its network in the inner loop
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False

    def loss(weights, x, y):
        return F.cross_entropy(torch.func.functional_call(wide, weights, (x.double(),)), y)

    expected = [torch.zeros_like(v) for v in start.values()]
    for task in tasks:
        grads = torch.func.grad(loss)(start, task["support_x"], task["support_y"])
        adapted = {n: start[n] - protocol.inner_lr * grads[n] for n in names}
        outer = torch.func.grad(loss)(adapted, task["query_x"], task["query_y"])
        expected = [e + outer[n] / len(tasks) for e, n in zip(expected, names)]
    assert all(g.dtype == torch.float64 for g in got) and next(net.parameters()).dtype == torch.float32
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_the_tolerance_is_twice_float32s_own_shortfall_and_never_stricter_than_0_999() -> None:
    assert study.tolerance({"cosine": 0.995}) == pytest.approx(0.01)
    assert study.tolerance({"cosine": 0.99999}) == pytest.approx(1 - study.AGREEMENT)
    assert study.agrees({"cosine": 0.991}, 0.01) and not study.agrees({"cosine": 0.989}, 0.01)
    assert not study.agrees({"cosine": None}, 0.01) and not study.agrees(None, 0.01)
