"""Ray Train shell (Train V2): `sqgan train` runs `loop.train` inside a `TorchTrainer`.

Before Ray starts, the driver checks everything it can in seconds — the dataset, the run folder, the checkpoint
to resume, the CPUs/GPUs the workers ask for, the tracking server — and fails with the fix named. It then
opens the MLflow run (resolved params, provenance tags; a resume continues its run); each worker runs the plain
loop with its rank; rank 0 logs metrics and artifacts into that run. Every checkpoint is reported to Ray, so with
`ray.max_failures` > 0 a failed worker group restarts from the latest one; controller retries are bounded too
(`ray.controller_failure_limit`), so no configuration retries forever. A run that ends by Ctrl-C or SIGTERM is
marked KILLED, one that raises FAILED.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray._private import ray_constants, services
from ray._raylet import GcsClient
from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train import torch as ray_torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sqgan.config import Params
from sqgan.data.dataset import check_class_labels
from sqgan.data.manifest import read_manifest
from sqgan.io import (
    check_output,
    free_sibling,
    link_or_copy,
    sigint_observed,
    sigterm_as_interrupt,
    stage_of,
    write_json_atomic,
)
from sqgan.models.factory import num_classes
from sqgan.quant.codebook_prior import load_prior
from sqgan.shells.tracking import (
    TRACKING_FILE,
    MlflowLogger,
    RunProgress,
    check_tracking,
    end_run,
    open_run,
    resolve_tracking_uri,
)
from sqgan.tags import RAY_RUN_PATH, RESTARTED_FROM_STEP, RESUMED_FROM, STAGE, STAGE_TRAIN
from sqgan.train.checkpoint import checkpoints_in, latest_checkpoint, load_checkpoint
from sqgan.train.loop import Hooks, Runtime, absolute_init_from, check_resume, init_source, train

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainRun:
    """What a finished `sqgan train` leaves behind."""

    run_id: str
    tracking_uri: str
    out_dir: Path
    metrics: dict[str, Any]
    ray_path: str


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """One TCP connect to a `host:port` Ray address (ray.init would retry its GCS for minutes)."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeError(f"ray.address {address!r}: expected host:port (or ray://host:port, or auto)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise RuntimeError(f"ray.address {address}: nothing answered within {timeout:g} s ({e.strerror or e}); "
                           f"start the cluster (`ray start --head`, or `ray up ray_cluster.yaml`) or unset ray.address "
                           f"to run on a local Ray") from None


def init_ray(params: Params) -> None:
    """Connect to `ray.address` or start a local Ray of this run's own (`start_local_ray`), unless one is running.
    Either way its tasks and actors know the API server of *this* Ray (`RAY_API_SERVER_ADDRESS`): Train V2's
    placement-group cleaner asks it whether a training's controller is alive, and left to guess it picks the newest
    Ray on the node, which beside a second Ray (another sweep, a notebook's `ray start`) is the wrong one."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if params.ray.address:
        kwargs["address"] = params.ray.address
        api = cluster_api_server(params.ray.address)
        if api:  # the cluster's nodes were started elsewhere: handed on with the job
            kwargs["runtime_env"] = {"env_vars": {API_SERVER_ENV: api}}
        ray.init(**kwargs)
        return
    # a Ray of this machine's own: no node to be preempted, so no PreemptionWatcher actor per training (a process to
    # start, and a core_worker error line on the terminal about its restart arguments)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if params.ray.num_cpus:
        kwargs["num_cpus"] = params.ray.num_cpus
    start_local_ray(**kwargs)


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def start_local_ray(**kwargs: Any) -> None:
    """ray.init(**kwargs) of a new local Ray: address="local" (without it ray.init() joins another Ray running on
    this machine) and its dashboard on a free port of 127.0.0.1, whose address its processes inherit as
    RAY_API_SERVER_ADDRESS: set in this process's environment while ray.init spawns the raylet (every worker it
    starts inherits it), then restored. (A runtime_env would hand it on too, but costs each worker process ~0.5 s.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    try:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, **kwargs)
    finally:
        if before is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = before


