"""What every quantizer returns (FQ in D, SQ in G): one type, so neither quantizer imports the other."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sqgan.metrics.codebook import perplexity


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # straight-through h′ = h + sg(e − h), same shape as the input
    loss: torch.Tensor  # commitment β‖sg(e) − h‖² (mean over elements)
    indices: torch.Tensor  # [B, H, W] chosen entry per position
    counts: torch.Tensor  # [K] assignments per entry in this batch (all ranks summed in training)

    @property
    def perplexity(self) -> torch.Tensor:
        """exp(H(p)) of the batch's assignment histogram p (computed on demand: the loop counts over a window)."""
        return perplexity(self.counts)
