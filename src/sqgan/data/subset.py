"""Few-shot subsets (DESIGN.md §3): a seeded choice of n images of a curated dataset's train split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sqgan.data.manifest import read_manifest, write_manifest
from sqgan.io import link_or_copy, stage_output


def make_subset(src: str | Path, out: str | Path, n: int, seed: int = 0, force: bool = False) -> Path:
    """Write the n-image subset of `src` chosen by `seed` to `out` (same n, seed and source → same subset)."""
    src, out = Path(src), Path(out)
    df = read_manifest(src)
    train = df[df["split"] == "train"].sort_values("path").reset_index(drop=True)
    if not 1 <= n <= len(train):
        raise ValueError(f"--n must be in [1, {len(train)}] (train images in {src}), got {n}")
    pick = np.sort(np.random.default_rng(seed).choice(len(train), size=n, replace=False))
    chosen = train.iloc[pick].copy()
    with stage_output(out, "subset", (src,), force) as tmp:
        for rel in chosen["path"]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(src / rel, tmp / rel)
        chosen["subset_of"] = src.name
        chosen["subset_seed"] = seed
        write_manifest(tmp, chosen.drop(columns=["sha256"]).to_dict("records"))
    return out
