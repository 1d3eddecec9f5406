"""BigGAN (Brock et al., ICLR 2019) generator and discriminator at 32², 64² or 128², as BigGAN-PyTorch builds them
(FQ-GAN's CIFAR and ImageNet tables train this code), in the two parts `sqgan.models.base` asks of a backbone.

  G (`BigGANSynthesis`): a shared class embedding e = shared(y) (`shared_dim`); z split into one chunk per block plus
      one (hierarchical z): chunk 0 → SN-linear → 4×4 × in₀; each up-block takes y = [e, z_chunk] for its conditional
      BatchNorms — BN without affine, then ·(1 + gain(y)) + bias(y), gain and bias SN-linear
      without bias — as: CBN, ReLU, nearest ×2, conv3×3, CBN, ReLU, conv3×3, plus the shortcut conv1×1(nearest ×2 (x));
      after the blocks BN, ReLU, conv3×3, tanh. Optional self-attention (SAGAN) after the block at `attention` px.
      Unconditional (no classes): the blocks' BNs take the z chunk alone.
  D (`BigGANTrunk`): residual blocks (the first without pre-activation) conv3×3, ReLU, conv3×3, avgpool 2; shortcut
      conv1×1 and avgpool (when the width changes or it downsamples); spectral norm on every weight; the head is ReLU,
      global sum pooling (the features φ) and an SN-linear logit. The projection ⟨embed(y), φ⟩ is `base.Discriminator`'s
      (SN embedding, this trunk says `spectral`). Attention after the block whose output is at `attention` px.

Widths (ch = model.g_channels / d_channels; BigGAN-PyTorch's `G_arch`/`D_arch`):
      32²:  G 4c → 4c → 4c (8, 16, 32);            D 4c, 4c, 4c, 4c (down, down, –, –)
      64²:  G 16c → 16c → 8c → 4c → 2c;           D c, 2c, 4c, 8c, 16c (down ×4, –)
      128²: G 16c → 16c → 8c → 4c → 2c → c;       D c, 2c, 4c, 8c, 16c, 16c (down ×5, –)
Weights start N(0, 0.02) (`G_init`/`D_init` N02, the CIFAR launch script FQ-GAN trains with); BN and SN as torch's
(one power iteration per training forward). The generator's orthogonal regularisation (train.ortho_reg,
`sqgan.losses.regularizers.orthogonal_penalty`) and several D steps per G step (train.d_steps) are the loop's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

G_WIDTHS = {32: ([4, 4, 4], [4, 4, 4]), 64: ([16, 16, 8, 4], [16, 8, 4, 2]),
            128: ([16, 16, 8, 4, 2], [16, 8, 4, 2, 1])}
D_WIDTHS = {32: ([4, 4, 4, 4], [True, True, False, False]), 64: ([1, 2, 4, 8, 16], [True] * 4 + [False]),
            128: ([1, 2, 4, 8, 16, 16], [True] * 5 + [False])}
INIT_STD = 0.02


def check_resolution(resolution: int) -> None:
    if resolution not in G_WIDTHS:
        raise ValueError(f"BigGAN supports resolution 32, 64 or 128, got {resolution}")


def z_slots(resolution: int) -> int:
    """Chunks hierarchical z splits into at `resolution`: one per G block plus the first linear's."""
    check_resolution(resolution)
    return len(G_WIDTHS[resolution][0]) + 1


def _sn(layer: nn.Module) -> nn.Module:
    nn.init.normal_(layer.weight, 0.0, INIT_STD)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return spectral_norm(layer)


