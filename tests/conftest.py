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
