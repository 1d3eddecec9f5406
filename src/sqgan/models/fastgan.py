"""FastGAN (Liu et al., ICLR 2021, "Towards faster and stabilized GAN training for high-fidelity few-shot image
synthesis") at 256², 512² or 1024², the other backbone of MixDL's Table 1, in the parts `sqgan.models.base` asks of a
backbone. Widths as the official code: nfc(r) = ngf · {4: 16, 8: 8, 16: 4, 32: 2, 64: 2, 128: 1, 256: ½, 512: ¼,
1024: ⅛}[r] in G, ndf · {…, 8: 16, 16: 8, 32: 4, 64: 2, 128: 1, 256: ½, 512: ¼, 1024: ⅛}[r] in D; every conv
spectrally normalised; weights N(0, 0.02), BN gains N(1, 0.02).

  G (`FastGANSynthesis`): z → ConvTranspose 4×4 → BN → GLU (4²); up-blocks ×2 to R, alternately "comp" (×2, conv3×3,
      noise, BN, GLU, conv3×3, noise, BN, GLU: at 8, 32, 128, 512) and plain (×2, conv3×3, BN, GLU); skip-layer
      excitation (SLE) gates the 64², 128², 256² and 512² maps channel-wise by the 4², 8², 16² and 32² maps
      (AdaptiveAvgPool 4 → conv4×4 → Swish → conv1×1 → sigmoid); conv3×3 → RGB (linear at 256/512, tanh at 1024, as
      the official code). Noise inputs come from the step's generator (noise_mode "const": fixed buffers).
  D (`FastGANTrunk`): `blocks` bring the image to 256² (conv3×3 at 256; stride-2 convs at 512/1024) and halve it five
      times (down-block: conv4×4/2, BN, LReLU, conv3×3, BN, LReLU, averaged with avgpool → conv1×1 → BN → LReLU); the
      32², 16² and 8² maps are gated by SLE from the 256², 128² and 64² ones (`skips`). The head judges the 8² map
      (conv1×1, BN, LReLU, conv4×4 → 5×5 patch logits) and a 128² copy of the image through its own small branch
      (→ 8², conv4×4 → 5×5): 50 logits per image. Its three decoders (AdaptiveAvgPool 8, four ×2 up-blocks, conv3×3,
      tanh → 128²) rebuild a real image from the 8² map, from the small branch's map and a random quadrant of it from
      the matching quadrant of the 16² map: `reconstruction_loss` (LPIPS, summed over the batch, as the official
      `percept(...).sum()`), D's self-supervision on reals.

Where sqgan differs from the official code, for one G/D contract across backbones: D's small branch sees the real or
generated image resized to 128² (nearest, as the official code resizes reals) — the official G renders a second 128²
image for it from its 128² map (to_128), which G here does not have; the hinge margin is 1 (official: U(0.8, 1) per
logit); the decoders' widths scale with ndf (32·{16: 4, 32: 2, 64: 2, 128: 1} at the official ndf 64); LPIPS is
sqgan's (metrics.lpips_backbone/weights: with ImageNet weights the official perceptual loss's network family, offline a
fixed random backbone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

RESOLUTIONS = (256, 512, 1024)
G_MULT = {4: 16, 8: 8, 16: 4, 32: 2, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}
D_MULT = {4: 16, 8: 16, 16: 8, 32: 4, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}
DEC_MULT = {16: 4, 32: 2, 64: 2, 128: 1}
D_SIDES = [256, 128, 64, 32, 16, 8]  # output side of each trunk block at every resolution
INIT_STD = 0.02


def check_resolution(resolution: int) -> None:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"FastGAN supports resolution 256, 512 or 1024, got {resolution}")


def _nfc(mult: dict[int, float], base: int) -> dict[int, int]:
    return {k: max(1, int(v * base)) for k, v in mult.items()}


def _sn(layer: nn.Module) -> nn.Module:
    nn.init.normal_(layer.weight, 0.0, INIT_STD)
    return spectral_norm(layer)


def _conv(cin: int, cout: int, k: int, s: int = 1, p: int = 0) -> nn.Module:
    return _sn(nn.Conv2d(cin, cout, k, s, p, bias=False))


def _bn(c: int, cls: type[nn.BatchNorm2d] = nn.BatchNorm2d) -> nn.BatchNorm2d:
    bn = cls(c)
    nn.init.normal_(bn.weight, 1.0, INIT_STD)
    nn.init.zeros_(bn.bias)
    return bn


class PartBatchNorm2d(nn.BatchNorm2d):
    """D's BatchNorm, whose batch statistics (in training) stay within each part of the batch: `parts`, the sizes of
    the reals and the fakes that one D call judges together (set by `FastGANTrunk.batch_parts`). The official code
    judges them in two calls, so reals are normalised among reals and fakes among fakes, as in G's step, where D sees
    fakes alone. Normalised over the joint batch instead, D learns to tell fakes by where they sit relative to the
    reals, which the fakes-only batch of G's step normalises away: G got no usable gradient (grey or off-colour
    backgrounds that never became the data's). The running statistics update once per part, as two calls would."""

    parts: tuple[int, ...] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parts is None or len(self.parts) < 2 or not self.training:
            return super().forward(x)
        return torch.cat([nn.BatchNorm2d.forward(self, chunk) for chunk in x.split(list(self.parts))])


