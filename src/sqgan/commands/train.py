"""`sqgan train`: a training as a Ray Train job, tracked in MLflow (the loop is `sqgan.train.loop`, the Ray and
MLflow shell `sqgan.shells.ray_train`); this module resolves the data and run folders from params and --resume."""

from __future__ import annotations

from pathlib import Path

from sqgan.config import Params
from sqgan.shells.ray_train import TrainRun, run_training


def run_folder_of(resume: Path) -> Path:
    """The run folder --resume names: the folder itself, or the one whose checkpoints/ holds the file."""
    if resume.is_dir():
        return resume.parent if resume.name == "checkpoints" else resume
    return resume.parent.parent if resume.parent.name == "checkpoints" else resume.parent


def run_train(params: Params, data: Path | None = None, out: Path | None = None, resume: Path | None = None,
              force: bool = False) -> tuple[TrainRun, Path]:
    """(the MLflow run, the run folder): data defaults to data.root/data.dataset, the folder to --resume's run folder,
    else train.out_dir."""
    data_dir = data or Path(params.data.root) / params.data.dataset
    out_dir = out or (run_folder_of(resume) if resume is not None else Path(params.train.out_dir))
    return run_training(params, data_dir, out_dir, resume=resume, force=force), out_dir
