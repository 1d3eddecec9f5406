"""Curate a folder of images: decode every file, convert to RGB, drop exact duplicates, quarantine the rest.

Output (written atomically: the folder appears complete or not at all, so an interrupted run leaves
nothing that looks finished and a re-run starts clean):
    images/…png          the kept images, RGB PNG at their original size, at their source's relative path with
                         `.png` (`a/cat.jpg` → `images/a/cat.png`; a second `a/cat.*` → `images/a/cat~2.png`)
    quarantine/…         copies of the unusable files
    quarantine.csv       path, reason
    manifest.parquet     path, sha256, width, height, source, source_id, split, mode_in, converted
                         (+ label, class_name when the source has classes)
    curate.json          counts: seen, kept, converted, duplicate, quarantined; labels (where from), classes

Class labels (`labels`): `csv` reads `labels.csv` in the source (columns path, label: an integer class, or a class
name — names are numbered in sorted order); `folders` takes the first folder of each image's path as its class
(ImageFolder's convention: src/<class>/<image>, at least 2 classes); `auto` is csv when labels.csv exists, else
folders when every image sits exactly one folder deep in 2 or more folders, else none; `none` writes no labels.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from sqgan.data.images import UnusableImage, list_files, load_rgb
from sqgan.data.manifest import write_manifest
from sqgan.io import UniqueNames, stage_output, write_json_atomic

REPORT = "curate.json"


class NothingUsable(ValueError):
    """Too few usable images remained."""


LABELS_FILE = "labels.csv"
LABEL_MODES = ("auto", "csv", "folders", "none")


def class_labels(src: Path, files: list[Path], mode: str = "auto") -> tuple[str, dict[str, tuple[int, str]]]:
    """(where the labels came from: labels.csv | folders | none, {relative path: (label, class name)})."""
    if mode not in LABEL_MODES:
        raise ValueError(f"data.curate.labels must be one of {', '.join(LABEL_MODES)}, got {mode!r}")
    rels = [p.relative_to(src).as_posix() for p in files]
    table = src / LABELS_FILE
    if mode == "csv" or (mode == "auto" and table.is_file()):
        if not table.is_file():
            raise FileNotFoundError(f"data.curate.labels=csv but {table} does not exist; write it (columns path, "
                                    f"label) or use labels=folders / none")
        df = pd.read_csv(table, dtype={"path": str})
        if not {"path", "label"} <= set(df.columns):
            raise ValueError(f"{table}: needs columns path and label, has {list(df.columns)}")
        given = dict(zip(df["path"], df["label"], strict=True))
        missing = [r for r in rels if r not in given]
        if missing:
            raise ValueError(f"{table} has no label for {missing[:3]} ({len(missing)} images); add them, or set "
                             f"data.curate.labels=none")
        values = [given[r] for r in rels]
        if all(isinstance(v, int | np.integer) for v in values):
            if min(values) < 0:
                raise ValueError(f"{table}: labels must be ≥ 0, found {min(values)}")
            return LABELS_FILE, {r: (int(v), str(int(v))) for r, v in zip(rels, values, strict=True)}
        names = sorted({str(v) for v in values})
        return LABELS_FILE, {r: (names.index(str(v)), str(v)) for r, v in zip(rels, values, strict=True)}
    folders = [Path(r).parts[0] if len(Path(r).parts) == 2 else None for r in rels]
    usable = None not in folders and len(set(folders)) >= 2
    if mode == "folders" and not usable:
        raise ValueError(f"data.curate.labels=folders: {src} must hold images as <class>/<image> in 2 or more "
                         f"class folders (ImageFolder's layout); use labels=csv or none")
    if mode in ("folders", "auto") and usable:
        names = sorted(set(folders))  # type: ignore[arg-type]
        return "folders", {r: (names.index(f), f) for r, f in zip(rels, folders, strict=True)}  # type: ignore[arg-type]
    return "none", {}


def curate(
    src: str | Path, out: str | Path, source: str | None = None, min_images: int = 1, labels: str = "auto",
    force: bool = False,
) -> dict[str, int | str]:
    """Curate `src` into `out`; returns the counts (and where the class labels came from). Raises `NothingUsable`
    when fewer than `min_images` remain.

    `out` may not be, contain or lie inside `src`, and an existing `out` is replaced only when it is an earlier
    curate output (or with `force`)."""
    src, out = Path(src), Path(out)
    if min_images < 1:
        raise ValueError(f"min_images must be ≥ 1, got {min_images}")
    files = [p for p in list_files(src) if p != src / LABELS_FILE]
    if not files:
        raise NothingUsable(f"{src} holds no files; put the images there or fix --src")
    labelled_by, label_of = class_labels(src, files, labels)  # before anything is written
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
            if label_of:
                rows[-1]["label"], rows[-1]["class_name"] = label_of[rel.as_posix()]
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
        report = {**counts, "labels": labelled_by, "classes": len({r["label"] for r in rows if "label" in r})}
        write_json_atomic(tmp / REPORT, report)
    return report
