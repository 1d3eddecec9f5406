"""What every backbone shares: G = mapping → style quantizer → synthesis, D = blocks (+ FQ) → head.

A backbone provides two parts and nothing else:
  - a synthesis network: `num_ws` (styles it consumes; 1 for DCGAN/SNGAN) and
    `forward(ws [B, num_ws, w_dim], generator=None, noise_mode="random") -> images [B, 3, R, R]` (data are in
    [-1, 1]; DCGAN/SNGAN end in tanh, StyleGAN2 leaves its output linear as the paper)
    (random draws inside, e.g. StyleGAN2's noise inputs, come from `generator` so a step is a function of its seed;
    noise_mode="const" uses fixed buffers, for evaluation);
  - a discriminator trunk: `blocks` (ModuleList; FQ may follow any of them), `widths` (channels out of each
    block), `feature_dim` (F) and `head(x) -> (logits [B], features [B, F])` (F = the penultimate features, for
    diagnostics and the projection head of a conditional D; a trunk with `spectral = True` normalises its weights, so
    the projection's embedding is spectrally normalised too); a
    trunk whose head mixes samples (StyleGAN2's minibatch stddev) sets `batch_statistics = True` and takes
    `head(x, parts=(n1, n2, …))`, computing those statistics within each part.
A trunk takes `in_channels` image channels: 3, or 3·m when D packs m samples (PacGAN, `Discriminator(pack=m)`).
Optional: `skips` {block i: earlier block j} calls block i as `block(x, output_j)` (FastGAN's skip-layer excitation);
`head_takes_input = True` calls `head(x, image=D's input, maps=the block outputs)`, and a head may return a third
value, a dict, passed on as `DiscriminatorOutput.aux`; logits may be [B] or per patch [B, P] (the losses average).
`Generator` and `Discriminator` below wrap them and put their quantizers' losses and statistics in one form, so
the loop never asks which backbone or which quantizer it has.

Class-conditional (model.conditional, `num_classes` K > 0): G adds a learned class embedding e_y ∈ R^{z_dim}
(N(0, 0.1²) at init, CLASS_EMBED_STD) to z before the mapping (before the synthesis without one), so w — and with SQ
on, the style the codebook quantizes — carries the class; D adds the projection head of Miyato & Koyama 2018 to its
logit, ⟨embed(y), φ(x)⟩ with φ the trunk's penultimate features. Both take the labels `c` [B] (int64); an unconditional
network refuses labels and a conditional one refuses to run without.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from sqgan.quant.common import QuantizerOutput
from sqgan.quant.fq import FeatureQuantizer

# The class embedding's init scale. At N(0, 1) (nn.Embedding's default: as large as z) the labelled demo's DCGAN
# collapsed within each class (400 steps: pixel diversity 0.06× the class's reals, 0.04× with SQ; FID 2.06); at
# N(0, 0.1²) the class starts as a small shift of z and the same run keeps its spread (0.65× / 0.78×, FID 0.93).
CLASS_EMBED_STD = 0.1


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
    aux: dict = field(default_factory=dict)  # what a trunk's head adds (FastGAN: the maps its decoders rebuild from)


class Generator(nn.Module):
    """z → [mapping] → w → [style quantizer] → broadcast to num_ws → synthesis.

    Without a mapping network (DCGAN/SNGAN with SQ off) w is z itself. `w_avg` (StyleGAN2's running mean of w,
    for truncation) lives in the mapping network when there is one.
    """

    def __init__(self, synthesis: nn.Module, z_dim: int, w_dim: int, mapping: nn.Module | None = None,
                 quantizer: nn.Module | None = None, num_classes: int = 0) -> None:
        super().__init__()
        if mapping is None and w_dim != z_dim:
            raise ValueError(f"without a mapping network w is z: w_dim ({w_dim}) must equal z_dim ({z_dim})")
        self.z_dim, self.w_dim, self.num_ws = z_dim, w_dim, int(synthesis.num_ws)
        self.mapping, self.quantizer, self.synthesis = mapping, quantizer, synthesis
        self.num_classes = num_classes
        # a synthesis that takes the classes itself (BigGAN's shared embedding) gets them there; any other gets z + e_c.
        # Made last, so an unconditional generator draws its weights exactly as before.
        self.own_classes = bool(getattr(synthesis, "takes_classes", False))
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes > 0 and not self.own_classes else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=CLASS_EMBED_STD)

    def condition(self, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """z + e_c for a conditional generator (checked: labels given and in range), z itself otherwise (and for a
        synthesis that takes the classes itself, after the same check)."""
        if self.num_classes == 0 and c is None:
            return z
        c = check_labels(c, self.num_classes, "G")
        return z if self.own_classes else z + self.embed(c)

    def synthesize(self, ws: torch.Tensor, c: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   noise_mode: str = "random") -> torch.Tensor:
        """The synthesis of styles ws [B, num_ws, w_dim], given the classes when it takes them (BigGAN)."""
        if self.own_classes and self.num_classes:
            return self.synthesis(ws, generator=generator, noise_mode=noise_mode, c=check_labels(c, self.num_classes,
                                                                                                 "G"))
        return self.synthesis(ws, generator=generator, noise_mode=noise_mode)

    def map(self, z: torch.Tensor, truncation_psi: float = 1.0, update_w_avg: bool = True,
            c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(w fed on, its un-quantized w, quantizer outputs): z (+ e_c) → w (→ truncated → quantized). In training
        mode the mapping's w_avg tracks these w unless `update_w_avg` is False (style mixing's second z)."""
        z = self.condition(z, c)
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

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, *, mix_z: torch.Tensor | None = None,
                mix_cutoff: torch.Tensor | None = None, truncation_psi: float = 1.0,
                generator: torch.Generator | None = None, noise_mode: str = "random") -> GeneratorOutput:
        """`c`: the classes [B] of a conditional generator. `mix_z` with `mix_cutoff` [B] (style mixing): ws[:, cutoff:]
        come from mix_z's w (same class)."""
        w, _, quant = self.map(z, truncation_psi, c=c)
        loss = sum((q.loss for q in quant.values()), z.new_zeros(()))
        ws = w[:, None, :].expand(-1, self.num_ws, -1)
        if mix_z is not None:
            # update_w_avg=False as stylegan2-ada's skip_w_avg_update
            w2, _, quant2 = self.map(mix_z, truncation_psi, update_w_avg=False, c=c)
            loss = loss + sum((q.loss for q in quant2.values()), z.new_zeros(()))
            layer = torch.arange(self.num_ws, device=z.device)[None, :, None]
            ws = torch.where(layer >= mix_cutoff[:, None, None], w2[:, None, :], ws)
        images = self.synthesize(ws, c, generator=generator, noise_mode=noise_mode)
        return GeneratorOutput(images, ws, loss, quant)


