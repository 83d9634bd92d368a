"""A module changed after ``InnerModel`` wrapped it: followed where every inner parameter still lives in the module
that held it (the call plan rebuilt), refused in one line otherwise; never the old plan on a new module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hypergrad.hyper_module import HyperModule
from lightning_hypergrad.inner_model import InnerModel

X = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))


def _refused(inner: InnerModel, w, what: str) -> None:
    with pytest.raises(RuntimeError, match=rf"the module changed after it was wrapped \({what}.*new InnerModel") as e:
        inner(w, X)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("init", ["zeros", "learned"])
def test_a_submodule_replaced_after_the_first_call_is_refused(init):
    torch.manual_seed(0)
    inner = InnerModel(nn.Sequential(nn.Linear(3, 2)), init=init)
    w = [torch.zeros(2, 3), torch.zeros(2)]
    assert float(inner(w, X).abs().max()) == 0.0  # w = 0: the output is 0
    inner.module[0] = nn.Linear(3, 2)  # its own weights would be used in place of w
    _refused(inner, w, r"the submodule '0' that held '0.weight' was replaced or removed")


@pytest.mark.parametrize("init", ["fixed", "learned"])
@pytest.mark.parametrize("first_call", [True, False])
def test_a_weight_norm_added_later_is_refused(first_call, init):
    torch.manual_seed(0)
    inner = InnerModel(nn.Sequential(nn.Linear(3, 2)), init=init)
    w = [p.detach().clone() for p in inner.parameter_tensors()]
    if first_call:
        inner(w, X)
    torch.nn.utils.parametrizations.weight_norm(inner.module[0])
    kind = "parameter" if init == "learned" else "buffer"
    _refused(inner, w, rf"'0.weight' is no longer a {kind} of its module; a parametrization \(weight_norm\) moves it")


def test_a_new_trainable_layer_is_refused():
    torch.manual_seed(0)
    inner = InnerModel(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)), params=["0.*", "2.*"])
    w = inner.initial()
    inner(w, X)
    inner.module[1] = nn.Linear(3, 3)
    _refused(inner, w, r"the parameters 1.weight, 1.bias, which are not inner parameters, require grad")


def test_changes_that_leave_the_inner_parameters_in_place_are_followed():
    """A layer without inner parameters replaced, and a parametrization added to a frozen layer: the plan is rebuilt
    and the call uses the new structure with the inner values."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    net[0].requires_grad_(False)
    inner = InnerModel(net, params=["2.*"])
    w = [torch.randn(2, 3), torch.randn(2)]
    torch.testing.assert_close(inner(w, X), F.linear(torch.tanh(net[0](X)), *w))
    net[1] = nn.ReLU()
    torch.testing.assert_close(inner(w, X), F.linear(torch.relu(net[0](X)), *w))
    torch.nn.utils.parametrizations.orthogonal(net[0])
    assert hasattr(net[0], "parametrizations")
    torch.testing.assert_close(inner(w, X), F.linear(torch.relu(net[0](X)), *w))


# ---------------------------------------------------------------------------------------------------------------------
# HyperModule: the same property for a module of hyperparameters (its call plan is made at attach)
# ---------------------------------------------------------------------------------------------------------------------


def _attached(net: nn.Module) -> tuple[HyperModule, list[torch.Tensor]]:
    torch.manual_seed(0)
    meta = HyperModule(net)
    hyperparameters = list(meta.parameters())
    meta.attach(hyperparameters)
    h = [torch.randn_like(p) for p in hyperparameters]
    meta(h)(X)  # the first call, as a loss makes it
    return meta, h


def _hyper_refused(meta: HyperModule, h, what: str) -> None:
    with pytest.raises(
        RuntimeError, match=rf"HyperModule\(Sequential\): the module changed after attach \({what}"
    ) as e:
        meta(h)(X)
    assert "\n" not in str(e.value) and "attach(hyperparameters) again" in str(e.value)


def test_a_hyper_module_whose_submodule_was_replaced_is_refused():
    """The old plan put h into the replaced layer, and the new one ran on its own weights: the output did not depend
    on h at all."""
    meta, h = _attached(nn.Sequential(nn.Linear(3, 2)))
    meta.module[0] = nn.Linear(3, 2)
    _hyper_refused(meta, h, r"the parameters 0\.weight, 0\.bias are not the ones attached")


def test_a_hyper_module_given_a_weight_norm_after_attach_is_refused():
    meta, h = _attached(nn.Sequential(nn.Linear(3, 2)))
    torch.nn.utils.parametrizations.weight_norm(meta.module[0])
    _hyper_refused(meta, h, r"the parameters 0\.weight are not the ones attached")


def test_a_hyper_module_whose_parameter_was_reassigned_is_refused():
    meta, h = _attached(nn.Sequential(nn.Linear(3, 2)))
    meta.module[0].weight = nn.Parameter(torch.randn(2, 3))
    _hyper_refused(meta, h, r"the parameters 0\.weight are not the ones attached")


def test_a_hyper_module_given_a_new_trainable_layer_is_refused():
    meta, h = _attached(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)))
    meta.module[1] = nn.Linear(3, 3)
    _hyper_refused(meta, h, r"the parameters 1\.weight, 1\.bias require grad and were not attached")


def test_a_hyper_module_follows_changes_that_leave_its_parameters_in_place():
    meta, h = _attached(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)))
    meta.module[1] = nn.Sigmoid()
    expected = torch.sigmoid(X @ h[0].T + h[1]) @ h[2].T + h[3]
    torch.testing.assert_close(meta(h)(X), expected, rtol=1e-6, atol=1e-7)
