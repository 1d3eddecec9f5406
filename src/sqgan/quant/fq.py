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

from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from sqgan.quant.common import QuantizerOutput


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
            self._ready_cache = True
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
        self._ready_cache = True

    @torch.no_grad()
    def assign(self, flat: torch.Tensor) -> torch.Tensor:
        """Nearest entry (L2) for each row of `flat` [N, C]: argmin ‖e‖² − 2 h·e in one GEMM (‖h‖² is the same
        for every entry of a row, so it is left out)."""
        e = self.codebook.to(flat.dtype)
        return torch.addmm(e.pow(2).sum(1)[None, :], flat, e.t(), alpha=-2.0).argmin(dim=1)

    @torch.no_grad()
    def ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """One EMA step of the dictionary from vectors `flat` [N, C] assigned to `indices` [N]; returns n_k."""
        counts = torch.zeros(self.codebook_size, device=flat.device).index_add_(
            0, indices, torch.ones_like(indices, dtype=torch.float32))  # n_k (scatter-add: no one-hot, no sync)
        sums = torch.zeros(self.codebook_size, flat.shape[1], device=flat.device).index_add_(
            0, indices, flat.float())  # Σ_i h_{i,k}
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

    def forward(self, h: torch.Tensor, update: bool = True) -> QuantizerOutput:
        """Quantize h; in training mode with `update`, take one EMA step of the dictionary (a forward with
        update=False, e.g. D in the G step when fq.update_in_g_step is off, leaves it as it is)."""
        if h.dim() != 4 or h.shape[1] != self.dim:
            raise ValueError(f"FeatureQuantizer expects [B, {self.dim}, H, W], got {list(h.shape)}")
        b, c, hh, ww = h.shape
        flat = h.permute(0, 2, 3, 1).reshape(-1, c)
        if self.training and not self._ready:
            self.initialise(flat.detach())
        indices = self.assign(flat.detach())
        # h′ uses the dictionary the vectors were assigned to (before this batch's EMA step), as the official code.
        e = self.codebook.index_select(0, indices).to(h.dtype)
        delta = (e - flat.detach()).view(b, hh, ww, c).permute(0, 3, 1, 2)  # e − h in h's shape (one subtraction)
        if self.training and update:
            counts = self.ema_update(flat.detach(), indices)
        else:
            counts = torch.zeros(self.codebook_size, device=h.device).index_add_(
                0, indices, torch.ones_like(indices, dtype=torch.float32))
        quantized, loss = _StraightThroughCommitment.apply(h, delta, self.commitment)
        return QuantizerOutput(quantized, loss, indices.view(b, hh, ww), counts)

    @property
    def _ready(self) -> bool:
        """Whether the dictionary has been initialised; read from the buffer once, then cached (no host sync per
        step; a state_dict load resets the cache)."""
        if not getattr(self, "_ready_cache", False):
            self._ready_cache = bool(self.initialised)
        return self._ready_cache

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - nn.Module's signature
        self._ready_cache = False
        super()._load_from_state_dict(*args, **kwargs)


class _StraightThroughCommitment(torch.autograd.Function):
    """(h′, L_Q) = (h + sg(e − h), β‖sg(e) − h‖²_mean) from h and δ = sg(e − h) in one pass: forward one add and
    one squared mean, backward ∂h′/∂h = I plus ∂L_Q/∂h = −2β δ / n (what autograd would build from five ops)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, delta: torch.Tensor, beta: float):  # noqa: ANN205 - autograd.Function
        ctx.save_for_backward(delta)
        ctx.beta = beta
        flat = delta.permute(0, 2, 3, 1).reshape(-1) if delta.dim() == 4 else delta.reshape(-1)  # a view: no copy
        return h + delta, (beta / flat.numel()) * torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor | None, grad_loss: torch.Tensor | None):  # noqa: ANN205
        (delta,) = ctx.saved_tensors
        if grad_loss is None:
            return grad_q, None, None
        scale = grad_loss * (-2.0 * ctx.beta / delta.numel())  # a 0-d tensor: no host sync
        grad = torch.addcmul(grad_q, delta, scale) if grad_q is not None else delta * scale
        return grad, None, None
