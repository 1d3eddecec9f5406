"""Copy a curated dataset from storage to a local folder (`sqgan data fetch`): what each pod of a sweep's RayJob runs
first, so the trials read the dataset a Kubeflow data task produced.

URIs: a local path or file://, s3://, gs:// (through pyarrow's file systems and their usual credentials), and
minio:// — Kubeflow's default artifact store — read as S3 at the endpoint in $SQGAN_S3_ENDPOINT (or
$AWS_ENDPOINT_URL). The copy is atomic, and it must hold a readable manifest.parquet.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from sqgan.data.manifest import MANIFEST, read_manifest
from sqgan.io import stage_output

ENDPOINT_VARS = ("SQGAN_S3_ENDPOINT", "AWS_ENDPOINT_URL")
RETRY_S = 60  # how long a storage request may retry before the fetch fails


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow file system, path in it) for `uri`."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    scheme, _, rest = uri.partition("://")
    if scheme == "minio":
        endpoint = next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)
        if endpoint is None:
            raise ValueError(f"{uri}: a minio:// URI needs the MinIO endpoint; set SQGAN_S3_ENDPOINT (e.g. "
                             f"http://minio-service.kubeflow:9000) and the credentials in AWS_ACCESS_KEY_ID / "
                             f"AWS_SECRET_ACCESS_KEY")
        proto, _, host = endpoint.rpartition("://")
        return pafs.S3FileSystem(endpoint_override=host, scheme=proto or "http"), rest
    if scheme == "gs":  # bounded: pyarrow's GCS client otherwise retries an unreachable endpoint for 15 minutes

        return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=RETRY_S)), rest
    if scheme not in ("file", "s3", "hdfs"):
        raise ValueError(f"{uri}: scheme {scheme}:// is not one this reads; use a path, file://, s3://, gs:// or "
                         f"minio://")
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors (bad URI, no network, no credentials) vary
        raise OSError(f"{uri}: could not open it ({e}); check the URI, the network and the storage credentials") \
            from None


def fetch_dataset(uri: str, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Copy the dataset folder at `uri` to `out` (atomically); returns {"images": n, "files": m}."""
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise OSError(f"{uri}: could not read it ({e}); check the URI, the network and the storage credentials") \
            from None
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: nothing there; pass the URI of a curated dataset folder (a data task's "
                                f"output)")
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"{uri}: not a folder; pass the curated dataset's folder (it holds {MANIFEST})")
    if fs.get_file_info(f"{path.rstrip('/')}/{MANIFEST}").type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri}: no {MANIFEST} inside; this is not a curated dataset (build it with a "
                                f"`sqgan data` stage first)")
    local = str(Path(uri).resolve()) if "://" not in uri else None
    with stage_output(out, "fetch", (local,), force) as tmp:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        images = len(read_manifest(tmp))
        files = sum(1 for p in tmp.rglob("*") if p.is_file())
    return {"images": images, "files": files}