class GLU(nn.Module):
    """The first half of the channels gated by the sigmoid of the second."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * torch.sigmoid(b)


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class SkipLayerExcitation(nn.Module):
    """SLE: big · sigmoid(conv1×1(Swish(conv4×4(AdaptiveAvgPool4(small))))), a channel gate from a far lower map."""

    def __init__(self, ch_small: int, ch_big: int) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.AdaptiveAvgPool2d(4), _conv(ch_small, ch_big, 4), Swish(),
                                  _conv(ch_big, ch_big, 1), nn.Sigmoid())

    def forward(self, small: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
        return big * self.main(small)


class NoiseInjection(nn.Module):
    """x + weight · noise (weight 0 at init), noise [B, 1, H, W] from `generator`, or a fixed buffer ("const")."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.register_buffer("noise_const", torch.randn(1, 1, side, side))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None, noise_mode: str) -> torch.Tensor:
        if noise_mode == "const":
            noise = self.noise_const
        else:
            noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], generator=generator, device=x.device,
                                dtype=x.dtype)
        return x + self.weight * noise


class UpBlock(nn.Module):
    """×2 (nearest), conv3×3 → 2·out, [noise,] BN, GLU; "comp": then conv3×3 → 2·out, noise, BN, GLU once more."""

    def __init__(self, cin: int, cout: int, side: int, comp: bool) -> None:
        super().__init__()
        self.comp = comp
        self.conv1, self.bn1 = _conv(cin, 2 * cout, 3, 1, 1), _bn(2 * cout)
        self.noise1 = NoiseInjection(side) if comp else None
        if comp:
            self.conv2, self.bn2, self.noise2 = _conv(cout, 2 * cout, 3, 1, 1), _bn(2 * cout), NoiseInjection(side)
        self.glu = GLU()

    def forward(self, x: torch.Tensor, generator: torch.Generator | None, noise_mode: str) -> torch.Tensor:
        h = self.conv1(F.interpolate(x, scale_factor=2, mode="nearest"))
        if self.noise1 is not None:
            h = self.noise1(h, generator, noise_mode)
        h = self.glu(self.bn1(h))
        if self.comp:
            h = self.glu(self.bn2(self.noise2(self.conv2(h), generator, noise_mode)))
        return h


