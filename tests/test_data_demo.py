"""The offline demo dataset: deterministic bytes, BreCaHAD-style crops, a manifest that matches the files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sqgan.data.dataset import ManifestDataset
from sqgan.data.demo import build_demo
from sqgan.data.recipe import grid_offsets
from sqgan.io import sha256_file


def _tree_hashes(root):
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_builds_are_byte_identical(tmp_path):
    a = build_demo(tmp_path / "a", resolution=32)
    b = build_demo(tmp_path / "b", resolution=32)
    ha, hb = _tree_hashes(a), _tree_hashes(b)
    assert ha == hb and len(ha) == 49 + 100 + 2  # images, manifest, stage marker


def test_the_labelled_variant_only_adds_each_images_source_as_its_class(tmp_path, demo_dir):
    labelled = build_demo(tmp_path / "labelled", resolution=32, lfw_faces=100, labels=True)
    plain = pd.read_parquet(demo_dir / "manifest.parquet")
    df = pd.read_parquet(labelled / "manifest.parquet")
    assert df.drop(columns=["label", "class_name"]).equals(plain)  # same images, paths, hashes and split
    assert (df["label"] == (df["source"] == "skimage:lfw_subset").astype(int)).all()
    assert df.groupby("label")["class_name"].unique().map(list).to_dict() == {0: ["tissue"], 1: ["face"]}
    assert ManifestDataset(labelled, 32).labels.bincount().tolist() == [
        int(((df.split == "train") & (df.label == k)).sum()) for k in (0, 1)]
    assert "label" not in plain  # the demo itself is unlabelled


def test_manifest_lists_every_image_with_its_sha256_and_size(demo_dir):
    df = pd.read_parquet(demo_dir / "manifest.parquet")
    assert list(df.columns[:7]) == ["path", "sha256", "width", "height", "source", "source_id", "split"]
    assert len(df) == 149
    assert (df["source"] == "skimage:immunohistochemistry").sum() == 49
    assert (df["source"] == "skimage:lfw_subset").sum() == 100
    assert (df["split"] == "test").sum() == 15
    for row in df.sample(10, random_state=0).itertuples():
        assert sha256_file(demo_dir / row.path) == row.sha256
        with Image.open(demo_dir / row.path) as im:
            assert im.size == (row.width, row.height) == (32, 32) and im.mode == "RGB"


def test_crop_grid_follows_brecahad_rule():
    assert grid_offsets(1360, 512, 256) == [0, 256, 512, 768]
    assert grid_offsets(1024, 512, 256) == [0, 256, 512]
    with pytest.raises(ValueError, match="larger than the image side"):
        grid_offsets(100, 128, 64)


def test_crops_hold_the_source_pixels_at_their_offsets(tmp_path):
    from skimage import data as skdata

    out = build_demo(tmp_path / "d", resolution=128, crop=128, stride=128, lfw_faces=0)
    slide = skdata.immunohistochemistry()
    df = pd.read_parquet(out / "manifest.parquet")
    assert len(df) == 16
    row = df[df["source_id"] == "ihc_x0256_y0128"].iloc[0]
    crop = np.asarray(Image.open(out / row.path))
    assert np.array_equal(crop, slide[128:256, 256:384])


def test_failed_build_leaves_previous_output_untouched(tmp_path, monkeypatch):
    out = build_demo(tmp_path / "d", resolution=32, lfw_faces=5)
    before = _tree_hashes(out)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("sqgan.data.demo.write_manifest", boom)
    with pytest.raises(OSError):
        build_demo(out, resolution=32, lfw_faces=10)
    assert _tree_hashes(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp folder left behind


def test_dataset_reads_train_split_in_minus_one_to_one(demo_dir):
    ds = ManifestDataset(demo_dir, 32, split="train")
    assert len(ds) == 134
    x = ds[0]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
