"""Curation on a folder of known good and bad files: counts, conversions, quarantine, atomic output."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data as skdata

from sqgan.data.curate import NothingUsable, curate
from sqgan.data.dataset import ManifestDataset
from sqgan.data.images import UnusableImage, load_rgb
from sqgan.data.manifest import read_manifest


@pytest.fixture()
def messy(tmp_path):
    """A source folder with one file of each kind the curate stage must handle."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    astro = skdata.astronaut()[::8, ::8]  # 64×64 RGB
    Image.fromarray(astro).save(src / "rgb.png")
    Image.fromarray(astro).save(src / "sub" / "copy.png")  # exact duplicate of rgb.png (other folder)
    Image.fromarray(astro).convert("CMYK").save(src / "cmyk.jpg", quality=95)
    Image.fromarray(skdata.camera()[::8, ::8]).save(src / "gray.png")
    Image.fromarray(skdata.camera()[4::8, 4::8].astype(np.uint16) * 257).save(src / "sixteen.png")
    rgba = np.dstack([astro, np.full(astro.shape[:2], 0, np.uint8)])  # fully transparent → white
    Image.fromarray(rgba, "RGBA").save(src / "rgba.png")
    Image.fromarray(astro).convert("P").save(src / "palette.gif")
    (src / "empty.png").write_bytes(b"")
    full = (src / "rgb.png").read_bytes()
    (src / "truncated.png").write_bytes(full[: len(full) // 2])
    (src / "notes.txt").write_text("not an image")
    return src


def test_curate_counts_converts_dedupes_and_quarantines(messy, tmp_path):
    counts = curate(messy, tmp_path / "out")
    assert counts == {"seen": 10, "kept": 6, "converted": 5, "duplicate": 1, "quarantined": 3, "labels": "none",
                      "classes": 0}  # rgb.png at the top beside sub/: not class folders
    out = tmp_path / "out"
    assert json.loads((out / "curate.json").read_text()) == counts
    q = pd.read_csv(out / "quarantine.csv").set_index("path")["reason"].to_dict()
    assert q["empty.png"] == "zero-byte file"
    assert q["truncated.png"].startswith("truncated or corrupt")
    assert q["notes.txt"].startswith("not an image")
    assert q["sub/copy.png"] == "duplicate of rgb.png"
    assert sorted(p.name for p in (out / "quarantine").iterdir()) == ["empty.png", "notes.txt", "truncated.png"]
    df = pd.read_parquet(out / "manifest.parquet").set_index("source_id")
    assert set(df.index) == {"rgb.png", "cmyk.jpg", "gray.png", "sixteen.png", "rgba.png", "palette.gif"}
    assert df.loc["sixteen.png", "mode_in"].startswith("I")
    assert not df.loc["rgb.png", "converted"] and df.loc["cmyk.jpg", "converted"]
    for row in df.itertuples():
        with Image.open(out / row.path) as im:
            assert im.mode == "RGB" and im.size == (row.width, row.height) == (64, 64)


def test_conversions_keep_the_pixels():
    from sqgan.data.images import to_rgb

    cam = skdata.camera()[::8, ::8]
    sixteen, _ = to_rgb(Image.fromarray(cam.astype(np.uint16) * 257))
    assert np.array_equal(np.asarray(sixteen)[..., 0], cam)  # 16-bit → 8-bit loses nothing that was 8-bit
    rgba = Image.fromarray(np.dstack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 0, np.uint8)]), "RGBA")
    assert np.all(np.asarray(to_rgb(rgba)[0]) == 255)  # transparent → the white background
    gray, converted = to_rgb(Image.fromarray(cam))
    assert converted and np.array_equal(np.asarray(gray)[..., 2], cam)


def test_unusable_reasons():
    with pytest.raises(UnusableImage, match="unreadable"):
        load_rgb("/nonexistent/file.png")


def test_nothing_usable_fails_and_leaves_no_output(tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    (src / "b.jpg").write_text("text")
    with pytest.raises(NothingUsable, match=r"only 0 usable image\(s\) of 2 files.*a.png: zero-byte file"):
        curate(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]  # no temp folder left either


def test_empty_source_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NothingUsable, match="holds no files"):
        curate(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="--src"):
        curate(tmp_path / "missing", tmp_path / "out")