def _conv(cin: int, cout: int, k: int = 3) -> nn.Module:
    return _sn(nn.Conv2d(cin, cout, k, 1, k // 2))


class ConditionalBatchNorm(nn.Module):
    """BN without its own affine, then ·(1 + gain(y)) + bias(y): gain and bias SN-linear maps (no bias) of the
    block's conditioning vector y = [shared(class), z_chunk]."""

    def __init__(self, channels: int, cond_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False, eps=eps)
        self.gain, self.bias = _sn(nn.Linear(cond_dim, channels, bias=False)), _sn(nn.Linear(cond_dim, channels,
                                                                                              bias=False))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * (1 + self.gain(y))[:, :, None, None] + self.bias(y)[:, :, None, None]


class SelfAttention(nn.Module):
    """SAGAN's attention: θ, φ (C/8) and g (C/2) 1×1 SN convs without bias, φ and g max-pooled ×2, softmax(θᵀφ) over
    the pooled positions, an SN conv back to C, added with a learned γ that starts at 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c = channels
        self.theta = _sn(nn.Conv2d(channels, channels // 8, 1, bias=False))
        self.phi = _sn(nn.Conv2d(channels, channels // 8, 1, bias=False))
        self.g = _sn(nn.Conv2d(channels, channels // 2, 1, bias=False))
        self.o = _sn(nn.Conv2d(channels // 2, channels, 1, bias=False))
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        theta = self.theta(x).view(b, self.c // 8, h * w)
        phi = F.max_pool2d(self.phi(x), 2).view(b, self.c // 8, h * w // 4)
        g = F.max_pool2d(self.g(x), 2).view(b, self.c // 2, h * w // 4)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=-1)  # [B, HW, HW/4]
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(b, self.c // 2, h, w))
        return x + self.gamma * o


class GBlock(nn.Module):
    """CBN, ReLU, ×2, conv3×3, CBN, ReLU, conv3×3; shortcut ×2 then conv1×1 (then attention when set)."""

    def __init__(self, cin: int, cout: int, cond_dim: int, attention: bool) -> None:
        super().__init__()
        self.bn1, self.bn2 = ConditionalBatchNorm(cin, cond_dim), ConditionalBatchNorm(cout, cond_dim)
        self.conv1, self.conv2 = _conv(cin, cout), _conv(cout, cout)
        self.conv_sc = _conv(cin, cout, 1)
        self.attention = SelfAttention(cout) if attention else None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        out = h + self.conv_sc(F.interpolate(x, scale_factor=2, mode="nearest"))
        return out if self.attention is None else self.attention(out)


class BigGANSynthesis(nn.Module):
    """BigGAN's generator as a synthesis network (`num_ws = 1`) that takes the classes itself (`takes_classes`):
    `forward(ws [B, 1, latent_dim], c=[B])`. latent_dim splits into `z_slots(resolution)` equal chunks."""

    num_ws = 1
    takes_classes = True

    def __init__(self, latent_dim: int = 128, resolution: int = 32, channels: int = 64, num_classes: int = 0,
                 shared_dim: int = 128, attention: int | None = None) -> None:
        super().__init__()
        slots = z_slots(resolution)
        if latent_dim % slots:
            raise ValueError(f"BigGAN at {resolution}px splits z into {slots} chunks: model.z_dim ({latent_dim}) must "
                             f"be a multiple of {slots}")
        self.latent_dim, self.resolution, self.num_classes = latent_dim, resolution, num_classes
        self.chunk = latent_dim // slots
        ins = [m * channels for m in G_WIDTHS[resolution][0]]
        outs = [m * channels for m in G_WIDTHS[resolution][1]]
        sides = [8 * 2**i for i in range(len(ins))]
        self.shared = nn.Embedding(num_classes, shared_dim) if num_classes > 0 else None
        if self.shared is not None:
            nn.init.normal_(self.shared.weight, 0.0, INIT_STD)
        cond = self.chunk + (shared_dim if num_classes > 0 else 0)
        self.linear = _sn(nn.Linear(self.chunk, ins[0] * 16))
        self.blocks = nn.ModuleList(GBlock(a, b, cond, attention == s) for a, b, s in zip(ins, outs, sides,
                                                                                           strict=True))
        self.bn = nn.BatchNorm2d(outs[-1])
        self.to_rgb = _conv(outs[-1], 3)

    def forward(self, ws: torch.Tensor, generator: torch.Generator | None = None, noise_mode: str = "random",
                c: torch.Tensor | None = None) -> torch.Tensor:
        """ws [B, 1, latent_dim] (z, or w with a mapping network), c [B] the classes → images [B, 3, R, R] in [-1, 1].
        No random draws: `generator` and `noise_mode` are accepted for the contract and unused."""
        if ws.dim() != 3 or ws.shape[2] != self.latent_dim:
            raise ValueError(f"BigGANSynthesis expects ws [B, num_ws, {self.latent_dim}], got {list(ws.shape)}")
        if (self.shared is None) != (c is None):
            raise ValueError("BigGANSynthesis: give classes c exactly when it was built with classes")
        zs = ws[:, 0].split(self.chunk, dim=1)
        e = self.shared(c) if self.shared is not None else None
        h = self.linear(zs[0]).view(ws.shape[0], -1, 4, 4)
        for block, z in zip(self.blocks, zs[1:], strict=True):
            h = block(h, z if e is None else torch.cat([e, z], dim=1))  # [shared(y), z_chunk] as BigGAN-PyTorch
        return torch.tanh(self.to_rgb(F.relu(self.bn(h))))


class DBlock(nn.Module):
    """[ReLU,] conv3×3, ReLU, conv3×3, [avgpool 2]; shortcut (width change or down) conv1×1 and avgpool — after the
    conv for pre-activation blocks, before it for the first — then attention when set. Hidden width = output width
    (BigGAN's wide D)."""

    def __init__(self, cin: int, cout: int, down: bool, preactivation: bool, attention: bool) -> None:
        super().__init__()
        self.down, self.preactivation = down, preactivation
        self.conv1, self.conv2 = _conv(cin, cout), _conv(cout, cout)
        self.conv_sc = _conv(cin, cout, 1) if (cin != cout or down) else None
        self.attention = SelfAttention(cout) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.down:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.preactivation:
            s = self.conv_sc(s) if self.conv_sc is not None else s
            s = F.avg_pool2d(s, 2) if self.down else s
        else:
            s = F.avg_pool2d(s, 2) if self.down else s
            s = self.conv_sc(s) if self.conv_sc is not None else s
        out = h + s
        return out if self.attention is None else self.attention(out)


class BigGANTrunk(nn.Module):
    """BigGAN's discriminator as a trunk (base.py contract): `blocks`, `widths`, `feature_dim`, `head`; `spectral`.

    Args:
        resolution: 32, 64 or 128.
        channels: ch (BigGAN's D_ch; CIFAR 64).
        in_channels: image channels (3; 3·m when D packs m samples).
        attention: the side (px) of the block output attention follows; None = none.
    """

    spectral = True

    def __init__(self, resolution: int = 32, channels: int = 64, in_channels: int = 3,
                 attention: int | None = None) -> None:
        super().__init__()
        check_resolution(resolution)
        mults, downs = D_WIDTHS[resolution]
        self.widths = [m * channels for m in mults]
        side, blocks, cin, attended = resolution, [], in_channels, False
        for i, (cout, down) in enumerate(zip(self.widths, downs, strict=True)):
            side //= 2 if down else 1
            here = attention == side and not attended  # after the first block that outputs that side
            attended |= here
            blocks.append(DBlock(cin, cout, down, preactivation=i > 0, attention=here))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = self.widths[-1]
        self.fc = _sn(nn.Linear(self.feature_dim, 1))

    def head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ReLU, global sum pooling → features [B, F]; SN-linear → logits [B]."""
        features = F.relu(x).sum(dim=(2, 3))
        return self.fc(features).squeeze(1), features

