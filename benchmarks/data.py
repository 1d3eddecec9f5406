"""Dataset-stage throughput, measured (numbers go in notes, never into timed tests).

- BreCaHAD crops per second on 1360×1024 slides (12 crops each, PNG written);
- KMeans (K = 14, n_init = 10, as the FFHQ-2.5k stage) on 70,000 × 768 features;
- feature extraction images/s: pixels, and BLIP-base's vision encoder (real size, random weights: the
  speed does not depend on the weights), on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def bench_crops(n_slides: int) -> None:
    from sqgan.data.brecahad import crop_brecahad

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "slides"
        src.mkdir()
        for i in range(n_slides):
            Image.fromarray(rng.integers(0, 255, (1024, 1360, 3), dtype=np.uint8)).save(src / f"s{i}.tif")
        t = time.perf_counter()
        counts = crop_brecahad(src, Path(d) / "out")
        dt = time.perf_counter() - t
    rate = counts["crops"] / dt
    print(f"brecahad: {counts['crops']} crops from {n_slides} slides in {dt:.2f} s = {rate:.1f} crops/s")


def bench_kmeans(n: int, dim: int, k: int) -> None:
    from sqgan.data.ffhq import cluster_features

    x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    t = time.perf_counter()
    cluster_features(x, k, seed=0)
    print(f"kmeans: {n} × {dim}, K={k}, n_init=10: {time.perf_counter() - t:.1f} s")


def bench_features(n: int, batch: int) -> None:
    from transformers import BlipImageProcessor, BlipVisionConfig, BlipVisionModel

    from sqgan.data.embeddings import BlipFeatures, PixelFeatures

    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (256, 256, 3), dtype=np.uint8))
              for i in range(n)]
    for ext in (PixelFeatures(), BlipFeatures(BlipVisionModel(BlipVisionConfig()), BlipImageProcessor(), "blip-base")):
        ext(images[:2])  # warm-up
        t = time.perf_counter()
        for s in range(0, n, batch):
            ext(images[s : s + batch])
        dt = time.perf_counter() - t
        dev = getattr(ext, "device", "cpu")
        print(f"features {ext.key}: {n / dt:.1f} images/s on {dev} (batch {batch}, threads {torch.get_num_threads()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--kmeans-n", type=int, default=70_000)
    ap.add_argument("--kmeans-dim", type=int, default=768)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    bench_crops(a.slides)
    bench_kmeans(a.kmeans_n, a.kmeans_dim, 14)
    bench_features(a.images, a.batch)


if __name__ == "__main__":
    main()
