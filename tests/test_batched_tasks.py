"""The tasks of a meta-batch run together (``batch_tasks``): the same hypergradient as one by one, float64."""

from __future__ import annotations

import pytest
import torch
from lightning_cases import random_meta_batch

import lightning_hypergrad as lh
from lightning_hypergrad.module import split_meta_batch, stack_tasks

# every estimator whose result is a sum over independent problems, with a setting that makes each one non-trivial
BATCHABLE = [
    "fo",
    "t1t2",
    "greedy(0.9)",
    "rmd",
    "truncated_rmd(2)",
    "fmd",
    "neumann(3, scale=0.05)",
    "momentum_greedy(0.9)",
    "greedy_tail(0.9, 2)",
]


def classifier(estimator, batch_tasks: bool, inner=None, steps: int = 4, batch_backbone=None) -> lh.FewShotClassifier:
    torch.manual_seed(0)
    model = lh.FewShotClassifier(
        ways=3,
        image_shape=(1, 8, 8),
        depth=1,
        width=4,
        estimator=estimator,
        inner_optimizer=inner or lh.SGD(lr=0.3, momentum=0.9),
        inner_steps=steps,
        batch_tasks=batch_tasks,
        batch_backbone=batch_backbone,
    )
    return model.double()


def both_paths(spec, inner=None, tasks: int = 3, steps: int = 4):
    batch = {k: v.double() if v.is_floating_point() else v for k, v in random_meta_batch(tasks=tasks).items()}
    results = []
    for batched in (False, True):
        model = classifier(lh.get_estimator(spec), batched, inner, steps)
        results.append(model.meta_gradient(split_meta_batch(batch)))
    return results


def assert_close(a, b, rtol=1e-10):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-14)


@pytest.mark.parametrize("spec", BATCHABLE)
def test_batched_tasks_give_the_one_by_one_hypergradient(float64_default, spec):
    one, together = both_paths(spec)
    assert_close(one.hypergrads, together.hypergrads)
    assert any(float(g.abs().max()) > 1e-6 for g in one.hypergrads)  # not trivially zero
    assert set(one.metrics) == set(together.metrics) == {"outer_loss", "acc"}
    for key in one.metrics:
        torch.testing.assert_close(one.metrics[key], together.metrics[key], rtol=1e-10, atol=1e-14)
    assert_close(one.params, together.params)  # the last task's final parameters


@pytest.mark.parametrize(
    "inner",
    [
        lh.SGD(lr=0.2),  # plain SGD: a mean where the sum belongs would scale the inner step by 1 / tasks
        lh.SGD(lr=0.2, momentum=0.8, nesterov=True, weight_decay=0.01),
        lh.Adam(lr=0.05),
    ],
    ids=["sgd", "nesterov-wd", "adam"],
)
def test_batched_tasks_are_exact_with_every_inner_optimizer(float64_default, inner):
    one, together = both_paths("greedy(0.9)", inner=inner)
    assert_close(one.hypergrads, together.hypergrads)
    assert_close(one.state.tensors(), together.state.tensors())


@pytest.mark.parametrize("spec", ["cg(3)", "neumann(3)"])
def test_estimators_that_are_not_sums_run_one_by_one(float64_default, spec):
    estimator = lh.get_estimator(spec)
    assert not estimator.batchable
    one, together = both_paths(spec)
    assert_close(one.hypergrads, together.hypergrads, rtol=1e-13)


def test_tasks_of_unequal_shapes_run_one_by_one(float64_default):
    small = split_meta_batch({k: v.double() if v.is_floating_point() else v for k, v in random_meta_batch(2).items()})
    large = split_meta_batch(
        {k: v.double() if v.is_floating_point() else v for k, v in random_meta_batch(1, queries=5).items()}
    )
    tasks = small + large
    assert stack_tasks(tasks) is None
    got = classifier("greedy(0.9)", True).meta_gradient(tasks)
    expected = classifier("greedy(0.9)", False).meta_gradient(tasks)
    assert_close(expected.hypergrads, got.hypergrads, rtol=1e-13)


