"""Pieces shared by the dataset recipes (DESIGN.md §3): the crop grid and the seeded train/test split."""

from __future__ import annotations

import numpy as np


def grid_offsets(size: int, crop: int, stride: int) -> list[int]:
    """Crop origins along one axis: 0, stride, … while the crop fits (BreCaHAD: 1360/512/256 → 0..768)."""
    if crop > size:
        raise ValueError(f"crop {crop} is larger than the image side {size}; use a crop ≤ {size}")
    return list(range(0, size - crop + 1, stride))


def split_for(n: int, test_fraction: float, seed: int) -> list[str]:
    """Seeded train/test assignment of n items (the same n, fraction and seed give the same split)."""
    n_test = int(round(n * test_fraction))
    order = np.random.default_rng(seed).permutation(n)
    split = ["train"] * n
    for i in order[:n_test]:
        split[i] = "test"
    return split
