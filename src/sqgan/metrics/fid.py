"""FID and KID through torchmetrics with a named, pluggable feature network.

- `metrics.inception_weights` set: torch-fidelity's Inception-v3 (the FID network) from that local file;
  metrics are logged as `fid_inception`, `kid_inception_*`.
- unset: a fixed-seed random CNN (no trained network can be downloaded here); logged as `fid_randcnn`,
  `kid_randcnn_*`. Its values compare runs with each other, never with published FID.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RandomCNNFeatures(nn.Module):
    """Fixed-seed random conv net: uint8 [N, 3, H, W] → [N, num_features] (resized to `size` first)."""

    def __init__(self, seed: int = 0, num_features: int = 64, size: int = 64) -> None:
        super().__init__()
        self.seed, self.size, self.num_features = seed, size, num_features
        widths = [3, 32, 64, 128, num_features]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, 2, 1) for a, b in zip(widths[:-1], widths[1:], strict=True))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.in_channels * 9
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                conv.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> RandomCNNFeatures:  # always eval: a fixed function
        return super().train(False)

    def describe(self) -> str:
        return f"random CNN (seed {self.seed}, {self.num_features}-d, input resized bilinear to {self.size}px)"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1.0
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.leaky_relu(x, 0.2)
        return x.mean(dim=(2, 3))


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception-v3 pool features (2048-d) from a local weights file; input uint8."""

    num_features = 2048

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"metrics.inception_weights: {path} not found; give the local torch-fidelity Inception .pth "
                f"(pt_inception-2015-12-05) or unset it to use the random-CNN features"
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.path = path
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
        )

    def describe(self) -> str:
        return f"inception-v3-compat (torch-fidelity) pool3 2048-d from {self.path.name}, input resized to 299px"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(x.shape[0], -1)


def feature_net_name(inception_weights: str | None) -> str:
    """The short name of the feature network, which goes into every metric name (fid_<name>, kid_<name>_mean)."""
    return "inception" if inception_weights else "randcnn"


def build_feature_net(inception_weights: str | None, randcnn_seed: int = 0) -> tuple[nn.Module, str]:
    """The feature network and its short name."""
    if inception_weights:
        return InceptionFeatures(inception_weights), feature_net_name(inception_weights)
    return RandomCNNFeatures(seed=randcnn_seed), feature_net_name(inception_weights)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images → uint8 [0, 255]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def fid_kid(
    real_batches: Iterable[torch.Tensor],
    fake_batches: Iterable[torch.Tensor],
    net: nn.Module,
    name: str,
    kid_subset_size: int = 100,
    kid_subsets: int = 50,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, Any]]:
    """FID and KID between uint8 image batches; returns (metrics, provenance)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    reals = [b.cpu() for b in real_batches]
    fakes = [b.cpu() for b in fake_batches]
    n_real, n_fake = sum(len(b) for b in reals), sum(len(b) for b in fakes)
    if n_real < 2 or n_fake < 2:
        raise ValueError(f"FID needs at least 2 real and 2 generated images, got {n_real} and {n_fake}")
    subset = min(kid_subset_size, n_real, n_fake)
    # sync_on_compute=False: rank 0 evaluates alone; a cross-rank gather here would wait forever for the others
    fid = FrechetInceptionDistance(feature=net, normalize=False, reset_real_features=True, sync_on_compute=False)
    with warnings.catch_warnings():  # "will save all extracted features": intended, the sets are small
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(
            feature=net, normalize=False, subsets=kid_subsets, subset_size=subset, sync_on_compute=False
        )
    for b in reals:
        fid.update(b, real=True)
        kid.update(b, real=True)
    for b in fakes:
        fid.update(b, real=False)
        kid.update(b, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # KID's subsets are drawn from the global RNG
        kid_mean, kid_std = kid.compute()
    metrics = {
        f"fid_{name}": float(fid.compute()),
        f"kid_{name}_mean": float(kid_mean),
        f"kid_{name}_std": float(kid_std),
    }
    import torchmetrics

    provenance = {
        "implementation": f"torchmetrics {torchmetrics.__version__} FrechetInceptionDistance/KernelInceptionDistance",
        "feature_extractor": net.describe() if hasattr(net, "describe") else type(net).__name__,
        "n_real": n_real,
        "n_fake": n_fake,
        "kid_subset_size": subset,
        "kid_subsets": kid_subsets,
    }
    return metrics, provenance
