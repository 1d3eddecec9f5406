"""BreCaHAD crops (DESIGN.md §3): 512² crops at stride 256 of the 162 slides of 1360×1024.

Offsets per axis: 0, stride, … while the crop fits (1360 → x ∈ {0, 256, 512, 768}; 1024 → y ∈ {0, 256, 512}),
x outer and y inner → 12 crops per slide, 1,944 in all. Any other size crops on the same rule (and is
counted in the report as an unexpected size); a slide smaller than the crop, or unreadable, is quarantined.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from sqgan.data.curate import NothingUsable
from sqgan.data.images import IMAGE_SUFFIXES, UnusableImage, list_files, load_rgb
from sqgan.data.manifest import write_manifest
from sqgan.data.recipe import grid_offsets
from sqgan.io import UniqueNames, stage_output, write_json_atomic

EXPECTED_SIZE = (1360, 1024)  # width, height of a BreCaHAD slide
REPORT = "brecahad.json"


def crop_brecahad(
    src: str | Path, out: str | Path, crop: int = 512, stride: int = 256, force: bool = False
) -> dict[str, int]:
    """Crop every slide under `src` into `out` (atomically); returns counts. Crop names keep the slide's relative
    path (`a/b.tif` → `images/a/b_x0000_y0000.png`), made unique where two slides would share one."""
    if crop < 1 or stride < 1:
        raise ValueError(f"crop and stride must be ≥ 1, got crop={crop}, stride={stride}")
    src, out = Path(src), Path(out)
    files = [p for p in list_files(src) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise NothingUsable(f"{src} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); fix --src")
    counts = {"slides": len(files), "crops": 0, "unexpected_size": 0, "quarantined": 0}
    rows, quarantine = [], []
    names = UniqueNames()
    with stage_output(out, "brecahad", (src,), force) as tmp:
        (tmp / "images").mkdir()
        for path in tqdm(files, desc="brecahad crops", unit="slide", mininterval=1.0):
            rel = path.relative_to(src).as_posix()
            try:
                img = load_rgb(path)
                xs, ys = grid_offsets(img.width, crop, stride), grid_offsets(img.height, crop, stride)
            except (UnusableImage, ValueError) as e:
                quarantine.append({"path": rel, "reason": str(e)})
                counts["quarantined"] += 1
                continue
            if (img.width, img.height) != EXPECTED_SIZE:
                counts["unexpected_size"] += 1
            stem = Path(rel).with_suffix("").as_posix()
            for x in xs:  # x outer, y inner (the recipe's order)
                for y in ys:
                    name = names.claim(f"images/{stem}_x{x:04d}_y{y:04d}.png")
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(img.pixels[y : y + crop, x : x + crop]).save(tmp / name, format="PNG")
                    rows.append({"path": name, "width": crop, "height": crop, "source": "brecahad",
                                 "source_id": rel, "split": "train", "x": x, "y": y})
            counts["crops"] += len(xs) * len(ys)
        if not rows:
            raise NothingUsable(f"{src}: no slide could be cropped; quarantined: {quarantine[:3]}")
        pd.DataFrame(quarantine, columns=["path", "reason"]).to_csv(tmp / "quarantine.csv", index=False)
        write_manifest(tmp, rows)
        write_json_atomic(tmp / REPORT, counts)
    return counts
