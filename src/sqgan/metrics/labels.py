"""The classes of an evaluation's images: which class a conditional generator draws each image in, so every metric
(and `sqgan sample`) sees the same balanced set, whatever the batch size."""

from __future__ import annotations

import torch
from torch import nn


def classes_of(g: nn.Module) -> int:
    """The classes a generator is conditioned on (0: unconditional)."""
    return int(getattr(g, "num_classes", 0) or 0)


def eval_labels(num_classes: int, start: int, n: int, label: int | None = None) -> torch.Tensor | None:
    """The classes of images start … start+n−1 of an evaluation: `label` for all of them when given, else class
    i mod K for image i (balanced: every class equally often, the same images for any batch size); None when
    unconditional."""
    if not num_classes:
        if label is not None:
            raise ValueError(f"class {label}: this generator is unconditional (trained with model.conditional false)")
        return None
    if label is not None:
        if not 0 <= label < num_classes:
            raise ValueError(f"class {label}: this generator has {num_classes} classes, 0..{num_classes - 1}")
        return torch.full((n,), label, dtype=torch.long)
    return torch.arange(start, start + n) % num_classes