def test_stack_tasks_keeps_equal_constants_and_refuses_different_ones():
    a = {"x": torch.zeros(2), "name": "same"}
    b = {"x": torch.ones(2), "name": "same"}
    stacked = stack_tasks([a, b])
    assert stacked.tensors["x"].shape == (2, 2) and stacked.constants == {"name": "same"} and stacked.size == 2
    assert stack_tasks([a, {"x": torch.ones(2), "name": "other"}]) is None
    assert stack_tasks([a, {"x": torch.ones(2)}]) is None
    assert stack_tasks([a, {"x": torch.ones(3), "name": "same"}]) is None
    assert stack_tasks([[torch.zeros(1)], [torch.zeros(1)]]) is None  # not dicts


class SharedHyperparameters(lh.BilevelModule):
    """Ridge regression per task, the log of the L2 penalty shared: ``h`` is the hyperparameters, not batched."""

    def __init__(self, batch_tasks: bool) -> None:
        super().__init__(estimator="rmd", inner_optimizer=lh.SGD(lr=0.1), inner_steps=5, batch_tasks=batch_tasks)
        self.log_l2 = torch.nn.Parameter(torch.tensor([-1.0, 0.5], dtype=torch.float64))

    def init_params(self, task):
        return [task["x"].new_zeros(task["x"].shape[1])]

    def inner_loss(self, params, h, task):
        w = params[0]
        residual = task["x"] @ w - task["y"]
        return (
            0.5 * (residual**2).mean()
            + 0.5 * (h[0].exp() * torch.stack([w[:2].pow(2).sum(), w[2:].pow(2).sum()])).sum()
        )

    def outer_loss(self, params, h, task):
        return 0.5 * ((task["xv"] @ params[0] - task["yv"]) ** 2).mean()


def ridge_tasks(n: int):
    g = torch.Generator().manual_seed(1)
    return [
        {
            k: torch.randn(*shape, generator=g, dtype=torch.float64)
            for k, shape in {"x": (6, 4), "y": (6,), "xv": (5, 4), "yv": (5,)}.items()
        }
        for _ in range(n)
    ]


def test_shared_hyperparameters_are_summed_over_the_tasks_and_match_finite_differences():
    tasks = ridge_tasks(3)
    one = SharedHyperparameters(False).meta_gradient(tasks).hypergrads[0]
    model = SharedHyperparameters(True)
    together = model.meta_gradient(tasks).hypergrads[0]
    torch.testing.assert_close(together, one, rtol=1e-10, atol=1e-14)

    def mean_outer(log_l2):  # the mean over the tasks of L_val(w_T), by the plain loop, no autograd through it
        total = 0.0
        for task in tasks:
            w = torch.zeros(4, dtype=torch.float64)
            for _ in range(5):
                w = w.requires_grad_()
                loss = model.inner_loss([w], [log_l2], task)
                (grad,) = torch.autograd.grad(loss, w)
                w = (w - 0.1 * grad).detach()
            total += float(model.outer_loss([w], [log_l2], task))
        return total / len(tasks)

    eps = 1e-6
    base = model.log_l2.detach()
    for i in range(2):
        step = torch.zeros(2, dtype=torch.float64)
        step[i] = eps
        fd = (mean_outer(base + step) - mean_outer(base - step)) / (2 * eps)
        assert abs(float(together[i]) - fd) < 1e-7 * max(1.0, abs(fd))


def test_metrics_stay_on_the_device_as_tensors(float64_default):
    one, together = both_paths("t1t2")
    for metrics in (one.metrics, together.metrics):
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("spec", ["fo", "t1t2", "greedy(0.9)", "rmd", "rmd(checkpoint_every=2)", "greedy_tail(0.9, 2)"])
def test_a_meta_batch_reads_no_number_back_from_the_device(monkeypatch, spec, batched):
    """On a GPU, reading a tensor's value (``float``, ``bool``, ``.item()``, ``.tolist()``) waits for the device.

    The CPU cannot show a wait, so the test makes every such read raise while the meta-batch is computed (after a
    first step, which checks the problem once).
    """
    model = classifier(lh.get_estimator(spec), batched)
    model.float()
    tasks = split_meta_batch(random_meta_batch(tasks=3))
    model.meta_gradient(tasks)

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor's value was read on the host")

    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    result = model.meta_gradient(tasks)
    monkeypatch.undo()
    assert all(bool(torch.isfinite(g).all()) for g in result.hypergrads)


