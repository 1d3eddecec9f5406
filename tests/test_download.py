"""Downloads from a server on 127.0.0.1: checksum, resume, and archives that try to escape."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from sqgan.data.download import ChecksumMismatch, UnsafeArchive, download, extract_archive

PAYLOAD = bytes(range(256)) * 4000  # 1 MB


def test_download_verifies_checksum_and_keeps_the_file(server, tmp_path):
    base, h = server
    h.files["/data/set.bin"] = PAYLOAD
    path = download(f"{base}/data/set.bin", hashlib.sha256(PAYLOAD).hexdigest(), tmp_path, progressbar=False)
    assert path == tmp_path / "set.bin" and path.read_bytes() == PAYLOAD
    download(f"{base}/data/set.bin", hashlib.sha256(PAYLOAD).hexdigest(), tmp_path, progressbar=False)
    assert h.seen_ranges == [None]  # a good copy is not fetched again


def test_download_resumes_a_partial_file_with_a_range_request(server, tmp_path):
    base, h = server
    h.files["/set.bin"] = PAYLOAD
    (tmp_path / ".set.bin.part").write_bytes(PAYLOAD[:300_000])  # what an interrupted run left
    path = download(f"{base}/set.bin", hashlib.sha256(PAYLOAD).hexdigest(), tmp_path, progressbar=False)
    assert h.seen_ranges == ["bytes=300000-"]
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / ".set.bin.part").exists()


def test_wrong_checksum_is_an_error_and_leaves_no_file(server, tmp_path):
    base, h = server
    h.files["/set.bin"] = PAYLOAD
    with pytest.raises(ChecksumMismatch, match="does not match sha256"):
        download(f"{base}/set.bin", "0" * 64, tmp_path, progressbar=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="64 hex digits"):
        download(f"{base}/set.bin", "abc", tmp_path)


def _tar(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def test_good_archive_extracts_into_the_target(tmp_path):
    arc = tmp_path / "ok.tar.gz"
    arc.write_bytes(_tar([("imgs/a.txt", b"a"), ("imgs/b.txt", b"b"), _link("imgs/c.txt", "a.txt")]))
    out = extract_archive(arc, tmp_path / "out")
    assert (out / "imgs/a.txt").read_bytes() == b"a" and (out / "imgs/c.txt").read_bytes() == b"a"


@pytest.mark.parametrize(
    "member, words",
    [
        (("../evil.txt", b"x"), "'..'"),
        (("/tmp/evil.txt", b"x"), "absolute path"),
        (_link("imgs/passwd", "/etc/passwd"), "points outside"),
        (_link("imgs/up", "../../outside"), "points outside"),
    ],
)
def test_hostile_tar_is_refused_and_extracts_nothing(tmp_path, member, words):
    arc = tmp_path / "bad.tar.gz"
    arc.write_bytes(_tar([("imgs/a.txt", b"a"), member]))
    with pytest.raises(UnsafeArchive, match=words):
        extract_archive(arc, tmp_path / "out" / "x")
    assert not (tmp_path / "out" / "x").exists() and not (tmp_path / "evil.txt").exists()


def test_hostile_zip_is_refused(tmp_path):
    arc = tmp_path / "bad.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        zf.writestr("../../evil.txt", b"x")
    with pytest.raises(UnsafeArchive, match="'..'"):
        extract_archive(arc, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not Path(tmp_path.parent / "evil.txt").exists()
