"""What every backbone shares: G = mapping → style quantizer → synthesis, D = blocks (+ FQ) → head.

A backbone provides two parts and nothing else:
  - a synthesis network: `num_ws` (styles it consumes; 1 for DCGAN/SNGAN) and
    `forward(ws [B, num_ws, w_dim], generator=None, noise_mode="random") -> images [B, 3, R, R]` (data are in
    [-1, 1]; DCGAN/SNGAN end in tanh, StyleGAN2 leaves its output linear as the paper)
    (random draws inside, e.g. StyleGAN2's noise inputs, come from `generator` so a step is a function of its seed;
    noise_mode="const" uses fixed buffers, for evaluation);
  - a discriminator trunk: `blocks` (ModuleList; FQ may follow any of them), `widths` (channels out of each
    block) and `head(x) -> (logits [B], features [B, F])` (F = the penultimate features, for diagnostics); a
    trunk whose head mixes samples (StyleGAN2's minibatch stddev) sets `batch_statistics = True` and takes
    `head(x, parts=(n1, n2, …))`, computing those statistics within each part.
`Generator` and `Discriminator` below wrap them and put their quantizers' losses and statistics in one form, so
the loop never asks which backbone or which quantizer it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sqgan.quant.common import QuantizerOutput
from sqgan.quant.fq import FeatureQuantizer


@dataclass
class GeneratorOutput:
    images: torch.Tensor  # [B, 3, R, R], data range [-1, 1]
    ws: torch.Tensor  # [B, num_ws, w_dim] the styles the synthesis saw (quantized when SQ is on)
    loss: torch.Tensor  # Σ of the generator's quantizer losses, unweighted (SQ: L_sq + L_uf; 0 without)
    quant: dict[str, QuantizerOutput] = field(default_factory=dict)  # "sq" when SQ is on


@dataclass
class DiscriminatorOutput:
    logits: torch.Tensor  # [B]
    features: torch.Tensor  # [B, F] penultimate features
    loss: torch.Tensor  # Σ over quantized layers of the FQ commitment loss (0 without)
    quant: dict[str, QuantizerOutput] = field(default_factory=dict)  # "fq/layer{i}" per quantized block


class Generator(nn.Module):
    """z → [mapping] → w → [style quantizer] → broadcast to num_ws → synthesis.

    Without a mapping network (DCGAN/SNGAN with SQ off) w is z itself. `w_avg` (StyleGAN2's running mean of w,
    for truncation) lives in the mapping network when there is one.
    """

    def __init__(self, synthesis: nn.Module, z_dim: int, w_dim: int, mapping: nn.Module | None = None,
                 quantizer: nn.Module | None = None) -> None:
        super().__init__()
        if mapping is None and w_dim != z_dim:
            raise ValueError(f"without a mapping network w is z: w_dim ({w_dim}) must equal z_dim ({z_dim})")
        self.z_dim, self.w_dim, self.num_ws = z_dim, w_dim, int(synthesis.num_ws)
        self.mapping, self.quantizer, self.synthesis = mapping, quantizer, synthesis

    def map(self, z: torch.Tensor, truncation_psi: float = 1.0,
            update_w_avg: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(w fed on, its un-quantized w, quantizer outputs): z → w (→ truncated → quantized). In training mode the
        mapping's w_avg tracks these w unless `update_w_avg` is False (style mixing's second z)."""
        w = z if self.mapping is None else self.mapping(z, update_w_avg=self.training and update_w_avg)
        if truncation_psi != 1.0:
            if self.mapping is None or not hasattr(self.mapping, "w_avg"):
                raise ValueError("truncation needs a mapping network with w_avg (StyleGAN2, or SQ on)")
            w = self.mapping.w_avg.lerp(w, truncation_psi)
        quant: dict[str, QuantizerOutput] = {}
        if self.quantizer is None:
            return w, w, quant
        out = self.quantizer(w)
        quant["sq"] = out
        return out.quantized, w, quant

    def forward(self, z: torch.Tensor, *, mix_z: torch.Tensor | None = None, mix_cutoff: torch.Tensor | None = None,
                truncation_psi: float = 1.0, generator: torch.Generator | None = None,
                noise_mode: str = "random") -> GeneratorOutput:
        """`mix_z` with `mix_cutoff` [B] (style mixing): ws[:, cutoff:] come from mix_z's w."""
        w, _, quant = self.map(z, truncation_psi)
        loss = sum((q.loss for q in quant.values()), z.new_zeros(()))
        ws = w[:, None, :].expand(-1, self.num_ws, -1)
        if mix_z is not None:
            w2, _, quant2 = self.map(mix_z, truncation_psi, update_w_avg=False)  # as stylegan2-ada's skip_w_avg_update
            loss = loss + sum((q.loss for q in quant2.values()), z.new_zeros(()))
            layer = torch.arange(self.num_ws, device=z.device)[None, :, None]
            ws = torch.where(layer >= mix_cutoff[:, None, None], w2[:, None, :], ws)
        images = self.synthesis(ws, generator=generator, noise_mode=noise_mode)
        return GeneratorOutput(images, ws, loss, quant)


class Discriminator(nn.Module):
    """A backbone's trunk with a `FeatureQuantizer` after each block in `fq_layers` (FQ-GAN quantizes several)."""

    def __init__(self, trunk: nn.Module, fq_layers: list[int] | None = None, codebook_size: int = 64,
                 decay: float = 0.9, commitment: float = 0.25, eps: float = 1e-5, mode: str = "feed",
                 init: str = "batch") -> None:
        super().__init__()
        self.trunk = trunk
        n = len(trunk.blocks)
        fq_layers = list(fq_layers or [])
        bad = [i for i in fq_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"fq layers {bad} do not exist: this discriminator has blocks 0..{n - 1}")
        self.quantizers = nn.ModuleDict({
            str(i): FeatureQuantizer(trunk.widths[i], codebook_size, decay, commitment, eps, mode, init)
            for i in fq_layers
        })

    def forward(self, x: torch.Tensor, feed: bool = True, update: bool = True,
                parts: tuple[int, ...] | None = None) -> DiscriminatorOutput:
        """`feed=False` passes h on even in feed mode (the warm-up that feeds h before h′); `update=False` keeps
        the FQ dictionaries as they are (assignments and loss still computed). `parts` (sizes summing to the batch,
        e.g. (reals, fakes)) keeps batch statistics within each part — StyleGAN2's minibatch stddev groups must not
        mix reals and fakes (stylegan2-ada scores them in separate calls); the FQ dictionaries still learn from
        the whole batch in one EMA step."""
        quant: dict[str, QuantizerOutput] = {}
        loss = x.new_zeros(())
        for i, block in enumerate(self.trunk.blocks):
            x = block(x)
            q = self.quantizers[str(i)] if str(i) in self.quantizers else None
            if q is not None:
                out = q(x, update=update)
                quant[f"fq/layer{i}"] = out
                loss = loss + out.loss
                if q.feeds and feed:
                    x = out.quantized
        if parts is not None and getattr(self.trunk, "batch_statistics", False):
            logits, features = self.trunk.head(x, parts=parts)
        else:
            logits, features = self.trunk.head(x)
        return DiscriminatorOutput(logits, features, loss, quant)