def check_labels(c: torch.Tensor | None, num_classes: int, who: str) -> torch.Tensor:
    """`c` when it fits a network of `num_classes` classes (0: unconditional, takes no labels); else a ValueError."""
    if num_classes == 0:
        raise ValueError(f"this {who} is unconditional (model.conditional false) and takes no class labels")
    if c is None:
        raise ValueError(f"this {who} is class-conditional ({num_classes} classes): give the labels c [B]")
    if c.dtype != torch.long or c.ndim != 1:
        raise ValueError(f"class labels must be int64 [B], got {c.dtype} {list(c.shape)}")
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= num_classes):
        raise ValueError(f"class labels must lie in [0, {num_classes}) (model.num_classes), got "
                         f"{int(c.min())}..{int(c.max())}")
    return c


def pack_samples(x: torch.Tensor, sizes: tuple[int, ...], m: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """PacGAN's packing: each part of `x` ([Σ sizes, C, H, W], parts in order) becomes ⌈s/m⌉ packs of m consecutive
    samples stacked along channels ([·, m·C, H, W]); a part whose size is not a multiple of m fills its last pack
    by repeating its last sample (so any batch can be scored; training batches are multiples of m). Returns the
    packs and the number of packs per part."""
    chunks, packed = [], []
    start = 0
    for s in sizes:
        k = -(-s // m)
        idx = torch.arange(k * m, device=x.device).clamp(max=max(s - 1, 0)) + start
        chunks.append(x[idx].reshape(k, m * x.shape[1], *x.shape[2:]))
        packed.append(k)
        start += s
    return torch.cat(chunks), tuple(packed)


def unpack_samples(t: torch.Tensor, sizes: tuple[int, ...], m: int) -> torch.Tensor:
    """The inverse for per-pack outputs ([Σ packs, …]): every sample gets its pack's value (logits, features), so
    the losses, which average over samples, average over packs."""
    out, start = [], 0
    for s in sizes:
        k = -(-s // m)
        out.append(t[start : start + k].repeat_interleave(m, dim=0)[:s])
        start += k
    return torch.cat(out)


class Discriminator(nn.Module):
    """A backbone's trunk with a `FeatureQuantizer` after each block in `fq_layers` (FQ-GAN quantizes several).

    `pack` = m > 1 is PacGAN (Lin et al. 2018): D scores m samples of one kind at once, stacked along channels (the
    trunk must take 3·m input channels), so a generator that drops a mode or repeats itself is seen in a single
    score; the logits come back one per sample (each sample gets its pack's), so every loss is unchanged and a
    mean over samples is a mean over packs. Packs never mix `parts` (reals with fakes)."""

    def __init__(self, trunk: nn.Module, fq_layers: list[int] | None = None, codebook_size: int = 64,
                 decay: float = 0.9, commitment: float = 0.25, eps: float = 1e-5, mode: str = "feed",
                 init: str = "batch", pack: int = 1, num_classes: int = 0) -> None:
        super().__init__()
        if pack < 1:
            raise ValueError(f"pack must be ≥ 1 (samples per D input), got {pack}")
        if pack > 1 and num_classes:
            raise ValueError("a packing discriminator has no per-sample score for the projection head; pack = 1")
        self.trunk, self.pack = trunk, pack
        n = len(trunk.blocks)
        fq_layers = list(fq_layers or [])
        bad = [i for i in fq_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"fq layers {bad} do not exist: this discriminator has blocks 0..{n - 1}")
        self.quantizers = nn.ModuleDict({
            str(i): FeatureQuantizer(trunk.widths[i], codebook_size, decay, commitment, eps, mode, init)
            for i in fq_layers
        })
        self.num_classes = num_classes
        self.embed: nn.Module | None = None
        if num_classes > 0:  # the projection head's class embedding, made last (an unconditional D is unchanged)
            embed = nn.Embedding(num_classes, trunk.feature_dim)
            nn.init.xavier_uniform_(embed.weight)  # as SNGAN-projection's and BigGAN's; N(0, 1) would swamp the logit
            self.embed = spectral_norm(embed) if getattr(trunk, "spectral", False) else embed

    def forward(self, x: torch.Tensor, feed: bool = True, update: bool = True,
                parts: tuple[int, ...] | None = None, c: torch.Tensor | None = None) -> DiscriminatorOutput:
        """`feed=False` passes h on even in feed mode (the warm-up that feeds h before h′); `update=False` keeps
        the FQ dictionaries as they are (assignments and loss still computed). `parts` (sizes summing to the batch,
        e.g. (reals, fakes)) keeps batch statistics within each part — StyleGAN2's minibatch stddev groups must not
        mix reals and fakes (stylegan2-ada scores them in separate calls); the FQ dictionaries still learn from
        the whole batch in one EMA step. `c`: the classes [B] of a conditional D (logit + ⟨embed(c), features⟩)."""
        if self.embed is not None or c is not None:
            c = check_labels(c, self.num_classes, "D")
        n, m = x.shape[0], self.pack
        sizes = tuple(parts) if parts is not None else (n,)
        if m > 1:
            x, packs = pack_samples(x, sizes, m)
            parts = packs if parts is not None else None  # the head's batch statistics: within each part's packs
        quant: dict[str, QuantizerOutput] = {}
        loss = x.new_zeros(())
        image, maps = x, []
        skips = getattr(self.trunk, "skips", {})
        # a trunk with BatchNorm (FastGAN's) keeps its statistics within each part for the whole call
        in_parts = getattr(self.trunk, "batch_parts", None)
        with in_parts(parts) if in_parts is not None else contextlib.nullcontext():
            for i, block in enumerate(self.trunk.blocks):
                x = block(x) if i not in skips else block(x, maps[skips[i]])
                q = self.quantizers[str(i)] if str(i) in self.quantizers else None
                if q is not None:
                    out = q(x, update=update)
                    quant[f"fq/layer{i}"] = out
                    loss = loss + out.loss
                    if q.feeds and feed:
                        x = out.quantized
                maps.append(x)
            kw: dict = {}
            if parts is not None and getattr(self.trunk, "batch_statistics", False):
                kw["parts"] = parts
            if getattr(self.trunk, "head_takes_input", False):
                kw.update(image=image, maps=maps)
            logits, features, *rest = self.trunk.head(x, **kw)
        if m > 1:
            logits, features = unpack_samples(logits, sizes, m), unpack_samples(features, sizes, m)
        if self.embed is not None:
            proj = (self.embed(c) * features).sum(1)
            logits = logits + proj.view(-1, *([1] * (logits.ndim - 1)))  # per patch: each patch's logit
        return DiscriminatorOutput(logits, features, loss, quant, rest[0] if rest else {})
