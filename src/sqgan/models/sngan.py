"""SNGAN ResNet generator and discriminator (Miyato et al., ICLR 2018, appendix: ResNets) at 32² or 64².

The paper's CIFAR-10 (32²) ResNets and the 64² ResNets of its official code (pfnet-research/sngan_projection
`snresnet_64`, also Mimicry's SNGAN64), in the two parts `sqgan.models.base` asks of a backbone:

  G (`SNGANSynthesis`): z → linear → 4×4 → up-blocks → BN, ReLU, conv3×3 → tanh; an up-block is
      BN, ReLU, nearest ×2, conv3×3, BN, ReLU, conv3×3, plus the shortcut conv1×1(nearest ×2 (x)).
      32²: 3 blocks of `channels` (paper 256);  64²: 4 blocks 16c → 8c → 4c → 2c → c (c = 64 gives 1024 → 64).
  D (`SNGANTrunk`): an optimised first block, then residual blocks with spectral norm W/σ(W) on every weight,
      ReLU, global sum pooling, SN-linear → logit.
      32²: 4 blocks of `channels` (paper 128), down, down, –, – (32 → 16 → 8 → 8 → 8);
      64²: 5 blocks c → 2c → 4c → 8c → 16c, all down (64 → 32 → 16 → 8 → 4 → 2).

`channels` follows the config's meaning: the width of G's last block and of D's first block.
Weights are Xavier-uniform as the official (Chainer) code: gain √2 for the residual convs, 1 for the shortcut
convs, the linears and G's output conv; biases 0.

Spectral norm is torch's parametrization: one power iteration per forward in training mode, updating the `_u`/`_v`
buffers in place (no update in eval mode). Those buffers start from the global RNG when the module is built
(then 15 iterations), so two trunks built after the same `torch.manual_seed` are identical, and they are in the
state_dict, so a resumed run continues the same iteration.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from sqgan.config import d_blocks

_GAIN_RESIDUAL = math.sqrt(2.0)  # official code: GlorotUniform(sqrt(2)) for the convs that ReLUs follow


def _check_resolution(resolution: int) -> None:
    if resolution not in (32, 64):
        raise ValueError(f"SNGAN supports resolution 32 or 64, got {resolution}")


def trunk_blocks(resolution: int) -> int:
    """Blocks of the SNGAN discriminator trunk at `resolution` (what fq.layers may name): 4 at 32², 5 at 64²."""
    return d_blocks("sngan", resolution)  # raises for a resolution other than 32 or 64


def _init(layer: nn.Conv2d | nn.Linear, gain: float) -> nn.Conv2d | nn.Linear:
    nn.init.xavier_uniform_(layer.weight, gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _sn(layer: nn.Conv2d | nn.Linear, gain: float) -> nn.Module:
    # Initialise first: the parametrization then normalises (and power-iterates on) the initialised weight.
    return spectral_norm(_init(layer, gain))


class _GBlock(nn.Module):
    """Up-block: BN, ReLU, nearest ×2, conv3×3, BN, ReLU, conv3×3; shortcut nearest ×2 then conv1×1."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = _init(nn.Conv2d(cin, cout, 3, 1, 1), _GAIN_RESIDUAL)
        self.conv2 = _init(nn.Conv2d(cout, cout, 3, 1, 1), _GAIN_RESIDUAL)
        self.shortcut = _init(nn.Conv2d(cin, cout, 1), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        # A 1×1 conv commutes with nearest upsampling, so convolve the 4× smaller map (same result, cheaper).
        return h + F.interpolate(self.shortcut(x), scale_factor=2, mode="nearest")


class _DBlock(nn.Module):
    """Residual D block: ReLU, conv3×3, ReLU, conv3×3, [avgpool 2]; shortcut conv1×1, [avgpool 2] when the
    width changes or it downsamples, identity otherwise. Hidden width = input width (official code)."""

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv1 = _sn(nn.Conv2d(cin, cin, 3, 1, 1), _GAIN_RESIDUAL)
        self.conv2 = _sn(nn.Conv2d(cin, cout, 3, 1, 1), _GAIN_RESIDUAL)
        self.shortcut = _sn(nn.Conv2d(cin, cout, 1), 1.0) if (cin != cout or down) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(F.relu(x))))  # not in-place: x is still needed by the shortcut
        s = x if self.shortcut is None else self.shortcut(x)
        if self.down:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class _DBlockOptimized(nn.Module):
    """First D block (no ReLU on the image): conv3×3, ReLU, conv3×3, avgpool 2; shortcut avgpool 2, conv1×1."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _sn(nn.Conv2d(cin, cout, 3, 1, 1), _GAIN_RESIDUAL)
        self.conv2 = _sn(nn.Conv2d(cout, cout, 3, 1, 1), _GAIN_RESIDUAL)
        self.shortcut = _sn(nn.Conv2d(cin, cout, 1), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(self.conv2(F.relu(self.conv1(x))), 2)
        return h + self.shortcut(F.avg_pool2d(x, 2))


class SNGANSynthesis(nn.Module):
    """SNGAN's ResNet generator as a synthesis network (base.py contract, `num_ws = 1`).

    Args:
        latent_dim: size of z (= w; the paper uses 128).
        resolution: 32 or 64.
        channels: width of the last up-block; None gives the paper's (256 at 32², 64 at 64²).
    """

    num_ws = 1

    def __init__(self, latent_dim: int = 128, resolution: int = 32, channels: int | None = None) -> None:
        super().__init__()
        _check_resolution(resolution)
        if channels is None:
            channels = 256 if resolution == 32 else 64
        self.latent_dim, self.resolution, self.channels = latent_dim, resolution, channels
        widths = [channels] * 4 if resolution == 32 else [channels * 2**i for i in range(4, -1, -1)]
        self.fc = _init(nn.Linear(latent_dim, widths[0] * 4 * 4), 1.0)
        self.blocks = nn.ModuleList(_GBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.bn = nn.BatchNorm2d(widths[-1])
        self.to_rgb = _init(nn.Conv2d(widths[-1], 3, 3, 1, 1), 1.0)

    def forward(self, ws: torch.Tensor, generator: torch.Generator | None = None,
                noise_mode: str = "random") -> torch.Tensor:
        """ws [B, 1, latent_dim] → images [B, 3, R, R] in [-1, 1]. No random draws: `generator` and `noise_mode`
        are accepted for the contract and unused."""
        if ws.dim() != 3 or ws.shape[2] != self.latent_dim:
            raise ValueError(f"SNGANSynthesis expects ws [B, num_ws, {self.latent_dim}], got {list(ws.shape)}")
        x = self.fc(ws[:, 0]).view(ws.shape[0], -1, 4, 4)
        for block in self.blocks:
            x = block(x)
        return torch.tanh(self.to_rgb(F.relu(self.bn(x))))


class SNGANTrunk(nn.Module):
    """SNGAN's ResNet discriminator as a trunk (base.py contract): `blocks`, `widths`, `head`.

    Args:
        resolution: 32 or 64.
        channels: width of the first block; None gives the paper's (128 at 32², 64 at 64²).
        in_channels: image channels (3; 3·m when D packs m samples).
    """

    def __init__(self, resolution: int = 32, channels: int | None = None, in_channels: int = 3) -> None:
        super().__init__()
        _check_resolution(resolution)
        if channels is None:
            channels = 128 if resolution == 32 else 64
        self.resolution, self.channels = resolution, channels
        n = trunk_blocks(resolution)
        if resolution == 32:
            self.widths = [channels] * n
            downs = [True, True, False, False]
        else:
            self.widths = [channels * 2**i for i in range(n)]
            downs = [True] * n
        blocks: list[nn.Module] = [_DBlockOptimized(in_channels, self.widths[0])]
        for i in range(1, len(self.widths)):
            blocks.append(_DBlock(self.widths[i - 1], self.widths[i], downs[i]))
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = self.widths[-1]
        self.fc = _sn(nn.Linear(self.widths[-1], 1), 1.0)

    spectral = True  # every weight spectrally normalised: a conditional D's projection embedding is too

    def head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ReLU, global sum pooling (the paper's, not a mean) → features [B, F]; SN-linear → logits [B]."""
        features = F.relu(x).sum(dim=(2, 3))
        return self.fc(features).squeeze(1), features
