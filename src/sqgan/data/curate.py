"""Curate a folder of images: decode every file, convert to RGB, drop exact duplicates, quarantine the rest.

Output (written atomically: the folder appears complete or not at all, so an interrupted run leaves
nothing that looks finished and a re-run starts clean):
    images/…png          the kept images, RGB PNG at their original size, at their source's relative path with
                         `.png` (`a/cat.jpg` → `images/a/cat.png`; a second `a/cat.*` → `images/a/cat~2.png`)
    quarantine/…         copies of the unusable files
    quarantine.csv       path, reason
    manifest.parquet     path, sha256, width, height, source, source_id, split, mode_in, converted
    curate.json          counts: seen, kept, converted, duplicate, quarantined
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from sqgan.data.images import UnusableImage, list_files, load_rgb
from sqgan.data.manifest import write_manifest
from sqgan.io import UniqueNames, stage_output, write_json_atomic

REPORT = "curate.json"


class NothingUsable(ValueError):
    """Too few usable images remained."""


def curate(
    src: str | Path, out: str | Path, source: str | None = None, min_images: int = 1, force: bool = False
) -> dict[str, int]:
    """Curate `src` into `out`; returns the counts. Raises `NothingUsable` when fewer than `min_images` remain.

    `out` may not be, contain or lie inside `src`, and an existing `out` is replaced only when it is an earlier
    curate output (or with `force`)."""
    src, out = Path(src), Path(out)
    if min_images < 1:
        raise ValueError(f"min_images must be ≥ 1, got {min_images}")
    files = list_files(src)
    if not files:
        raise NothingUsable(f"{src} holds no files; put the images there or fix --src")
    source = source or src.name
    rows, quarantine, seen_pixels = [], [], {}
    counts = {"seen": len(files), "kept": 0, "converted": 0, "duplicate": 0, "quarantined": 0}
    names = UniqueNames()
    with stage_output(out, "curate", (src,), force) as tmp:
        (tmp / "images").mkdir()
        for path in tqdm(files, desc=f"curate {src.name}", unit="file", mininterval=1.0):
            rel = path.relative_to(src)
            try:
                img = load_rgb(path)
            except UnusableImage as e:
                dest = tmp / "quarantine" / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
                quarantine.append({"path": rel.as_posix(), "reason": str(e)})
                counts["quarantined"] += 1
                continue
            digest = hashlib.sha256(img.pixels.tobytes() + str(img.pixels.shape).encode()).hexdigest()
            if digest in seen_pixels:  # pixel-identical to an image already kept
                quarantine.append({"path": rel.as_posix(), "reason": f"duplicate of {seen_pixels[digest]}"})
                counts["duplicate"] += 1
                continue
            seen_pixels[digest] = rel.as_posix()
            out_rel = names.claim(f"images/{rel.with_suffix('').as_posix()}.png")
            (tmp / out_rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.pixels).save(tmp / out_rel, format="PNG")
            rows.append({"path": out_rel, "width": img.width, "height": img.height, "source": source,
                         "source_id": rel.as_posix(), "split": "train", "mode_in": img.mode_in,
                         "converted": img.converted})
            counts["kept"] += 1
            counts["converted"] += int(img.converted)
        if counts["kept"] < min_images:
            reasons = "; ".join(f"{q['path']}: {q['reason']}" for q in quarantine[:5])
            raise NothingUsable(
                f"{src}: only {counts['kept']} usable image(s) of {len(files)} files (need {min_images}); "
                f"first problems: {reasons or 'none'}"
            )
        pd.DataFrame(quarantine, columns=["path", "reason"]).to_csv(tmp / "quarantine.csv", index=False)
        write_manifest(tmp, rows)
        write_json_atomic(tmp / REPORT, counts)
    return counts