def cluster_api_server(address: str) -> str | None:
    """The dashboard (API server) URL of the Ray cluster at `address` (host:port of its GCS, or auto), read once from
    the cluster's GCS before connecting; None for a Ray Client address (ray://, its cluster resolves its own) or a
    cluster without a dashboard."""
    if address.startswith("ray://"):
        return None
    gcs = GcsClient(address=services.canonicalize_bootstrap_address_or_die(address))
    url = gcs.internal_kv_get(ray_constants.DASHBOARD_ADDRESS.encode(), namespace=ray_constants.KV_NAMESPACE_DASHBOARD,
                              timeout=10)
    return f"http://{url.decode()}" if url else None


def available_resources(params: Params) -> tuple[dict[str, float], str]:
    """(CPU/GPU totals, where) of the Ray this run will use: a running or remote one as Ray reports it, else
    this machine (ray.num_cpus or its cores) — read without starting Ray."""
    if params.ray.address:
        if not ray.is_initialized():
            check_ray_address(params.ray.address)
            init_ray(params)
        return dict(ray.cluster_resources()), f"the Ray cluster at {params.ray.address}"
    if ray.is_initialized():
        return dict(ray.cluster_resources()), "the running Ray"

    cpus = params.ray.num_cpus or os.cpu_count() or 1
    where = f"ray.num_cpus={cpus}" if params.ray.num_cpus else f"this machine ({cpus} CPUs)"
    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}, where


def node_label(ip: str, node_id: str) -> str:
    """How a Ray node is named in messages and tags: "IP (first 8 hex digits of its id)"."""
    return f"{ip} ({node_id[:8]})"


def node_resources() -> dict[str, dict[str, float]]:
    """{node label: its CPU/GPU/custom resources} of every alive node of the running Ray."""
    return {node_label(n["NodeManagerAddress"], n["NodeID"]): dict(n.get("Resources", {}))
            for n in ray.nodes() if n.get("Alive")}


