"""The one place that turns `model.arch` into networks: the loop, the metrics and sampling all build G and D here.

Each backbone registers its synthesis network, its discriminator trunk, its own adversarial loss and how it is
initialised; `build_generator` adds the mapping network (StyleGAN2's own, or a small MLP so that DCGAN/SNGAN can be
style-quantized) and the style quantizer, `build_discriminator` the feature quantizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sqgan.config import Params
from sqgan.models.base import Discriminator, Generator
from sqgan.models.biggan import BigGANSynthesis, BigGANTrunk
from sqgan.models.dcgan import DCGANSynthesis, DCGANTrunk, dcgan_init_
from sqgan.models.fastgan import FastGANSynthesis, FastGANTrunk
from sqgan.models.sngan import SNGANSynthesis, SNGANTrunk
from sqgan.models.stylegan2 import DiscriminatorTrunk, MappingNetwork, SynthesisNetwork
from sqgan.quant.sq import StyleQuantizer


@dataclass(frozen=True)
class Backbone:
    synthesis: Callable[[Params, int], nn.Module]  # (params, latent/w dim) → synthesis network
    trunk: Callable[[Params], nn.Module]
    loss: str  # the adversarial loss its paper trains with (train.loss: auto)
    d_init: Callable[[nn.Module], None] | None = None  # applied to D's trunk after the quantizers are made


def _dcgan_synthesis(p: Params, latent: int) -> nn.Module:
    return DCGANSynthesis(latent, p.model.resolution, p.model.g_channels)


def _dcgan_trunk(p: Params) -> nn.Module:
    return DCGANTrunk(p.model.resolution, p.model.d_channels, p.model.mbstd_group_size, mbstd_channels(p),
                      in_channels=3 * p.model.pack)


def mbstd_channels(p: Params) -> int:
    """model.mbstd_num_channels, unset resolved per backbone: 1 for StyleGAN2 (config F), 0 (none) otherwise."""
    if p.model.mbstd_num_channels is not None:
        return p.model.mbstd_num_channels
    return 1 if p.model.arch == "stylegan2" else 0


def _sngan_synthesis(p: Params, latent: int) -> nn.Module:
    return SNGANSynthesis(latent, p.model.resolution, p.model.g_channels)


def _sngan_trunk(p: Params) -> nn.Module:
    if mbstd_channels(p):
        raise ValueError("model.mbstd_num_channels: the SNGAN discriminator has no minibatch-stddev layer; unset it "
                         "or use model.arch dcgan or stylegan2")
    return SNGANTrunk(p.model.resolution, p.model.d_channels, in_channels=3 * p.model.pack)


def _stylegan2_synthesis(p: Params, latent: int) -> nn.Module:
    return SynthesisNetwork(latent, p.model.resolution, channel_base=p.model.channel_base,
                            channel_max=p.model.channel_max, conv_clamp=p.model.conv_clamp)


def _stylegan2_trunk(p: Params) -> nn.Module:
    m = p.model
    return DiscriminatorTrunk(m.resolution, channel_base=m.channel_base, channel_max=m.channel_max,
                              mbstd_group_size=m.mbstd_group_size, mbstd_num_channels=mbstd_channels(p),
                              img_channels=3 * m.pack, conv_clamp=m.conv_clamp)


def _biggan_synthesis(p: Params, latent: int) -> nn.Module:
    return BigGANSynthesis(latent, p.model.resolution, p.model.g_channels, num_classes(p), p.model.shared_dim,
                           p.model.attention)


def _biggan_trunk(p: Params) -> nn.Module:
    if mbstd_channels(p):
        raise ValueError("model.mbstd_num_channels: the BigGAN discriminator has no minibatch-stddev layer; unset it")
    return BigGANTrunk(p.model.resolution, p.model.d_channels, in_channels=3 * p.model.pack,
                       attention=p.model.attention)


def _fastgan_synthesis(p: Params, latent: int) -> nn.Module:
    return FastGANSynthesis(latent, p.model.resolution, p.model.g_channels)


def _fastgan_trunk(p: Params) -> nn.Module:
    if mbstd_channels(p):
        raise ValueError("model.mbstd_num_channels: the FastGAN discriminator has no minibatch-stddev layer; unset it")
    return FastGANTrunk(p.model.resolution, p.model.d_channels, in_channels=3 * p.model.pack)


BACKBONES: dict[str, Backbone] = {
    "dcgan": Backbone(_dcgan_synthesis, _dcgan_trunk, "hinge", dcgan_init_),
    "sngan": Backbone(_sngan_synthesis, _sngan_trunk, "hinge"),
    "stylegan2": Backbone(_stylegan2_synthesis, _stylegan2_trunk, "nonsaturating"),
    "biggan": Backbone(_biggan_synthesis, _biggan_trunk, "hinge"),
    "fastgan": Backbone(_fastgan_synthesis, _fastgan_trunk, "hinge"),
}


class MappingMLP(nn.Module):
    """The small mapping network z → w added to DCGAN/SNGAN so their latent can be style-quantized:
    w = ẑ + f(ẑ), ẑ = z normalised by its second moment (as StyleGAN2's), f = `layers` linear layers with
    LeakyReLU(0.2) between them, the last one zero at init, so w starts as ẑ and f learns what to add (w_dim ≠ z_dim:
    a fixed variance-preserving projection of ẑ instead of ẑ); tracks w_avg.

    Why residual (issue 25): a plain MLP with PyTorch's default init gives w ~7× smaller spread than z and a mean as
    large as that spread. DCGAN's first layer (N(0, 0.02) weights) then sees a faint input, its learned bias — one
    constant 4×4 map — soon outweighs it, and the synthesis ignores w: the demo's 64 samples were one texture (pixel
    diversity 0.07× the reals', one distinct nearest real), with or without quantization, even with f frozen. With
    w = ẑ + f(ẑ) the same run covers the data (0.79×, 26 distinct nearest reals of 64). A variance-preserving init
    of the plain MLP (He, zero bias, linear output) was not enough (0.22×, 2)."""

    def __init__(self, z_dim: int, w_dim: int, layers: int = 2, w_avg_beta: float = 0.995) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"model.mapping_layers must be ≥ 1 for the DCGAN/SNGAN mapping, got {layers}")
        # the skip: ẑ itself, or (w_dim ≠ z_dim) a fixed projection with orthonormal rows/columns scaled so every
        # coordinate of w keeps unit variance
        skip = None
        if w_dim != z_dim:
            q, _ = torch.linalg.qr(torch.randn(max(z_dim, w_dim), min(z_dim, w_dim)))
            skip = (q if w_dim > z_dim else q.t()) * math.sqrt(w_dim / z_dim if w_dim > z_dim else 1.0)
        self.register_buffer("skip", skip)
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(z_dim if i == 0 else w_dim, w_dim))
            if i < layers - 1:
                mods.append(nn.LeakyReLU(0.2))
        nn.init.zeros_(mods[-1].weight)
        nn.init.zeros_(mods[-1].bias)
        self.residual = nn.Sequential(*mods)
        self.w_avg_beta = w_avg_beta
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, update_w_avg: bool = False) -> torch.Tensor:
        z = z * (z.square().mean(1, keepdim=True) + 1e-8).rsqrt()
        w = (z if self.skip is None else z @ self.skip.t()) + self.residual(z)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().float().mean(0).lerp(self.w_avg, self.w_avg_beta))
        return w


def backbone(params: Params) -> Backbone:
    return BACKBONES[params.model.arch]


def adversarial_loss(params: Params) -> str:
    """train.loss, with `auto` resolved to the backbone's own (StyleGAN2: non-saturating; DCGAN/SNGAN: hinge)."""
    return backbone(params).loss if params.train.loss == "auto" else params.train.loss


def r1_gamma(params: Params) -> float:
    """train.r1_gamma, with unset resolved as stylegan2-ada's `auto` config does for StyleGAN2
    (γ = 0.0002 · R² / batch, the total batch of all workers) and to 0 (no R1) for DCGAN/SNGAN."""
    if params.train.r1_gamma is not None:
        return params.train.r1_gamma
    if params.model.arch == "stylegan2":
        return 0.0002 * params.model.resolution**2 / (params.train.batch_size * params.train.workers)
    return 0.0


def lazy_ratios(params: Params) -> tuple[float, float]:
    """(G, D) ratios k/(k+1) of lazy regularisation (StyleGAN2 App. B, stylegan2-ada's `mb_ratio`): a network whose
    regulariser runs every k steps trains at lr·ratio and betas^ratio, so its Adam sees the same averages as if
    every step carried the term. 1 where no lazy term runs."""
    t = params.train
    d = t.r1_every / (t.r1_every + 1) if r1_gamma(params) > 0 and t.r1_every > 1 else 1.0
    pl_on = t.pl_weight > 0 and params.model.arch == "stylegan2"
    g = t.pl_every / (t.pl_every + 1) if pl_on and t.pl_every > 1 else 1.0
    return g, d


def mapping_layers(params: Params) -> int:
    if params.model.mapping_layers is not None:
        return params.model.mapping_layers
    return 8 if params.model.arch == "stylegan2" else 2


def num_classes(params: Params) -> int:
    """The classes G and D are conditioned on: model.num_classes when model.conditional, else 0 (unconditional)."""
    return params.model.num_classes if params.model.conditional else 0


def build_generator(params: Params) -> Generator:
    m, sq = params.model, params.sq
    bb = backbone(params)
    mapping: nn.Module | None = None
    if m.arch == "stylegan2":
        mapping = MappingNetwork(m.z_dim, m.w_dim, num_layers=mapping_layers(params))
    elif sq.enabled:
        mapping = MappingMLP(m.z_dim, m.w_dim, mapping_layers(params))
    w_dim = m.w_dim if mapping is not None else m.z_dim
    quantizer = None
    if sq.enabled:
        quantizer = StyleQuantizer(w_dim, sq.code_dim, sq.codebook_size, sq.commitment, sq.uniformity_t)
    return Generator(bb.synthesis(params, w_dim), m.z_dim, w_dim, mapping=mapping, quantizer=quantizer,
                     num_classes=num_classes(params))


def build_discriminator(params: Params) -> Discriminator:
    fq = params.fq
    bb = backbone(params)
    D = Discriminator(bb.trunk(params), fq.layers if fq.enabled else [], fq.codebook_size, fq.decay, fq.commitment,
                      fq.eps, fq.mode, fq.init, pack=params.model.pack, num_classes=num_classes(params))
    if bb.d_init is not None:  # after the quantizers drew their start, so DCGAN's init stays what it always was
        bb.d_init(D.trunk)
    return D
