"""Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) ‖ p(y)) over `splits` (10) splits of the generated
images' class logits — torch-fidelity's implementation (shuffled by `seed` first, as it does)."""

from __future__ import annotations

import torch
from torch_fidelity.metric_isc import isc_features_to_metric


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over the splits of the softmax of `logits` [N, C]."""
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(f"IS needs at least {splits} generated images (one per split), got {logits.shape[0]}")
    out = isc_features_to_metric(logits.detach().cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return float(out["inception_score_mean"]), float(out["inception_score_std"])
