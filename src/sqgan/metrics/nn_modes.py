"""NN-mode count (MixDL, Fig. 8): how many distinct reference (training) images are the nearest neighbour of at
least one generated image, Euclidean in the metric's feature space. A generator that copies k training images
scores k; one that spreads over the set scores up to min(N generated, N real). Ties go to the lower real index.

MixDL's own script (`count_modes.py`) takes the arg*max* of the LPIPS distances, i.e. the farthest training image;
this is the nearest, as the paper's text and figure describe."""

from __future__ import annotations

import torch


def nearest_reals(real: torch.Tensor, fake: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Index of the nearest real feature vector [N_r, F] for each generated one [N, F] (float64, in chunks)."""
    for what, f in (("real", real), ("generated", fake)):
        if f.ndim != 2 or f.shape[0] < 1:
            raise ValueError(f"NN-mode count needs {what} feature vectors [N, F] (N ≥ 1), got shape {tuple(f.shape)}")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"NN-mode count: real features have {real.shape[1]} dimensions, generated {fake.shape[1]}")
    r = real.detach().cpu().double()
    out = [torch.cdist(f, r).argmin(dim=1) for f in fake.detach().cpu().double().split(chunk)]
    return torch.cat(out)


def nn_mode_count(real: torch.Tensor, fake: torch.Tensor) -> int:
    """Distinct real images that are some generated image's nearest neighbour."""
    return int(nearest_reals(real, fake).unique().numel())
