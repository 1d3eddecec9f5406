"""Feature quantization of discriminator features (FQ-GAN, Zhao et al., ICML 2020, §3).

A map [B, C, H, W] is B·H·W vectors of dim C; each goes to its nearest dictionary entry (L2).
The dictionary is not learned by gradients but by an exponential moving average of the features
assigned to each entry (paper eq. 7–8, official code `ops.VectorQuantizerEMA`):

    N_k ← λ N_k + (1 − λ) n_k                  n_k  = number of vectors assigned to k in the batch
    m_k ← λ m_k + (1 − λ) Σ_i h_{i,k}          Σ h  = sum of the vectors assigned to k
    Ñ_k = (N_k + ε) / (n + K ε) · n            n    = Σ_k N_k   (Laplace smoothing)
    e_k = m_k / Ñ_k

The stored N_k stays the raw EMA; Ñ_k only normalises (as in the official code and Sonnet's VQ-VAE).
λ = 0 gives e_k = the minibatch mean of the vectors assigned to k (up to the ε of the smoothing).
N starts at 1 and m at the initial dictionary, so e = m / N starts at it; an entry never chosen then
decays smoothly towards 0 instead of jumping to ~1/ε times its start (the official code starts N at 0).

Initial dictionary: `init="batch"` (default) takes K vectors of the first training batch, so the entries
start where the features are; `init="random"` is the official N(0, 1). With DCGAN's N(0, 0.02) weights the
features start near 0 while N(0, 1) entries have norm ≈ √C, so in feed mode every position snaps to
the one entry nearest 0 and D sees a constant (measured: all-equal logits, 1/64 entries used).

Under torch.distributed, n_k and Σh are all-reduced (summed) before the EMA, so every rank holds the
same dictionary, equal to that of one process fed the concatenated batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from sqgan.metrics.codebook import perplexity


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # straight-through h′ = h + sg(e − h), same shape as the input
    loss: torch.Tensor  # commitment β‖sg(e) − h‖² (mean over elements)
    indices: torch.Tensor  # [B, H, W] chosen entry per position
    perplexity: torch.Tensor  # exp(H(p)) of the batch's assignment histogram p
    counts: torch.Tensor  # [K] assignments per entry in this batch (all ranks summed in training)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class FeatureQuantizer(nn.Module):
    """Position-wise vector quantizer with an EMA dictionary (FQ-GAN).

    Args:
        dim: C, the channel dimension of the quantized feature map.
        codebook_size: K, number of dictionary entries (the paper uses K = 2^P).
        decay: λ, EMA decay of the dictionary statistics (paper 0.9, official code 0.8).
        commitment: β of the commitment loss β‖sg(e) − h‖² (paper 0.25).
        eps: ε of the Laplace smoothing of the counts (1e-5).
        mode: "feed" — `forward(...).quantized` is meant to go on to the next layer (the paper);
            "regularize" — the next layer sees h and only the loss pulls h to the dictionary (official code).
            The quantizer computes the same outputs either way; `feeds` tells the caller which to pass on.
        init: "batch" — the dictionary starts as K vectors drawn from the first training batch;
            "random" — N(0, 1) entries (official code).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        decay: float = 0.9,
        commitment: float = 0.25,
        eps: float = 1e-5,
        mode: Literal["feed", "regularize"] = "feed",
        init: Literal["batch", "random"] = "batch",
    ) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"FeatureQuantizer: decay must be in [0, 1), got {decay}")
        if codebook_size < 1 or dim < 1:
            raise ValueError(f"FeatureQuantizer: dim and codebook_size must be ≥ 1, got {dim}, {codebook_size}")
        if mode not in ("feed", "regularize"):
            raise ValueError(f"FeatureQuantizer: mode must be 'feed' or 'regularize', got {mode!r}")
        if init not in ("batch", "random"):
            raise ValueError(f"FeatureQuantizer: init must be 'batch' or 'random', got {init!r}")
        self.dim, self.codebook_size, self.init = dim, codebook_size, init
        self.decay, self.commitment, self.eps, self.mode = decay, commitment, eps, mode
        init = torch.randn(codebook_size, dim)
        self.register_buffer("codebook", init.clone())  # e  [K, C]
        self.register_buffer("ema_count", torch.ones(codebook_size))  # N  [K]
        self.register_buffer("ema_sum", init.clone())  # m  [K, C]
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @property
    def feeds(self) -> bool:
        return self.mode == "feed"

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, decay={self.decay}, mode={self.mode!r}"

    @torch.no_grad()
    def initialise(self, flat: torch.Tensor) -> None:
        """Set the starting dictionary once (from `flat` when init="batch"); rank 0's copy wins under DDP."""
        if bool(self.initialised):
            return
        if self.init == "batch":
            n = flat.shape[0]
            pick = torch.randperm(n, device=flat.device)[: self.codebook_size]
            if n < self.codebook_size:  # fewer vectors than entries: repeat them, jittered
                extra = torch.randint(n, (self.codebook_size - n,), device=flat.device)
                pick = torch.cat([pick, extra])
            start = flat[pick].float()
            if n < self.codebook_size:
                start[n:] += 1e-3 * start[n:].std().clamp_min(1e-6) * torch.randn_like(start[n:])
            self.codebook.copy_(start)
            self.ema_sum.copy_(start)
            self.ema_count.fill_(1.0)
        if _distributed():
            for buf in (self.codebook, self.ema_count, self.ema_sum):
                dist.broadcast(buf, src=0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def assign(self, flat: torch.Tensor) -> torch.Tensor:
        """Nearest entry (L2) for each row of `flat` [N, C]."""
        e = self.codebook.to(flat.dtype)
        dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None, :]
        return dist2.argmin(dim=1)

    @torch.no_grad()
    def ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """One EMA step of the dictionary from vectors `flat` [N, C] assigned to `indices` [N]; returns n_k."""
        onehot = torch.zeros(flat.shape[0], self.codebook_size, device=flat.device, dtype=torch.float32)
        onehot.scatter_(1, indices[:, None], 1.0)
        counts = onehot.sum(0)  # n_k
        sums = onehot.t() @ flat.float()  # Σ_i h_{i,k}
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        lam = self.decay
        self.ema_count.mul_(lam).add_(counts, alpha=1 - lam)
        self.ema_sum.mul_(lam).add_(sums, alpha=1 - lam)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.codebook_size * self.eps) * n
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        return counts

    def forward(self, h: torch.Tensor) -> QuantizerOutput:
        if h.dim() != 4 or h.shape[1] != self.dim:
            raise ValueError(f"FeatureQuantizer expects [B, {self.dim}, H, W], got {list(h.shape)}")
        b, c, hh, ww = h.shape
        flat = h.permute(0, 2, 3, 1).reshape(-1, c)
        if self.training:
            self.initialise(flat.detach())
        indices = self.assign(flat.detach())
        # h′ uses the dictionary the vectors were assigned to (before this batch's EMA step), as the official code.
        e = self.codebook[indices].to(h.dtype).view(b, hh, ww, c).permute(0, 3, 1, 2)
        if self.training:
            counts = self.ema_update(flat.detach(), indices)
        else:
            counts = torch.bincount(indices, minlength=self.codebook_size).float()
        loss = self.commitment * (h - e.detach()).pow(2).mean()
        quantized = h + (e - h).detach()  # straight-through: forward e, gradient identity
        return QuantizerOutput(quantized, loss, indices.view(b, hh, ww), perplexity(counts), counts)


def dictionary_digest(module: nn.Module) -> str:
    """sha256 over every FeatureQuantizer's dictionary and EMA statistics in `module` (in module order): equal on
    every DDP rank as long as the all-reduced EMA keeps them in step."""
    import hashlib

    h = hashlib.sha256()
    for name, sub in module.named_modules():
        if isinstance(sub, FeatureQuantizer):
            h.update(name.encode())
            for buf in (sub.codebook, sub.ema_count, sub.ema_sum):
                h.update(buf.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
