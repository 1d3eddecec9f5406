"""MixDL — mixup-based distance learning (Kong et al., "Few-shot image generation with mixup-based distance learning",
ECCV 2022; official code reyllama/mixdl, `train_mixdl.py` and `model_cdc.py`).

Every `every` steps B anchors w_1..w_B are mixed with coefficients c [M, B] (each row on the simplex):
w_mix = c · w (eq. 3). With p = softmax(c) over the anchors and q = softmax over the anchors of the cosine similarity
between the mix's features and each anchor's features, MixDL adds λ·KL(p ‖ q) (eq. 4–6):
  - G: features = the activation of a random synthesis layer, λ_G = 1000 (`g_mixdl_term`);
  - D: features = a linear projection of D's penultimate features, λ_D = 1 (`d_mixdl_term`, `ProjectionHead`);
  - mixup images are judged by a patch-level D head (`MixupPatchHead`, `patch_logits`) on an intermediate D map.
This module is the library part; the training loop decides when the terms are due and what to backpropagate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sqgan.models.stylegan2 import Conv2dLayer, DiscriminatorTrunk, SynthesisLayer

Coefficients = Literal["dirichlet", "gaussian", "uniform"]
Reduction = Literal["batchmean", "mean"]


@dataclass(frozen=True)
class MixDLSettings:
    every: int = 2  # one MixDL step in `every` steps (official --interp_freq 2: the odd steps)
    lambda_g: float = 1000.0  # λ_G (official --kl_wt)
    lambda_d: float = 1.0  # λ_D (official --d_kl_wt)
    coefficients: Coefficients = "dirichlet"  # how c is drawn (official: default, --gaussian, --uniform)
    dirichlet_alpha: float = 1.0  # Dirichlet concentration (official: ones(B) / --dir_div, dir_div = 1)
    num_mix: int | None = None  # M mixup samples per step; None = B, as the official code (alpha is [B, B])
    # "batchmean": KL(p‖q) summed over anchors, averaged over mixup samples (the paper's KL); "mean": also divided by
    # B, as the official nn.KLDivLoss() default (its λ_G = 1000 was tuned with this, at batch 4).
    reduction: Reduction = "batchmean"
    layer_per_sample: bool = True  # official: one random G layer per mixup sample (feat_ind has size batch)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"mixdl.every must be ≥ 1, got {self.every}")
        if self.lambda_g < 0 or self.lambda_d < 0:
            raise ValueError(f"mixdl.lambda_g and mixdl.lambda_d must be ≥ 0, got {self.lambda_g}, {self.lambda_d}")
        if self.coefficients not in ("dirichlet", "gaussian", "uniform"):
            raise ValueError(f"mixdl.coefficients must be dirichlet, gaussian or uniform, got {self.coefficients!r}")
        if self.dirichlet_alpha <= 0:
            raise ValueError(f"mixdl.dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        if self.num_mix is not None and self.num_mix < 1:
            raise ValueError(f"mixdl.num_mix must be ≥ 1 or unset, got {self.num_mix}")
        if self.reduction not in ("batchmean", "mean"):
            raise ValueError(f"mixdl.reduction must be batchmean or mean, got {self.reduction!r}")

    def due(self, step: int) -> bool:
        """Whether step `step` is a MixDL step: one step in `every`, the last of each group (every = 2: the odd
        steps, as the official i % interp_freq > 0; every = 1: all steps)."""
        return step % self.every == self.every - 1


# ---------------------------------------------------------------------------------------------------------------------
# Mixing coefficients and the mix.


def _standard_gamma(alpha: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """n draws of Gamma(alpha, 1) from `generator` (torch.distributions takes no generator): Marsaglia & Tsang (2000)
    for alpha ≥ 1; for alpha < 1, Gamma(alpha + 1) · U^(1/alpha)."""
    device = generator.device
    a = alpha + 1.0 if alpha < 1 else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, device=device)
    todo = torch.arange(n, device=device)
    while todo.numel():  # each round accepts ≥ 95 % of the proposals
        x = torch.randn(todo.numel(), generator=generator, device=device)
        v = (1 + c * x) ** 3
        u = torch.rand(todo.numel(), generator=generator, device=device)
        ok = (v > 0) & (u.log() < 0.5 * x**2 + d - d * v + d * v.clamp_min(1e-30).log())
        out[todo[ok]] = d * v[ok]
        todo = todo[~ok]
    if alpha < 1:
        out = out * torch.rand(n, generator=generator, device=device).pow(1.0 / alpha)
    return out


def mixing_coefficients(num_mix: int, num_anchors: int, generator: torch.Generator,
                        kind: Coefficients = "dirichlet", alpha: float = 1.0) -> torch.Tensor:
    """c [num_mix, num_anchors], each row non-negative and summing to 1, drawn from `generator` (on its device).

    dirichlet: c ~ Dir(alpha·1) per mixup sample (the paper, §3.2); gaussian: softmax of N(0, I) (official --gaussian:
    MultivariateNormal(0, I) then Softmax(dim=1)); uniform: U(0, 1) entries divided by their row sum (official
    --uniform with unif_norm).
    """
    if num_mix < 1 or num_anchors < 1:
        raise ValueError(f"mixing coefficients need ≥ 1 mixup sample and ≥ 1 anchor, got {num_mix}, {num_anchors}")
    device = generator.device
    if kind == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
        g = _standard_gamma(alpha, num_mix * num_anchors, generator).reshape(num_mix, num_anchors)
        return g / g.sum(dim=1, keepdim=True)  # normalised Gammas are Dirichlet
    if kind == "gaussian":
        return torch.randn(num_mix, num_anchors, generator=generator, device=device).softmax(dim=1)
    if kind == "uniform":
        u = torch.rand(num_mix, num_anchors, generator=generator, device=device)
        return u / u.sum(dim=1, keepdim=True)
    raise ValueError(f"mixing coefficients: kind must be dirichlet, gaussian or uniform, got {kind!r}")


def mix_styles(coefficients: torch.Tensor, w_anchors: torch.Tensor) -> torch.Tensor:
    """w_mix = c · w (eq. 3): [M, B] × [B, w_dim] → [M, w_dim]; row i is Σ_j c_ij w_j."""
    if coefficients.dim() != 2 or w_anchors.dim() != 2 or coefficients.shape[1] != w_anchors.shape[0]:
        raise ValueError(f"mix_styles expects c [M, B] and w [B, w_dim], got {list(coefficients.shape)} and "
                         f"{list(w_anchors.shape)}")
    return coefficients.to(w_anchors.dtype) @ w_anchors


# ---------------------------------------------------------------------------------------------------------------------
# The distance loss (shared by G and D).


def cosine_similarities(mix_features: torch.Tensor, anchor_features: torch.Tensor) -> torch.Tensor:
    """[M, B]: cosine between each mix's and each anchor's features, each sample's features flattened."""
    a = F.normalize(mix_features.flatten(1).float(), dim=1, eps=1e-8)
    b = F.normalize(anchor_features.flatten(1).float(), dim=1, eps=1e-8)
    return a @ b.t()


