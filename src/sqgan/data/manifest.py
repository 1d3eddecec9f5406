"""The manifest of a curated dataset: `manifest.parquet` beside an `images/` folder.

Columns: path (relative to the dataset folder), sha256, width, height, source, source_id, split; optionally
`label` (the integer class, ≥ 0; curate and the CIFAR stages write it) and `class_name`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sqgan.io import atomic_path, free_sibling, sha256_file

MANIFEST = "manifest.parquet"
REQUIRED_COLUMNS = ("path", "sha256", "width", "height", "source", "source_id", "split")


def write_manifest(root: str | Path, rows: list[dict]) -> Path:
    """Hash each listed file and write the manifest atomically (rows sorted by path for stable bytes).

    The rows and the files must agree: one row per file under `images/`, no path listed twice."""
    root = Path(root)
    if not rows:
        raise ValueError(f"{root}: no images to list in the manifest")
    listed = [str(row["path"]) for row in rows]
    twice = sorted({p for p in listed if listed.count(p) > 1})
    if twice:
        raise ValueError(f"{root}: manifest would list {twice[:3]} more than once (two inputs on one file)")
    images = root / "images"
    on_disk = {p.relative_to(root).as_posix() for p in images.rglob("*") if p.is_file()} if images.is_dir() else set()
    unlisted = sorted(on_disk - set(listed))
    if unlisted:
        raise ValueError(f"{root}: files {unlisted[:3]} are not in the manifest (rows and files must agree)")
    for row in rows:
        row["sha256"] = sha256_file(root / row["path"])
    df = pd.DataFrame(rows).sort_values("path").reset_index(drop=True)
    cols = list(REQUIRED_COLUMNS) + [c for c in df.columns if c not in REQUIRED_COLUMNS]
    with atomic_path(root / MANIFEST) as tmp:
        df[cols].to_parquet(tmp, index=False)
    return root / MANIFEST


def read_manifest(root: str | Path) -> pd.DataFrame:
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {root} is not a curated dataset. If it holds raw images, curate them into a new "
            f"folder (`sqgan data curate --src {root} --out {free_sibling(Path(str(root) + '-curated'))}`) and "
            f"train on that; for the demo data run `dvc repro demo_data`."
        )
    df = pd.read_parquet(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {missing}; rebuild the dataset")
    if "label" in df.columns:
        labels = df["label"]
        if labels.isna().any() or not pd.api.types.is_integer_dtype(labels) or (labels < 0).any():
            bad = labels[labels.isna() | (labels < 0)].head(3).tolist() or labels.dtype
            raise ValueError(f"{path}: its label column must hold integer classes ≥ 0 for every image, found {bad}; "
                             f"rebuild the dataset (curate writes labels from labels.csv or class folders)")
    return df
