"""One naming for estimators: ``get_estimator(spec)`` parses what ``str(estimator)`` prints."""

from __future__ import annotations

import pytest
import torch
from bilevel_cases import MLPTask

import lightning_hypergrad as lh

SPECS = {
    "fo": lh.FO(),
    "t1t2": lh.T1T2(),
    "greedy(0.99)": lh.Greedy(0.99),
    "greedy(0.9)": lh.Greedy(0.9),
    "greedy(1.0)": lh.Greedy(1),
    "rmd": lh.RMD(),
    "truncated_rmd(5)": lh.TruncatedRMD(5),
    "neumann(10)": lh.Neumann(10),
    "neumann(20, scale=0.05)": lh.Neumann(20, scale=0.05),
    "cg(10)": lh.ConjugateGradient(10),
    "cg(3, tol=1e-06)": lh.ConjugateGradient(3, tol=1e-6),
    "fmd": lh.FMD(),
    "fmd(max_entries=8)": lh.FMD(max_entries=8),
    "greedy(0.5, nonfinite='raise')": lh.Greedy(0.5, nonfinite="raise"),
    "neumann(10, scale='lr')": lh.Neumann(10, scale="lr"),
    "neumann(10, scale=0.1)": lh.Neumann(10, scale=0.1),
    "neumann(10, power_iterations=20)": lh.Neumann(10, power_iterations=20),
    "neumann(5, damping=0.1)": lh.Neumann(5, damping=0.1),
    "neumann(10, scale=0.1, damping=0.5)": lh.Neumann(10, scale=0.1, damping=0.5),
    "neumann(10, power_iterations=3, damping=1.0)": lh.Neumann(10, power_iterations=3, damping=1),
    "cg(10, damping=0.01)": lh.ConjugateGradient(10, damping=0.01),
    "cg(3, tol=1e-06, damping=0.5)": lh.ConjugateGradient(3, tol=1e-6, damping=0.5),
}


@pytest.mark.parametrize("spec", list(SPECS))
def test_str_prints_the_spec_and_get_estimator_parses_it_back(spec):
    estimator = SPECS[spec]
    assert str(estimator) == spec
    parsed = lh.get_estimator(spec)
    assert type(parsed) is type(estimator) and vars(parsed) == vars(estimator)


def test_every_registered_estimator_round_trips_with_its_defaults():
    for name, cls in lh.ESTIMATORS.items():
        estimator = cls()
        assert str(estimator).split("(")[0] == name
        assert vars(lh.get_estimator(str(estimator))) == vars(estimator)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("greedy", lh.Greedy(0.99)),
        ("Greedy(0.9)", lh.Greedy(0.9)),
        (" GREEDY( 0.5 ) ", lh.Greedy(0.5)),
        ("truncated-rmd(2)", lh.TruncatedRMD(2)),
        ("neumann(scale=0.1)", lh.Neumann(10, scale=0.1)),
        ("T1T2", lh.T1T2()),
    ],
)
def test_names_are_case_insensitive_and_arguments_default(spec, expected):
    parsed = lh.get_estimator(spec)
    assert type(parsed) is type(expected) and vars(parsed) == vars(expected)


def test_a_parsed_spec_computes_what_the_constructed_estimator_computes():
    task = MLPTask()
    a = lh.get_estimator("greedy(0.7)")(task.problem(4)).hypergrads
    b = lh.Greedy(0.7)(task.problem(4)).hypergrads
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("adam", "unknown estimator 'adam'; choose one of auto_greedy, cg, fmd, fo, greedy"),
        ("greedy0.99", "unknown estimator 'greedy0.99'"),
        ("greedy(0.99", "cannot parse the estimator spec"),
        ("greedy(x)", "cannot parse the estimator spec"),
        ("greedy(0.9, 0.5)", "greedy takes gamma"),
        ("rmd(3)", "rmd takes no positional argument"),
        ("greedy(1.5)", "gamma must be in"),
        ("neumann(10, size=3)", "estimator spec 'neumann(10, size=3)'"),
    ],
)
def test_bad_specs_fail_with_a_message_naming_the_fix(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lh.get_estimator(spec)


def test_a_module_takes_a_spec_string():
    model = lh.FewShotClassifier(ways=3, image_shape=(1, 8, 8), estimator="greedy(0.9)")
    assert isinstance(model.estimator, lh.Greedy) and model.estimator.gamma == 0.9
    callback = lh.HypergradCallback(reference="rmd", compare=["t1t2", lh.FO()])
    assert [str(e) for e in callback.compare] == ["t1t2", "fo"] and str(callback.reference) == "rmd"
