"""DCGAN generator and discriminator (Radford et al., 2016) at 32² or 64², with FQ in D.

G: z → 4×4 → (ConvTranspose 4/2/1, BN, ReLU)* → conv → tanh.
D: (Conv 4/2/1, LeakyReLU 0.2)* down to 4×4 → linear. A `FeatureQuantizer` may follow any block
(FQ-GAN quantizes several of D's layers); block i has `d_channels · 2^i` channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from sqgan.quant.fq import FeatureQuantizer, QuantizerOutput


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


class Generator(nn.Module):
    def __init__(self, z_dim: int = 128, resolution: int = 32, channels: int = 64) -> None:
        super().__init__()
        n = _blocks_for(resolution)
        self.z_dim, self.resolution = z_dim, resolution
        top = channels * 2 ** (n - 1)
        self.fc = nn.Linear(z_dim, top * 4 * 4)
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

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], -1, 4, 4)
        x = torch.relu(self.bn0(x))
        return torch.tanh(self.to_rgb(self.blocks(x)))


@dataclass
class DiscriminatorOutput:
    logits: torch.Tensor  # [B]
    fq_loss: torch.Tensor  # Σ over quantized layers of the commitment loss (0 when FQ is off)
    fq: dict[int, QuantizerOutput] = field(default_factory=dict)  # per quantized block


class Discriminator(nn.Module):
    def __init__(
        self,
        resolution: int = 32,
        channels: int = 64,
        fq_layers: list[int] | None = None,
        codebook_size: int = 64,
        decay: float = 0.9,
        commitment: float = 0.25,
        eps: float = 1e-5,
        mode: str = "feed",
        init: str = "batch",
    ) -> None:
        super().__init__()
        n = _blocks_for(resolution)
        self.resolution = resolution
        self.blocks = nn.ModuleList()
        self.widths = []
        ch_in = 3
        for i in range(n):
            out = channels * 2**i
            self.blocks.append(nn.Sequential(nn.Conv2d(ch_in, out, 4, 2, 1), nn.LeakyReLU(0.2, True)))
            self.widths.append(out)
            ch_in = out
        self.fc = nn.Linear(ch_in * 4 * 4, 1)
        fq_layers = list(fq_layers or [])
        bad = [i for i in fq_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"fq layers {bad} do not exist: the {resolution}px discriminator has blocks 0..{n - 1}")
        self.quantizers = nn.ModuleDict(
            {
                str(i): FeatureQuantizer(self.widths[i], codebook_size, decay, commitment, eps, mode, init)
                for i in fq_layers
            }
        )
        dcgan_init_(self)

    def forward(self, x: torch.Tensor, feed: bool = True) -> DiscriminatorOutput:
        """`feed=False` passes h on even in feed mode (the warm-up that feeds h before h′)."""
        fq: dict[int, QuantizerOutput] = {}
        loss = x.new_zeros(())
        for i, block in enumerate(self.blocks):
            x = block(x)
            q = self.quantizers[str(i)] if str(i) in self.quantizers else None
            if q is not None:
                out = q(x)
                fq[i] = out
                loss = loss + out.loss
                if q.feeds and feed:
                    x = out.quantized
        return DiscriminatorOutput(self.fc(x.flatten(1)).squeeze(1), loss, fq)
