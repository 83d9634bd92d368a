"""Random invalid settings through the command line fail at once, naming the setting, never deep inside torch."""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_hypergrad.cli import cli

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")
ROOT = Path(__file__).resolve().parents[1]
BASE = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger=false"]  # run=False: no subcommand

bad_floats_outside_unit = st.one_of(
    st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.0, exclude_min=True), st.just(math.nan)
)
INVALID = st.one_of(
    st.tuples(st.just("model.init_args.estimator.init_args.gamma"), bad_floats_outside_unit, st.just("gamma")),
    st.tuples(st.just("model.init_args.inner_steps"), st.integers(max_value=0), st.just("inner_steps")),
    st.tuples(st.just("model.init_args.outer_lr"), st.floats(max_value=0.0, allow_nan=False), st.just("outer_lr")),
    st.tuples(
        st.just("model.init_args.inner_optimizer.init_args.lr"),
        st.floats(max_value=0.0, exclude_max=True, allow_nan=False),
        st.just("lr"),
    ),
    st.tuples(
        st.just("model.init_args.inner_optimizer.init_args.momentum"), st.floats(min_value=1.01), st.just("momentum")
    ),
    st.tuples(
        st.just("data.init_args.ways"), st.one_of(st.integers(max_value=0), st.integers(6, 10**6)), st.just("ways")
    ),
    st.tuples(st.just("data.init_args.shots"), st.integers(max_value=0), st.just("shots")),
    st.tuples(st.just("data.init_args.queries"), st.integers(175, 10**6), st.just("queries")),
    st.tuples(
        st.just("data.init_args.dataset"),
        st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).filter(
            lambda s: s not in ("digits", "omniglot", "cifar100", "cifarfs", "mini-imagenet", "folder")
        ),
        st.just("dataset"),
    ),
    st.tuples(
        st.just("model.init_args.estimator.class_path"),
        st.from_regex(r"lightning_hypergrad\.[A-Z][a-z]{3,10}", fullmatch=True).filter(
            lambda s: s.split(".")[1] not in ("Greedy", "Neumann")
        ),
        st.just("estimator"),
    ),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(INVALID)
def test_invalid_settings_give_a_clear_error_before_any_work(capsys, case):
    key, value, name = case
    with pytest.raises((SystemExit, ValueError, TypeError)) as info:
        cli([*BASE, f"--{key}={value}"], run=False)
    message = str(info.value) + capsys.readouterr().err
    assert name in message, message[-2000:]
    if not isinstance(info.value, SystemExit):
        innermost = traceback.extract_tb(info.value.__traceback__)[-1].filename
        assert "/torch/" not in innermost, innermost
