"""Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel
k(x, y) = (xᵀy / d + 1)³, averaged over random subsets, with stylegan2-ada's convention for the subsets: `subsets`
(100) draws of min(N_real, N_generated, `max_subset_size` (1000)) vectors each.

torch-fidelity's `kid_features_to_metric`, moved to torch so the kernels run on the features' device: the same
subsets (numpy's RandomState(seed).choice, in its order), the same estimator (its `mmd2`), float64 throughout.
tests/test_metrics.py holds it equal to torch-fidelity's function and to a brute-force loop.
"""

from __future__ import annotations

import numpy as np
import torch


def kid_subset_size(n_real: int, n_fake: int, max_subset_size: int = 1000) -> int:
    return min(n_real, n_fake, max_subset_size)


def unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² between two equal-size sets [m, d] under the cubic polynomial kernel."""
    m, d = x.shape
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off_xx = k_xx.sum() - k_xx.diagonal().sum()
    off_yy = k_yy.sum() - k_yy.diagonal().sum()
    return (off_xx + off_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m)


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, max_subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD² over `subsets` subsets drawn from numpy's RandomState(seed)."""
    size = kid_subset_size(len(real), len(fake), max_subset_size)
    if size < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated feature vectors, got {len(real)} and {len(fake)}")
    real, fake = real.detach().double(), fake.detach().double()
    rng = np.random.RandomState(seed)
    mmds = torch.empty(subsets, dtype=torch.float64)
    for i in range(subsets):  # draws in torch-fidelity's order: one from the reals, then one from the fakes
        r = torch.from_numpy(rng.choice(len(real), size, replace=False)).to(real.device)
        f = torch.from_numpy(rng.choice(len(fake), size, replace=False)).to(fake.device)
        mmds[i] = unbiased_mmd2(real[r], fake[f]).cpu()
    return float(mmds.mean()), float(mmds.std(unbiased=False))
