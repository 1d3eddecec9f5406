"""Style quantization in the generator (SQ-GAN, CVPR 2025, §3; DESIGN.md §2.2).

w ∈ R^{w_dim} is split into s = w_dim / code_dim sub-vectors; one codebook C ∈ R^{K×code_dim} is shared by all
of them. Codes and sub-vectors live on the unit hypersphere (both l2-normalised), so the nearest code is the one of
largest cosine. The synthesis sees the concatenated codes; the gradient passes straight through to w.

    L_sq = ‖sg(ŵ_j) − c̄_k‖² + β‖ŵ_j − sg(c̄_k)‖²      (codebook + commitment terms on the sphere, mean over j)
    L_uf = log E_{i≠j} exp(−t‖c̄_i − c̄_j‖²)            (uniformity, Wang & Isola 2020: spreads the codes)

The codebook is an nn.Parameter learned by L_sq (not by an EMA as FQ's), so under DDP its gradient is all-reduced
with every other parameter and it stays identical on every rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sqgan.quant.common import QuantizerOutput


def uniformity_loss(codes: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """L_uf = log E_{i≠j} exp(−t‖c̄_i − c̄_j‖²) over the rows of `codes` (normalised here). −4t for two antipodal
    codes; 0 when all codes coincide."""
    c = F.normalize(codes, dim=-1)
    k = c.shape[0]
    if k < 2:
        return codes.new_zeros(())
    sq = (2.0 - 2.0 * c @ c.t()).clamp_min(0.0)  # ‖a − b‖² = 2 − 2a·b on the sphere
    eye = torch.eye(k, dtype=torch.bool, device=c.device)
    return torch.logsumexp((-t * sq).masked_fill(eye, float("-inf")).flatten(), dim=0) - math.log(k * (k - 1))


class StyleQuantizer(nn.Module):
    """Quantize w sub-vector-wise against one shared codebook on the unit hypersphere.

    Args:
        w_dim: dimension of w (the mapping network's output).
        code_dim: dimension of each sub-vector and code (SQ-GAN found 4 best); must divide w_dim.
        codebook_size: K codes.
        commitment: β of the commitment term of L_sq.
        uniformity_t: t of the uniformity loss.
    """

    def __init__(self, w_dim: int, code_dim: int = 4, codebook_size: int = 256, commitment: float = 0.25,
                 uniformity_t: float = 2.0) -> None:
        super().__init__()
        if code_dim < 1 or w_dim % code_dim:
            raise ValueError(f"StyleQuantizer: code_dim ({code_dim}) must divide w_dim ({w_dim}); pick a divisor")
        if codebook_size < 2:
            raise ValueError(f"StyleQuantizer: codebook_size must be ≥ 2, got {codebook_size}")
        self.w_dim, self.code_dim, self.codebook_size = w_dim, code_dim, codebook_size
        self.num_subvectors = w_dim // code_dim  # s
        self.commitment, self.uniformity_t = commitment, uniformity_t
        self.codebook = nn.Parameter(F.normalize(torch.randn(codebook_size, code_dim), dim=-1))

    def extra_repr(self) -> str:
        return f"w_dim={self.w_dim}, code_dim={self.code_dim}, codebook_size={self.codebook_size}"

    def codes(self) -> torch.Tensor:
        """c̄: the codebook on the sphere [K, code_dim]."""
        return F.normalize(self.codebook, dim=-1)

    def split(self, w: torch.Tensor) -> torch.Tensor:
        """ŵ: w [B, w_dim] as s normalised sub-vectors [B, s, code_dim]."""
        if w.dim() != 2 or w.shape[1] != self.w_dim:
            raise ValueError(f"StyleQuantizer expects w of shape [B, {self.w_dim}], got {list(w.shape)}")
        return F.normalize(w.view(w.shape[0], self.num_subvectors, self.code_dim), dim=-1)

    def forward(self, w: torch.Tensor) -> QuantizerOutput:
        sub = self.split(w)
        codes = self.codes()
        with torch.no_grad():
            indices = (sub.reshape(-1, self.code_dim) @ codes.t()).argmax(dim=1)  # max cosine = nearest on the sphere
        q = codes[indices].view_as(sub)
        if torch.is_grad_enabled():  # the losses only matter where they are backpropagated (G's step, not D's)
            l_sq = (sub.detach() - q).pow(2).sum(-1).mean() + self.commitment * (sub - q.detach()).pow(2).sum(-1).mean()
            loss = l_sq + uniformity_loss(self.codebook, self.uniformity_t)
        else:
            loss = w.new_zeros(())
        flat_q = q.reshape(w.shape)
        quantized = w + (flat_q - w).detach() if w.requires_grad else flat_q  # forward: the codes; backward: identity
        counts = torch.zeros(self.codebook_size, device=w.device).index_add_(
            0, indices, torch.ones_like(indices, dtype=torch.float32))
        return QuantizerOutput(quantized, loss, indices.view(w.shape[0], self.num_subvectors), counts)
