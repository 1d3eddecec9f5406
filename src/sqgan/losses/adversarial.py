"""Adversarial losses on D's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """D's loss: hinge E[relu(1 − D(x))] + E[relu(1 + D(G(z)))], or non-saturating softplus."""
    if kind == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    if kind == "nonsaturating":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    raise ValueError(f"train.loss must be 'hinge' or 'nonsaturating', got {kind!r}")


def g_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """G's loss: hinge −E[D(G(z))], or non-saturating E[softplus(−D(G(z)))]."""
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "nonsaturating":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"train.loss must be 'hinge' or 'nonsaturating', got {kind!r}")
