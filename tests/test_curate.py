"""Curation on a folder of known good and bad files: counts, conversions, quarantine, atomic output."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data as skdata

from sqgan.data.curate import NothingUsable, curate
from sqgan.data.images import UnusableImage, load_rgb


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
    assert counts == {"seen": 10, "kept": 6, "converted": 5, "duplicate": 1, "quarantined": 3}
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
