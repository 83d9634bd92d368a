"""The whole-network MAML study of the exact meta-gradient (``python -m studies.scale.maml``): every method's
meta-gradient against second-order MAML written out here with ``torch.func`` in float64, the ``--quick`` run's record
and report, the refusal to time where the float64 agreement fails, the skips, and an ``--out`` that cannot be written
refused before any work."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from studies.compile.study import Protocol, make_tasks, ours_model
from studies.peers.study import import_peers
from studies.scale import maml

ROOT = Path(__file__).resolve().parents[1]
TINY = replace(Protocol(), meta_batch=2, width=4, steps=(2,))

pytestmark = [
    pytest.mark.usefixtures("study_from_the_root"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"),
]


def second_order_maml(
    protocol: Protocol, steps: int, tasks: list[dict[str, Tensor]], second_order: bool = True
) -> list[Tensor]:
    """Second-order MAML written out: from the study's initial weights (the protocol's seed), per task ``steps`` SGD
    steps through ``torch.func.functional_call`` with the inner gradient's graph kept, the query loss differentiated
    with respect to the initial weights, the mean over the tasks; batch norm on each batch's statistics (training
    mode, on copies of the buffers). In float64; in the order of the model's hyperparameters. ``second_order=False``:
    the inner gradient without its graph (first-order MAML)."""
    torch.manual_seed(protocol.seed)
    model = ours_model("maml", protocol, steps, compile_losses=False).double()
    net = copy.deepcopy(model.inner_model.module).train()
    name_of = {id(p): name for name, p in model.inner_model.module.named_parameters()}
    names = [name_of[id(p)] for p in model.hyperparameters()]
    start = {name: p.detach().clone().requires_grad_() for name, p in net.named_parameters()}
    total = [torch.zeros_like(start[name]) for name in names]

    def loss(weights: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        buffers = {name: b.clone() for name, b in net.named_buffers()}
        return F.cross_entropy(torch.func.functional_call(net, {**weights, **buffers}, (x,)), y)

    for task in tasks:
        weights = dict(start)
        for _ in range(steps):
            grads = torch.autograd.grad(loss(weights, task["support_x"], task["support_y"]), list(weights.values()),
                                        create_graph=second_order)  # fmt: skip
            weights = {name: w - protocol.inner_lr * g for (name, w), g in zip(weights.items(), grads)}
        query = loss(weights, task["query_x"], task["query_y"])
        for k, g in enumerate(torch.autograd.grad(query, [start[name] for name in names])):
            total[k] += g / len(tasks)
    return total


@pytest.mark.parametrize("method", maml.METHODS)
def test_every_method_equals_second_order_maml_written_out(method: str) -> None:
    peers, missing = import_peers(ROOT / ".peers")
    if method in maml.PEERS and method not in peers:
        pytest.skip(f"{method} is not available here: {missing.get(method, 'it does not import')}")
    steps = TINY.steps[0]
    tasks = maml.in_dtype(make_tasks(TINY), torch.float64)
    expected = second_order_maml(TINY, steps, tasks)
    first_order = second_order_maml(TINY, steps, tasks, second_order=False)
    case = maml.maml_case(TINY, steps, tasks, peers, torch.float64)
    run = next(m.run for m in case.methods if m.name == method)
    got = [g.detach() for g in run()]
    assert [g.dtype for g in got] == [torch.float64] * len(expected)
    assert [g.shape for g in got] == [e.shape for e in expected]
    scale = max(float(e.abs().max()) for e in expected)
    difference = max(float((g - e).abs().max()) for g, e in zip(got, expected))
    assert difference <= 1e-10 * scale, f"{method}: {difference / scale:.1e} of the largest entry"
    # the problem tells the second-order meta-gradient apart from the first-order one
    assert max(float((e - f).abs().max()) for e, f in zip(expected, first_order)) > 1e-3 * scale


def test_the_quick_run_records_every_method_timed_and_the_report(tmp_path: Path) -> None:
    assert maml.main(["run", "--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "maml_quick.json").read_text())
    peers, missing = import_peers(ROOT / ".peers")
    methods = [*maml.OURS, maml.BARE, *(p for p in maml.PEERS if p in peers)]
    assert record["quick"] is True and record["refused"] is None and record["failures"] == []
    assert (record["protocol"]["meta_batch"], record["protocol"]["width"], record["protocol"]["steps"]) == (
        2,
        4,
        [1, 2],
    )
    assert record["rounds"] == 2 and record["threads"] == 1 and set(record["loadavg"]) == {"before", "after"}
    assert record["missing_peers"] == {k: v for k, v in missing.items() if k in maml.PEERS}
    check = record["check"]
    assert check["failures"] == [] and check["dtype"] == "float64" and check["T"] == 2
    assert [row["method"] for row in check["rows"]] == methods[1:]
    assert all(row["relative_difference"] <= maml.TOLERANCE for row in check["rows"])
    assert [(row["T"], row["method"]) for row in record["rows"]] == [(t, m) for t in (1, 2) for m in methods]
    for row in record["rows"]:
        assert row["status"] == "timed" and row["reason"] is None, row
        assert row["peak_bytes"] > 0 and row["first_call_seconds"] > 0
        assert len(row["seconds"]) == 2 and all(s > 0 for s in row["seconds"])
        assert row["summary"]["q1"] <= row["summary"]["median"] <= row["summary"]["q3"]
        assert len(row["ratio_to_rmd"]["per_round"]) == 2
        assert row["agreement"]["cosine"] > 0.9999
        if peers:
            assert len(row["ratio_to_fastest_peer"]["per_round"]) == 2
        if row["method"] == maml.REFERENCE:
            assert row["ratio_to_rmd"]["median"] == 1.0
    if peers:
        assert set(record["fastest_peer"].values()) <= set(peers)
    # written atomically (no temporary file, no lock left), and report writes the same page again from the record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maml_quick.json", "maml_quick.md"]
    page = (tmp_path / "maml_quick.md").read_text()
    assert "--quick" in page and "MAML T = 1: ours fastest exact form / fastest peer <= 1" in page
    assert ("**met**" in page or "**missed** by" in page) if peers else "no peer timed" in page
    (tmp_path / "maml_quick.md").unlink()
    assert maml.main(["report", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "maml_quick.md").read_text() == page


def test_a_failed_float64_agreement_is_recorded_and_nothing_timed(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(maml, "TOLERANCE", -1.0)  # every difference, even 0, is then too large
    assert maml.main(["run", "--quick", "--out", str(tmp_path)]) == 1
    record = json.loads((tmp_path / "maml_quick.json").read_text())
    assert record["rows"] == [] and record["check"]["failures"] and record["refused"].startswith("the float64")
    assert "**Refused: the float64 agreement with rmd failed" in (tmp_path / "maml_quick.md").read_text()
    assert "error: the float64 agreement with rmd failed" in capsys.readouterr().err


def test_a_method_predicted_too_slow_is_skipped_from_then_on() -> None:
    rows = [{"method": "rmd", "T": 1, "status": "timed", "summary": {"median": 2.0}},
            {"method": "higher", "T": 1, "status": "skipped"}]  # fmt: skip
    assert maml.skip_reason(rows, "rmd", 5, max_seconds=20) is None  # 2 s x 5 = 10 s
    assert "predicted 40 s per call (from T = 1) > --max-seconds 20" in maml.skip_reason(rows, "rmd", 20, 20)
    assert maml.skip_reason(rows, "higher", 5, 1e9) == "skipped at T = 1 already"
    assert maml.skip_reason(rows, "torchopt", 5, 1e-9) is None  # nothing to predict from


def test_an_unwritable_out_is_one_line_before_any_work(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(maml, "run_study", lambda *a, **k: pytest.fail("the study started"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        maml.main(["run", "--quick", "--out", str(blocker / "results")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write the results into" in err and "is a file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
