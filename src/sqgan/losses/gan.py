"""The losses of one training step as phases the loop calls in order (as stylegan2-ada's `loss.py`):

    d_main   D: L_adv(D(A(x)), D(A(G(z)))) + α_t · Σ L_FQ        (A = ADA and/or DiffAugment)
                [+ FastGAN: Σ LPIPS of D's decoders' rebuilds of A(x)]
    d_r1     D: γ/2 · r1_every · E‖∇_x D(A(x))‖²                   every train.r1_every steps when γ > 0
    d_qcr    D: λ_qcr · qcr_every · ‖D(G(w^q)) − D(G(w'^q))‖²      every sq.qcr_every steps when SQ and λ_qcr > 0
    g_main   G: L_adv(D(A(G(z)))) + λ_sq (L_sq + L_uf) [+ β_ortho · BigGAN's orthogonal penalty]
    g_pl     G: pl_weight · pl_every · path-length penalty         every train.pl_every steps when pl_weight > 0

With mixdl.enabled, one step in mixdl.every is a MixDL step (MixDLSettings.due; every = 2: the odd steps, as
the official train_mixdl.py): B anchors
w = G.map(z) and M mixes c·w (c drawn per mixup sample), and d_main / g_main become
    d_main   D: L_adv(P(A(x)), P(A(G(c·w)))) + λ_D KL(softmax(c) ‖ softmax(cos(h(D(G(c·w))), h(D(G(w)))))) + α_t Σ L_FQ
    g_main   G: L_adv(P(A(G(c·w)))) + λ_G KL(softmax(c) ‖ softmax(cos(G_l(c·w), G_l(w)))) + λ_sq (L_sq + L_uf)
with P the patch head on a random D map, h the projection head and G_l a random synthesis layer
(sqgan.losses.mixdl). These phases call the unwrapped G and D (the heads and hooks need the modules themselves),
so under DDP their gradients are all-reduced by the loop (`Phase.sync`), not by DDP.

Each phase that is due returns a `Phase` (the loss to backpropagate, its statistics as detached tensors, and the
quantizer outputs to count); the loop does backward and the optimiser step, so every phase is one forward and one
backward through DDP. Lazy terms are weighted by their interval, as StyleGAN2's lazy regularisation. Every random
draw comes from the step's generator, so a step is a function of (seed, step, rank).

A conditional run (model.conditional) gives the fakes classes drawn uniformly from the step's generator (after
every other draw of G's batch, so an unconditional step draws as before) and D the reals' labels; D scores each
image with its class (projection), R1 the reals with theirs, QCR both fakes with one class.

QCR compares D's scores of the two un-augmented fakes (the paper's formula), with the same noise inputs (const) so
only the style differs; its D forward leaves the FQ dictionaries as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sqgan.config import Params
from sqgan.losses import mixdl
from sqgan.losses.adversarial import d_loss, g_loss
from sqgan.losses.regularizers import orthogonal_penalty, path_length_penalty, qcr_penalty, r1_penalty
from sqgan.metrics.features import LPIPSNet
from sqgan.models.factory import adversarial_loss, r1_gamma
from sqgan.models.fastgan import reconstruction_loss
from sqgan.quant.common import QuantizerOutput

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class Phase:
    loss: torch.Tensor
    stats: dict[str, torch.Tensor]
    quant: dict[str, QuantizerOutput] = field(default_factory=dict)
    real_logits: torch.Tensor | None = None  # d_main: for ADA's r_t
    sync: tuple[nn.Module, ...] = ()  # modules whose gradients the loop all-reduces itself (DDP bypassed)


def alpha_at(step: int, alpha: float, warmup_steps: int) -> float:
    """α linearly from 0 to its value over `warmup_steps` (FQ-GAN anneals the FQ weight)."""
    if warmup_steps <= 0:
        return alpha
    return alpha * min(1.0, step / warmup_steps)


def amp_dtype(params: Params, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of train.amp on `device` (None: float32); fp16 off a GPU is an error naming bf16."""
    amp = params.train.amp
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"train.amp fp16 needs a GPU (its loss scaling is for CUDA's float16) and this run is on "
                         f"{device.type}; on a CPU use train.amp=bf16, or off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