def distance_kl(coefficients: torch.Tensor, similarities: torch.Tensor) -> torch.Tensor:
    """Per mixup sample KL(p ‖ q) [M], p = softmax(c) (eq. 4), q = softmax(similarities) (eq. 5), over the anchors."""
    log_p = coefficients.float().log_softmax(dim=1)
    log_q = similarities.float().log_softmax(dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def _reduce(kl: torch.Tensor, num_anchors: int, reduction: Reduction) -> torch.Tensor:
    if reduction == "batchmean":
        return kl.mean()
    if reduction == "mean":  # nn.KLDivLoss()'s default: the mean over all M·B elements
        return kl.mean() / num_anchors
    raise ValueError(f"reduction must be batchmean or mean, got {reduction!r}")


def mixdl_distance_loss(coefficients: torch.Tensor, mix_features: torch.Tensor, anchor_features: torch.Tensor,
                        weight: float = 1.0, reduction: Reduction = "batchmean") -> torch.Tensor:
    """weight · KL(softmax(c) ‖ softmax(cos(f(mix), f(anchors)))) averaged over mixup samples (eq. 6); the same for
    G (weight λ_G, features of a synthesis layer) and D (weight λ_D, projected penultimate features)."""
    sims = cosine_similarities(mix_features, anchor_features)
    return weight * _reduce(distance_kl(coefficients, sims), anchor_features.shape[0], reduction)


# ---------------------------------------------------------------------------------------------------------------------
# Activations by forward hooks.


class _Stop(Exception):
    """Raised by a hook to end a forward once the last wanted activation is in (the official patch D returns early)."""


@contextmanager
def capture_activations(model: nn.Module, names: Sequence[str],
                        stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, forwards of `model` record the outputs of its submodules `names` (dotted, as
    `named_modules`) into the yielded dict; with `stop`, the forward ends (raises, caught here) once all are in."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"capture_activations: {type(model).__name__} has no submodules {missing}")
    acts: dict[str, torch.Tensor] = {}
    wanted = set(names)

    def hook_for(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            acts[name] = output
            if stop and wanted.issubset(acts):
                raise _Stop

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in dict.fromkeys(names)]
    try:
        yield acts
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------------------
# G side.


def g_layer_names(synthesis: nn.Module) -> list[str]:
    """The synthesis layers whose activations MixDL compares, in forward order: StyleGAN2's modulated convs
    (b4.conv1, b8.conv0, b8.conv1, …: the official feat_list, one per StyledConv); for other backbones the entries
    of `synthesis.blocks` (SNGAN's residual blocks, DCGAN's up-block ReLUs)."""
    names = [n for n, m in synthesis.named_modules() if isinstance(m, SynthesisLayer)]
    if names:
        return names
    blocks = getattr(synthesis, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return [f"blocks.{i}" for i in range(len(blocks))]
    if isinstance(blocks, nn.Sequential):
        return [f"blocks.{n}" for n, m in blocks.named_children() if isinstance(m, nn.ReLU)]
    raise ValueError(f"MixDL: no synthesis layers found in {type(synthesis).__name__}")


def random_layers(num_layers: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[size] layer indices drawn uniformly from 1 … num_layers − 2 (official: randint(1, num_layers − 1), which
    leaves out the first 4×4 layer and the last); all layers when there are fewer than 3."""
    low, high = (1, num_layers - 1) if num_layers >= 3 else (0, num_layers)
    return torch.randint(low, high, (size,), generator=generator, device=generator.device)


def synthesis_activations(synthesis: nn.Module, ws: torch.Tensor, layers: Sequence[int],
                          generator: torch.Generator | None = None,
                          noise_mode: str = "random") -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(images, {layer index: activation [N, C, H, W]}): one synthesis forward on ws [N, num_ws, w_dim], the
    activations of the layers `layers` (indices into `g_layer_names`) taken by forward hooks."""
    names = g_layer_names(synthesis)
    bad = [i for i in layers if not 0 <= i < len(names)]
    if bad:
        raise ValueError(f"synthesis layers {bad} do not exist: this synthesis has layers 0..{len(names) - 1}")
    wanted = sorted({int(i) for i in layers})
    with capture_activations(synthesis, [names[i] for i in wanted]) as acts:
        images = synthesis(ws, generator=generator, noise_mode=noise_mode)
    return images, {i: acts[names[i]] for i in wanted}


@dataclass
class MixDLTerm:
    loss: torch.Tensor  # weighted (λ · KL), to add to the phase's loss
    stats: dict[str, torch.Tensor]  # detached
    coefficients: torch.Tensor  # c [M, B]
    layers: torch.Tensor | None = None  # G: the synthesis layer of each mixup sample [M]
    images: torch.Tensor | None = None  # G: anchors then mixes [B + M, 3, R, R]
    logits: torch.Tensor | None = None  # D: D's logits on cat[reals, anchors, mixes] [R + B + M]
    quant_loss: torch.Tensor | None = None  # unweighted quantizer losses of the forward (G: SQ; D: FQ)
    quant: dict | None = None  # their QuantizerOutputs, for the codebook statistics


def g_mixdl_term(G: nn.Module, generator: torch.Generator, *, z: torch.Tensor | None = None,
                 w: torch.Tensor | None = None, coefficients: torch.Tensor | None = None,
                 settings: MixDLSettings | None = None, noise_mode: str = "random") -> MixDLTerm:
    """G's MixDL term for anchors z [B, z_dim] (mapped by G) or w [B, w_dim]: λ_G · KL(p ‖ q) with q from a random
    synthesis layer (official train_mixdl.py, G step). `G` is the unwrapped `base.Generator`; c is drawn from
    `generator` unless given. Anchors and mixes go through the synthesis in one forward."""
    s = settings or MixDLSettings()
    if (z is None) == (w is None):
        raise ValueError("g_mixdl_term: pass exactly one of z (anchors' latents) or w (anchors' styles)")
    quant: dict = {}
    if w is None:
        w, _, quant = G.map(z)  # the w the synthesis would see (quantized when SQ is on)
    b = w.shape[0]
    if coefficients is None:
        coefficients = mixing_coefficients(s.num_mix or b, b, generator, s.coefficients, s.dirichlet_alpha)
    c = coefficients.to(w.device)
    m = c.shape[0]
    w_mix = mix_styles(c, w)  # eq. 3, in W
    names = g_layer_names(G.synthesis)
    layers = random_layers(len(names), m if s.layer_per_sample else 1, generator).expand(m).to(w.device)
    ws = torch.cat([w, w_mix])[:, None, :].expand(-1, G.num_ws, -1)
    images, acts = synthesis_activations(G.synthesis, ws, layers.tolist(), generator, noise_mode)
    sims = c.new_zeros(m, b, dtype=torch.float32)
    for layer, feats in acts.items():  # each mixup sample against the anchors at its own layer
        rows = (layers == layer).nonzero().squeeze(1)
        sims[rows] = cosine_similarities(feats[b:][rows], feats[:b])
    kl = distance_kl(c, sims)
    loss = s.lambda_g * _reduce(kl, b, s.reduction)
    stats = {"mixdl/g_kl": kl.mean().detach(), "mixdl/g": loss.detach()}
    quant_loss = sum((q.loss for q in quant.values()), w.new_zeros(()))
    return MixDLTerm(loss, stats, c, layers, images, quant_loss=quant_loss, quant=quant)


# ---------------------------------------------------------------------------------------------------------------------
# D side.


class ProjectionHead(nn.Module):
    """The linear projection over D's penultimate features in which D's MixDL distances are measured (DESIGN §2.3;
    the official code measures them on D's penultimate FC output directly)."""

    def __init__(self, in_features: int, proj_dim: int | None = None) -> None:
        super().__init__()
        self.in_features, self.proj_dim = in_features, proj_dim or in_features
        self.linear = nn.Linear(in_features, self.proj_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def d_mixdl_term(D: nn.Module, head: ProjectionHead, anchor_images: torch.Tensor, mix_images: torch.Tensor,
                 coefficients: torch.Tensor, settings: MixDLSettings | None = None, *, feed: bool = True,
                 update: bool = False, reals: torch.Tensor | None = None) -> MixDLTerm:
    """D's MixDL term: λ_D · KL(p ‖ q) with q from the projected penultimate features of D on the anchors' and the
    mixes' images (official train_mixdl.py, D step: one D pass on cat[anchors, mixes]). `feed`/`update` go to
    `base.Discriminator` (FQ); the images come from G without gradient. `reals`, when given, go through the same D
    pass in front (so FQ's dictionaries and loss see real and generated features, as in a plain D step); they take
    no part in the distances."""
    s = settings or MixDLSettings()
    b = anchor_images.shape[0]
    if coefficients.shape != (mix_images.shape[0], b):
        raise ValueError(f"d_mixdl_term: coefficients must be [{mix_images.shape[0]}, {b}] (mixes × anchors), got "
                         f"{list(coefficients.shape)}")
    images = [anchor_images, mix_images] if reals is None else [reals, anchor_images, mix_images]
    r = 0 if reals is None else reals.shape[0]
    # batch statistics (StyleGAN2's minibatch stddev, FastGAN's BatchNorm) never mix the reals with G's images
    out = D(torch.cat(images), feed=feed, update=update, parts=None if reals is None else (r, b + mix_images.shape[0]))
    proj = head(out.features[r:].float())
    kl = distance_kl(coefficients, cosine_similarities(proj[b:], proj[:b]))
    loss = s.lambda_d * _reduce(kl, b, s.reduction)
    stats = {"mixdl/d_kl": kl.mean().detach(), "mixdl/d": loss.detach()}
    return MixDLTerm(loss, stats, coefficients, logits=out.logits, quant_loss=out.loss, quant=out.quant)


def patch_taps(D: nn.Module, resolution: int, sides: Sequence[int] | None = None) -> list[tuple[str, int, int]]:
    """(module name in D, channels, side) of the intermediate D maps the patch head may judge, in forward order.

    StyleGAN2: each trunk block's conv outputs (conv0 at the block's input side, conv1 at half of it) whose side is in
    `sides`, default {R/8, R/16} — at 256 px the four 32×32/16×16 maps of the official Patch_Discriminator. Other
    trunks: the block outputs at those sides."""
    trunk = D.trunk
    want = set(sides) if sides is not None else {resolution // 8, resolution // 16}
    taps: list[tuple[str, int, int]] = []
    side = resolution
    out_sides = getattr(trunk, "sides", None)  # a trunk whose blocks do not all halve says its sides (FastGAN)
    for i, block in enumerate(trunk.blocks):
        out = out_sides[i] if out_sides is not None else side // 2
        if isinstance(trunk, DiscriminatorTrunk):
            for sub, s_ in (("conv0", side), ("conv1", side // 2)):
                if s_ in want:
                    taps.append((f"trunk.blocks.{i}.{sub}", getattr(block, sub).out_channels, s_))
        elif out in want:
            taps.append((f"trunk.blocks.{i}", trunk.widths[i], out))
        side = out
    if not taps:
        raise ValueError(f"MixDL patch head: no D map of side {sorted(want)} at resolution {resolution}; pass sides "
                         f"that the discriminator has (it halves {resolution} down to 4)")
    return taps


class MixupPatchHead(nn.Module):
    """The patch-level D head that judges mixup images (official `Extra`): per candidate D map a 3×3 conv to one
    channel, i.e. one logit per patch; `index` picks the map (official: at random per D call)."""

    def __init__(self, taps: Sequence[tuple[str, int, int]], activation: str = "lrelu") -> None:
        """`taps` from `patch_taps`. activation "lrelu" is the official ConvLayer(512, 1, 3) (its FusedLeakyReLU ends
        the head); "linear" leaves the logits unbounded below."""
        super().__init__()
        if not taps:
            raise ValueError("MixupPatchHead needs at least one D map to judge")
        self.taps = [name for name, _, _ in taps]
        self.sides = [side for _, _, side in taps]
        self.convs = nn.ModuleList(Conv2dLayer(ch, 1, 3, activation=activation) for _, ch, _ in taps)

    @classmethod
    def for_discriminator(cls, D: nn.Module, resolution: int, sides: Sequence[int] | None = None,
                          activation: str = "lrelu") -> MixupPatchHead:
        return cls(patch_taps(D, resolution, sides), activation)

    def forward(self, feature_map: torch.Tensor, index: int) -> torch.Tensor:
        """[B, C, H, W] map of tap `index` → patch logits [B, H, W]."""
        return self.convs[index](feature_map.float()).squeeze(1)


def random_tap(head: MixupPatchHead, generator: torch.Generator) -> int:
    """A tap index drawn from `generator` (official: numpy.random.randint(lowp, highp) per D call)."""
    return int(torch.randint(len(head.taps), (1,), generator=generator, device=generator.device))


def patch_logits(D: nn.Module, head: MixupPatchHead, images: torch.Tensor, index: int, *,
                 feed: bool = True, parts: tuple[int, ...] | None = None) -> torch.Tensor:
    """Patch logits [B, H, W] of D's map `head.taps[index]` on `images`; D's forward stops at that map, as the
    official patch D returns early. FQ dictionaries are left as they are. `parts` (e.g. reals, mixes) keep D's batch
    statistics within each (FastGAN's BatchNorm)."""
    with capture_activations(D, [head.taps[index]], stop=True) as acts:
        D(images, feed=feed, update=False, parts=parts)
    return head(acts[head.taps[index]], index)


# ---------------------------------------------------------------------------------------------------------------------
# What training builds from params.


def settings_from(params) -> MixDLSettings:
    """MixDLSettings of a run's `mixdl` section."""
    x = params.mixdl
    return MixDLSettings(every=x.every, lambda_g=x.lambda_g, lambda_d=x.lambda_d, coefficients=x.coefficients,
                         dirichlet_alpha=x.dirichlet_alpha, num_mix=x.num_mix, reduction=x.reduction,
                         layer_per_sample=x.layer_per_sample)


@torch.no_grad()
def feature_dim(D: nn.Module, resolution: int) -> int:
    """Size of D's penultimate features: one forward of the bare trunk (no quantizers) on zeros, in eval mode."""
    trunk = D.trunk
    if hasattr(trunk, "feature_dim"):  # every sqgan trunk says it
        return int(trunk.feature_dim)
    was = trunk.training
    trunk.eval()
    try:
        x = torch.zeros(2, 3, resolution, resolution, device=next(trunk.parameters()).device)
        for block in trunk.blocks:
            x = block(x)
        return int(trunk.head(x)[1].flatten(1).shape[1])
    finally:
        trunk.train(was)


class MixDLHeads(nn.Module):
    """D's two MixDL heads, trained with D (in its optimiser, saved in its checkpoint): `proj` (the projection of the
    penultimate features the D distances are measured in) and `patch` (the patch-level head judging mixup images)."""

    def __init__(self, D: nn.Module, params) -> None:
        super().__init__()
        x, r = params.mixdl, params.model.resolution
        self.proj = ProjectionHead(feature_dim(D, r), x.proj_dim)
        self.patch = MixupPatchHead.for_discriminator(D, r, x.patch_sides, x.patch_activation)
