"""PPL uniformity (MixDL, Table 7): how evenly a generator's images change along a straight path between two
latents. Each path runs from w(z₀) to w(z₁) in INTERVALS = 10 equal sub-intervals (11 images); LPIPS is taken
between consecutive images and between the two ends. Reported over P paths:

    mean  mean LPIPS of a sub-interval (over every path and sub-interval)
    std   the spread of one path's 10 sub-interval distances (population std), averaged over paths — low = uniform;
          a "stair-like" path that jumps once has std 0.3 × its jump and mean 0.1 × it
    end   mean end-to-end LPIPS(x(z₀), x(z₁))

The path is linear in the generator's un-quantized w (after the mapping network, before the style quantizer, as
MixDL interpolates StyleGAN2's w; z itself for a generator without mapping), and every point of it goes through the
quantizer and the synthesis as a sampled w would. Always untruncated, noise constant. MixDL's paper reports these
for Landscape at a scale of ×100 by its figures (StyleGAN2 21.91 / 12.66 / 60.90); this module reports plain LPIPS.
"""

from __future__ import annotations

import torch
from torch import nn

from sqgan.metrics.features import to_uint8
from sqgan.metrics.labels import classes_of, eval_labels

INTERVALS = 10


def ppl_paths(num_fake: int) -> int:
    """Paths an evaluation of `num_fake` images measures: one per 10 images (each path draws 11)."""
    return max(1, num_fake // INTERVALS)


def _base_generator(G: nn.Module) -> nn.Module:
    base = getattr(G, "G", G)  # a TruncatedGenerator: the path is measured on its untruncated G
    if not all(hasattr(base, a) for a in ("map", "synthesis", "quantizer", "num_ws")):
        raise ValueError(f"pplu needs an sqgan Generator (map → quantizer → synthesis), got {type(base).__name__}")
    return base


@torch.no_grad()
def path_images(G: nn.Module, z0: torch.Tensor, z1: torch.Tensor, intervals: int = INTERVALS,
                c: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images [B, intervals + 1, 3, R, R] along the straight w-path from z0 [B, z_dim] to z1 (both ends in
    class c [B] for a conditional G)."""
    base = _base_generator(G).eval()
    kw = {} if c is None else {"c": c}
    w0, w1 = base.map(z0, **kw)[1], base.map(z1, **kw)[1]
    t = torch.linspace(0, 1, intervals + 1, device=w0.device, dtype=w0.dtype)
    w = torch.lerp(w0[:, None, :], w1[:, None, :], t[None, :, None]).flatten(0, 1)
    if base.quantizer is not None:
        w = base.quantizer(w).quantized
    ws = w[:, None, :].expand(-1, base.num_ws, -1)
    if c is not None:  # each path's class for all its steps
        images = base.synthesize(ws, c.repeat_interleave(intervals + 1), noise_mode="const")
    else:
        images = base.synthesis(ws, noise_mode="const")
    return to_uint8(images).unflatten(0, (len(z0), intervals + 1))


@torch.no_grad()
def path_distances(G: nn.Module, lpips: nn.Module, paths: int, z_dim: int, seed: int, batch: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sub-interval LPIPS [paths, INTERVALS], end-to-end LPIPS [paths]) of `paths` paths whose ends are drawn from
    a CPU generator seeded `seed` (all up front: the same paths for any batch size); path p of a conditional G
    stays in class p mod K."""
    k = classes_of(_base_generator(G))
    z = torch.randn(2 * paths, z_dim, generator=torch.Generator().manual_seed(seed))
    per_batch = max(1, batch // (INTERVALS + 1))
    steps, ends = [], []
    for i in range(0, paths, per_batch):
        z0, z1 = z[2 * i : 2 * (i + per_batch) : 2].to(device), z[2 * i + 1 : 2 * (i + per_batch) : 2].to(device)
        c = eval_labels(k, i, len(z0))
        x = path_images(G, z0, z1, c=None if c is None else c.to(device))  # [b, 11, 3, R, R]
        b = len(x)
        steps.append(lpips(x[:, :-1].flatten(0, 1), x[:, 1:].flatten(0, 1)).double().cpu().reshape(b, INTERVALS))
        ends.append(lpips(x[:, 0], x[:, -1]).double().cpu().reshape(b))
    return torch.cat(steps), torch.cat(ends)


def uniformity(steps: torch.Tensor, ends: torch.Tensor) -> dict[str, float]:
    """{mean, std, end} of path_distances' output (see the module's docstring)."""
    if steps.ndim != 2 or steps.shape[1] < 2 or ends.shape != steps.shape[:1]:
        raise ValueError(f"pplu: sub-interval distances [P, I ≥ 2] and end distances [P], got {tuple(steps.shape)} "
                         f"and {tuple(ends.shape)}")
    return {"mean": float(steps.mean()), "std": float(steps.std(dim=1, correction=0).mean()),
            "end": float(ends.mean())}
