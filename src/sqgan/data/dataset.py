"""torch Dataset over a curated manifest; images are decoded once and held as uint8 at the resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sqgan.data.manifest import read_manifest


class ManifestDataset(Dataset):
    """Images of one split of a curated dataset as float tensors in [-1, 1], [3, R, R]. With `mirror` (stylegan2-ada's
    --mirror) it holds 2N samples: index i < N is image i, index N + i is image i flipped left-right (`batch`,
    `batch_labels`); `images` and `labels` stay the N images as decoded."""

    def __init__(self, root: str | Path, resolution: int, split: str | None = "train", mirror: bool = False) -> None:
        self.root = Path(root)
        self.mirror = mirror
        self._gather: torch.Tensor | None = None  # a copy of images on the training device (`to_device`)
        self._gather_labels: torch.Tensor | None = None
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
        return self.images.shape[0] * (2 if self.mirror else 1)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.batch(torch.tensor([i]))[0].cpu()

    def to_device(self, device: torch.device, max_bytes: int) -> bool:
        """Keep a copy of the uint8 images (and labels) on `device` for `batch` when they take at most `max_bytes`
        (a GPU: batches are then gathered there, no host copy per step); False (nothing done) on a CPU or when too
        large."""
        if device.type == "cpu" or self.images.numel() > max_bytes:
            return False
        self._gather = self.images.to(device)
        self._gather_labels = self.labels.to(device) if self.labels is not None else None
        return True

    def _split(self, indices: torch.Tensor, on: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = indices.to(on)
        if not self.mirror:
            return idx, None
        n = self.images.shape[0]
        return idx % n, idx >= n

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Samples `indices` (of len(self)) as float [B, 3, R, R] in [-1, 1], on the device `to_device` chose (else
        the host)."""
        src = self._gather if self._gather is not None else self.images
        idx, flip = self._split(indices, src.device)
        x = src[idx]
        if flip is not None:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.float() / 127.5 - 1.0

    def batch_labels(self, indices: torch.Tensor) -> torch.Tensor:
        """The classes of samples `indices` (a flipped image keeps its class); the dataset must have labels."""
        if self.labels is None:
            raise ValueError(f"{self.root}: the manifest has no 'label' column")
        src = self._gather_labels if self._gather_labels is not None else self.labels
        return src[self._split(indices, src.device)[0]]


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
