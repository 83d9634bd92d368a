"""Online mode: the inner model and its optimizer state carry on from one outer step to the next."""

from __future__ import annotations

import runpy
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning_hypergrad as lh

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = runpy.run_path(str(ROOT / "examples" / "custom_module.py"), run_name="example")
INNER_STEPS, OUTER_STEPS = 3, 4


class FrozenHyperparameters(EXAMPLE["WeightDecayTuner"]):
    """Outer SGD with lr 0: the hyperparameters stay put, so the inner model must follow one SGD trajectory."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def make_model() -> FrozenHyperparameters:
    return FrozenHyperparameters(
        inner_optimizer=lh.SGD(lr=0.5, momentum=0.9), inner_steps=INNER_STEPS, online=True, estimator=lh.T1T2()
    )


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    return L.Trainer(**(defaults | kwargs))


def test_online_mode_continues_one_inner_trajectory_across_outer_steps():
    task = EXAMPLE["digits_task"]()
    model = make_model()
    trainer(max_steps=OUTER_STEPS, enable_checkpointing=False).fit(model, DataLoader([[task]] * 10, batch_size=None))
    # the same trajectory, run by torch.optim.SGD in one piece of OUTER_STEPS * INNER_STEPS steps
    w = [p.clone().requires_grad_() for p in model.inner_model.initial()]
    opt = torch.optim.SGD(w, lr=0.5, momentum=0.9)
    for _ in range(OUTER_STEPS * INNER_STEPS):
        opt.zero_grad()
        model.inner_loss(model.inner_model.bind(w), [model.log_wd.detach()], task).backward()
        opt.step()
    for carried, expected in zip(model.carried_params, w):
        torch.testing.assert_close(carried, expected.detach(), rtol=1e-6, atol=1e-7)
    assert model.carried_state.step == OUTER_STEPS * INNER_STEPS


def test_the_carried_inner_model_is_in_the_checkpoint(tmp_path):
    task = EXAMPLE["digits_task"]()
    loader = DataLoader([[task]] * 10, batch_size=None)
    model = make_model()
    trainer(
        max_steps=OUTER_STEPS, callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)]
    ).fit(model, loader)
    resumed = make_model()
    trainer(max_steps=OUTER_STEPS, enable_checkpointing=False).fit(
        resumed, loader, ckpt_path=tmp_path / "epoch=0-step=2.ckpt"
    )
    for a, b in zip(resumed.carried_params, model.carried_params):
        assert torch.equal(a, b)
    assert resumed.carried_state.step == model.carried_state.step