class FastGANSynthesis(nn.Module):
    """FastGAN's generator as a synthesis network (`num_ws = 1`): ws [B, 1, latent_dim] → [B, 3, R, R]."""

    num_ws = 1

    def __init__(self, latent_dim: int = 256, resolution: int = 256, channels: int = 64) -> None:
        super().__init__()
        check_resolution(resolution)
        self.latent_dim, self.resolution = latent_dim, resolution
        nfc = _nfc(G_MULT, channels)
        self.init = nn.Sequential(_sn(nn.ConvTranspose2d(latent_dim, 2 * nfc[4], 4, 1, 0, bias=False)),
                                  _bn(2 * nfc[4]), GLU())
        sides = [s for s in (8, 16, 32, 64, 128, 256, 512, 1024) if s <= resolution]
        self.sides = sides
        self.blocks = nn.ModuleList(UpBlock(nfc[s // 2], nfc[s], s, comp=s in (8, 32, 128, 512)) for s in sides)
        # SLE: the 64/128/256/512 maps gated by the 4/8/16/32 ones (none at 1024, as the official)
        self.sle = nn.ModuleDict({str(s): SkipLayerExcitation(nfc[s // 16], nfc[s]) for s in sides
                                  if s in (64, 128, 256, 512)})
        self.to_rgb = _conv(nfc[resolution], 3, 3, 1, 1)

    def forward(self, ws: torch.Tensor, generator: torch.Generator | None = None,
                noise_mode: str = "random") -> torch.Tensor:
        if ws.dim() != 3 or ws.shape[2] != self.latent_dim:
            raise ValueError(f"FastGANSynthesis expects ws [B, num_ws, {self.latent_dim}], got {list(ws.shape)}")
        feats = {4: self.init(ws[:, 0, :, None, None])}
        x = feats[4]
        for side, up in zip(self.sides, self.blocks, strict=True):
            x = up(x, generator, noise_mode)
            if str(side) in self.sle:
                x = self.sle[str(side)](feats[side // 16], x)
            feats[side] = x
        img = self.to_rgb(x)
        return torch.tanh(img) if self.resolution == 1024 else img


class DownBlock(nn.Module):
    """conv4×4/2, BN, LReLU (the small branch's)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.main = nn.Sequential(_conv(cin, cout, 4, 2, 1), _bn(cout, PartBatchNorm2d), nn.LeakyReLU(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class DownBlockComp(nn.Module):
    """(conv4×4/2, BN, LReLU, conv3×3, BN, LReLU) + (avgpool 2, conv1×1, BN, LReLU), halved; then SLE from a map of 8×
    the side when `sle_from` channels are given (`forward(x, skip)`)."""

    def __init__(self, cin: int, cout: int, sle_from: int | None = None) -> None:
        super().__init__()
        self.main = nn.Sequential(_conv(cin, cout, 4, 2, 1), _bn(cout, PartBatchNorm2d), nn.LeakyReLU(0.2),
                                  _conv(cout, cout, 3, 1, 1), _bn(cout, PartBatchNorm2d), nn.LeakyReLU(0.2))
        self.direct = nn.Sequential(nn.AvgPool2d(2), _conv(cin, cout, 1), _bn(cout, PartBatchNorm2d),
                                    nn.LeakyReLU(0.2))
        self.sle = SkipLayerExcitation(sle_from, cout) if sle_from is not None else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        h = (self.main(x) + self.direct(x)) / 2
        return h if self.sle is None else self.sle(skip, h)


class SimpleDecoder(nn.Module):
    """AdaptiveAvgPool 8, four ×2 up-blocks (conv3×3 → 2·out, BN, GLU), conv3×3 → RGB, tanh: an 8² map → 128²."""

    def __init__(self, cin: int, base: int) -> None:
        super().__init__()
        nfc = _nfc(DEC_MULT, base)
        chans = [cin, nfc[16], nfc[32], nfc[64], nfc[128]]
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(8)]
        for a, b in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(a, 2 * b, 3, 1, 1), _bn(2 * b), GLU()]
        layers += [_conv(chans[-1], 3, 3, 1, 1), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class FastGANTrunk(nn.Module):
    """FastGAN's discriminator as a trunk: `blocks` (6, sides `sides`), `skips` (block → the earlier block whose
    output gates it by SLE), `widths`, `feature_dim`, and `head(x, image=…, maps=…)` → (patch logits [B, 50],
    features [B, F] (the 8² map summed over positions), aux {"small": small-branch map, "maps": block outputs})."""

    head_takes_input = True

    def __init__(self, resolution: int = 256, channels: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        check_resolution(resolution)
        nfc = _nfc(D_MULT, channels)
        if resolution == 256:
            first: nn.Module = nn.Sequential(_conv(in_channels, nfc[512], 3, 1, 1), nn.LeakyReLU(0.2))
        elif resolution == 512:
            first = nn.Sequential(_conv(in_channels, nfc[512], 4, 2, 1), nn.LeakyReLU(0.2))
        else:
            first = nn.Sequential(_conv(in_channels, nfc[1024], 4, 2, 1), nn.LeakyReLU(0.2),
                                  _conv(nfc[1024], nfc[512], 4, 2, 1), _bn(nfc[512], PartBatchNorm2d),
                                  nn.LeakyReLU(0.2))
        self.widths = [nfc[512], nfc[256], nfc[128], nfc[64], nfc[32], nfc[16]]
        self.sides = list(D_SIDES)
        self.skips = {3: 0, 4: 1, 5: 2}  # the 32², 16², 8² maps gated by the 256², 128², 64² ones
        w = self.widths
        self.blocks = nn.ModuleList([first, DownBlockComp(w[0], w[1]), DownBlockComp(w[1], w[2]),
                                     DownBlockComp(w[2], w[3], w[0]), DownBlockComp(w[3], w[4], w[1]),
                                     DownBlockComp(w[4], w[5], w[2])])
        self.rf_big = nn.Sequential(_conv(w[5], nfc[8], 1), _bn(nfc[8], PartBatchNorm2d), nn.LeakyReLU(0.2),
                                    _conv(nfc[8], 1, 4))
        self.small = nn.Sequential(_conv(in_channels, nfc[256], 4, 2, 1), nn.LeakyReLU(0.2),
                                   DownBlock(nfc[256], nfc[128]), DownBlock(nfc[128], nfc[64]),
                                   DownBlock(nfc[64], nfc[32]))
        self.rf_small = _conv(nfc[32], 1, 4)
        base = max(1, channels // 2)
        self.decoder_big, self.decoder_small = SimpleDecoder(w[5], base), SimpleDecoder(nfc[32], base)
        self.decoder_part = SimpleDecoder(w[4], base)
        self.feature_dim = w[5]

    @contextlib.contextmanager
    def batch_parts(self, parts: tuple[int, ...] | None) -> Iterator[None]:
        """Within this block, D's BatchNorms keep their statistics within each part (reals, fakes) of the batch."""
        norms = [m for m in self.modules() if isinstance(m, PartBatchNorm2d)]
        for m in norms:
            m.parts = parts
        try:
            yield
        finally:
            for m in norms:
                m.parts = None

    def head(self, x: torch.Tensor, image: torch.Tensor, maps: list[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        small = self.small(F.interpolate(image, size=128, mode="nearest"))
        logits = torch.cat([self.rf_big(x).flatten(1), self.rf_small(small).flatten(1)], dim=1)
        return logits, x.sum(dim=(2, 3)), {"small": small, "maps": maps}

    def reconstructions(self, aux: dict, n: int, part: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(whole, small, quadrant `part`) 128² rebuilds of the first n images of the batch D judged."""
        maps = aux["maps"]
        last, mid = maps[5][:n], maps[4][:n]  # the 8² and 16² maps
        h = mid.shape[2] // 2
        quad = [mid[:, :, :h, :h], mid[:, :, :h, h:], mid[:, :, h:, :h], mid[:, :, h:, h:]][part]
        return self.decoder_big(last), self.decoder_small(aux["small"][:n]), self.decoder_part(quad)


def crop_part(images: torch.Tensor, part: int) -> torch.Tensor:
    """Quadrant `part` (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of images [B, C, H, W]."""
    h = images.shape[2] // 2
    return [images[:, :, :h, :h], images[:, :, :h, h:], images[:, :, h:, :h], images[:, :, h:, h:]][part]


def reconstruction_loss(trunk: FastGANTrunk, aux: dict, real: torch.Tensor, part: int,
                        lpips: nn.Module) -> torch.Tensor:
    """FastGAN's self-supervision of D on reals: Σ over the batch of LPIPS(decoder(map), real at 128²) for the whole
    image from the 8² map, the small branch's, and quadrant `part` from the 16² map's quadrant."""
    whole, small, quad = trunk.reconstructions(aux, real.shape[0], part)
    target = F.interpolate(real, size=whole.shape[2], mode="nearest")
    target_part = F.interpolate(crop_part(real, part), size=quad.shape[2], mode="nearest")
    return (lpips(whole, target).sum() + lpips(small, target).sum() + lpips(quad, target_part).sum())
