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


@dataclass(frozen=True)
class Backbone:
    synthesis: Callable[[Params, int], nn.Module]  # (params, latent/w dim) → synthesis network
    trunk: Callable[[Params], nn.Module]
    loss: str  # the adversarial loss its paper trains with (train.loss: auto)
    d_init: Callable[[nn.Module], None] | None = None  # applied to D's trunk after the quantizers are made


def _dcgan_synthesis(p: Params, latent: int) -> nn.Module:
    from sqgan.models.dcgan import DCGANSynthesis

    return DCGANSynthesis(latent, p.model.resolution, p.model.g_channels)


def _dcgan_trunk(p: Params) -> nn.Module:
    from sqgan.models.dcgan import DCGANTrunk

    return DCGANTrunk(p.model.resolution, p.model.d_channels)


def _dcgan_init(m: nn.Module) -> None:
    from sqgan.models.dcgan import dcgan_init_

    dcgan_init_(m)


def _sngan_synthesis(p: Params, latent: int) -> nn.Module:
    from sqgan.models.sngan import SNGANSynthesis

    return SNGANSynthesis(latent, p.model.resolution, p.model.g_channels)


def _sngan_trunk(p: Params) -> nn.Module:
    from sqgan.models.sngan import SNGANTrunk

    return SNGANTrunk(p.model.resolution, p.model.d_channels)


def _stylegan2_synthesis(p: Params, latent: int) -> nn.Module:
    from sqgan.models.stylegan2 import SynthesisNetwork

    return SynthesisNetwork(latent, p.model.resolution, channel_base=p.model.channel_base,
                            channel_max=p.model.channel_max)


def _stylegan2_trunk(p: Params) -> nn.Module:
    from sqgan.models.stylegan2 import DiscriminatorTrunk

    return DiscriminatorTrunk(p.model.resolution, channel_base=p.model.channel_base, channel_max=p.model.channel_max)


BACKBONES: dict[str, Backbone] = {
    "dcgan": Backbone(_dcgan_synthesis, _dcgan_trunk, "hinge", _dcgan_init),
    "sngan": Backbone(_sngan_synthesis, _sngan_trunk, "hinge"),
    "stylegan2": Backbone(_stylegan2_synthesis, _stylegan2_trunk, "nonsaturating"),
}


class MappingMLP(nn.Module):
    """The small mapping network z → w added to DCGAN/SNGAN so their latent can be style-quantized: z normalised
    by its second moment (as StyleGAN2's), then `layers` linear + LeakyReLU(0.2) layers; tracks w_avg too."""

    def __init__(self, z_dim: int, w_dim: int, layers: int = 2, w_avg_beta: float = 0.995) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        dim = z_dim
        for _ in range(layers):
            mods += [nn.Linear(dim, w_dim), nn.LeakyReLU(0.2)]
            dim = w_dim
        self.net = nn.Sequential(*mods)
        self.w_avg_beta = w_avg_beta
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, update_w_avg: bool = False) -> torch.Tensor:
        z = z * (z.square().mean(1, keepdim=True) + 1e-8).rsqrt()
        w = self.net(z)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().mean(0).lerp(self.w_avg, self.w_avg_beta))
        return w


def backbone(params: Params) -> Backbone:
    return BACKBONES[params.model.arch]


def adversarial_loss(params: Params) -> str:
    """train.loss, with `auto` resolved to the backbone's own (StyleGAN2: non-saturating; DCGAN/SNGAN: hinge)."""
    return backbone(params).loss if params.train.loss == "auto" else params.train.loss


def r1_gamma(params: Params) -> float:
    """train.r1_gamma, with unset resolved as stylegan2-ada's `auto` config does for StyleGAN2
    (γ = 0.0002 · R² / batch) and to 0 (no R1) for DCGAN/SNGAN."""
    if params.train.r1_gamma is not None:
        return params.train.r1_gamma
    if params.model.arch == "stylegan2":
        return 0.0002 * params.model.resolution**2 / params.train.batch_size
    return 0.0


def mapping_layers(params: Params) -> int:
    if params.model.mapping_layers is not None:
        return params.model.mapping_layers
    return 8 if params.model.arch == "stylegan2" else 2


def build_generator(params: Params) -> Generator:
    m, sq = params.model, params.sq
    bb = backbone(params)
    mapping: nn.Module | None = None
    if m.arch == "stylegan2":
        from sqgan.models.stylegan2 import MappingNetwork

        mapping = MappingNetwork(m.z_dim, m.w_dim, num_layers=mapping_layers(params))
    elif sq.enabled:
        mapping = MappingMLP(m.z_dim, m.w_dim, mapping_layers(params))
    w_dim = m.w_dim if mapping is not None else m.z_dim
    quantizer = None
    if sq.enabled:
        from sqgan.quant.sq import StyleQuantizer

        quantizer = StyleQuantizer(w_dim, sq.code_dim, sq.codebook_size, sq.commitment, sq.uniformity_t)
    return Generator(bb.synthesis(params, w_dim), m.z_dim, w_dim, mapping=mapping, quantizer=quantizer)


def build_discriminator(params: Params) -> Discriminator:
    fq = params.fq
    bb = backbone(params)
    D = Discriminator(bb.trunk(params), fq.layers if fq.enabled else [], fq.codebook_size, fq.decay, fq.commitment,
                      fq.eps, fq.mode, fq.init)
    if bb.d_init is not None:  # after the quantizers drew their start, so DCGAN's init stays what it always was
        bb.d_init(D.trunk)
    return D


def d_blocks(arch: str, resolution: int) -> int:
    """Blocks of a backbone's discriminator trunk at `resolution` (what fq.layers may name)."""
    if arch == "sngan":
        from sqgan.models.sngan import trunk_blocks

        return trunk_blocks(resolution)
    return int(math.log2(resolution)) - 2