def worker_slots(cpus_per_worker: int, available: dict[str, float],
                 nodes: dict[str, dict[str, float]] | None = None) -> int:
    """How many workers of `cpus_per_worker` CPUs fit at once: in `available`, or node by node on a cluster
    (`nodes`), since a worker's CPUs sit on one node."""
    if nodes:
        return sum(int(r.get("CPU", 0)) // cpus_per_worker for r in nodes.values())
    return int(available.get("CPU", 0)) // cpus_per_worker


def _node_list(nodes: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{name}: {int(r.get('CPU', 0))} CPU" + (f", {int(r['GPU'])} GPU" if r.get("GPU") else "")
                     for name, r in nodes.items())


def check_resources(params: Params, available: dict[str, float], where: str,
                    nodes: dict[str, dict[str, float]] | None = None) -> bool:
    """Fail unless train.workers × ray.cpus_per_worker CPUs (and a GPU per worker, if asked) fit — and, on a
    cluster (`nodes`), unless some node holds one worker's CPUs (a worker's bundle cannot span nodes); returns
    use_gpu. Ray would otherwise wait for the worker group forever."""
    w, c = params.train.workers, params.ray.cpus_per_worker
    cpus, gpus = int(available.get("CPU", 0)), int(available.get("GPU", 0))
    if w * c > cpus:
        if cpus >= w:
            fix = f"--set ray.cpus_per_worker={cpus // w}"
        else:
            fix = f"--set train.workers={max(1, cpus // c)}" if cpus >= c else f"--set train.workers={max(1, cpus)} " \
                  f"--set ray.cpus_per_worker=1"
        raise RuntimeError(f"train.workers={w} × ray.cpus_per_worker={c} needs {w * c} CPUs, but {where} has {cpus}; "
                           f"{fix}")
    if nodes:
        biggest = max(int(r.get("CPU", 0)) for r in nodes.values())
        if biggest < c:
            raise RuntimeError(f"ray.cpus_per_worker={c}: a worker's CPUs must sit on one node, but no node of {where} "
                               f"has {c} (its nodes: {_node_list(nodes)}); --set ray.cpus_per_worker={max(1, biggest)}"
                               f"{'' if biggest else ', or add nodes with CPUs'}")
        slots = worker_slots(c, available, nodes)
        if slots < w:
            raise RuntimeError(f"train.workers={w} with ray.cpus_per_worker={c}: the nodes of {where} hold {slots} "
                               f"such workers ({_node_list(nodes)}); --set train.workers={max(1, slots)}")
    if params.train.use_gpu == "true" and gpus < w:
        fix = "--set train.use_gpu=auto (GPU when there is one)"
        if gpus >= 1:
            fix += f" or --set train.workers={gpus}"
        raise RuntimeError(f"train.use_gpu=true with train.workers={w} needs {w} GPUs, but {where} has {gpus}; {fix}")
    return params.train.use_gpu == "true" or (params.train.use_gpu == "auto" and gpus >= w)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a training; the message says how to continue it."""


def fit_tracked(trainer: Any, tracking_uri: str, run_id: str, out_dir: Path | None = None) -> Any:
    """`trainer.fit()`, ending the MLflow run as KILLED (Ctrl-C, SIGTERM: raises `TrainingInterrupted` naming
    `--resume` and the last checkpoint), FAILED (an error) or FINISHED. Ray Train answers SIGINT itself (it aborts
    its controller and ends fit() with SystemExit or an actor error), so the signal is observed, not inferred."""
    seen: list[int] = []
    try:
        with sigterm_as_interrupt(), sigint_observed() as seen:
            result = trainer.fit()
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or seen:
            end_run(tracking_uri, run_id, "KILLED")
            raise TrainingInterrupted(interrupted_message(out_dir)) from None
        end_run(tracking_uri, run_id, "FAILED")
        raise
    if seen:
        end_run(tracking_uri, run_id, "KILLED")
        raise TrainingInterrupted(interrupted_message(out_dir))
    if result.error is not None:
        end_run(tracking_uri, run_id, "FAILED")
        raise RuntimeError(f"training failed: {result.error}") from result.error
    return result


def interrupted_message(out_dir: Path | None) -> str:
    """The one line an interrupted training prints: what was kept and the command that continues it."""
    found = checkpoints_in(out_dir) if out_dir is not None else []
    if found:
        return (f"interrupted: the MLflow run is marked KILLED; its last checkpoint is {found[-1]}; continue with "
                f"`sqgan train --resume {out_dir}`")
    where = f" into {out_dir}" if out_dir is not None else ""
    return (f"interrupted before the first checkpoint: the MLflow run is marked KILLED; start again{where} with "
            f"--force")


SHARED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "glusterfs", "beegfs", "fuse.")


def filesystem_type(path: Path) -> str:
    """The type of the file system holding `path` (longest mount point in /proc/mounts); "" when unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    best, kind = "", ""
    target = str(path)
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, parts[2]
    return kind


def resolve_storage(params: Params, project_dir: str | Path = ".") -> str:
    """ray.storage_path as RunConfig wants it: a URI (s3://, gs://, …) as is, a folder made absolute. With
    ray.address set the trials and workers may run on other nodes, which must reach the folder: one on a network
    file system (NFS, Lustre, …) is taken as is; any other is taken only when every node of the cluster sees it —
    a file written there is read back by a task on each node (`nodes_missing_folder`: true of a cluster whose
    nodes all run on this machine, or share its disk) — and refused otherwise, naming the nodes that cannot."""
    sp = params.ray.storage_path
    if "://" in sp:
        return sp
    folder = Path(project_dir, sp).resolve()
    if params.ray.address:
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        kind = filesystem_type(probe)
        if kind.startswith(SHARED_FILESYSTEMS):
            return str(folder)
        check_ray_address(params.ray.address)
        init_ray(params)
        missing = nodes_missing_folder(folder)
        if missing:
            raise RuntimeError(
                f"ray.storage_path {sp} is a folder on this machine ({kind or 'local'} file system) that node(s) "
                f"{', '.join(missing)} of the Ray cluster at {params.ray.address} cannot see (a file written there "
                f"was not found from them), so trials there could not checkpoint into it; use shared storage: --set "
                f"ray.storage_path=s3://BUCKET/sqgan (or gs://…, or a folder on an NFS mount every node sees), or "
                f"unset ray.address to run on a local Ray")
    return str(folder)


@ray.remote(num_cpus=0)
def _reads(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def nodes_missing_folder(folder: Path, timeout: float = 60.0) -> list[str]:
    """The alive nodes of the running Ray that do not see `folder` as this process does: a token file is written
    there (the folder is created) and read by a zero-CPU task pinned to each node; a node that does not answer
    within `timeout` counts as not seeing it."""
    folder.mkdir(parents=True, exist_ok=True)
    token = os.urandom(8).hex()
    marker = folder / f".sqgan-probe-{token}"
    marker.write_text(token)
    try:
        nodes = {n["NodeID"]: node_label(n["NodeManagerAddress"], n["NodeID"]) for n in ray.nodes() if n.get("Alive")}
        refs = {node: _reads.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(str(marker), token) for node in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        seen = {node for node, ref in refs.items() if ref in ready and ray.get(ref)}
        return [name for node, name in nodes.items() if node not in seen]
    finally:
        marker.unlink(missing_ok=True)


@dataclass
class WorkerConfig:
    """What each training worker gets (Ray pickles it to every rank)."""

    params: dict[str, Any]  # Params as JSON
    data_dir: str
    out_dir: str
    tracking_uri: str
    run_id: str
    threads: int
    resume: str | None = None  # checkpoint to start from (a restart after a failure uses Ray's latest instead)
    report_logs: bool = False  # report every log step to Ray Train (a sweep's trial), not only `reported_to_ray`
    reference: bool = False  # Ray's checkpoints name the run folder's file (a local Ray) instead of copying it
    fault: str | None = None  # tests only ($SQGAN_TEST_WORKER_FAULT): "RANK:STEP:FLAG_FILE", that rank exits once


def maybe_fail(fault: str | None, rank: int, step: int) -> None:
    """The fault switch of the restart tests: rank RANK exits at step STEP unless FLAG_FILE exists (created first,
    so the restarted worker group runs through). It waits 5 s first: Ray Train polls its workers every 2 s, and a
    checkpoint reported less than one poll before a crash is lost (the group restarts from the one before)."""
    if not fault:
        return
    want_rank, want_step, flag = fault.split(":", 2)
    if rank == int(want_rank) and step == int(want_step) and not Path(flag).exists():
        Path(flag).write_text(f"rank {rank} exited at step {step}\n")
        time.sleep(5.0)
        os._exit(1)


def say(line: str) -> None:
    """A line for the terminal from a Ray worker or trial (Ray forwards it with the process's prefix)."""
    print(line, flush=True)


def quiet_console() -> None:
    """In a Ray worker or trial process: Ray's INFO lines — Train V2's `Reporting training result N:
    TrainingReport(…30 metrics…)` at every report, `Checkpoint successfully created at: …`, the process-group set-up
    — go to Ray's log files only (session_*/logs/train/ray-train-{app,sys}-worker-*.log; Ray Train's report line is
    logged under its module's file path, so RunConfig's LoggingConfig does not reach it), not to the terminal the
    driver forwards worker output to: the console handlers Ray sets on the root, `ray` and `ray.train` loggers are
    raised to WARNING; their file handlers keep every level."""
    for name in ("", "ray", "ray.train"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(max(handler.level, logging.WARNING))


def reported_to_ray(params: Params, step: int) -> bool:
    """Whether the loop's report at `step` goes to Ray Train: at checkpoints (Ray keeps them for a restart), interim
    evaluations and the end. Every log step would cost a barrier across the ranks and a hand-over to Train's
    controller (one at a time: a report waits until the controller, polling every 2 s, took the previous one) for
    nothing `sqgan train` uses; a sweep's TorchTrainer still reports them (Tune may rank on a logged metric). The same
    steps on every rank, as Train requires."""
    t, every = params.train, params.metrics.eval_every
    return step % t.checkpoint_every == 0 or bool(every and step % every == 0) or step >= t.steps


REFERENCE_FILE = "sqgan_checkpoint.json"  # a Ray checkpoint that names the run folder's file instead of holding it


def restored_checkpoint(folder: Path, local_tmp: Path) -> str:
    """The checkpoint file a Ray checkpoint folder stands for: its copy, or the run-folder file its reference names
    (checked to be there and the size it had)."""
    if (folder / CHECKPOINT_FILE).exists():
        return str(shutil.copy2(folder / CHECKPOINT_FILE, local_tmp / CHECKPOINT_FILE))
    ref = json.loads((folder / REFERENCE_FILE).read_text())
    path = Path(ref["path"])
    if not path.is_file() or path.stat().st_size != ref["bytes"]:
        raise FileNotFoundError(f"Ray's checkpoint of step {ref['step']} names {path}, which is gone or changed "
                                f"(raise train.keep_checkpoints, or resume by hand with --resume)")
    return str(path)


def restore(restored: Any, local_tmp: Path) -> str | None:
    """The checkpoint file to continue from after a restart: the one Ray's checkpoint (`ray.train.get_checkpoint()`
    or `ray.tune.get_checkpoint()`) stands for, or None when Ray holds none."""
    if restored is None:
        return None
    with restored.as_directory() as d:
        return restored_checkpoint(Path(d), local_tmp)


def checkpoint_folder(path: Path, step: int, reference: bool, into: Path) -> Path:
    """Fill `into` with what Ray keeps of the loop's checkpoint `path`: a reference to the run folder's file (a
    local Ray: no second copy) or the file itself (Ray copies the folder into shared storage)."""
    if reference:
        write_json_atomic(into / REFERENCE_FILE, {"path": str(Path(path).resolve()), "step": step,
                                                  "bytes": Path(path).stat().st_size})
    else:
        link_or_copy(path, into / CHECKPOINT_FILE)
    return into


def uses_reference(params: Params, storage_path: str) -> bool:
    """Ray's checkpoints may name the run folder's file when every trial and worker shares this machine's disk."""
    return not params.ray.address and "://" not in storage_path


def train_under_ray(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    tracking_uri: str,
    run_id: str,
    runtime: Runtime,
    restored: Any,
    resume: str | None,
    send: Callable[[dict[str, Any], Any], None],
    checkpoint_type: Any,
    reference: bool,
    wanted: Callable[[int], bool] = lambda step: True,
    fault: str | None = None,
) -> None:
    """The plain loop inside Ray — a Train worker's rank, or a Tune trial's own process. It continues from Ray's
    checkpoint `restored` when there is one (a restart after a failure; tag sqgan.restarted_from_step), else from
    `resume`; rank 0 logs to the MLflow run, each point once (a resumed, restarted or retried run replays the steps
    after its checkpoint); each report whose step `wanted` selects goes to Ray through `send(metrics, checkpoint)`,
    a checkpoint as a `checkpoint_type` folder (`checkpoint_folder`, `reference`: by path on a local Ray)."""
    local_tmp = Path(tempfile.mkdtemp(prefix="sqgan-ckpt-"))
    try:
        from_ray = restore(restored, local_tmp)
        resume = from_ray or resume
        logger = MlflowLogger(tracking_uri, run_id, skip_logged=True) if runtime.rank == 0 else None
        if from_ray is not None and logger is not None:
            logger.set_tags({RESTARTED_FROM_STEP: int(load_checkpoint(from_ray)["step"])})

        def report(metrics: dict[str, float], step: int, path: Path | None) -> None:
            maybe_fail(fault, runtime.rank, step)
            if not wanted(step):
                return
            payload = {**metrics, "step": step}
            if path is None:
                send(payload, None)
                return
            with tempfile.TemporaryDirectory(prefix="sqgan-report-") as d:
                send(payload, checkpoint_type.from_directory(checkpoint_folder(path, step, reference, Path(d))))

        hooks = Hooks(
            log_metrics=logger.log_metrics if logger else Hooks.log_metrics,
            log_artifact=logger.log_artifact if logger else Hooks.log_artifact,
            set_tags=logger.set_tags if logger else Hooks.set_tags,
            report=report,
            progress=None,  # the driver draws the run's bar (RunProgress) or Tune its table: a worker's tqdm reaches
            say=say,        # the terminal as Ray's forwarded log lines, one prefixed line per redraw
        )
        train(params, data_dir, out_dir, resume=resume, runtime=runtime, hooks=hooks)
    finally:
        shutil.rmtree(local_tmp, ignore_errors=True)


def train_worker(config: dict[str, Any]) -> None:
    """`train_loop_per_worker`: one DDP rank of the training loop, reporting to Ray Train (every log step for a
    sweep's trial, else at checkpoints, evaluations and the end: `reported_to_ray`)."""
    cfg = WorkerConfig(**config["worker"])
    params = Params.model_validate(cfg.params)
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, cfg.threads))
    quiet_console()
    train_under_ray(
        params, cfg.data_dir, cfg.out_dir, tracking_uri=cfg.tracking_uri, run_id=cfg.run_id,
        runtime=Runtime(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                        device=ray.train.torch.get_device()),
        restored=ray.train.get_checkpoint(), resume=cfg.resume,
        send=lambda metrics, checkpoint: ray.train.report(metrics, checkpoint=checkpoint),
        checkpoint_type=ray.train.Checkpoint, reference=cfg.reference,
        wanted=lambda step: cfg.report_logs or reported_to_ray(params, step), fault=cfg.fault,
    )


def build_trainer(
    params: Params,
    data_dir: Path,
    out_dir: Path,
    *,
    tracking_uri: str,
    run_id: str,
    use_gpu: bool,
    storage_path: str,
    name: str,
    resume: Path | None = None,
    callbacks: list[Any] | None = None,
    report_logs: bool = False,
) -> Any:
    """The TorchTrainer of one training (train.workers ranks of `train_worker`), shared by `sqgan train` and each
    trial of `sqgan tune` (which adds its callbacks). A run `name` already in `storage_path` resumes from its latest
    checkpoint; failed worker groups restart ray.max_failures times and controller retries stay bounded."""
    threads = params.ray.cpus_per_worker
    worker = WorkerConfig(params=params.model_dump(mode="json"), data_dir=str(data_dir), out_dir=str(out_dir),
                          tracking_uri=tracking_uri, run_id=run_id, threads=threads,
                          resume=str(resume) if resume else None,
                          reference=uses_reference(params, storage_path), report_logs=report_logs,
                          fault=os.environ.get("SQGAN_TEST_WORKER_FAULT"))
    return ray_torch.TorchTrainer(
        train_worker,
        train_loop_config={"worker": asdict(worker)},
        scaling_config=ScalingConfig(
            num_workers=params.train.workers, use_gpu=use_gpu, resources_per_worker={"CPU": threads}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=params.ray.max_failures,
                                         controller_failure_limit=params.ray.controller_failure_limit),
            callbacks=list(callbacks or []),
            logging_config=LoggingConfig(log_level="WARNING"),  # Train's own INFO lines: its log files only
        ),
    )


def run_training(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    resume: str | Path | None = None,
    project_dir: str | Path = ".",
    parent_run_id: str | None = None,
    force: bool = False,
) -> TrainRun:
    """Run one training as a Ray Train job, tracked in MLflow; returns where everything went."""
    params = absolute_init_from(params)
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()
    if resume is not None:
        resume = latest_checkpoint(resume, "--resume").resolve()
    use_gpu, storage = preflight(params, data_dir, out_dir, resume, project_dir, force)

    init_ray(params)
    tags = {STAGE: STAGE_TRAIN}
    if resume is not None:
        tags[RESUMED_FROM] = str(resume)
    tracking_uri, run_id = open_run(params, data_dir, out_dir, project_dir, tags=tags, parent_run_id=parent_run_id,
                                    resume=resume)
    # One Ray run name per invocation: Ray Train restores a run name it already holds from *its* latest checkpoint,
    # which would override the checkpoint --resume names (a killed run's Ray state ends at its last report).
    name = f"train-{run_id[:12]}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    trainer = build_trainer(params, data_dir, out_dir, tracking_uri=tracking_uri, run_id=run_id, use_gpu=use_gpu,
                            storage_path=storage, name=name, resume=resume)
    start = int(load_checkpoint(resume)["step"]) if resume is not None else 0
    with RunProgress(tracking_uri, run_id, params.train.steps, start):
        result = fit_tracked(trainer, tracking_uri, run_id, out_dir)
    MlflowLogger(tracking_uri, run_id).set_tags({RAY_RUN_PATH: result.path})
    end_run(tracking_uri, run_id, "FINISHED")
    return TrainRun(run_id, tracking_uri, out_dir, dict(result.metrics or {}), result.path)


