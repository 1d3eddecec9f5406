"""`sqgan data …`: each dataset stage of the stage table (`sqgan.data.stages.STAGES`) run from the command line, and
`sqgan data prepare NAME` (a real dataset from params alone); download and fetch of raw and curated files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqgan.config import Params
from sqgan.data.download import archive_stem, download, extract_archive, file_name
from sqgan.data.fetch import fetch_dataset
from sqgan.data.stages import PREPARABLE, STAGES, get_stage, run_stage
from sqgan.io import check_output

__all__ = ["PREPARABLE", "STAGES", "download_file", "fetch_dataset", "option_sets", "run_data"]


def option_sets(name: str, options: dict[str, Any]) -> list[str]:
    """A stage's command-line options as `--set <section>.<option>=value` overrides (unset options left out): every
    option of `sqgan data NAME` is a key of its stage's params section."""
    section = get_stage(name).section
    return [f"{section}.{k}={v}" for k, v in options.items() if v is not None]


def run_data(name: str, params: Params, src: Path | None, out: Path | None, force: bool | str) -> tuple[dict, Path]:
    """(the stage's report, its output folder): stage `name` run through the stage table."""
    return run_stage(name, params, src, out, force), out or get_stage(name).default_out(params)


def download_file(url: str, sha256: str, out: Path, filename: str | None, extract: bool, force: bool) -> Path:
    """Download (resuming a partial file), verify, and optionally extract into out/<archive stem>; a refused
    destination is refused before anything is fetched."""
    if extract:
        check_output(out / archive_stem(file_name(url, filename)), "extract", (), force)
    path = download(url, sha256, out, filename, force=force)
    if extract:
        path = extract_archive(path, out / archive_stem(path.name), force=force)
    return path
