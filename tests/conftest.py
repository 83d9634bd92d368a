from pathlib import Path

import pytest
import torch

# The tests' problems are tiny: one thread is faster than two and immune to a busy second core.
torch.set_num_threads(1)


@pytest.fixture
def float64_default():
    """float64 as the default dtype for the test (restored after it): the tests that hold estimators to 1e-12."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def study_from_the_root(monkeypatch: pytest.MonkeyPatch):
    """A study's test runs from the repository root (``.peers`` is found there); torch's thread count, which the
    studies set, is restored after it."""
    threads = torch.get_num_threads()
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    yield
    torch.set_num_threads(threads)