def preflight(params: Params, data_dir: Path, out_dir: Path, resume: Path | None, project_dir: str | Path,
              force: bool) -> tuple[bool, str]:
    """Everything that can fail, checked before Ray starts: the dataset, the run folder, the checkpoint, the
    resources, the storage and the tracking server. Returns (use_gpu, storage path)."""
    manifest = read_manifest(data_dir)
    check_class_labels(data_dir, manifest["label"].to_numpy() if "label" in manifest else None, num_classes(params))
    earlier = checkpoints_in(out_dir)
    # an earlier run's folder: its checkpoints, or tracking.json without the loop's marker (killed while Ray started);
    # a run whose checkpoints DVC removed before re-running its stage keeps the marker and is trained over
    killed = (out_dir / TRACKING_FILE).exists() and stage_of(out_dir) != "train"
    if resume is None and not force and out_dir.is_dir() and (earlier or killed):
        if earlier:
            raise RuntimeError(f"--out {out_dir} holds the checkpoints of an earlier run (up to {earlier[-1].name}); "
                               f"continue it with --resume {out_dir}, write to a new folder (e.g. --out "
                               f"{free_sibling(out_dir)}), or add --force to train over it")
        raise RuntimeError(f"--out {out_dir} holds what a killed run left ({TRACKING_FILE}, no checkpoint: nothing "
                           f"to resume); add --force to train over it")
    # a run's folder (tracking.json) is sqgan's even before the loop marked it
    check_output(out_dir, "train", (data_dir,), force or (out_dir / TRACKING_FILE).exists())
    if resume is not None:
        check_resume(load_checkpoint(resume), params, resume)
    if params.train.init_from and resume is None:
        init_source(params)
    check_prior_file(params)
    use_gpu, storage, _ = check_environment(params, project_dir)
    return use_gpu, storage


