"""Synthetic few-shot tasks and a quiet Trainer for the Lightning tests."""

from __future__ import annotations

import signal

import lightning as L
import torch
from torch.utils.data import DataLoader


def random_meta_batch(tasks: int = 2, ways: int = 3, shots: int = 2, queries: int = 3, shape=(1, 8, 8), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "support_x": torch.randn(tasks, ways * shots, *shape, generator=g),
        "support_y": torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1),
        "query_x": torch.randn(tasks, ways * queries, *shape, generator=g),
        "query_y": torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1),
    }


def loader(*batches):
    return DataLoader(list(batches), batch_size=None)


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**(defaults | kwargs))


class BatchRecorder(L.LightningModule):
    """Records the query images of every training batch and learns nothing (one optimizer step per batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["query_x"].clone())
        return self.weight * batch["query_x"].mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def default_sigint() -> None:
    """Ctrl-C's default action in a child process: a shell that starts a job in the background (``cmd &``) hands it
    SIGINT ignored, and the child would inherit that; a user's terminal does not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