def test_rerun_after_interruption_replaces_rather_than_duplicates(messy, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = {"n": 0}
    import sqgan.data.curate as mod

    real = mod.load_rgb

    def flaky(path):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the stage is killed midway
        return real(path)

    monkeypatch.setattr(mod, "load_rgb", flaky)
    with pytest.raises(KeyboardInterrupt):
        curate(messy, out)
    assert not out.exists()
    monkeypatch.setattr(mod, "load_rgb", real)
    first = curate(messy, out)
    second = curate(messy, out)
    assert first == second
    assert len(list((out / "images").iterdir())) == 6


def _classes(src, layout: dict[str, int]) -> None:
    """Images at the given relative paths, each a flat colour (so none is a duplicate)."""
    for i, rel in enumerate(layout):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 10 + 20 * i, np.uint8)).save(src / rel)


def test_curate_keeps_labels_from_class_folders_or_labels_csv_and_says_which(tmp_path):
    folders = tmp_path / "folders"
    _classes(folders, {"dog/a.png": 0, "dog/b.png": 0, "cat/c.png": 0, "zebra/d.png": 0})
    report = curate(folders, tmp_path / "f-out")
    assert (report["labels"], report["classes"]) == ("folders", 3)
    df = read_manifest(tmp_path / "f-out").set_index("source_id")
    assert df["label"].to_dict() == {"cat/c.png": 0, "dog/a.png": 1, "dog/b.png": 1, "zebra/d.png": 2}  # sorted names
    assert df.loc["zebra/d.png", "class_name"] == "zebra"
    ds = ManifestDataset(tmp_path / "f-out", 32)
    assert ds.labels.tolist() == [ds.manifest.set_index("source_id").loc[s, "label"] for s in ds.manifest.source_id]

    flat = tmp_path / "flat"
    _classes(flat, {"x.png": 0, "y.png": 0, "z.png": 0})
    pd.DataFrame({"path": ["x.png", "y.png", "z.png"], "label": [3, 0, 3]}).to_csv(flat / "labels.csv", index=False)
    report = curate(flat, tmp_path / "c-out")
    assert (report["labels"], report["classes"], report["seen"]) == ("labels.csv", 2, 3)  # labels.csv is no image
    assert read_manifest(tmp_path / "c-out").set_index("source_id")["label"].to_dict() == {"x.png": 3, "y.png": 0,
                                                                                           "z.png": 3}
    pd.DataFrame({"path": ["x.png", "y.png", "z.png"], "label": ["owl", "cat", "owl"]}).to_csv(flat / "labels.csv",
                                                                                             index=False)
    named = curate(flat, tmp_path / "n-out")
    assert read_manifest(tmp_path / "n-out").set_index("source_id")["label"].to_dict() == {"x.png": 1, "y.png": 0,
                                                                                           "z.png": 1}
    assert named["classes"] == 2
    assert curate(flat, tmp_path / "none-out", labels="none")["labels"] == "none"
    assert "label" not in read_manifest(tmp_path / "none-out").columns


def test_bad_labels_are_refused_before_anything_is_written(tmp_path):
    flat = tmp_path / "flat"
    _classes(flat, {"x.png": 0, "y.png": 0})
    with pytest.raises(ValueError, match="labels=folders: .* 2 or more class folders"):
        curate(flat, tmp_path / "out", labels="folders")
    with pytest.raises(FileNotFoundError, match="labels.csv does not exist"):
        curate(flat, tmp_path / "out", labels="csv")
    pd.DataFrame({"path": ["x.png"], "label": [1]}).to_csv(flat / "labels.csv", index=False)
    with pytest.raises(ValueError, match=r"no label for \['y.png'\]"):
        curate(flat, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    curate(flat, tmp_path / "ok", labels="none")
    df = pd.read_parquet(tmp_path / "ok" / "manifest.parquet")
    df["label"] = [0, -1]
    df.to_parquet(tmp_path / "ok" / "manifest.parquet")
    with pytest.raises(ValueError, match=r"integer classes ≥ 0 .* \[-1\]"):
        read_manifest(tmp_path / "ok")
