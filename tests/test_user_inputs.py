"""User tensors and batches are checked, with a message that names the setting: features, dtypes, keys, batch size."""

from __future__ import annotations

import pytest
import torch
from lightning_cases import loader, quiet_trainer, random_meta_batch

import lightning_hypergrad as lh


def _problem(features=None, dtype=torch.float32):
    x = torch.randn(8, 3)
    a = torch.zeros(3, requires_grad=True)
    return lh.BilevelProblem(
        lambda w, h: ((x @ w[0]) ** 2).mean() + (w[0] * h[0]).sum(),
        lambda w, h: (x @ w[0]).mean(),
        [a],
        [torch.zeros(3, dtype=dtype)],
        lh.SGD(lr=0.1),
        2,
        features=features,
    )


@pytest.mark.parametrize(
    "features, got",
    [(lambda: 3.0, "float 3.0"), (lambda: [1.0, 2.0], "a list holding float"), (lambda: {"h": 1}, "dict")],
    ids=["number", "list-of-floats", "dict"],
)
def test_features_that_are_not_a_list_of_tensors_are_named(features, got):
    with pytest.raises(TypeError, match=rf"features\(\) must return a list of tensors .*got {got}"):
        lh.Greedy(0.9)(_problem(features))


def test_init_params_of_another_dtype_than_the_data_names_the_dtypes():
    with pytest.raises(
        TypeError,
        match=r"mixed dtypes .* \(init_params\) are float64 and h \(the hyperparameters or features\) float32",
    ):
        lh.RMD()(_problem(dtype=torch.float64))


def _model(**kwargs):
    torch.manual_seed(0)
    return lh.FewShotClassifier(ways=3, image_shape=(1, 8, 8), inner_steps=1, **kwargs)


def test_a_task_without_query_labels_is_named():
    batch = random_meta_batch()
    del batch["query_y"]
    with pytest.raises(ValueError, match=r"a task lacks query_y \(it has support_x, support_y, query_x\)"):
        quiet_trainer(max_steps=1).fit(_model(), loader(batch))


def test_images_of_another_dtype_than_the_model_are_named():
    batch = random_meta_batch()
    batch["support_x"], batch["query_x"] = batch["support_x"].double(), batch["query_x"].double()
    with pytest.raises(TypeError, match=r"the task's support_x is float64 and the model float32"):
        quiet_trainer(max_steps=1).fit(_model(), loader(batch))


def test_a_meta_batch_of_another_size_than_meta_batch_size_is_refused():
    with pytest.raises(ValueError, match=r"the meta-batch holds 3 tasks, but meta_batch_size is 2"):
        quiet_trainer(max_steps=1).fit(_model(meta_batch_size=2), loader(random_meta_batch(tasks=3)))
    quiet_trainer(max_steps=1).fit(_model(meta_batch_size=3), loader(random_meta_batch(tasks=3)))  # as it says
