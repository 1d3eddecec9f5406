"""A digest of every codebook in a set of modules: the check that DDP ranks hold the same dictionaries."""

from __future__ import annotations

import hashlib

from torch import nn

from sqgan.quant.fq import FeatureQuantizer
from sqgan.quant.sq import StyleQuantizer


def dictionary_digest(*modules: nn.Module) -> str:
    """sha256 over every codebook in `modules` (in module order): each FeatureQuantizer's dictionary and EMA
    statistics, each StyleQuantizer's codebook. Equal on every DDP rank as long as the all-reduced EMA (FQ) and the
    all-reduced gradients (SQ) keep them in step."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, sub in module.named_modules():
            if isinstance(sub, FeatureQuantizer):
                bufs = (sub.codebook, sub.ema_count, sub.ema_sum)
            elif isinstance(sub, StyleQuantizer):
                bufs = (sub.codebook,)
            else:
                continue
            h.update(f"{i}.{name}".encode())
            for buf in bufs:
                h.update(buf.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
