"""`sqgan data prepare NAME`: one real dataset from params, raw source to curated folder (a DVC stage each).

The raw source is `data.<name>.path` (a folder, or an archive extracted once) or `data.<name>.url` with its
sha256 (downloaded, verified, extracted under `<data.root>/raw/`). Then the dataset's own stage function
runs and writes `<data.root>/<name>/` (images, manifest.parquet and a report JSON; plots for FFHQ-2.5k).
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

from sqgan.config import Params, SourceParams

DATASETS = ("ffhq2k5", "brecahad", "dogface", "metfaces", "subset")
def _is_archive(path: Path) -> bool:
    return path.is_file() and (tarfile.is_tarfile(path) or zipfile.is_zipfile(path))


def raw_source(name: str, src: SourceParams, root: Path) -> Path:
    """The folder holding dataset `name`'s raw files (downloading and extracting as needed)."""
    from sqgan.data.download import archive_stem, download, extract_archive

    if src.path:
        p = Path(src.path)
        if not p.exists():
            raise FileNotFoundError(f"data.{name}.path: {p} not found; point it at the folder or archive you have")
        if p.is_dir():
            return p
        archive = p
    elif src.url:
        archive = download(src.url, src.sha256 or "", root / "raw" / "downloads")
    else:
        raise ValueError(
            f"data.{name}: neither url (with sha256) nor path is set; set one in params.yaml or with "
            f"--set data.{name}.path=/where/it/is"
        )
    if not _is_archive(archive):
        raise ValueError(f"data.{name}: {archive} is neither a folder nor a tar/zip archive")
    dest = root / "raw" / name / archive_stem(archive.name)
    if not dest.exists():  # extraction is atomic: an existing folder is a complete one
        extract_archive(archive, dest)
    return dest


def find_root(folder: Path, marker: str) -> Path:
    """`folder`, or its single sub-folder chain, that contains `marker` (archives often wrap a top folder)."""
    cur = folder
    for _ in range(4):
        if (cur / marker).exists():
            return cur
        subs = [p for p in cur.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subs) != 1:
            break
        cur = subs[0]
    raise FileNotFoundError(f"{folder}: no '{marker}' inside; is this the right archive or folder?")


def prepare(name: str, params: Params) -> dict:
    """Build dataset `name` under data.root; returns its report."""
    from sqgan.data.brecahad import crop_brecahad
    from sqgan.data.curate import curate
    from sqgan.data.dogface import build_dogface
    from sqgan.data.features import build_extractor
    from sqgan.data.ffhq import build_ffhq2k5
    from sqgan.data.subset import make_subset

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} (the demo: sqgan data demo)")
    d = params.data
    root = Path(d.root)
    out = root / name
    if name == "ffhq2k5":
        curated = root / "raw" / "ffhq-curated"
        counts = curate(raw_source(name, d.ffhq2k5, root), curated)
        f = d.ffhq2k5
        report = build_ffhq2k5(curated, out, build_extractor(f.features, f.model, f.pretrained), d.cache,
                               k=f.k, seed=f.seed, batch_size=f.batch_size)
        return {**report, "curate": counts}
    if name == "brecahad":
        return crop_brecahad(raw_source(name, d.brecahad, root), out, d.brecahad.crop, d.brecahad.stride)
    if name == "dogface":
        g = d.dogface
        pet = find_root(raw_source(name, g, root), "annotations")
        return build_dogface(pet, out, g.size, g.margin, g.seed, g.detector_steps, g.detector_weights)
    if name == "metfaces":
        return curate(raw_source(name, d.metfaces, root), out)
    s = d.subset
    path = make_subset(root / s.source, out, s.n, s.seed)
    return {"subset": str(path), "source": s.source, "n": s.n, "seed": s.seed}