# ---------------------------------------------------------------------------------------------------------------------
# the backbone over every task at once, batch norm per task
# ---------------------------------------------------------------------------------------------------------------------


def _meta_batch64(tasks: int = 3):
    batch = random_meta_batch(tasks=tasks)
    return split_meta_batch({k: v.double() if v.is_floating_point() else v for k, v in batch.items()})


@pytest.mark.parametrize("spec", ["fo", "t1t2", "greedy(0.99)", "rmd"])
def test_one_backbone_call_gives_the_one_by_one_hypergradient_and_buffers(float64_default, spec):
    """batch_tasks=True calls the backbone once for the meta-batch; the hypergradient, the metrics and the batch-norm
    buffers (running mean, variance, count) equal those of one call per task."""
    tasks = _meta_batch64(4)
    results, buffers, calls = [], [], []
    for batched in (False, True):
        model = classifier(lh.get_estimator(spec), batched, batch_backbone=True)
        model.train()
        count = []
        handle = model.backbone.register_forward_hook(lambda *args, count=count: count.append(1))
        results.append(model.meta_gradient(tasks))
        handle.remove()
        calls.append(len(count))
        buffers.append({k: v.clone() for k, v in model.backbone.named_buffers()})
    assert calls == [4, 1]
    assert_close(results[0].hypergrads, results[1].hypergrads)
    assert any("running_mean" in k for k in buffers[0])
    for key in buffers[0]:
        torch.testing.assert_close(buffers[0][key], buffers[1][key], rtol=1e-10, atol=1e-14)
    tracked = [v for k, v in buffers[1].items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == 4 for v in tracked)  # updated once per task


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    ("norm", "shape"),
    [(torch.nn.BatchNorm2d, (5, 3, 4, 4)), (torch.nn.BatchNorm1d, (5, 3)), (torch.nn.BatchNorm1d, (5, 3, 6))],
)
def test_per_task_batch_norm_is_one_call_per_task(float64_default, norm, shape, momentum):
    from lightning_hypergrad.inner_model import per_task_batch_norm

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4 * shape[0], *shape[1:], generator=g).requires_grad_()
    one, together = norm(3, momentum=momentum), norm(3, momentum=momentum)
    with torch.no_grad():
        for m in (one, together):
            m.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
            m.bias.copy_(torch.tensor([0.1, 0.0, -0.2]))
    expected = torch.cat([one(part) for part in x.split(shape[0])])
    with per_task_batch_norm(together, 4):
        got = together(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    for a, b in zip(one.buffers(), together.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    (grad_expected,) = torch.autograd.grad((expected**3).sum(), x)
    (grad_got,) = torch.autograd.grad((got**3).sum(), x)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-10, atol=1e-13)
    together.eval()  # outside training: the running statistics, as without the context
    with per_task_batch_norm(together, 4):
        torch.testing.assert_close(together(x), torch.cat([together(part) for part in x.split(shape[0])]))
    assert "forward" not in together.__dict__  # the module is left as it was


def test_a_subclass_with_its_own_features_keeps_one_call_per_task(float64_default):
    class Scaled(lh.FewShotClassifier):
        def features(self, task):
            return [2 * f for f in super().features(task)]

    torch.manual_seed(0)
    model = Scaled(ways=3, image_shape=(1, 8, 8), depth=1, width=4, inner_steps=2, batch_tasks=True)
    model = model.double()
    model.batch_backbone = True
    stacked = stack_tasks(_meta_batch64(2))
    assert model.stacked_features(stacked) is None


def test_on_a_cpu_the_backbone_runs_per_task_unless_asked(float64_default):
    stacked = stack_tasks(_meta_batch64(2))
    assert classifier("fo", True).stacked_features(stacked) is None  # automatic: one call per task on a CPU
    assert classifier("fo", True, batch_backbone=True).stacked_features(stacked) is not None
    assert classifier("fo", True, batch_backbone=False).stacked_features(stacked) is None
    with pytest.raises(TypeError, match="batch_backbone must be true, false or null"):
        lh.FewShotClassifier(ways=3, image_shape=(1, 8, 8), batch_backbone="yes")
