"""The offline demo dataset, built from images bundled in scikit-image (no network).

- BreCaHAD-style overlapping crops of the immunohistochemistry slide (512×512): crops of `crop` px at
  stride `stride`, x outer and y inner, like the BreCaHAD recipe (DESIGN.md §3).
- The first `lfw_faces` images of `lfw_subset` (its first 100 are faces, 25×25 grayscale → RGB).

Every image is resized to the training resolution and written as PNG; the manifest lists path, sha256,
width, height, source, source_id and a seeded split — and, for the labelled variant (`labels`), each image's
source as its class (`label` 0 = tissue, 1 = face; `class_name`). Same params → byte-identical output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata
from tqdm import tqdm

from sqgan.data.manifest import write_manifest
from sqgan.data.recipe import grid_offsets, split_for
from sqgan.io import stage_output

IHC_SOURCE = "skimage:immunohistochemistry"
LFW_SOURCE = "skimage:lfw_subset"
CLASSES = {IHC_SOURCE: (0, "tissue"), LFW_SOURCE: (1, "face")}  # the labelled variant's classes


def _ihc_crops(crop: int, stride: int) -> list[tuple[str, np.ndarray]]:
    slide = skdata.immunohistochemistry()  # uint8 [512, 512, 3]
    h, w = slide.shape[:2]
    out = []
    for x in grid_offsets(w, crop, stride):
        for y in grid_offsets(h, crop, stride):
            out.append((f"ihc_x{x:04d}_y{y:04d}", slide[y : y + crop, x : x + crop]))
    return out


def _lfw_faces(n: int) -> list[tuple[str, np.ndarray]]:
    faces = skdata.lfw_subset()[:n]  # float64 in [0, 1], [n, 25, 25]; the first 100 are faces
    out = []
    for i, face in enumerate(faces):
        gray = np.clip(np.rint(face * 255.0), 0, 255).astype(np.uint8)
        out.append((f"lfw_{i:03d}", np.stack([gray] * 3, axis=-1)))
    return out


def build_demo(
    out: str | Path,
    resolution: int = 32,
    crop: int = 128,
    stride: int = 64,
    lfw_faces: int = 100,
    test_fraction: float = 0.1,
    seed: int = 0,
    labels: bool = False,
    force: bool = False,
) -> Path:
    """Write the demo dataset to `out` (atomically: the folder appears complete or not at all). An existing `out`
    is replaced only when it is an earlier demo output (or with `force`)."""
    items = [(IHC_SOURCE, sid, arr) for sid, arr in _ihc_crops(crop, stride)]
    items += [(LFW_SOURCE, sid, arr) for sid, arr in _lfw_faces(lfw_faces)]
    splits = split_for(len(items), test_fraction, seed)
    out = Path(out)
    rows = []
    with stage_output(out, "demo", force=force) as tmp:
        (tmp / "images").mkdir()
        for (source, sid, arr), split in tqdm(
            list(zip(items, splits, strict=True)), desc="demo data", unit="img", mininterval=1.0
        ):
            img = Image.fromarray(arr).convert("RGB")
            if img.size != (resolution, resolution):
                img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
            rel = f"images/{sid}.png"
            img.save(tmp / rel, format="PNG", optimize=False)
            rows.append({"path": rel, "width": resolution, "height": resolution, "source": source,
                         "source_id": sid, "split": split})
            if labels:
                rows[-1]["label"], rows[-1]["class_name"] = CLASSES[source]
        write_manifest(tmp, rows)
    return out
