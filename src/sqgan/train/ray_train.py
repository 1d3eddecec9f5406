"""Ray Train shell (Train V2): `sqgan train` runs `loop.train` inside a `TorchTrainer`.

The driver creates the MLflow run (resolved params, provenance tags); each worker runs the plain loop with
its rank; rank 0 logs metrics and artifacts into that run. Every checkpoint is reported to Ray, so with
`ray.max_failures` > 0 a failed worker group restarts from the latest one (`ray.train.get_checkpoint()`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqgan.config import Params

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainRun:
    """What a finished `sqgan train` leaves behind."""

    run_id: str
    tracking_uri: str
    out_dir: Path
    metrics: dict[str, Any]
    ray_path: str


def init_ray(params: Params) -> None:
    """Connect to `ray.address` or start a local Ray (auth off, no dashboard) unless one is running."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if params.ray.address:
        kwargs["address"] = params.ray.address
    elif params.ray.num_cpus:
        kwargs["num_cpus"] = params.ray.num_cpus
    ray.init(**kwargs)


def _use_gpu(params: Params) -> bool:
    import ray

    if params.train.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return params.train.use_gpu == "true"


def train_worker(config: dict[str, Any]) -> None:
    """`train_loop_per_worker`: one DDP rank of the training loop."""
    import ray.train
    import ray.train.torch  # noqa: F401  (get_device)
    import torch

    from sqgan.io import link_or_copy
    from sqgan.tracking import MlflowLogger
    from sqgan.train.loop import Hooks, Runtime, train

    params = Params.model_validate(config["params"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    device = ray.train.torch.get_device()

    resume = config.get("resume")
    local_tmp = Path(tempfile.mkdtemp(prefix="sqgan-ckpt-"))
    restored = ray.train.get_checkpoint()
    if restored is not None:  # a restart after a failure: continue from Ray's latest checkpoint
        with restored.as_directory() as d:
            resume = str(shutil.copy2(Path(d) / CHECKPOINT_FILE, local_tmp / CHECKPOINT_FILE))

    logger = MlflowLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None

    def on_checkpoint(path: Path | None, step: int, metrics: dict[str, float]) -> None:
        report = {**metrics, "step": step}
        if path is None:
            ray.train.report(report, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="sqgan-report-") as d:
            link_or_copy(path, Path(d) / CHECKPOINT_FILE)  # Ray copies the folder into storage
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))

    hooks = Hooks(
        log_metrics=logger.log_metrics if logger else Hooks.log_metrics,
        log_artifact=logger.log_artifact if logger else Hooks.log_artifact,
        on_checkpoint=on_checkpoint,
    )
    try:
        train(params, config["data_dir"], config["out_dir"], resume=resume,
              runtime=Runtime(rank=rank, world_size=world, device=device), hooks=hooks)
    finally:
        shutil.rmtree(local_tmp, ignore_errors=True)


def run_training(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    resume: str | Path | None = None,
    project_dir: str | Path = ".",
    parent_run_id: str | None = None,
) -> TrainRun:
    """Run one training as a Ray Train job, tracked in MLflow; returns where everything went."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sqgan.data.manifest import read_manifest
    from sqgan.tracking import end_run, start_run

    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()
    read_manifest(data_dir)  # fail here, before Ray starts, when the dataset is missing
    if resume is not None:
        from sqgan.train.loop import check_resume_compatible, load_checkpoint

        resume = Path(resume).resolve()
        check_resume_compatible(load_checkpoint(resume)["params"], params, resume)

    init_ray(params)
    tags = {"sqgan.stage": "train"}
    if resume is not None:
        tags["resumed_from"] = str(resume)
    tracking_uri, run_id = start_run(params, data_dir, project_dir, tags=tags, parent_run_id=parent_run_id)
    storage = Path(project_dir, params.ray.storage_path).resolve()
    threads = params.ray.cpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "params": params.model_dump(mode="json"),
            "data_dir": str(data_dir),
            "out_dir": str(out_dir),
            "resume": str(resume) if resume else None,
            "tracking_uri": tracking_uri,
            "run_id": run_id,
            "threads": threads,
        },
        scaling_config=ScalingConfig(
            num_workers=params.train.workers, use_gpu=_use_gpu(params), resources_per_worker={"CPU": threads}
        ),
        run_config=RunConfig(
            name=f"train-{run_id[:12]}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=params.ray.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except BaseException:
        end_run(tracking_uri, run_id, "FAILED")
        raise
    if result.error is not None:
        end_run(tracking_uri, run_id, "FAILED")
        raise RuntimeError(f"training failed: {result.error}") from result.error
    from sqgan.tracking import MlflowLogger

    MlflowLogger(tracking_uri, run_id).set_tags({"ray.run_path": result.path})
    end_run(tracking_uri, run_id, "FINISHED")
    return TrainRun(run_id, tracking_uri, out_dir, dict(result.metrics or {}), result.path)
