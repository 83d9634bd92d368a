"""Lightning callbacks of lightning_hypergrad."""

from lightning_hypergrad.callbacks.hypergrad_quality import HypergradCallback, cosine_and_norm_ratio

__all__ = ["HypergradCallback", "cosine_and_norm_ratio"]