def check_prior_file(params: Params) -> None:
    """sq.prior, when set, is a prior file whose codebook fits sq.codebook_size × sq.code_dim."""
    if not (params.sq.enabled and params.sq.prior):
        return

    shape = tuple(load_prior(params.sq.prior)["codebook"].shape)
    if shape != (params.sq.codebook_size, params.sq.code_dim):
        raise ValueError(f"sq.prior {params.sq.prior} holds a {shape[0]} × {shape[1]} codebook but sq.codebook_size × "
                         f"sq.code_dim is {params.sq.codebook_size} × {params.sq.code_dim}; run `sqgan prior` with "
                         f"these params, or set sq.prior: null")


def check_environment(params: Params, project_dir: str | Path) -> tuple[bool, str, str]:
    """What a training needs around it, for `sqgan train` and each sweep alike: the storage, the tracking server
    and the CPUs/GPUs. Returns (use_gpu, storage path, tracking URI)."""
    storage = resolve_storage(params, project_dir)
    tracking_uri = resolve_tracking_uri(params, project_dir)
    check_tracking(tracking_uri)
    available, where = available_resources(params)
    use_gpu = check_resources(params, available, where, node_resources() if params.ray.address else None)
    if params.train.amp == "fp16" and not use_gpu:
        raise RuntimeError(f"train.amp fp16 needs GPUs (its loss scaling is for CUDA's float16) and this run trains on "
                           f"CPUs ({where}); use --set train.amp=bf16 (CPU or GPU) or off")
    if params.train.compile:
        check_compile(use_gpu)
    return use_gpu, storage, tracking_uri


