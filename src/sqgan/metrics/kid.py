"""Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel
k(x, y) = (xᵀy / d + 1)³, averaged over random subsets — torch-fidelity's implementation, with stylegan2-ada's
convention for the subsets: `subsets` (100) draws of min(N_real, N_generated, `max_subset_size` (1000)) each."""

from __future__ import annotations

import torch


def kid_subset_size(n_real: int, n_fake: int, max_subset_size: int = 1000) -> int:
    return min(n_real, n_fake, max_subset_size)


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, max_subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD² over `subsets` subsets; the subsets are drawn from numpy's RandomState(seed)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = kid_subset_size(len(real), len(fake), max_subset_size)
    if size < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated feature vectors, got {len(real)} and {len(fake)}")
    out = kid_features_to_metric(real.detach().cpu().double(), fake.detach().cpu().double(), kid_subsets=subsets,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return float(out["kernel_inception_distance_mean"]), float(out["kernel_inception_distance_std"])
