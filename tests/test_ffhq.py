"""FFHQ-2.5k clustering: smallest cluster on known clusters, the features cache, BLIP and CLIP paths."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sqgan.data.clip import ClipWeightsUnavailable
from sqgan.data.embeddings import (
    BlipFeatures,
    ClipFeatures,
    FeatureExtractor,
    PixelFeatures,
    build_extractor,
    extract_features,
)
from sqgan.data.ffhq import build_ffhq2k5, smallest_cluster


class KnownClusters(FeatureExtractor):
    """Features that put image i in cluster `truth[sha]`: three well separated blobs."""

    key = "known"

    def __init__(self, truth: dict[bytes, int]) -> None:
        super().__init__()
        self.truth = truth
        self.rng = np.random.default_rng(0)

    def _features(self, images):
        centres = np.eye(3, 8) * 10
        out = []
        for im in images:
            c = self.truth[im.tobytes()]
            out.append(centres[c] + self.rng.normal(0, 0.1, 8))
        return np.stack(out)


def _truth(demo_dir) -> tuple[dict[bytes, int], pd.DataFrame]:
    from PIL import Image

    df = pd.read_parquet(demo_dir / "manifest.parquet").sort_values("path").reset_index(drop=True)
    # clusters of 100, 40 and 9 images; the 9 must be chosen
    assign = np.array([0] * 100 + [1] * 40 + [2] * 9)
    np.random.default_rng(1).shuffle(assign)
    truth = {}
    for rel, c in zip(df["path"], assign, strict=True):
        with Image.open(demo_dir / rel) as im:
            truth[im.convert("RGB").tobytes()] = int(c)
    df["truth"] = assign
    return truth, df


def test_smallest_cluster_is_chosen_on_known_clusters_and_cache_is_reused(demo_dir, tmp_path):
    truth, df = _truth(demo_dir)
    ext = KnownClusters(truth)
    report = build_ffhq2k5(demo_dir, tmp_path / "out", ext, tmp_path / "cache", k=3, seed=0, batch_size=32)
    assert sorted(report["sizes"]) == [9, 40, 100] and report["images"] == 9
    assert ext.images_seen == 149
    chosen = set(pd.read_parquet(tmp_path / "out" / "manifest.parquet")["source_id"])
    assert chosen == set(df.loc[df["truth"] == 2, "source_id"])
    assert len(list((tmp_path / "out" / "images").iterdir())) == 9
    clusters = pd.read_parquet(tmp_path / "out" / "clusters.parquet")
    assert len(clusters) == 149 and clusters["cluster"].nunique() == 3
    for png in ("cluster_sizes.png", "tsne.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "ffhq2k5.json").read_text())["chosen_cluster"] == report["chosen_cluster"]
    # a re-run extracts nothing: every feature comes from the sha256-keyed cache
    again = KnownClusters(truth)
    assert build_ffhq2k5(demo_dir, tmp_path / "out2", again, tmp_path / "cache", k=3)["images"] == 9
    assert again.images_seen == 0


def test_smallest_cluster_ties_go_to_lowest_id_and_empty_clusters_are_skipped():
    chosen, sizes = smallest_cluster(np.array([0, 0, 2, 2, 3]), 4)
    assert chosen == 3 and sizes.tolist() == [2, 0, 2, 1]
    assert smallest_cluster(np.array([1, 0, 1, 0]), 2)[0] == 0


def test_k_larger_than_the_dataset_is_an_error(demo_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--k must be in \[2, 149\]"):
        build_ffhq2k5(demo_dir, tmp_path / "o", PixelFeatures(), tmp_path / "c", k=500)


def test_pixel_features_run_end_to_end_and_are_seed_deterministic(demo_dir, tmp_path):
    # separate caches: the second run extracts every feature again, so determinism is really tested
    ext_a, ext_b = PixelFeatures(), PixelFeatures()
    a = build_ffhq2k5(demo_dir, tmp_path / "a", ext_a, tmp_path / "ca", k=4, tsne_max=60)
    b = build_ffhq2k5(demo_dir, tmp_path / "b", ext_b, tmp_path / "cb", k=4, tsne_max=60)
    assert ext_a.images_seen == ext_b.images_seen == 149
    assert a == b and sum(a["sizes"]) == 149 and a["images"] == min(a["sizes"])
    ma = pd.read_parquet(tmp_path / "a" / "manifest.parquet")
    assert len(ma) == a["images"] and (ma["cluster"] == a["chosen_cluster"]).all()


def test_blip_path_with_a_tiny_random_blip_vision_model(demo_dir, tmp_path):
    from transformers import BlipImageProcessor, BlipVisionConfig, BlipVisionModel

    torch.manual_seed(0)
    cfg = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=0.02)
    ext = BlipFeatures(BlipVisionModel(cfg), BlipImageProcessor(size={"height": 32, "width": 32}), "blip-tiny")
    df = pd.read_parquet(demo_dir / "manifest.parquet").head(12)
    feats = extract_features(demo_dir, list(df["path"]), list(df["sha256"]), ext, tmp_path / "c", batch_size=5)
    assert feats.shape == (12, 32) and np.isfinite(feats).all() and ext.images_seen == 12
    assert not np.allclose(feats[0], feats[1])


def test_clip_path_with_a_tiny_random_open_clip_model(demo_dir, tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                                       "head_width": 16},
                           text_cfg={"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1})
    preprocess = open_clip.image_transform(32, is_train=False)
    ext = ClipFeatures(model, preprocess, "clip-tiny")
    report = build_ffhq2k5(demo_dir, tmp_path / "o", ext, tmp_path / "c", k=3, tsne_max=50)
    assert sum(report["sizes"]) == 149 and report["features"] == "clip-tiny"
    feats = extract_features(demo_dir, ["images/lfw_000.png"], [pd.read_parquet(demo_dir / "manifest.parquet")
                             .set_index("path").loc["images/lfw_000.png", "sha256"]], ext, tmp_path / "c")
    assert np.linalg.norm(feats[0]) == pytest.approx(1.0, abs=1e-5)  # l2-normalised embedding


def test_offline_hub_names_fail_with_a_message_naming_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="local folder"):
        BlipFeatures.load("Salesforce/blip-itm-base-coco")


def test_clip_features_load_through_the_one_loader_and_name_their_param(tmp_path):
    """`--features clip` fails as fast as the prior does, naming data.ffhq2k5.pretrained and the pixels fallback."""
    with pytest.raises(ClipWeightsUnavailable, match=r"data\.ffhq2k5\.pretrained = .*no such file.*--features pixels"):
        ClipFeatures.load("ViT-B-32", str(tmp_path / "missing.bin"))
    with pytest.raises(ClipWeightsUnavailable, match=r"data\.ffhq2k5\.pretrained is not set"):
        build_extractor("clip")
