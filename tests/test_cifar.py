"""The CIFAR stages: the official python tarballs (fixtures built here, served on 127.0.0.1) → PNGs + a manifest
with labels and the official split; a wrong member, a wrong checksum or a pickle that names code is refused with
nothing written."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sqgan.config import default_params
from sqgan.data.cifar import UnexpectedArchive, build_cifar
from sqgan.data.download import ChecksumMismatch
from sqgan.data.stages import run_stage as prepare

CLASSES10 = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def _batch(n: int, seed: int, label_key: bytes = b"labels", classes: int = 10) -> dict:
    """A batch as the release pickles it: bytes keys, uint8 [n, 3072] rows (R plane, G plane, B plane)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 200, 100, 0  # image 0: an orange square (tells R/G/B apart)
    batch = {b"batch_label": b"fixture", label_key: [int(x) for x in rng.integers(0, classes, n)], b"data": data,
             b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [int(x) % 20 for x in batch[label_key]]
    return batch


def _tar(members: dict[str, object]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, obj in members.items():
            data = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _cifar10(train: int = 5, test: int = 3, **extra: object) -> tuple[bytes, dict]:
    batches = {"data_batch_1": _batch(train, 1), "test_batch": _batch(test, 2)}
    members = {f"cifar-10-batches-py/{k}": v for k, v in batches.items()}
    members["cifar-10-batches-py/batches.meta"] = {b"label_names": CLASSES10, b"num_vis": 3072}
    return _tar({**members, **extra}), batches


def test_cifar10_is_downloaded_by_md5_and_keeps_labels_split_and_pixels(server, tmp_path):
    base, h = server
    blob, batches = _cifar10()
    h.files["/cifar-10-python.tar.gz"] = blob
    params = default_params([f"data.root={tmp_path / 'data'}", f"data.cifar10.url={base}/cifar-10-python.tar.gz",
                             f"data.cifar10.md5={hashlib.md5(blob).hexdigest()}"])
    report = prepare("cifar10", params)
    assert (report["train"], report["test"], report["complete"]) == (5, 3, False)  # 1 of 5 train batches
    out = tmp_path / "data" / "cifar10"
    df = pd.read_parquet(out / "manifest.parquet")
    train, test = df[df.split == "train"].sort_values("path"), df[df.split == "test"].sort_values("path")
    assert train["label"].tolist() == batches["data_batch_1"][b"labels"]
    assert test["label"].tolist() == batches["test_batch"][b"labels"]
    assert [CLASSES10[x].decode() for x in train["label"]] == train["class_name"].tolist()
    first = np.asarray(Image.open(out / train["path"].iloc[0]))
    assert first.shape == (32, 32, 3) and (first == [200, 100, 0]).all()  # channel planes → RGB pixels
    row = batches["test_batch"][b"data"][2]
    assert (np.asarray(Image.open(out / test["path"].iloc[2])) == row.reshape(3, 32, 32).transpose(1, 2, 0)).all()
    assert not any(p.suffix in (".gz", ".tar") for p in out.rglob("*"))  # read in place, nothing extracted
    assert prepare("cifar10", params) == report and h.seen_ranges == [None]  # the verified download is reused


def test_a_wrong_md5_or_an_unexpected_member_is_refused_and_nothing_is_left(server, tmp_path):
    base, h = server
    blob, _ = _cifar10()
    h.files["/c.tar.gz"] = blob
    root = tmp_path / "data"
    with pytest.raises(ChecksumMismatch, match="md5"):
        prepare("cifar10", default_params([f"data.root={root}", f"data.cifar10.url={base}/c.tar.gz",
                                           f"data.cifar10.md5={'f' * 32}"]))
    assert not (root / "cifar10").exists() and not list((root / "raw" / "downloads").glob("c.tar.gz"))
    odd, _ = _cifar10(**{"cifar-10-batches-py/run_me.sh": b"echo hi"})
    (tmp_path / "odd.tar.gz").write_bytes(odd)
    with pytest.raises(UnexpectedArchive, match="run_me.sh"):
        prepare("cifar10", default_params([f"data.root={root}", f"data.cifar10.path={tmp_path / 'odd.tar.gz'}"]))
    assert not (root / "cifar10").exists()
    with pytest.raises(ValueError, match="neither sha256 nor md5"):
        default_params(["data.cifar10.md5=null"])


class _Evil:
    def __reduce__(self):
        return os.system, (f"touch {_Evil.marker}",)


def test_a_batch_that_names_code_is_refused_not_run(tmp_path):
    _Evil.marker = tmp_path / "ran"
    blob, _ = _cifar10()
    evil, _ = _cifar10()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:  # the good members, and an evil test batch
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    members["cifar-10-batches-py/test_batch"] = pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2)
    (tmp_path / "evil.tar.gz").write_bytes(_tar(members))
    with pytest.raises(UnexpectedArchive, match="names (posix|os|nt).system"):
        build_cifar(tmp_path / "evil.tar.gz", tmp_path / "out")
    assert not _Evil.marker.exists() and not (tmp_path / "out").exists()


def test_cifar100_from_the_folder_its_tarball_extracts_to_keeps_fine_and_coarse_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test = _batch(4, 5, b"fine_labels", 100), _batch(2, 6, b"fine_labels", 100)
    for name, obj in {"train": train, "test": test,
                      "meta": {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                               b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}}.items():
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    report = prepare("cifar100", default_params([f"data.root={tmp_path / 'data'}", f"data.cifar100.path={folder}"]))
    assert (report["train"], report["test"], report["complete"], report["classes"]) == (4, 2, True, 100)
    df = pd.read_parquet(Path(tmp_path / "data" / "cifar100" / "manifest.parquet")).sort_values(["split", "path"])
    assert df[df.split == "train"]["label"].tolist() == train[b"fine_labels"]
    assert df[df.split == "train"]["coarse_label"].tolist() == train[b"coarse_labels"]
    assert df[df.split == "test"]["class_name"].tolist() == [f"c{x}" for x in test[b"fine_labels"]]
    (folder / "meta").unlink()
    with pytest.raises(UnexpectedArchive, match="meta .* is missing"):
        build_cifar(folder, tmp_path / "again", name="cifar100")
