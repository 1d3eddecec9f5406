"""CIFAR-10 / CIFAR-100 (DESIGN.md §2.5, FQ-GAN's Tables 1–4) from the official python tarballs: PNGs + a manifest
with each image's `label` (and its `class_name`; CIFAR-100 also `coarse_label`) and the official train/test split.

The tarball is read as it is — nothing is extracted to disk but the PNGs — and refused, with nothing written, when
a member is not one of the release's files (a wrong or tampered archive). Its batches are pickles; they are read
by an unpickler that builds nothing but pickle's plain data and numpy arrays (`SafeUnpickler`), so a pickle that
names any other callable is refused instead of run.

    cifar10:  cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta, readme.html}
    cifar100: cifar-100-python/{train, test, meta}

A release is expected whole; a subset of its batches (a fixture, a partial copy) is read when every member is a
release file and the meta and at least one train and one test batch are there, and the report says which.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from sqgan.data.manifest import write_manifest
from sqgan.io import stage_output, write_json_atomic

REPORT = "cifar.json"


@dataclass(frozen=True)
class Release:
    folder: str  # the tarball's top folder
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    extra: tuple[str, ...]  # release files that hold no images
    label_key: bytes  # the batches' label list
    names_key: bytes  # the meta's class names
    classes: int

    @property
    def members(self) -> set[str]:
        return {f"{self.folder}/{m}" for m in (*self.train, *self.test, self.meta, *self.extra)}


RELEASES = {
    "cifar10": Release("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                       "batches.meta", ("readme.html",), b"labels", b"label_names", 10),
    "cifar100": Release("cifar-100-python", ("train",), ("test",), "meta", (), b"fine_labels", b"fine_label_names",
                        100),
}


class UnexpectedArchive(ValueError):
    """The archive is not the CIFAR release the stage reads."""


class SafeUnpickler(pickle.Unpickler):
    """Builds pickle's own data (dicts, lists, bytes, numbers) and numpy arrays; any other global is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how Python 3's protocol 2 writes bytes (a copy re-pickled by Python 3)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the pickle names {module}.{name}, which a CIFAR batch never does; refusing to "
                                     f"load it")


def load_batch(data: bytes, where: str) -> dict[bytes, Any]:
    try:
        out = SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise UnexpectedArchive(f"{where}: not a CIFAR batch ({e})") from None
    if not isinstance(out, dict):
        raise UnexpectedArchive(f"{where}: not a CIFAR batch (a pickled {type(out).__name__}, not a dict)")
    return out


def _members(src: Path, release: Release) -> dict[str, bytes]:
    """{member name: bytes} of the release files in `src` (a tarball, or the folder it extracts to / holds)."""
    found: dict[str, bytes] = {}
    if src.is_file():
        try:
            tf = tarfile.open(src)
        except tarfile.TarError as e:
            raise UnexpectedArchive(f"{src}: not a tar archive ({e}); give the official python tarball") from None
        with tf:
            for m in tf.getmembers():
                name = m.name.lstrip("./")
                if m.isdir() and name in ("", release.folder):
                    continue
                if name not in release.members or not m.isfile():
                    raise UnexpectedArchive(
                        f"{src}: member {m.name!r} is not a file of the {release.folder} release; refusing the "
                        f"archive (nothing was written). Give the official tarball (and its md5 in params)")
                found[name] = tf.extractfile(m).read()  # type: ignore[union-attr]
    elif src.is_dir():
        root = src / release.folder if (src / release.folder).is_dir() else src
        for p in sorted(root.rglob("*")):
            name = f"{release.folder}/{p.relative_to(root).as_posix()}"
            if p.is_dir():
                continue
            if name not in release.members:
                raise UnexpectedArchive(f"{root}: {p.name!r} is not a file of the {release.folder} release; "
                                        f"point data.<name>.path at the folder the tarball extracts to")
            found[name] = p.read_bytes()
    else:
        raise FileNotFoundError(f"{src}: no such tarball or folder")
    need = {"meta": [release.meta], "a train batch": list(release.train), "the test batch": list(release.test)}
    for what, names in need.items():
        if not any(f"{release.folder}/{n}" in found for n in names):
            raise UnexpectedArchive(f"{src}: {what} ({', '.join(names)}) is missing; give the whole release")
    return found


def _images(batch: dict[bytes, Any], release: Release, where: str) -> Iterator[tuple[np.ndarray, int, dict]]:
    data, labels = batch.get(b"data"), batch.get(release.label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UnexpectedArchive(f"{where}: its data is not uint8 [N, 3072] images")
    if not isinstance(labels, list) or len(labels) != len(data):
        raise UnexpectedArchive(f"{where}: {len(labels) if isinstance(labels, list) else 'no'} labels for "
                                f"{len(data)} images")
    names = batch.get(b"filenames") or [b""] * len(data)
    coarse = batch.get(b"coarse_labels")
    for i, (row, label) in enumerate(zip(data, labels, strict=True)):
        if not isinstance(label, int) or not 0 <= label < release.classes:
            raise UnexpectedArchive(f"{where}: label {label!r} of image {i} is not in 0..{release.classes - 1}")
        extra = {"filename": names[i].decode(errors="replace")}
        if coarse is not None:
            extra["coarse_label"] = int(coarse[i])
        yield row.reshape(3, 32, 32).transpose(1, 2, 0), label, extra


def build_cifar(src: str | Path, out: str | Path, name: str = "cifar10", force: bool = False) -> dict[str, Any]:
    """Write CIFAR `name` (cifar10 | cifar100) from `src` (its python tarball, or the folder it extracts to) to
    `out`, atomically: images/{train,test}/NNNNN.png and a manifest with label, class_name and split."""
    if name not in RELEASES:
        raise ValueError(f"CIFAR stage: unknown release {name!r}; choose one of {', '.join(RELEASES)}")
    release, src, out = RELEASES[name], Path(src), Path(out)
    members = _members(src, release)  # every check of the archive before anything is written
    meta = load_batch(members[f"{release.folder}/{release.meta}"], f"{src}:{release.meta}")
    classes = [c.decode() for c in meta.get(release.names_key, [])]
    if len(classes) != release.classes:
        raise UnexpectedArchive(f"{src}:{release.meta}: {len(classes)} class names, {name} has {release.classes}")
    batches = [(split, b) for split, names in (("train", release.train), ("test", release.test)) for b in names
               if f"{release.folder}/{b}" in members]
    rows: list[dict[str, Any]] = []
    counts = {"train": 0, "test": 0}
    with stage_output(out, name, (src,), force) as tmp:
        for split in counts:
            (tmp / "images" / split).mkdir(parents=True)
        for split, b in batches:
            where = f"{src}:{b}"
            batch = load_batch(members[f"{release.folder}/{b}"], where)
            for i, (pixels, label, extra) in enumerate(tqdm(_images(batch, release, where), desc=f"{name} {b}",
                                                            unit="img", mininterval=1.0)):
                rel = f"images/{split}/{counts[split]:05d}.png"
                Image.fromarray(pixels).save(tmp / rel, format="PNG")
                rows.append({"path": rel, "width": 32, "height": 32, "source": name, "source_id": f"{b}:{i}",
                             "split": split, "label": label, "class_name": classes[label], **extra})
                counts[split] += 1
        write_manifest(tmp, rows)
        report = {"release": release.folder, "batches": [b for _, b in batches],
                  "complete": all(f"{release.folder}/{b}" in members for b in (*release.train, *release.test)),
                  "classes": release.classes,
                  **counts}
        write_json_atomic(tmp / REPORT, report)
    return report
