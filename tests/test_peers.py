"""The peers study: the project's exact and first-order hypergradients equal learn2learn's, higher's and TorchOpt's.

learn2learn comes with the ``fewshot`` extra; higher and TorchOpt with ``bash scripts/install_peers.sh`` (into
``.peers/``, which CI installs). A test of a peer that is not installed skips, naming the command; the exactness of
the same estimators is covered without peers by the closed-form and finite-difference tests.
"""

from __future__ import annotations

import pytest
import torch

from studies.peers import study

PEERS, MISSING = study.import_peers(study.PEERS_DIR)


def _need(*names: str) -> None:
    absent = [MISSING[n] for n in names if n not in PEERS]
    if absent:
        pytest.skip("; ".join(absent))


@pytest.mark.parametrize("make", [study.anil_case, study.maml_case], ids=["anil", "maml"])
def test_equal_to_learn2learn_in_both_orders(make):
    _need("learn2learn")
    case = make(PEERS, torch.float64)
    for method in ("rmd", "fo"):
        ours, theirs = case.ours[method](), case.peers[case.pairs[method]]()
        assert study.relative_difference(ours, theirs) < 1e-12
        assert max(float(g.abs().max()) for g in theirs) > 1e-6  # not trivially zero
    # the two orders differ: the comparison can tell second order from first
    assert study.relative_difference(case.ours["rmd"](), case.ours["fo"]()) > 1e-3


@pytest.mark.parametrize("peer", ["higher innerloop_ctx", "TorchOpt MetaSGD"])
def test_whole_network_hpo_equal_to_higher_and_torchopt(peer):
    _need("higher" if peer.startswith("higher") else "torchopt")
    case = study.hpo_case(PEERS, torch.float64, steps=6)
    theirs = case.peers[peer]()
    for method in ("rmd", "rmd(checkpoint_every='sqrt')", "mixed_rmd", "mixed_rmd(checkpoint_every='sqrt')"):
        assert study.relative_difference(case.ours[method](), theirs) < 1e-12
    assert study.relative_difference(case.ours["t1t2"](), theirs) > 1e-3  # an estimate, and the check can see it


def test_imaml_equal_to_torchopts_implicit_maml():
    _need("torchopt")
    case = study.imaml_case(PEERS, torch.float64)
    spec, theirs = case.exact[0], case.peers["TorchOpt iMAML (custom_root, normal CG)"]()
    assert study.relative_difference(case.ours[spec](), theirs) < 1e-12
    assert max(float(g.abs().max()) for g in theirs) > 1e-6
    # another solver of the same system (fewer iterations than unknowns): close but not equal, and the check sees it
    assert study.relative_difference(case.ours["minres(5)"](), theirs) > 1e-9


def test_a_missing_peer_is_left_out_with_the_command(monkeypatch, tmp_path):
    real = study.importlib.import_module

    def refuse(name, *args, **kwargs):
        if name == "higher":
            raise ImportError("not here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(study.importlib, "import_module", refuse)
    found, missing = study.import_peers(tmp_path / "nowhere")
    assert "higher" not in found and "bash scripts/install_peers.sh" in missing["higher"]
    assert "higher innerloop_ctx" not in study.hpo_case(found, torch.float64, steps=2).peers


def test_the_tiny_study_writes_its_tables(tmp_path):
    _need("learn2learn")
    assert study.main(["--rounds", "1", "--hpo-steps", "2", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "peers.md").read_text()
    assert "## Equality (float64)" in text and "| anil | 10 | `rmd` | learn2learn MAML(head) |" in text
    assert (tmp_path / "peers.json").exists()
