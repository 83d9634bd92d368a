"""Differentiable (out-of-place) inner optimizers."""

from lightning_hypergrad.optim.adam import Adam, AdamW
from lightning_hypergrad.optim.base import DifferentiableOptimizer, OptimizerState, Setting
from lightning_hypergrad.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "DifferentiableOptimizer", "OptimizerState", "Setting"]
