"""The raw source of a real dataset (`sqgan data prepare NAME`): `data.<name>.path` (a folder, or an archive
extracted once) or `data.<name>.url` with its sha256 (downloaded, verified, extracted under `<data.root>/raw/`).
The stage that then runs is looked up in `sqgan.data.stages`."""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from sqgan.data.download import archive_stem, download, extract_archive
from sqgan.io import check_output, stage_output

if TYPE_CHECKING:
    from sqgan.config import SourceParams


def _is_archive(path: Path) -> bool:
    return path.is_file() and (tarfile.is_tarfile(path) or zipfile.is_zipfile(path))


def raw_source(name: str, src: SourceParams, root: Path, extract: bool = True) -> Path:
    """The folder holding dataset `name`'s raw files (downloading and extracting as needed); with `extract=False`
    the archive itself when that is what the source is (a stage that reads its archive in place, as CIFAR's)."""
    if src.path:
        p = Path(src.path)
        if not p.exists():
            raise FileNotFoundError(f"data.{name}.path: {p} not found; point it at the folder or archive you have")
        if p.is_dir():
            return p
        archive = p
    elif src.url:
        archive = download(src.url, src.sha256, root / "raw" / "downloads", md5=getattr(src, "md5", None))
    else:
        raise ValueError(
            f"data.{name}: neither url (with sha256) nor path is set; set one in params.yaml or with "
            f"--set data.{name}.path=/where/it/is"
        )
    if not _is_archive(archive):
        raise ValueError(f"data.{name}: {archive} is neither a folder nor a tar/zip archive")
    if not extract:
        return archive
    dest = root / "raw" / name / archive_stem(archive.name)
    if not dest.exists():  # extraction is atomic: an existing folder is a complete one
        extract_archive(archive, dest)
    return dest


def download_raw(name: str, src: SourceParams, out: str | Path, force: bool = False) -> Path:
    """Dataset `name`'s raw files (`raw_source`: downloaded and verified, or the local path) as a folder `out`,
    written atomically: what the Kubeflow download component hands to the stage that prepares the dataset."""
    out = Path(out)
    check_output(out, "download", (src.path,), force)  # before fetching anything
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.raw-", dir=out.parent) as scratch:
        folder = raw_source(name, src, Path(scratch))
        with stage_output(out, "download", (src.path,), force) as tmp:
            for child in folder.iterdir():
                if folder.is_relative_to(scratch):  # fetched here: move it
                    shutil.move(child, tmp / child.name)
                elif child.is_dir():  # the user's own folder: copy, never move
                    shutil.copytree(child, tmp / child.name, symlinks=True)
                else:
                    shutil.copy2(child, tmp / child.name)
    return out


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
