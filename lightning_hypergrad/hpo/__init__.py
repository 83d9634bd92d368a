"""Hyperparameter optimization of one network's training on scikit-learn's digits (offline data)."""

from lightning_hypergrad.hpo.data import DigitsHPODataModule
from lightning_hypergrad.hpo.models import HyperCleaner, LearningRateTuner, MLPProblem, WeightDecayTuner, auc

__all__ = ["DigitsHPODataModule", "HyperCleaner", "LearningRateTuner", "MLPProblem", "WeightDecayTuner", "auc"]