# what train.compile needs, tried in a fresh interpreter (its compiler settings and caches are the run's; the
# driver's own dynamo state is left alone): Inductor compiles a small function for the CPU with a C++ compiler,
# for GPUs with Triton
_COMPILE_PROBE = '''
import sys, torch
if sys.argv[1] == "gpu":  # the driver need not have a GPU itself: that Triton imports is what can be tried here
    import triton  # noqa: F401
else:
    torch.compile(lambda x: x * 2.0 + 1.0, dynamic=False)(torch.ones(3))
'''


def check_compile(use_gpu: bool) -> None:
    """train.compile's preflight, before Ray starts: a torch build (or machine) that cannot compile is one clear
    error naming the fix, not a stack trace from the first training step."""
    try:
        done = subprocess.run([sys.executable, "-c", _COMPILE_PROBE, "gpu" if use_gpu else "cpu"], capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise RuntimeError("train.compile: torch.compile did not compile a one-line function in 10 minutes; set "
                           "--set train.compile=false") from None
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if "Error" in ln or "error" in ln] or done.stderr.splitlines()
        why = lines[-1].strip() if lines else f"exit status {done.returncode}"
        needs = "Triton (pip install triton, as the CUDA torch wheels bring)" if use_gpu else \
            "a working C++ compiler (g++ or clang, or $CXX naming one)"
        raise RuntimeError(f"train.compile: this torch cannot compile here ({why}); it needs {needs}. Install it, "
                           f"or train eagerly with --set train.compile=false")
