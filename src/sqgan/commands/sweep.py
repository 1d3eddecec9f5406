"""`sqgan tune`: a sweep with Ray Tune (`sqgan.shells.tune`), resumed from its folder, or its report re-rendered from
MLflow alone (`sqgan.shells.tune_report`)."""

from __future__ import annotations

from pathlib import Path

from sqgan.config import Params
from sqgan.shells import tune as sweeps
from sqgan.shells.tracking import resolve_tracking_uri
from sqgan.shells.tune_report import write_report


def run_tune(params: Params, data: Path | None = None, out: Path | None = None, force: bool = False) -> sweeps.Sweep:
    """A new sweep over tune.space on data (default data.root/data.dataset) into out (default tune.out_dir)."""
    data_dir = data or Path(params.data.root) / params.data.dataset
    return sweeps.run_sweep(params, data_dir, out or Path(params.tune.out_dir), force=force)


def resume_tune(sweep_dir: Path) -> sweeps.Sweep:
    """Continue the interrupted sweep in `sweep_dir` with the params saved there."""
    return sweeps.resume_sweep(sweep_dir)


def report_tune(params: Params, parent_run_id: str, out: Path | None = None) -> tuple[list, Path]:
    """(rows, folder): the trial table and plots of sweep `parent_run_id` from MLflow alone, into out (default
    <tune.out_dir>-report-<first 12 of the id>), not logged back."""
    where = out or Path(f"{params.tune.out_dir}-report-{parent_run_id[:12]}")
    return write_report(resolve_tracking_uri(params), parent_run_id, where, log=False), where
