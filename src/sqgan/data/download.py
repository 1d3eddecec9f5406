"""Download with a checksum (pooch), resuming a partial file, and extract archives safely.

- The bytes stream into `.NAME.part`; an interrupted download leaves only that, and the next call asks the
  server for the rest (HTTP Range). pooch checks the sha256 before the file takes its real name, so a wrong
  checksum is an error that leaves no file at the destination (and no partial file either).
- Extraction refuses archives with members that would escape the target: absolute paths, `..`, links
  that point outside, device files. It extracts into a temp folder that is renamed when complete.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pooch
import requests
from tqdm import tqdm

from sqgan.io import UnsafeOutput, free_sibling, sha256_file, stage_output

SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
MD5 = re.compile(r"^[0-9a-fA-F]{32}$")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")


def archive_stem(name: str) -> str:
    """'BreCaHAD.tar.gz' → 'BreCaHAD': the folder an archive is extracted into."""
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class ChecksumMismatch(ValueError):
    """The downloaded bytes are not the ones the sha256 names."""


class UnsafeArchive(ValueError):
    """An archive member would land outside the extraction folder."""


class ResumableDownloader:
    """A pooch downloader that continues `part` with an HTTP Range request (restarting if the server ignores it)."""

    def __init__(self, part: Path, progressbar: bool = True, timeout: float = 60.0, chunk: int = 1 << 20) -> None:
        self.part, self.progressbar, self.timeout, self.chunk = Path(part), progressbar, timeout, chunk

    def __call__(self, url: str, output_file: str, pooch: object, check_only: bool = False) -> None:
        have = self.part.stat().st_size if self.part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as r:
            if r.status_code == 416 and have:  # nothing left to send: the part is complete
                pass
            else:
                r.raise_for_status()
                if have and r.status_code != 206:  # the server sent the whole file: start over
                    have = 0
                total = have + int(r.headers.get("content-length", 0) or 0)
                with open(self.part, "ab" if have else "wb") as f, tqdm(
                    total=total or None, initial=have, unit="B", unit_scale=True, desc=Path(output_file).name,
                    disable=not self.progressbar, mininterval=1.0,
                ) as bar:
                    for block in r.iter_content(self.chunk):
                        f.write(block)
                        bar.update(len(block))
        shutil.move(str(self.part), output_file)  # complete: pooch now checks the hash and renames


def file_name(url: str, filename: str | None = None) -> str:
    """The name a download of `url` is saved under: `filename`, else the URL's last path part."""
    name = filename or PurePosixPath(urlparse(url).path).name
    if not name:
        raise ValueError(f"cannot tell a file name from {url!r}; pass --filename")
    return name


def md5_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(
    url: str, sha256: str | None, out_dir: str | Path, filename: str | None = None, progressbar: bool = True,
    force: bool = False, md5: str | None = None,
) -> Path:
    """Fetch `url` into `out_dir` (kept only if its sha256 — or, for a source that publishes only that, its md5 —
    matches); an existing good copy is not fetched again. An existing file of that name with other bytes is never
    replaced without `force`."""
    if sha256 or not md5:
        if not SHA256.match(sha256 or ""):
            raise ValueError(f"--sha256 must be 64 hex digits, got {sha256!r}; compute it with `sha256sum FILE`")
        algo, digest, of = "sha256", sha256.lower(), sha256_file  # type: ignore[union-attr]
    else:
        if not MD5.match(md5):
            raise ValueError(f"md5 must be 32 hex digits, got {md5!r}; compute it with `md5sum FILE`")
        algo, digest, of = "md5", md5.lower(), md5_file
    out_dir = Path(out_dir)
    name = file_name(url, filename)
    target = out_dir / name
    if target.exists() and not force and (not target.is_file() or of(target) != digest):
        raise UnsafeOutput(f"{target} exists and is not the file with {algo} {digest}; nothing was changed. "
                           f"Download into another folder (--out {free_sibling(out_dir)}), or add --force to "
                           f"replace {target.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    part = out_dir / f".{name}.part"
    try:
        path = pooch.retrieve(url, known_hash=f"{algo}:{digest}", fname=name, path=out_dir,
                              downloader=ResumableDownloader(part, progressbar=progressbar))
    except ValueError as e:
        if "hash" in str(e).lower():
            raise ChecksumMismatch(
                f"{url}: the downloaded file does not match {algo} {digest} and was not kept ({e}); "
                f"check the URL and the checksum in params"
            ) from None
        raise
    return Path(path)


def _check_member_name(archive: Path, name: str) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchive(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    if ".." in p.parts:
        raise UnsafeArchive(f"{archive}: member {name!r} climbs out with '..'; refusing to extract")


def _check_link(archive: Path, name: str, target: str) -> None:
    resolved = PurePosixPath(name).parent / target
    if PurePosixPath(target).is_absolute() or ".." in PurePosixPath(_normalise(resolved)).parts:
        raise UnsafeArchive(f"{archive}: link {name!r} → {target!r} points outside the target; refusing to extract")


def _normalise(p: PurePosixPath) -> str:
    parts: list[str] = []
    for part in p.parts:
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            else:
                parts.append("..")
        elif part != ".":
            parts.append(part)
    return "/".join(parts)


def extract_archive(archive: str | Path, dest: str | Path, force: bool = False) -> Path:
    """Extract a tar or zip archive into `dest` (atomically), refusing members that escape it. An existing `dest`
    is replaced only when it is an earlier extraction (or with `force`)."""
    archive, dest = Path(archive), Path(dest)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                _check_member_name(archive, m.name)
                if m.issym() or m.islnk():
                    _check_link(archive, m.name, m.linkname)
                if m.isdev():
                    raise UnsafeArchive(f"{archive}: member {m.name!r} is a device file; refusing to extract")
            with stage_output(dest, "extract", (archive,), force) as tmp:
                try:
                    tf.extractall(tmp, members=members, filter="data")  # the stdlib's guard as a second line
                except tarfile.FilterError as e:
                    raise UnsafeArchive(f"{archive}: {e}; refusing to extract") from None
        return dest
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_member_name(archive, info.filename)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise UnsafeArchive(f"{archive}: member {info.filename!r} is a symbolic link; refusing to extract")
            with stage_output(dest, "extract", (archive,), force) as tmp:
                zf.extractall(tmp)
        return dest
    raise ValueError(f"{archive} is neither a tar nor a zip archive; drop --extract or fix the URL")
