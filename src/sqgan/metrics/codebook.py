"""Codebook usage statistics from assignment counts."""

from __future__ import annotations

import torch


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(H(p)) of the assignment histogram p = counts / Σ counts (K when uniform, 1 when one entry takes all)."""
    p = counts.float() / counts.sum().clamp_min(1.0)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def utilisation(counts: torch.Tensor) -> torch.Tensor:
    """Share of entries chosen at least once in the window the counts cover."""
    return (counts > 0).float().mean()
