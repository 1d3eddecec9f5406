"""Atomic writes, safe stage outputs and hashing: a file or folder appears complete or not at all, and a stage
never replaces what it did not write."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MARKER = ".sqgan-stage.json"  # written into every stage output: which stage made this folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; the result should read like any new file
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def read_torch_file(path: str | Path, what: str, fix: str) -> Any:
    """torch.load(path, weights_only=True) for a file sqgan wrote (`what`: "checkpoint", "codebook prior"); a folder,
    a missing, empty or unreadable file is a one-line error naming it and `fix` (never torch's weights_only=False
    advice, which would be unsafe to follow)."""
    import torch  # on demand: io is the foundation every command loads, and `sqgan --help` must not wait for torch

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; {fix}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found; {fix}")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes: an interrupted copy?); {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types here
        raise ValueError(f"{what} {path} is not a readable sqgan {what} ({type(e).__name__}); {fix}") from None


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
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should read like any new folder
    try:
        yield tmp
        old = None
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
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
    stage = _marker(Path(folder)).get("stage")
    return str(stage) if stage else None


def free_sibling(path: str | Path) -> Path:
    """`path` itself if it does not exist, else the first of `path-2`, `path-3`, … that does not."""
    path = Path(path)
    if not path.exists():
        return path
    n = 2
    while (cand := path.with_name(f"{path.name}-{n}")).exists():
        n += 1
    return cand


def listing(folder: str | Path) -> str:
    """sha256 of the sorted relative paths of every file under `folder` but its marker: what a stage wrote."""
    folder = Path(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    return sha256_bytes("\n".join(names).encode())


def _suggest(path: Path) -> Path:
    """A free sibling of `path`, absolute where the given path ends in '.' or '..'."""
    return free_sibling(path.resolve() if path.name in ("", ".", "..") else path)


def check_output(out: str | Path, stage: str, inputs: tuple[str | Path | None, ...] = (), force: bool = False) -> None:
    """Refuse an `out` that is, contains or lies inside one of `inputs`, that is or contains the working folder,
    or that exists and holds something this stage did not write (unless `force`); an earlier output of this
    stage to which files were added since counts as not written by it. Raises `UnsafeOutput` naming a safe fix."""
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
    cwd = Path.cwd().resolve()
    if out_r == cwd or out_r in cwd.parents:
        raise UnsafeOutput(f"--out {out_path} is or contains the current folder {cwd}; it is never replaced, even "
                           f"with --force. Write to a new folder, e.g. --out {_suggest(out_path)}")
    if not (out_r.exists() or out_path.is_symlink()):
        return
    if out_r.is_dir() and not any(out_r.iterdir()):
        return  # an empty folder: nothing to lose
    if force:
        return
    owner = stage_of(out_r) if out_r.is_dir() else None
    safe = _suggest(out_path)
    if owner == stage:
        if stage == "train" or _unchanged(out_r):
            return
        raise UnsafeOutput(
            f"--out {out_path} is an earlier '{stage}' output, but files were added to or removed from it since; "
            f"nothing was changed. Move what you added elsewhere, write to a new folder (e.g. --out {safe}), or "
            f"add --force to replace the folder and everything in it"
        )
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


def _unchanged(folder: Path) -> bool:
    """A stage's output holds what its stage wrote: the listing its marker recorded (if any) is still the listing."""
    recorded = _marker(folder).get("listing")
    return recorded is None or recorded == listing(folder)


def _marker(folder: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((folder / MARKER).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


@contextlib.contextmanager
def stage_output(
    out: str | Path, stage: str, inputs: tuple[str | Path | None, ...] = (), force: bool = False
) -> Iterator[Path]:
    """`atomic_dir(out)` after `check_output`; the finished folder carries the stage's marker with the listing of
    what it wrote. `out` is resolved first, so a symlink's target is what gets replaced."""
    check_output(out, stage, inputs, bool(force))
    if force is True:
        refuse_unknown_files(out, stage)
    with atomic_dir(Path(out).resolve()) as tmp:
        yield tmp
        mark_output(tmp, stage, listing(tmp))


DELETE_UNKNOWN = "delete-unknown"  # `force` value of --force --delete-unknown: replace what no sqgan stage wrote too


def refuse_unknown_files(out: str | Path, stage: str) -> None:
    """--force replaces only what a sqgan stage wrote: refuse (naming the files and the switch) an `out` that holds
    files no stage wrote, or to which files were added since its stage wrote it."""
    out_path = Path(out)
    out_r = out_path.resolve()
    if not out_r.exists() or (out_r.is_dir() and not any(out_r.iterdir())):
        return
    owner = stage_of(out_r) if out_r.is_dir() else None
    if owner is not None and _unchanged(out_r):
        return
    if out_r.is_dir():  # files changed after the stage's marker first: what the user added
        marked = (out_r / MARKER).stat().st_mtime if (out_r / MARKER).exists() else -1.0
        found = [p for p in out_r.rglob("*") if p.is_file() and p.name != MARKER]
        found.sort(key=lambda p: (p.stat().st_mtime <= marked, p.relative_to(out_r).as_posix()))
        files = [p.relative_to(out_r).as_posix() for p in found]
    else:
        files = [out_r.name]
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    why = (f"files were added to or removed from the '{owner}' output since it was written" if owner is not None
           else "no sqgan stage wrote it")
    raise UnsafeOutput(f"--force replaces only what a sqgan stage wrote, but {why} ({shown}); nothing was deleted. "
                       f"Move what you want to keep, write to a new folder (e.g. --out {_suggest(out_path)}), or add "
                       f"--delete-unknown as well to delete everything in {out_path} and write the '{stage}' output")


def mark_output(folder: str | Path, stage: str, files: str | None = None) -> None:
    """Record in `folder` that `stage` wrote it (so a re-run may replace it and other stages may not), with the
    hash of its file listing when the stage wrote the folder whole."""
    info = {"stage": stage} if files is None else {"listing": files, "stage": stage}
    write_bytes_atomic(Path(folder) / MARKER, (json.dumps(info, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, a scheduler) ends the process like Ctrl-C, so temp folders are removed and runs closed."""
    def _raise(*_: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    try:
        old = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def sigint_observed() -> Iterator[list[int]]:
    """Record each SIGINT delivered inside the block, whichever handler a library installs meanwhile: Ray Train's
    fit() installs its own graceful-abort handler, after which an interrupted fit ends with SystemExit or an actor
    error rather than KeyboardInterrupt. Outside the main thread signals are left alone (and nothing is seen)."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    install = signal.signal

    def observed(handler: Any) -> Any:
        if not callable(handler):
            return handler

        def wrapper(signum: int, frame: Any) -> Any:
            seen.append(signum)
            return handler(signum, frame)

        return wrapper

    def interrupt(signum: int, frame: Any) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    def patched(signum: int, handler: Any) -> Any:
        return install(signum, observed(handler) if signum == signal.SIGINT else handler)

    previous = install(signal.SIGINT, interrupt)
    signal.signal = patched  # type: ignore[assignment]
    try:
        yield seen
    finally:
        signal.signal = install  # type: ignore[assignment]
        install(signal.SIGINT, previous)


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
