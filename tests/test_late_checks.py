"""Checks that came late or read oddly: the callback's estimators at fit start, a one-string compare, Omniglot files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lightning_cases import loader, quiet_trainer, random_meta_batch

import lightning_hypergrad as lh
from lightning_hypergrad.data.datasets import omniglot
from lightning_hypergrad.data.registry import DatasetOptions


def test_compare_given_as_one_string_is_one_estimator():
    assert [str(e) for e in lh.HypergradCallback(compare="t1t2").compare] == ["t1t2"]


@pytest.mark.parametrize(
    "compare, message",
    [
        ("truncated_rmd(50)", r"compare=truncated_rmd\(50\): TruncatedRMD truncate \(K=50\) exceeds .* \(T=10\)"),
        ("fmd", r"compare=fmd: FMD carries one tangent per hyperparameter entry"),
    ],
)
def test_a_compared_estimator_that_cannot_run_is_refused_before_the_first_step(compare, message):
    model = lh.FewShotClassifier(ways=3, image_shape=(1, 8, 8), inner_steps=10)
    calls = []
    model.meta_gradient = lambda *a, **k: calls.append(1)  # type: ignore[method-assign]
    trainer = quiet_trainer(max_steps=1, callbacks=[lh.HypergradCallback(every_n_steps=5, compare=[compare])])
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, loader(random_meta_batch()))
    assert not calls


def _archive(path: Path, characters: int) -> None:
    images = np.ones((characters, 2, 3, 3), dtype=bool)
    labels = np.repeat(np.arange(characters)[:, None], 2, axis=1)
    np.savez(path, images=images, labels=labels)


def test_swapped_omniglot_archives_are_told_apart_by_their_characters(tmp_path):
    _archive(tmp_path / "images_background.npz", 659)
    _archive(tmp_path / "images_evaluation.npz", 964)
    with pytest.raises(ValueError, match="the two files' names are swapped; rename them"):
        omniglot.check_omniglot_files(DatasetOptions(root=tmp_path, image_size=None, download=False, split_seed=0))
    (tmp_path / "images_background.npz").rename(tmp_path / "x.npz")
    (tmp_path / "images_evaluation.npz").rename(tmp_path / "images_background.npz")
    (tmp_path / "x.npz").rename(tmp_path / "images_evaluation.npz")
    omniglot.check_omniglot_files(DatasetOptions(root=tmp_path, image_size=None, download=False, split_seed=0))


def test_the_missing_omniglot_message_lists_only_what_is_missing(tmp_path):
    _archive(tmp_path / "images_background.npz", 3)
    message = omniglot.omniglot_missing_message(tmp_path)
    assert "images_evaluation.npz" in message.split(". Either")[0]
    assert str(tmp_path / "images_background.npz") not in message
