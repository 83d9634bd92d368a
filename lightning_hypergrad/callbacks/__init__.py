"""Lightning callbacks of lightning_hypergrad."""

from lightning_hypergrad.callbacks.hypergrad_quality import HypergradCallback, cosine_and_norm_ratio
from lightning_hypergrad.callbacks.step_timer import StepTimer

__all__ = ["HypergradCallback", "StepTimer", "cosine_and_norm_ratio"]
