"""`sqgan data prepare NAME`: raw data from a URL (served on 127.0.0.1) or a local path, through each stage."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from conftest import zip_bytes
from PIL import Image
from typer.testing import CliRunner

from sqgan.cli import app
from sqgan.config import default_params
from sqgan.data.stages import run_stage as prepare


def _image_bytes(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _zip_of_slides(n: int) -> bytes:
    rng = np.random.default_rng(0)
    return zip_bytes({f"BreCaHAD/images/Case_{i}.tif": _image_bytes(rng.integers(0, 255, (1024, 1360, 3),
                                                                                 dtype=np.uint8), "TIFF")
                      for i in range(n)})


def test_brecahad_is_downloaded_verified_extracted_and_cropped(server, tmp_path):
    base, h = server
    blob = _zip_of_slides(2)
    h.files["/brecahad.zip"] = blob
    params = default_params([f"data.root={tmp_path / 'data'}", f"data.brecahad.url={base}/brecahad.zip",
                                f"data.brecahad.sha256={hashlib.sha256(blob).hexdigest()}"])
    report = prepare("brecahad", params)
    assert report["crops"] == 24 and report["slides"] == 2
    assert len(pd.read_parquet(tmp_path / "data" / "brecahad" / "manifest.parquet")) == 24
    again = prepare("brecahad", params)  # the verified download and its extraction are reused
    assert again == report and h.seen_ranges == [None]


def test_metfaces_from_a_local_archive_and_subset_from_it(tmp_path):
    members = {f"metfaces/images/{i:05d}.png": _image_bytes(np.full((40, 30, 3), i * 40, np.uint8), "PNG")
               for i in range(6)}
    (tmp_path / "metfaces.zip").write_bytes(zip_bytes({**members, "metfaces/images/broken.png": b""}))
    root = tmp_path / "data"
    params = default_params([f"data.root={root}", f"data.metfaces.path={tmp_path / 'metfaces.zip'}",
                                "data.subset.source=metfaces", "data.subset.n=3"])
    counts = prepare("metfaces", params)
    assert counts["kept"] == 6 and counts["quarantined"] == 1
    prepare("subset", params)
    assert len(pd.read_parquet(root / "subset" / "manifest.parquet")) == 3


def test_a_100_shot_set_from_its_zip_is_curated_as_released_under_its_set_name(tmp_path):
    members = {f"100-shot-panda/img/{i}.jpg": _image_bytes(np.full((24, 24, 3), 30 * i, np.uint8), "JPEG")
               for i in range(5)}
    (tmp_path / "panda.zip").write_bytes(zip_bytes(members))
    root = tmp_path / "data"
    params = default_params([f"data.root={root}", f"data.fewshot100.path={tmp_path / 'panda.zip'}",
                             "data.fewshot100.set=panda"])
    counts = prepare("fewshot100", params)
    assert counts["kept"] == 5 and counts["labels"] == "none"
    df = pd.read_parquet(root / "fewshot100" / "manifest.parquet")
    assert set(df["source"]) == {"panda"} and "label" not in df


def test_dogface_from_a_local_folder(tmp_path):
    from test_dogface import _pet_root

    pet, _ = _pet_root(tmp_path, n_dogs=6, n_unannotated=0)
    params = default_params([f"data.root={tmp_path / 'data'}", f"data.dogface.path={pet}",
                                "data.dogface.size=32", "data.dogface.detector_steps=2"])
    assert prepare("dogface", params)["crops"] == 6


def test_missing_source_names_the_params_to_set(tmp_path):
    r = CliRunner().invoke(app, ["data", "prepare", "ffhq2k5", "--set", f"data.root={tmp_path}"])
    assert r.exit_code == 1 and "data.ffhq2k5: neither url (with sha256) nor path is set" in r.output
    with pytest.raises(ValueError, match="unknown stage 'cifar'"):
        prepare("cifar", default_params([]))
    with pytest.raises(FileNotFoundError, match="data.brecahad.path"):
        prepare("brecahad", default_params([f"data.brecahad.path={tmp_path / 'nope'}"]))


def test_cli_download_with_extract_unpacks_next_to_the_archive(server, tmp_path):
    base, h = server
    h.files["/set.zip"] = blob = zip_bytes({"pics/a.txt": b"a"})
    r = CliRunner().invoke(app, ["data", "download", "--url", f"{base}/set.zip", "--out", str(tmp_path),
                                 "--sha256", hashlib.sha256(blob).hexdigest(), "--extract"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "set" / "pics" / "a.txt").read_bytes() == b"a"
    bad = CliRunner().invoke(app, ["data", "download", "--url", f"{base}/set.zip", "--out", str(tmp_path / "x"),
                                   "--sha256", "0" * 64])
    assert bad.exit_code == 1 and "does not match sha256" in bad.output
