"""FFHQ-2.5k (DESIGN.md §3): image features of all FFHQ images → KMeans (K = 14, seeded) → the smallest cluster.

Input: a curated dataset (manifest with sha256, which keys the features cache). Output (atomic):
    images/…             the smallest cluster's images (hard links where possible)
    manifest.parquet     those images, with their `cluster`
    clusters.parquet     every input image with its cluster id
    cluster_sizes.png    bar chart of the cluster sizes (chosen cluster highlighted)
    tsne.png             t-SNE of the features coloured by cluster (≤ tsne_max points, seeded subsample)
    ffhq2k5.json         K, sizes, chosen cluster, image count, feature extractor
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from sqgan.data.embeddings import FeatureExtractor, extract_features
from sqgan.data.manifest import read_manifest, write_manifest
from sqgan.io import check_output, link_or_copy, stage_output, write_json_atomic

REPORT = "ffhq2k5.json"


def cluster_features(features: np.ndarray, k: int, seed: int = 0, pca_dims: int | None = None) -> np.ndarray:
    """KMeans labels of `features` (rows l2-normalised; optional PCA first, for raw pixels)."""
    x = features.astype(np.float32)
    if pca_dims and x.shape[1] > pca_dims:
        x = PCA(n_components=min(pca_dims, len(x)), random_state=seed).fit_transform(x)
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    return KMeans(n_clusters=k, random_state=seed, n_init=10).fit_predict(x)


def smallest_cluster(labels: np.ndarray, k: int) -> tuple[int, np.ndarray]:
    """(id of the smallest non-empty cluster — the lowest id on ties, sizes of all K clusters)."""
    sizes = np.bincount(labels, minlength=k)
    nonempty = np.where(sizes > 0)[0]
    return int(nonempty[np.argmin(sizes[nonempty])]), sizes


def _plot_sizes(sizes: np.ndarray, chosen: int, path: Path) -> None:
    matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    colors = ["tab:red" if i == chosen else "tab:gray" for i in range(len(sizes))]
    ax.bar(range(len(sizes)), sizes, color=colors)
    ax.set_xlabel("cluster")
    ax.set_ylabel("images")
    ax.set_title(f"cluster sizes (K={len(sizes)}); chosen: {chosen} ({sizes[chosen]} images)")
    ax.set_xticks(range(len(sizes)))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_tsne(features: np.ndarray, labels: np.ndarray, chosen: int, path: Path, seed: int, max_points: int) -> None:
    matplotlib.use("Agg")

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(features), size=min(max_points, len(features)), replace=False))
    perplexity = float(min(30, max(2, (len(idx) - 1) // 3)))
    emb = TSNE(n_components=2, random_state=seed, perplexity=perplexity, init="pca").fit_transform(features[idx])
    fig, ax = plt.subplots(figsize=(6, 6))
    k = int(labels.max()) + 1
    sc = ax.scatter(emb[:, 0], emb[:, 1], c=labels[idx], cmap=plt.get_cmap("tab20", k), vmin=-0.5, vmax=k - 0.5, s=6)
    mask = labels[idx] == chosen
    ax.scatter(emb[mask, 0], emb[mask, 1], facecolors="none", edgecolors="black", s=14, linewidths=0.5)
    ax.set_title(f"t-SNE, {len(idx)} images (cluster {chosen} outlined)")
    fig.colorbar(sc, ax=ax, label="cluster")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_ffhq2k5(
    src: str | Path,
    out: str | Path,
    extractor: FeatureExtractor,
    cache_dir: str | Path,
    k: int = 14,
    seed: int = 0,
    batch_size: int = 64,
    tsne_max: int = 5000,
    force: bool = False,
) -> dict:
    """Cluster the curated dataset `src` and write its smallest cluster to `out`; returns the report."""
    src, out = Path(src), Path(out)
    check_output(out, "ffhq2k5", (src,), force)  # before hours of feature extraction, not after
    df = read_manifest(src).sort_values("path").reset_index(drop=True)
    if not 2 <= k <= len(df):
        raise ValueError(f"--k must be in [2, {len(df)}] (images in {src}), got {k}")
    feats = extract_features(src, list(df["path"]), list(df["sha256"]), extractor, cache_dir, batch_size)
    pca = 50 if extractor.key.startswith("pixels") else None
    labels = cluster_features(feats, k, seed, pca_dims=pca)
    chosen, sizes = smallest_cluster(labels, k)
    df["cluster"] = labels
    report = {"k": k, "seed": seed, "features": extractor.key, "sizes": sizes.tolist(), "chosen_cluster": chosen,
              "images": int(sizes[chosen]), "input_images": len(df)}
    with stage_output(out, "ffhq2k5", (src,), force) as tmp:
        picked = df[df["cluster"] == chosen].copy()
        for rel in picked["path"]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(src / rel, tmp / rel)
        picked["cluster_of"] = src.name
        write_manifest(tmp, picked.drop(columns=["sha256"]).to_dict("records"))
        df.to_parquet(tmp / "clusters.parquet", index=False)
        _plot_sizes(sizes, chosen, tmp / "cluster_sizes.png")
        _plot_tsne(feats, labels, chosen, tmp / "tsne.png", seed, tsne_max)
        write_json_atomic(tmp / REPORT, report)
    return report
