"""Embedding diversity (seed 000 A.4): mean pairwise cosine similarity of a set of features (lower = more diverse)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pairwise_cosine(features: torch.Tensor) -> torch.Tensor:
    """Mean of cos(f_i, f_j) over the N(N−1) ordered pairs i ≠ j of the rows of `features` [N, F]."""
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"mean_pairwise_cosine needs at least 2 feature vectors, got {n}")
    f = F.normalize(features.flatten(1), dim=1)
    total = f.sum(0).square().sum()  # Σ_ij cos = ‖Σ_i f̂_i‖²; the diagonal adds n
    return (total - n) / (n * (n - 1))