class GANLoss:
    """The phases of a step for G and D (possibly DDP-wrapped) under `params`."""

    def __init__(self, params: Params, G: nn.Module, D: nn.Module, augment: Augment, device: torch.device,
                 num_ws: int, heads: nn.Module | None = None) -> None:
        self.p, self.G, self.D, self.augment, self.device = params, G, D, augment, device
        self.mixdl = mixdl.settings_from(params) if params.mixdl.enabled else None
        if self.mixdl is not None and heads is None:
            raise ValueError("mixdl.enabled needs D's MixDL heads (sqgan.losses.mixdl.MixDLHeads)")
        self.heads = heads
        self.kind = adversarial_loss(params)
        self.r1_gamma = r1_gamma(params)
        self.num_ws = num_ws
        self.mixing = params.model.style_mixing if num_ws > 1 else 0.0
        self.sq_on = params.sq.enabled
        self.num_classes = params.model.num_classes if params.model.conditional else 0
        self.recon_lpips = None  # FastGAN: D's self-supervised reconstruction of reals, measured by LPIPS
        if params.model.arch == "fastgan":
            mp = params.metrics
            self.recon_lpips = LPIPSNet(mp.lpips_backbone, mp.lpips_weights).net.to(device)
        self.pl_mean = torch.zeros((), device=device)
        dtype = amp_dtype(params, device)
        self._autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None \
            else contextlib.nullcontext

    # ------------------------------------------------------------------------------------ helpers
    def _z(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.p.model.z_dim, generator=gen, device=self.device)

    def _classes(self, n: int, gen: torch.Generator) -> torch.Tensor | None:
        """Uniform classes for n fakes of a conditional run (no draw, None, for an unconditional one)."""
        if not self.num_classes:
            return None
        return torch.randint(self.num_classes, (n,), generator=gen, device=self.device)

    def _generate(self, n: int, gen: torch.Generator):
        """(G(z, c), c) with style mixing (StyleGAN2: with prob. style_mixing the ws after a random layer come from a
        2nd z); c the fakes' classes (None unconditional)."""
        z = self._z(n, gen)
        kw: dict = {"generator": gen}
        if self.mixing > 0:
            mix_z = self._z(n, gen)
            cutoff = torch.randint(1, self.num_ws, (n,), generator=gen, device=self.device)
            use = torch.rand(n, generator=gen, device=self.device) < self.mixing
            kw.update(mix_z=mix_z, mix_cutoff=torch.where(use, cutoff, torch.full_like(cutoff, self.num_ws)))
        c = self._classes(n, gen)
        return self.G(z, c, **kw), c

    def mixdl_due(self, step: int) -> bool:
        return self.mixdl is not None and self.mixdl.due(step)

    # ------------------------------------------------------------------------------------- phases
    def d_main(self, real: torch.Tensor, gen: torch.Generator, step: int,
               real_labels: torch.Tensor | None = None) -> Phase:
        if self.mixdl_due(step):
            return self.d_mixdl(real, gen, step)
        p = self.p
        b = real.shape[0]
        with self._autocast():
            with torch.no_grad():
                fake_out, fake_labels = self._generate(b, gen)
                fake = fake_out.images
            c = None if fake_labels is None else torch.cat([real_labels, fake_labels])
            seen = self.augment(torch.cat([real, fake.to(real.dtype)]), gen)
            out = self.D(seen, feed=step >= p.fq.feed_warmup_steps, parts=(b, fake.shape[0]), c=c)
            real_logits, fake_logits = out.logits.float().split(b)
            adv = d_loss(real_logits, fake_logits, self.kind)
        alpha = alpha_at(step, p.fq.alpha, p.fq.alpha_warmup_steps)
        loss = adv + alpha * out.loss
        stats = {"loss/d_adv": adv, "loss/fq": out.loss, "d/real_logit": real_logits.mean(),
                 "d/fake_logit": fake_logits.mean()}
        if self.recon_lpips is not None:  # FastGAN: D rebuilds the reals it saw (a random quadrant among them)
            part = int(torch.randint(4, (1,), generator=gen, device=self.device))
            recon = reconstruction_loss(unwrap(self.D).trunk, out.aux, seen[:b].float(), part, self.recon_lpips)
            loss = loss + recon
            stats["loss/d_recon"] = recon
        stats["loss/d"] = loss
        return Phase(loss, {k: v.detach() for k, v in stats.items()}, out.quant, real_logits.detach())

    def d_r1(self, real: torch.Tensor, gen: torch.Generator, step: int,
             real_labels: torch.Tensor | None = None) -> Phase | None:
        every = self.p.train.r1_every
        if self.r1_gamma <= 0 or step % every:
            return None
        x = real.detach().requires_grad_(True)
        with self._autocast():
            logits = self.D(self.augment(x, gen), feed=step >= self.p.fq.feed_warmup_steps, update=False,
                            c=real_labels).logits
        # a packing D (model.pack m) gives each sample its pack's logit, so ∇_x of Σ logits is m× the pack's gradient:
        # ÷ m makes this E over packs of ‖∇ D(pack)‖², R1 of the network D is (m = 1: unchanged)
        penalty = r1_penalty(logits.float(), x) / self.p.model.pack
        # + 0·logits (as stylegan2-ada's loss.py): D's last bias does not reach ∇_x D, and without it in the graph
        # DDP waits for its gradient forever ("parameters that were not used in producing loss")
        loss = penalty * (self.r1_gamma / 2) * every + logits.float().sum() * 0
        return Phase(loss, {"loss/r1": penalty.detach()})

    def d_qcr(self, real: torch.Tensor, gen: torch.Generator, step: int) -> Phase | None:
        sq = self.p.sq
        if not self.sq_on or sq.lambda_qcr <= 0 or step % sq.qcr_every:
            return None
        b = real.shape[0]
        z = self._z(b, gen)
        eps = torch.randn(z.shape, generator=gen, device=self.device) * sq.qcr_sigma
        c = self._classes(b, gen)
        c2 = None if c is None else torch.cat([c, c])  # the neighbour keeps the class
        with self._autocast():
            with torch.no_grad():  # one G call for both, so batch statistics (DCGAN's BN) are shared
                pair = self.G(torch.cat([z, z + eps]), c2, noise_mode="const").images
            logits = self.D(pair.to(real.dtype), feed=step >= self.p.fq.feed_warmup_steps, update=False,
                            c=c2).logits
        a, b_ = logits.float().split(b)
        penalty = qcr_penalty(a, b_)
        return Phase(penalty * sq.lambda_qcr * sq.qcr_every, {"loss/qcr": penalty.detach()})

    def g_main(self, gen: torch.Generator, step: int) -> Phase:
        if self.mixdl_due(step):
            return self.g_mixdl(gen, step)
        p = self.p
        b = p.train.batch_size
        with self._autocast():
            out, c = self._generate(b, gen)
            d_out = self.D(self.augment(out.images, gen), feed=step >= p.fq.feed_warmup_steps,
                           update=p.fq.update_in_g_step, c=c)
            adv = g_loss(d_out.logits.float(), self.kind)
        loss = adv + p.sq.lambda_sq * out.loss if self.sq_on else adv
        stats = {"loss/g_adv": adv}
        if p.train.ortho_reg > 0:  # BigGAN's orthogonal regularisation of the synthesis weights
            ortho = orthogonal_penalty(unwrap(self.G).synthesis)
            loss = loss + p.train.ortho_reg * ortho
            stats["loss/ortho"] = ortho
        stats["loss/g"] = loss
        if self.sq_on:
            stats["loss/sq"] = out.loss
        return Phase(loss, {k: v.detach() for k, v in stats.items()}, out.quant)

    def g_pl(self, gen: torch.Generator, step: int) -> Phase | None:
        t = self.p.train
        if t.pl_weight <= 0 or self.num_ws <= 1 or step % t.pl_every:
            return None
        n = max(1, t.batch_size // 2)  # StyleGAN2's pl_batch_shrink = 2
        with self._autocast():
            z = self._z(n, gen)
            out = self.G(z, self._classes(n, gen), generator=gen)
        penalty, self.pl_mean = path_length_penalty(out.images.float(), out.ws, self.pl_mean, gen)
        # + 0·(a pixel, SQ's loss): every G parameter in the graph for DDP, as d_r1 (the codebook reaches the images
        # only through the straight-through estimator, i.e. not at all)
        loss = penalty * t.pl_weight * t.pl_every + (out.images[:, 0, 0, 0].float().sum() + out.loss) * 0
        return Phase(loss, {"loss/pl": penalty.detach(), "g/pl_mean": self.pl_mean})

    # -------------------------------------------------------------------------------------- MixDL
    def _anchors_and_mixes(self, b: int, gen: torch.Generator):
        """(c [M, B], anchor images [B], mix images [M]) without gradient: B anchors w = G.map(z), mixes c·w."""
        s, G = self.mixdl, unwrap(self.G)
        with torch.no_grad():
            w = G.map(self._z(b, gen))[0]
            c = mixdl.mixing_coefficients(s.num_mix or b, b, gen, s.coefficients, s.dirichlet_alpha)
            ws = torch.cat([w, mixdl.mix_styles(c, w)])[:, None, :].expand(-1, G.num_ws, -1)
            images = G.synthesis(ws, generator=gen)
        return c, images[:b], images[b:]

    def d_mixdl(self, real: torch.Tensor, gen: torch.Generator, step: int) -> Phase:
        """D on a MixDL step: patch-level adversarial loss of reals against mixup images (a random D map judged by
        the patch head), λ_D · the distance loss on the projection head (its D pass also carries the reals, so FQ's
        dictionaries learn and L_FQ counts as in a plain step)."""
        p, D = self.p, unwrap(self.D)
        b = real.shape[0]
        feed = step >= p.fq.feed_warmup_steps
        with self._autocast():
            c, anchors, mixes = self._anchors_and_mixes(b, gen)
            anchors, mixes = anchors.to(real.dtype), mixes.to(real.dtype)
            tap = mixdl.random_tap(self.heads.patch, gen)
            patches = mixdl.patch_logits(D, self.heads.patch, self.augment(torch.cat([real, mixes]), gen), tap,
                                         feed=feed, parts=(b, mixes.shape[0]))
            real_p, fake_p = patches.float().flatten(1).split([b, mixes.shape[0]])
            adv = d_loss(real_p, fake_p, self.kind)
            term = mixdl.d_mixdl_term(D, self.heads.proj, anchors, mixes, c, self.mixdl, feed=feed, update=True,
                                reals=real)
        alpha = alpha_at(step, p.fq.alpha, p.fq.alpha_warmup_steps)
        loss = adv + term.loss + alpha * term.quant_loss
        stats = {"loss/d": loss, "loss/fq": term.quant_loss, "mixdl/d_patch": adv, "mixdl/d_real_patch": real_p.mean(),
                 "mixdl/d_fake_patch": fake_p.mean(), **term.stats}
        return Phase(loss, {k: v.detach() for k, v in stats.items()}, term.quant, real_p.mean(1).detach(),
                     sync=(D, self.heads))

    def g_mixdl(self, gen: torch.Generator, step: int) -> Phase:
        """G on a MixDL step: patch-level adversarial loss of the mixup images + λ_G · the distance loss at a random
        synthesis layer (+ λ_sq (L_sq + L_uf) of the anchors' styles)."""
        p, G, D = self.p, unwrap(self.G), unwrap(self.D)
        b = p.train.batch_size
        with self._autocast():
            term = mixdl.g_mixdl_term(G, gen, z=self._z(b, gen), settings=self.mixdl)
            mixes = term.images[b:]
            tap = mixdl.random_tap(self.heads.patch, gen)
            patches = mixdl.patch_logits(D, self.heads.patch, self.augment(mixes, gen), tap,
                                   feed=step >= p.fq.feed_warmup_steps)
            adv = g_loss(patches.float().flatten(1), self.kind)
        loss = adv + term.loss
        stats = {"mixdl/g_patch": adv, **term.stats}
        if self.sq_on:
            loss = loss + p.sq.lambda_sq * term.quant_loss
            stats["loss/sq"] = term.quant_loss
        stats["loss/g"] = loss
        return Phase(loss, {k: v.detach() for k, v in stats.items()}, term.quant, sync=(G,))


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if hasattr(module, "module") else module
