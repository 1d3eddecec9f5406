"""Names of quality metrics: every choice that changes a value is in the name, so two values that share a name
were computed alike (stylegan2-ada's `fid50k_full`, extended by the feature network).

    fid{N}_{split}_{net}            FID of N generated images against the reference split
    sfid{N}_{split}_{net}           sFID: FID on spatial features (Inception mixed_6/conv, first 7 channels)
    kid{N}_{split}_{net}_mean|_std  KID (unbiased MMD², cubic kernel), subsets as stylegan2-ada
    precision{N}_{split}_{net}      improved precision / recall (k-NN manifolds, Kynkäänniemi et al. 2019)
    recall{N}_{split}_{net}
    is{N}_{net}_mean|_std           Inception Score (no reference set)
    lpips{N}_{net}                  mean LPIPS distance between N pairs of generated images (diversity)
    pplu{P}_{net}_mean|_std|_end    PPL uniformity: LPIPS along P straight latent paths of 10 steps (MixDL)
    nnmodes{N}_{split}_{net}        NN-mode count: distinct reference images nearest to one of N generated (MixDL)
    ifid{N}_{split}_{net}           intra-class FID: mean over classes of FID against that class's reals (conditional)

N is the number of generated images (`50k` when a multiple of 1000), split the reference split of the curated
dataset (`train`, `test`, … or `all`), net the feature network: `inception` (the canonical torch-fidelity
weights), `inception-<sha8>` (any other weights file), `randcnn` (the fixed-seed random CNN; `randcnn-s<seed>`
for another seed), `alex`/`vgg` (LPIPS on ImageNet weights) or `randalex`/`randvgg` (LPIPS on a random backbone).
The rest of the provenance (implementation and version, the weights' sha256, resizer, resolution, seeds) is
logged beside each value (`sqgan.metrics.provenance`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

QUALITY_METRICS = ("fid", "sfid", "kid", "precision", "recall", "is", "lpips", "pplu", "nnmodes", "ifid")
# compared against real images: their name holds the split
REFERENCED = ("fid", "sfid", "kid", "precision", "recall", "nnmodes", "ifid")

_KEY = re.compile(rf"^({'|'.join(QUALITY_METRICS)})(\d+k?)_(.+?)(?:_(mean|std|end))?$")


def count_tag(n: int) -> str:
    """50000 → '50k', 500 → '500' (stylegan2-ada's convention)."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def metric_key(metric: str, n: int, net: str, split: str | None = None, stat: str | None = None) -> str:
    if metric not in QUALITY_METRICS:
        raise ValueError(f"unknown quality metric {metric!r}; choose one of {', '.join(QUALITY_METRICS)}")
    if (metric in REFERENCED) != (split is not None):
        raise ValueError(f"{metric} {'needs' if metric in REFERENCED else 'takes no'} a reference split")
    parts = [f"{metric}{count_tag(n)}", *([split] if split else []), net, *([stat] if stat else [])]
    return "_".join(parts)


@dataclass(frozen=True)
class MetricKey:
    metric: str
    n: str
    split: str | None
    net: str
    stat: str | None


def parse_metric_key(key: str) -> MetricKey | None:
    """The parts of a quality metric's name, or None for any other metric (losses, codebook usage, …)."""
    m = _KEY.match(key)
    if m is None:
        return None
    metric, n, rest, stat = m.groups()
    split = None
    if metric in REFERENCED:
        split, sep, rest = rest.partition("_")
        if not sep:
            return None
    if "_" in rest or not rest:
        return None
    return MetricKey(metric, n, split, rest, stat)


def is_quality_metric(key: str) -> bool:
    return parse_metric_key(key) is not None
