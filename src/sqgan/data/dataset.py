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
