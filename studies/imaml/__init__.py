"""MAML, first-order MAML and iMAML side by side (python -m studies.imaml)."""
