"""BreCaHAD crops: offsets, order, counts and pixels against the source; few-shot subsets."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sqgan.data.brecahad import crop_brecahad
from sqgan.data.subset import make_subset


def _slide(seed: int, w: int = 1360, h: int = 1024) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_brecahad_slide_gives_twelve_crops_on_the_recipe_grid(tmp_path):
    src = tmp_path / "slides"
    src.mkdir()
    slides = {f"s{i}": _slide(i) for i in range(2)}
    for name, arr in slides.items():
        Image.fromarray(arr).save(src / f"{name}.tif")
    counts = crop_brecahad(src, tmp_path / "out")
    assert counts == {"slides": 2, "crops": 24, "unexpected_size": 0, "quarantined": 0}
    df = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    s0 = df[df["source_id"] == "s0.tif"]
    assert sorted(set(s0["x"])) == [0, 256, 512, 768] and sorted(set(s0["y"])) == [0, 256, 512]
    row = s0[(s0["x"] == 768) & (s0["y"] == 512)].iloc[0]
    crop = np.asarray(Image.open(tmp_path / "out" / row.path))
    assert crop.shape == (512, 512, 3)
    assert np.array_equal(crop, slides["s0"][512:1024, 768:1280])


def test_other_sizes_crop_on_the_same_rule_and_small_or_bad_slides_are_quarantined(tmp_path):
    src = tmp_path / "slides"
    src.mkdir()
    Image.fromarray(_slide(0, 800, 600)).save(src / "odd.tif")  # x ∈ {0, 256}, y ∈ {0}
    Image.fromarray(_slide(1, 300, 300)).save(src / "tiny.tif")
    (src / "broken.tif").write_bytes(b"II*\x00garbage")
    counts = crop_brecahad(src, tmp_path / "out")
    assert counts == {"slides": 3, "crops": 2, "unexpected_size": 1, "quarantined": 2}
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv").set_index("path")["reason"]
    assert "larger than the image side" in q["tiny.tif"]
    assert q["broken.tif"].startswith(("not an image", "truncated or corrupt"))
    assert json.loads((tmp_path / "out" / "brecahad.json").read_text())["crops"] == 2


def test_subset_is_seeded_and_a_true_subset(demo_dir, tmp_path):
    a = make_subset(demo_dir, tmp_path / "a", n=10, seed=3)
    b = make_subset(demo_dir, tmp_path / "b", n=10, seed=3)
    c = make_subset(demo_dir, tmp_path / "c", n=10, seed=4)
    ma, mb, mc = (pd.read_parquet(p / "manifest.parquet") for p in (a, b, c))
    assert list(ma["path"]) == list(mb["path"]) and list(ma["path"]) != list(mc["path"])
    full = pd.read_parquet(demo_dir / "manifest.parquet").set_index("path")
    assert len(ma) == 10 and set(ma["path"]) <= set(full[full["split"] == "train"].index)
    assert all(full.loc[r.path, "sha256"] == r.sha256 for r in ma.itertuples())
    with pytest.raises(ValueError, match=r"--n must be in \[1, 134\]"):
        make_subset(demo_dir, tmp_path / "d", n=1000)
