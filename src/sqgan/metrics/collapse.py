"""Is the generator still covering its data? Cheap pixel-space diagnostics of a set of samples against the reals.

- `diversity/pixel`: the samples' mean pairwise RMS pixel distance divided by the reals' (1 ≈ as varied as the data;
  a generator that ignores z gives ~0).
- `diversity/nn_distinct`: how many distinct real images are the pixel-nearest neighbour of at least one sample,
  as a share of min(#samples, #reals) (a collapsed generator has one nearest real for every sample).

Both are computed at a fixed small side (`SIDE`), so they cost little at any resolution; they say nothing about
quality (FID does), only whether the samples spread over the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIDE = 32  # images are compared at 32² (area-resized), whatever the training resolution


def _flat(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [-1, 1] float images [N, 3, H, W] → float rows [N, 3·SIDE²] in [0, 1]."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else (images.float().clamp(-1, 1) + 1) / 2
    if x.shape[-1] != SIDE:
        x = F.interpolate(x, size=(SIDE, SIDE), mode="area")
    return x.flatten(1)


def mean_pairwise_rms(images: torch.Tensor) -> float:
    """Mean over pairs i ≠ j of the RMS pixel difference (at SIDE², in [0, 1] units)."""
    x = _flat(images).double()
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"pixel diversity needs at least 2 images, got {n}")
    d = torch.cdist(x, x).square() / x.shape[1]
    return float(d.clamp_min(0).sqrt().sum() / (n * (n - 1)))


def nearest_real(fake: torch.Tensor, real: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Index of the pixel-nearest real image of each fake [N]."""
    f, r = _flat(fake), _flat(real)
    return torch.cat([torch.cdist(f[i : i + chunk], r).argmin(1) for i in range(0, len(f), chunk)])


@dataclass(frozen=True)
class CollapseStats:
    pixel: float  # samples' pixel diversity / reals'
    nn_distinct: float  # distinct nearest reals / min(#samples, #reals)
    nn_count: int  # distinct nearest reals

    def as_metrics(self) -> dict[str, float]:
        return {"diversity/pixel": self.pixel, "diversity/nn_distinct": self.nn_distinct}


def collapse_stats(fake: torch.Tensor, real: torch.Tensor, real_diversity: float | None = None) -> CollapseStats:
    """The diagnostics of `fake` against `real` (uint8 or [-1, 1] images). `real_diversity` (the reals' own
    mean_pairwise_rms) may be passed when it is computed once per run."""
    ref = mean_pairwise_rms(real) if real_diversity is None else real_diversity
    if ref <= 0:
        raise ValueError("the real images are all identical: pixel diversity has no scale to compare with")
    count = int(nearest_real(fake, real).unique().numel())
    return CollapseStats(mean_pairwise_rms(fake) / ref, count / min(len(fake), len(real)), count)
