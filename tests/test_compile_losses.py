"""``compile_losses``: the hooks through ``torch.compile`` for the estimators without double backward.

The compiled run is compared with the eager run of the same module on the same tasks (float64: equal to rounding;
float32: within float32's reordering tolerance), the compiled graphs are shown to run, and the estimators that need
double backward are refused before any work, while a callback's exact reference still runs eager.
"""

from __future__ import annotations

import pytest
import torch

import lightning_hypergrad as lh

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _tasks(dtype: torch.dtype, count: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "support_x": torch.randn(6, 1, 4, 4, generator=g, dtype=dtype),
            "support_y": torch.arange(6) % 3,
            "query_x": torch.randn(6, 1, 4, 4, generator=g, dtype=dtype),
            "query_y": torch.arange(6) % 3,
        }
        for _ in range(count)
    ]


def _maml(dtype: torch.dtype, compile_losses: bool, estimator: str = "fo") -> lh.MAML:
    torch.manual_seed(0)
    model = lh.MAML(
        ways=3,
        image_shape=(1, 4, 4),
        depth=1,
        width=4,
        estimator=estimator,
        inner_steps=2,
        inner_optimizer=lh.SGD(lr=0.3, momentum=0.5),
        compile_losses=compile_losses,
    )
    model._build()
    return model.to(dtype)


def _hypergrads(model: lh.MAML, tasks: list[dict], estimator: str) -> list[torch.Tensor]:
    return [g.clone() for g in model.meta_gradient(tasks, lh.get_estimator(estimator)).hypergrads]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_the_compiled_hooks_give_the_eager_hypergradient(dtype, tolerance):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    tasks = _tasks(dtype)
    eager, compiled = _maml(dtype, False), _maml(dtype, True)
    for spec in ("fo", "t1t2_fd", "sama", "greedy_fd(0.9)"):
        a, b = _hypergrads(eager, tasks, spec), _hypergrads(compiled, tasks, spec)
        scale = max(float(x.abs().max()) for x in a)
        assert scale > 0
        assert max(float((x - y).abs().max()) for x, y in zip(a, b)) <= tolerance * scale, spec
    # the compiled graphs ran (a silently eager run would capture nothing)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2


@pytest.mark.parametrize("spec", ["rmd", "t1t2", "greedy(0.99)", "mixed_rmd"])
def test_an_estimator_with_double_backward_is_refused_with_one_line(spec):
    with pytest.raises(ValueError, match=r"compile_losses=True: .*double backward.*sama.*or compile_losses=False") as e:
        _maml(torch.float32, True, spec)
    assert "\n" not in str(e.value)


def test_compile_losses_with_batch_tasks_is_refused():
    with pytest.raises(ValueError, match="compile_losses=True does not run with batch_tasks=True"):
        lh.BilevelModule(estimator="fo", compile_losses=True, batch_tasks=True)


def test_a_reference_estimator_with_double_backward_gets_the_eager_hooks():
    model = _maml(torch.float64, True)
    compiled_family = model.task_family()
    reference_family = model.task_family(lh.get_estimator("rmd"))
    assert reference_family.inner_loss == model.inner_loss and reference_family.outer_loss == model.outer_loss
    assert compiled_family.inner_loss != model.inner_loss
    # and the exact reference runs on the compiled module (eager hooks): equal to an eager module's
    tasks = _tasks(torch.float64, 1)
    a, b = _hypergrads(_maml(torch.float64, False), tasks, "rmd"), _hypergrads(model, tasks, "rmd")
    assert max(float((x - y).abs().max()) for x, y in zip(a, b)) < 1e-12
