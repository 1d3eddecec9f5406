"""Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls reaching
every feature vector's k-th nearest neighbour (k = 3); precision = share of generated vectors inside the real
manifold, recall = share of real vectors inside the generated one — torch-fidelity's implementation."""

from __future__ import annotations

import torch
from torch_fidelity.metric_prc import prc_features_to_metric


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} real and generated images, got "
                         f"{len(real)} and {len(fake)}")
    out = prc_features_to_metric(fake.detach().cpu().float(), real.detach().cpu().float(), prc_neighborhood=k,
                                 prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    return float(out["precision"]), float(out["recall"])
