"""Fréchet Inception Distance (Heusel et al. 2017) from feature matrices, by torch-fidelity's own functions:
FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½), the trace of the root from the eigenvalues of Σ_r Σ_g."""

from __future__ import annotations

import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between real and generated features [N, F] (float64 statistics, as torch-fidelity)."""
    for what, f in (("real", real), ("generated", fake)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"FID needs at least 2 {what} feature vectors [N, F], got shape {tuple(f.shape)}")
    stats = [fid_features_to_statistics(f.detach().cpu().double()) for f in (real, fake)]
    return float(fid_statistics_to_metric(stats[0], stats[1], verbose=False)["frechet_inception_distance"])
