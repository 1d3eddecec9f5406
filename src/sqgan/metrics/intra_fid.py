"""Intra-class FID (Miyato & Koyama 2018, the class-conditional tables of FQ-GAN and BigGAN): the mean over classes
of the FID between one class's generated images and that class's reference images, in the same feature space as FID.
A conditional generator that draws every class alike (ignoring its label) has a fine FID and a poor intra-class FID.

The evaluation draws image i in class i mod K (`sqgan.metrics.labels.eval_labels`), so N generated images give
⌊N/K⌋ or ⌈N/K⌉ per class; each class needs at least 2 of each kind (a covariance)."""

from __future__ import annotations

import torch

from sqgan.metrics.fid import fid_from_features


def intra_class_fid(real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor,
                    fake_labels: torch.Tensor) -> tuple[float, dict[int, float]]:
    """(mean over the generated classes, per-class FID) of features [N, F] with their labels [N]."""
    for what, f, y in (("reference", real, real_labels), ("generated", fake, fake_labels)):
        if y is None or y.shape != f.shape[:1]:
            raise ValueError(f"ifid needs one class label per {what} image, got "
                             f"{None if y is None else tuple(y.shape)} labels for {tuple(f.shape[:1])} features")
    per: dict[int, float] = {}
    for k in sorted(set(fake_labels.tolist())):
        r, g = real[real_labels == k], fake[fake_labels == k]
        if len(r) < 2 or len(g) < 2:
            raise ValueError(f"ifid: class {k} has {len(r)} reference and {len(g)} generated images; each class needs "
                             f"at least 2 of both (more generated images: num_fake ≥ 2 × classes; a reference split "
                             f"that holds every class)")
        per[k] = fid_from_features(r, g)
    return sum(per.values()) / len(per), per
