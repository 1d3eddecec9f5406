"""OxfordDog: cats excluded, crops centred on the head box, detector for unannotated dogs, bad annotations."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sqgan.data.dogface import BadAnnotation, Box, build_dogface, clip_box, iou, read_voc_box, square_crop

VOC = """<annotation><size><width>{w}</width><height>{h}</height></size>
<object><name>dog</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>
</object></annotation>"""


def _pet_root(tmp_path, n_dogs=12, n_unannotated=3):
    """A miniature Oxford-IIIT Pet: noise images with a red square marking each head box."""
    root = tmp_path / "pet"
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "xmls").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["#Image CLASS-ID SPECIES BREED ID"]
    boxes = {}
    for i in range(n_dogs + 2):
        cat = i >= n_dogs
        name = f"Persian_{i}" if cat else f"beagle_{i}"
        w, h = int(rng.integers(120, 200)), int(rng.integers(120, 200))
        px = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        bw = int(rng.integers(30, 60))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bw))
        px[y0 : y0 + bw, x0 : x0 + bw] = (255, 0, 0)
        Image.fromarray(px).save(root / "images" / f"{name}.jpg", quality=98)
        boxes[name] = (x0, y0, x0 + bw, y0 + bw)
        if i < n_dogs - n_unannotated or cat:
            (root / "annotations" / "xmls" / f"{name}.xml").write_text(
                VOC.format(w=w, h=h, x0=x0, y0=y0, x1=x0 + bw, y1=y0 + bw))
        lines.append(f"{name} {1 if cat else 2} {1 if cat else 2} 1")
    (root / "annotations" / "list.txt").write_text("\n".join(lines) + "\n")
    return root, boxes


def _red_centroid(path) -> tuple[float, float]:
    a = np.asarray(Image.open(path)).astype(int)
    mask = (a[..., 0] > 180) & (a[..., 1] < 90) & (a[..., 2] < 90)
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def test_dog_crops_are_centred_on_the_head_box_and_cats_are_excluded(tmp_path, monkeypatch):
    import sqgan.data.dogface as mod

    trained, detected = {}, {}
    real_train, real_detect = mod.train_detector, mod.detect

    def spy_train(images, boxes, **kw):
        trained["n"] = len(images)
        trained["model"], trained["iou"] = real_train(images, boxes, **kw)
        return trained["model"], trained["iou"]

    def spy_detect(model, images, side):
        detected["boxes"] = real_detect(model, images, side)
        return detected["boxes"]

    monkeypatch.setattr(mod, "train_detector", spy_train)
    monkeypatch.setattr(mod, "detect", spy_detect)
    root, _ = _pet_root(tmp_path)
    report = build_dogface(root, tmp_path / "out", size=64, detector_steps=5, detector_side=32)
    assert report["dogs"] == 12 and report["crops"] == 12
    assert report["from_xml"] == 9 and report["from_detector"] == 3
    assert trained["n"] == 9  # trained on the annotated dogs only; its held-out IoU is what the report says
    assert report["detector_heldout_iou"] == trained["iou"]
    det_rows = pd.read_parquet(tmp_path / "out" / "manifest.parquet").query("box_source == 'detector'")
    assert sorted(det_rows["x0"]) == sorted(b.x0 for b in detected["boxes"])  # crops use the detector's boxes
    assert report["train"] + report["test"] == 12 and report["test"] == round(12 * 498 / 4990)
    df = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert not df["source_id"].str.startswith("Persian").any()
    for row in df[df["box_source"] == "xml"].itertuples():
        cx, cy = _red_centroid(tmp_path / "out" / row.path)
        assert abs(cx - 31.5) < 2.0 and abs(cy - 31.5) < 2.0, row.source_id
    assert json.loads((tmp_path / "out" / "dogface.json").read_text()) == report


def test_square_crop_pads_where_the_box_leaves_the_image():
    px = np.zeros((50, 50, 3), np.uint8)
    px[0:10, 0:10] = 255  # a box in the corner: the crop reaches outside the image
    crop = square_crop(px, Box(0, 0, 10, 10), size=20, margin=1.0)
    assert crop.shape == (20, 20, 3)
    assert crop[10, 10].tolist() == [255, 255, 255]  # the box's centre is the crop's centre


def test_bad_annotations(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><object><bndbox><xmin>3</xmin>")
    with pytest.raises(BadAnnotation, match="malformed VOC XML"):
        read_voc_box(bad)
    none = tmp_path / "none.xml"
    none.write_text("<annotation></annotation>")
    with pytest.raises(BadAnnotation, match="no object/bndbox"):
        read_voc_box(none)
    with pytest.raises(BadAnnotation, match="outside"):
        clip_box(Box(300, 300, 400, 400), 200, 100)
    assert clip_box(Box(-5, 10, 50, 500), 200, 100) == Box(0, 10, 50, 100)


def test_malformed_xml_falls_back_to_the_detector_and_box_outside_is_quarantined(tmp_path):
    root, _ = _pet_root(tmp_path, n_dogs=8, n_unannotated=0)
    (root / "annotations" / "xmls" / "beagle_0.xml").write_text("<annotation><object>")
    (root / "annotations" / "xmls" / "beagle_1.xml").write_text(
        VOC.format(w=10, h=10, x0=900, y0=900, x1=950, y1=950))
    report = build_dogface(root, tmp_path / "out", size=32, detector_steps=3, detector_side=32)
    assert report["xml_errors"] == 1 and report["quarantined"] == 1 and report["from_detector"] == 1
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv").set_index("path")["reason"]
    assert "outside" in q["beagle_1.jpg"] and "malformed" in q["beagle_0.xml"]


def test_iou():
    assert iou(Box(0, 0, 10, 10), Box(0, 0, 10, 10)) == pytest.approx(1.0)
    assert iou(Box(0, 0, 10, 10), Box(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou(Box(0, 0, 1, 1), Box(2, 2, 3, 3)) == 0.0


def test_not_a_pet_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Oxford-IIIT Pet root"):
        build_dogface(tmp_path, tmp_path / "out")
