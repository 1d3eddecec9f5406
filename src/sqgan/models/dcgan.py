"""DCGAN synthesis network and discriminator trunk (Radford et al., 2016) at 32² or 64² (contract: models/base.py).

G: latent → 4×4 → (ConvTranspose 4/2/1, BN, ReLU)* → conv → tanh.
D: (Conv 4/2/1, LeakyReLU 0.2)* down to 4×4 → linear; block i has `d_channels · 2^i` channels. The factory wraps
the trunk in `models.base.Discriminator` (FQ after any block) and then applies `dcgan_init_` to the whole of it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sqgan.models.stylegan2 import MinibatchStdLayer


def _blocks_for(resolution: int) -> int:
    if resolution not in (32, 64):
        raise ValueError(f"DCGAN supports resolution 32 or 64, got {resolution}")
    return int(math.log2(resolution)) - 2


def dcgan_init_(module: nn.Module) -> None:
    """N(0, 0.02) weights, BN γ ~ N(1, 0.02) (DCGAN §4)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANSynthesis(nn.Module):
    """The DCGAN generator as a synthesis network: one style (num_ws = 1), the latent itself."""

    num_ws = 1

    def __init__(self, latent_dim: int = 128, resolution: int = 32, channels: int = 64) -> None:
        super().__init__()
        n = _blocks_for(resolution)
        self.latent_dim, self.resolution = latent_dim, resolution
        top = channels * 2 ** (n - 1)
        self.fc = nn.Linear(latent_dim, top * 4 * 4)
        self.bn0 = nn.BatchNorm2d(top)
        layers: list[nn.Module] = []
        ch = top
        for _ in range(n):
            out = max(ch // 2, channels)
            layers += [nn.ConvTranspose2d(ch, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(True)]
            ch = out
        self.blocks = nn.Sequential(*layers)
        self.to_rgb = nn.Conv2d(ch, 3, 3, 1, 1)
        dcgan_init_(self)

    def forward(self, ws: torch.Tensor, generator: torch.Generator | None = None,
                noise_mode: str = "random") -> torch.Tensor:
        z = ws[:, 0]
        x = self.fc(z).view(z.shape[0], -1, 4, 4)
        x = torch.relu(self.bn0(x))
        return torch.tanh(self.to_rgb(self.blocks(x)))


class DCGANTrunk(nn.Module):
    """Strided convolutions down to 4×4; the head is one linear layer on the flattened 4×4 map (the features), after
    an optional minibatch-stddev layer (`mbstd_num_channels` > 0; Karras et al. 2018, §3, as StyleGAN2's head)."""

    def __init__(self, resolution: int = 32, channels: int = 64, mbstd_group_size: int = 4,
                 mbstd_num_channels: int = 0, in_channels: int = 3) -> None:
        super().__init__()
        n = _blocks_for(resolution)
        self.resolution = resolution
        self.blocks = nn.ModuleList()
        self.widths: list[int] = []
        ch_in = in_channels
        for i in range(n):
            out = channels * 2**i
            self.blocks.append(nn.Sequential(nn.Conv2d(ch_in, out, 4, 2, 1), nn.LeakyReLU(0.2, True)))
            self.widths.append(out)
            ch_in = out
        self.mbstd = None
        if mbstd_num_channels > 0:
            self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels)
            self.batch_statistics = True  # base.Discriminator passes parts=(reals, fakes): groups never mix them
        self.feature_dim = (ch_in + mbstd_num_channels) * 4 * 4  # the flattened 4×4 map the head scores
        self.fc = nn.Linear(self.feature_dim, 1)

    def head(self, x: torch.Tensor, parts: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mbstd is not None:
            x = self.mbstd(x, parts)
        features = x.flatten(1)
        return self.fc(features).squeeze(1), features
