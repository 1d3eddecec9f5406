"""torch Dataset over a curated manifest; images are decoded once and held as uint8 at the resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sqgan.data.manifest import read_manifest


class ManifestDataset(Dataset):
    """Images of one split of a curated dataset as float tensors in [-1, 1], [3, R, R]."""

    def __init__(self, root: str | Path, resolution: int, split: str | None = "train") -> None:
        self.root = Path(root)
        df = read_manifest(self.root)
        if split is not None:
            df = df[df["split"] == split]
        if len(df) == 0:
            raise ValueError(f"{self.root}: no images in split {split!r}; check the manifest's 'split' column")
        self.manifest = df.reset_index(drop=True)
        self.resolution = resolution
        arrays = []
        for rel in self.manifest["path"]:
            with Image.open(self.root / rel) as im:
                im = im.convert("RGB")
                if im.size != (resolution, resolution):
                    im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
                arrays.append(np.asarray(im))
        self.images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, R, R]
        # the class of each image [N] when the manifest has labels (conditional training reads them), else None
        labelled = "label" in self.manifest
        self.labels = torch.tensor(self.manifest["label"].to_numpy(dtype=np.int64)) if labelled else None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].float() / 127.5 - 1.0

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices].float() / 127.5 - 1.0


def check_class_labels(root: str | Path, labels: np.ndarray | torch.Tensor | None, num_classes: int) -> None:
    """For a conditional run (num_classes > 0): the dataset at `root` has labels and every one lies in
    [0, num_classes); a ValueError naming both otherwise. Nothing to check for an unconditional run."""
    if num_classes <= 0:
        return
    if labels is None:
        raise ValueError(f"{root}: model.conditional is true but the manifest has no 'label' column; curate the "
                         f"dataset with labels (data.curate.labels csv or folders; cifar10/cifar100 have them) or "
                         f"set model.conditional false")
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        found = len(np.unique(labels))
        raise ValueError(f"{root}: the manifest's labels run {labels.min()}..{labels.max()} ({found} classes) but "
                         f"model.num_classes is {num_classes}; set model.num_classes to {labels.max() + 1}")
