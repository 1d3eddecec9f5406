"""Image features for dataset curation (FFHQ-2.5k clustering), with a cache keyed by image sha256.

- `pixels`: downscaled RGB pixels (weight-free; for the demo and tests).
- `clip`: an open_clip CLIP image encoder (weights from a local file or an open_clip tag).
- `blip`: the BLIP-base vision encoder through transformers (default `Salesforce/blip-itm-base-coco`;
  a local folder works offline), its pooled output.
Batches run on the GPU when there is one. Each image's features are cached as
`<cache>/<extractor key>/<sha[:2]>/<sha>.npy`, so a re-run extracts nothing twice.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sqgan.data.clip import ClipWeightsUnavailable, load_clip
from sqgan.io import atomic_path


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FeatureExtractor(ABC):
    """Maps a list of RGB uint8 images to an [N, D] float32 array; `key` names it in the cache."""

    key = "base"

    def __init__(self) -> None:
        self.images_seen = 0  # how many images went through the network (the cache saves the rest)

    @abstractmethod
    def _features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """[N, D] features of a batch."""

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.images_seen += len(images)
        return np.asarray(self._features(images), dtype=np.float32)


class PixelFeatures(FeatureExtractor):
    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.size = size
        self.key = f"pixels-{size}"

    def _features(self, images: Sequence[Image.Image]) -> np.ndarray:
        side = (self.size, self.size)
        arrs = [np.asarray(im.convert("RGB").resize(side, Image.Resampling.BILINEAR)) for im in images]
        return np.stack(arrs).reshape(len(images), -1).astype(np.float32) / 255.0


class NetworkFeatures(FeatureExtractor):
    """A torch image encoder and its preprocessing, on the GPU when there is one."""

    def __init__(self, model: torch.nn.Module, preprocess, key: str) -> None:
        super().__init__()
        self.device = _device()
        self.model = model.to(self.device).eval()
        self.preprocess, self.key = preprocess, key


class ClipFeatures(NetworkFeatures):
    """open_clip image embeddings, l2-normalised."""

    @classmethod
    def load(cls, model_name: str = "ViT-B-32", pretrained: str | None = None,
             key: str = "data.ffhq2k5.pretrained") -> ClipFeatures:
        """Through the one CLIP loader (`sqgan.data.clip`); its errors name `key` and end with the pixels fallback."""
        try:
            model, preprocess = load_clip(model_name, pretrained, key=key)
        except ClipWeightsUnavailable as e:
            raise ClipWeightsUnavailable(f"{e}; or use --features pixels") from None
        return cls(model, preprocess, f"clip-{model_name}-{Path(str(pretrained)).name}")

    @torch.no_grad()
    def _features(self, images: Sequence[Image.Image]) -> np.ndarray:
        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        f = self.model.encode_image(x).float()
        return torch.nn.functional.normalize(f, dim=-1).cpu().numpy()


class BlipFeatures(NetworkFeatures):
    """Pooled output of BLIP's vision encoder (768-d for BLIP-base); `preprocess` is a BlipImageProcessor."""

    @classmethod
    def load(cls, name_or_path: str = "Salesforce/blip-itm-base-coco") -> BlipFeatures:
        # on demand: BLIP (transformers) is optional and heavy
        from transformers import BlipForImageTextRetrieval, BlipImageProcessor

        try:
            model = BlipForImageTextRetrieval.from_pretrained(name_or_path)
            processor = BlipImageProcessor.from_pretrained(name_or_path)
        except Exception as e:
            raise RuntimeError(
                f"could not load BLIP {name_or_path!r} ({e}); download it where the hub is reachable and pass the "
                f"local folder, or use --features pixels"
            ) from None
        return cls(model.vision_model, processor, f"blip-{Path(name_or_path).name}")

    @torch.no_grad()
    def _features(self, images: Sequence[Image.Image]) -> np.ndarray:
        batch = self.preprocess(images=[im.convert("RGB") for im in images], return_tensors="pt")
        out = self.model(pixel_values=batch["pixel_values"].to(self.device))
        return out.pooler_output.float().cpu().numpy()


def build_extractor(kind: str, model: str | None = None, pretrained: str | None = None) -> FeatureExtractor:
    if kind == "pixels":
        return PixelFeatures()
    if kind == "clip":
        return ClipFeatures.load(model or "ViT-B-32", pretrained)
    if kind == "blip":
        return BlipFeatures.load(model or "Salesforce/blip-itm-base-coco")
    raise ValueError(f"--features must be one of blip, clip, pixels; got {kind!r}")


def _cache_file(cache_dir: Path, key: str, sha: str) -> Path:
    return cache_dir / re.sub(r"[^A-Za-z0-9._-]+", "_", key) / sha[:2] / f"{sha}.npy"


def extract_features(
    root: str | Path,
    paths: Sequence[str],
    shas: Sequence[str],
    extractor: FeatureExtractor,
    cache_dir: str | Path,
    batch_size: int = 64,
) -> np.ndarray:
    """[N, D] features of the images `paths` (relative to `root`), from the cache where it has them."""
    root, cache_dir = Path(root), Path(cache_dir)
    out: list[np.ndarray | None] = [None] * len(paths)
    todo = []
    for i, sha in enumerate(shas):
        f = _cache_file(cache_dir, extractor.key, sha)
        if f.exists():
            out[i] = np.load(f)
        else:
            todo.append(i)
    with tqdm(total=len(todo), desc=f"features {extractor.key}", unit="img", mininterval=1.0,
              disable=not todo) as bar:
        for start in range(0, len(todo), batch_size):
            idx = todo[start : start + batch_size]
            images = []
            for i in idx:
                with Image.open(root / paths[i]) as im:
                    images.append(im.convert("RGB"))
            feats = extractor(images)
            for i, f in zip(idx, feats, strict=True):
                out[i] = f
                dest = _cache_file(cache_dir, extractor.key, shas[i])
                dest.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, f)
            bar.update(len(idx))
    return np.stack(out)  # type: ignore[arg-type]
