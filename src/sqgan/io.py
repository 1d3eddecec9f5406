"""Atomic writes, safe stage outputs and hashing: a file or folder appears complete or not at all, and a stage
never replaces what it did not write."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MARKER = ".sqgan-stage.json"  # written into every stage output: which stage made this folder


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; on success it replaces `path`, on error it is removed.

    A reader never sees a half-written `path`: the old folder stays until the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link `src` to `dst` (same bytes, no second copy on disk); copy where links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class UnsafeOutput(ValueError):
    """An --out that would destroy an input or a folder the stage did not write."""


def stage_of(folder: str | Path) -> str | None:
    """The stage that wrote `folder` (from its marker), or None when no sqgan stage did."""
    try:
        return str(json.loads((Path(folder) / MARKER).read_text())["stage"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def free_sibling(path: str | Path) -> Path:
    """`path` itself if it does not exist, else the first of `path-2`, `path-3`, … that does not."""
    path = Path(path)
    if not path.exists():
        return path
    n = 2
    while (cand := path.with_name(f"{path.name}-{n}")).exists():
        n += 1
    return cand


def check_output(out: str | Path, stage: str, inputs: tuple[str | Path | None, ...] = (), force: bool = False) -> None:
    """Refuse an `out` that is, contains or lies inside one of `inputs`, or that exists and holds something
    this stage did not write (unless `force`). Raises `UnsafeOutput` naming a folder that is safe to use."""
    out_path = Path(out)
    out_r = out_path.resolve()
    for src in inputs:
        if src is None:
            continue
        src_r = Path(src).resolve()
        if out_r == src_r or out_r in src_r.parents or src_r in out_r.parents:
            how = "is" if out_r == src_r else ("contains" if out_r in src_r.parents else "lies inside")
            safe = free_sibling(src_r.parent / f"{src_r.stem or src_r.name}-{stage}")
            raise UnsafeOutput(
                f"--out {out_path} {how} the input {src}; the input is never written to. "
                f"Write to a separate folder, e.g. --out {safe}"
            )
    if not (out_r.exists() or out_path.is_symlink()):
        return
    if out_r.is_dir() and not any(out_r.iterdir()):
        return  # an empty folder: nothing to lose
    owner = stage_of(out_r) if out_r.is_dir() else None
    if owner == stage or force:
        return
    safe = free_sibling(out_path)
    if owner is not None:
        raise UnsafeOutput(
            f"--out {out_path} holds the output of the '{owner}' stage, not of '{stage}'; nothing was changed. "
            f"Write to a new folder (e.g. --out {safe}), or add --force to replace that output"
        )
    kind = "folder" if out_r.is_dir() else "file"
    raise UnsafeOutput(
        f"--out {out_path} is an existing {kind} that no sqgan stage wrote; nothing was changed (sqgan never "
        f"replaces what it did not write). Write to a new folder, e.g. --out {safe}"
    )


@contextlib.contextmanager
def stage_output(
    out: str | Path, stage: str, inputs: tuple[str | Path | None, ...] = (), force: bool = False
) -> Iterator[Path]:
    """`atomic_dir(out)` after `check_output`; the finished folder carries the stage's marker."""
    check_output(out, stage, inputs, force)
    with atomic_dir(out) as tmp:
        yield tmp
        mark_output(tmp, stage)


def mark_output(folder: str | Path, stage: str) -> None:
    """Record in `folder` that `stage` wrote it (so a re-run may replace it and other stages may not)."""
    write_bytes_atomic(Path(folder) / MARKER, (json.dumps({"stage": stage}) + "\n").encode())


class UniqueNames:
    """Output names that never collide: a name already claimed (case-insensitively) gets `~2`, `~3`, … before
    its extension, so no two inputs can land on one file."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def claim(self, name: str) -> str:
        stem, dot, ext = name.rpartition(".")
        if not dot or "/" in ext:
            stem, ext = name, ""
        cand, n = name, 2
        while cand.casefold() in self._taken:
            cand = f"{stem}~{n}.{ext}" if ext else f"{stem}~{n}"
            n += 1
        self._taken.add(cand.casefold())
        return cand
