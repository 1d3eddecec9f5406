"""MLflow: where runs go, what they are tagged with, and a small logger the training ranks use.

Default backend: sqlite `mlflow.db` in the project, artifacts under `mlartifacts/` (the file store is
deprecated in MLflow 3). `mlflow.tracking_uri` in params or `MLFLOW_TRACKING_URI` override it.
The driver creates the run (params, provenance tags); rank 0 logs metrics and artifacts into it by id.
A run folder's `tracking.json` names its run, so `--resume` continues that run (or starts a child linked to it).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from tqdm import tqdm

from sqgan.config import Params
from sqgan.io import sha256_file, write_json_atomic
from sqgan.tags import (
    DATA_DIR,
    DATA_DVC_LOCK_MD5,
    DATA_MANIFEST_SHA256,
    DATA_MATCHES_DVC_LOCK,
    DATA_MD5,
    GIT_DIRTY,
    GIT_SHA,
    PARENT_RUN_ID,
    RESUMED_FROM_RUN,
    RESUMES,
    TRIAL_ID,
    VERSION,
    resume_from,
    resume_status_before,
)

TRACKING_FILE = "tracking.json"  # in a run folder: {"tracking_uri", "run_id"} of the MLflow run it belongs to
PACKAGES = ("sqgan", "torch", "torchvision", "ray", "mlflow", "dvc", "torchmetrics", "numpy", "pydantic")


def resolve_tracking_uri(params: Params, project_dir: str | Path = ".") -> str:
    if params.mlflow.tracking_uri:
        return params.mlflow.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(project_dir) / 'mlflow.db').resolve()}"


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """One short probe of the tracking backend, so a wrong URI fails in seconds with the URI named (not after
    minutes of client retries, and before Ray starts)."""
    scheme = urlparse(uri).scheme
    fix = "start the server (`make ui` serves http://127.0.0.1:5000) or unset mlflow.tracking_uri and " \
          "MLFLOW_TRACKING_URI to log to sqlite:///mlflow.db in the project"
    if scheme in ("http", "https"):
        try:
            r = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as e:
            raise RuntimeError(f"mlflow.tracking_uri {uri}: no answer within {timeout:g} s ({type(e).__name__}); "
                               f"{fix}") from None
        if r.status_code >= 500:
            raise RuntimeError(f"mlflow.tracking_uri {uri}: the server answered HTTP {r.status_code}; {fix}")
    elif scheme == "sqlite" and uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
            raise RuntimeError(f"mlflow.tracking_uri {uri}: folder {db.parent} does not exist or is not writable; "
                               f"create it or point mlflow.tracking_uri elsewhere")


def mlflow_client(tracking_uri: str):
    return MlflowClient(tracking_uri=tracking_uri)


def open_existing(uri: str, fix: str):
    """A client of a tracking store that must already hold runs (report, reproduce, eval --run): a sqlite file that
    does not exist is an error naming it and `fix` — never a new, empty database — and a server must answer."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise FileNotFoundError(f"tracking URI {uri}: no MLflow database at {db}; {fix}")
    check_tracking(uri)
    return mlflow_client(uri)


def search_all(client: Any, experiment_id: str, filter_string: str = "") -> list[Any]:
    """Every run of the experiment matching `filter_string`, oldest first, page by page (no cap)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def child_runs(client: Any, parent: Any) -> list[Any]:
    """The runs nested under `parent` (a sweep's trials)."""
    return search_all(client, parent.info.experiment_id, f"tags.`{PARENT_RUN_ID}` = '{parent.info.run_id}'")


def trial_runs(client: Any, parent: Any, trial_id: str) -> list[Any]:
    """The run(s) nested under sweep `parent` for Ray trial `trial_id` (one, or none before it starts)."""
    query = f"tags.`{PARENT_RUN_ID}` = '{parent.info.run_id}' and tags.`{TRIAL_ID}` = '{trial_id}'"
    return client.search_runs([parent.info.experiment_id], query)


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | Path) -> str:
    """The experiment's id, created with artifacts under `artifact_root` when it does not exist yet."""
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None  # a tracking server keeps the artifacts where it was told to (--artifacts-destination)
    if not tracking_uri.startswith(("http://", "https://", "databricks")):
        root = Path(artifact_root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        location = (root / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created by a concurrent run meanwhile
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_sha(project_dir: str | Path = ".") -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_dir,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_dirty_files(project_dir: str | Path = ".") -> list[str]:
    """The tracked files with uncommitted changes (what makes git_sha end in -dirty)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_dir,
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(line[3:].split(" -> ")[-1].strip() for line in out.splitlines() if len(line) > 3)


def dirty_tag(files: list[str], limit: int = 2000) -> str:
    """The git_dirty tag: the changed files, comma-separated, cut at `limit` characters with a count."""
    text = ",".join(files)
    if len(text) <= limit:
        return text
    kept = text[:limit].rsplit(",", 1)[0]
    return f"{kept},…+{len(files) - kept.count(',') - 1} more"


def dvc_lock_hash(data_dir: Path, project_dir: Path) -> str | None:
    """The md5 that dvc.lock records for `data_dir` as a stage output, if any."""
    lock = project_dir / "dvc.lock"
    if not lock.exists():
        return None
    try:
        rel = os.path.relpath(data_dir.resolve(), project_dir.resolve())
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except (OSError, ValueError, yaml.YAMLError):
        return None
    for stage in stages.values():
        for out in stage.get("outs", []) or []:
            if os.path.normpath(out.get("path", "")) == os.path.normpath(rel):
                return out.get("md5")
    return None


def dvc_dir_md5(folder: str | Path) -> str:
    """The md5 that DVC 3 records for `folder` as a directory output: md5 of the sorted JSON list of
    {md5, relpath} of every file, plus ".dir" (dvc_data.hashfile.tree.Tree.digest)."""
    folder = Path(folder)
    entries = []
    for p in folder.rglob("*"):
        if p.is_file():
            h = hashlib.md5()
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            entries.append({"md5": h.hexdigest(), "relpath": p.relative_to(folder).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance_tags(data_dir: str | Path, project_dir: str | Path = ".") -> dict[str, str]:
    data_dir, project_dir = Path(data_dir), Path(project_dir)
    manifest = data_dir / "manifest.parquet"
    on_disk = dvc_dir_md5(data_dir)
    locked = dvc_lock_hash(data_dir, project_dir)
    tags = {
        GIT_SHA: git_sha(project_dir),
        GIT_DIRTY: dirty_tag(git_dirty_files(project_dir)),  # which tracked files the -dirty is about
        DATA_DIR: str(data_dir),
        DATA_MANIFEST_SHA256: sha256_file(manifest) if manifest.exists() else "missing",
        DATA_MD5: on_disk,  # of the data on disk, the way DVC hashes a folder
        DATA_DVC_LOCK_MD5: locked or "not in dvc.lock",
        DATA_MATCHES_DVC_LOCK: "not in dvc.lock" if locked is None else str(locked == on_disk).lower(),
        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
    }
    tags.update({f"{VERSION}{k}": v for k, v in package_versions().items()})
    return tags


def start_run(
    params: Params,
    data_dir: str | Path,
    project_dir: str | Path = ".",
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> tuple[str, str]:
    """Create a run with the resolved params and provenance tags; returns (tracking_uri, run_id)."""
    uri = resolve_tracking_uri(params, project_dir)
    exp_id = ensure_experiment(uri, params.mlflow.experiment, Path(project_dir) / params.mlflow.artifact_root)
    all_tags = provenance_tags(data_dir, project_dir) | dict(tags or {})
    if params.mlflow.run_name:
        all_tags[MLFLOW_RUN_NAME] = params.mlflow.run_name
    client = mlflow_client(uri)
    parent_run_id = parent_run_id or params.mlflow.parent_run_id
    if parent_run_id:
        try:
            client.get_run(parent_run_id)
        except Exception:  # noqa: BLE001 - MLflow raises its own error for an unknown id
            raise ValueError(f"mlflow.parent_run_id {parent_run_id}: no such run in {uri}; pass the id of a run "
                             f"there, or unset mlflow.parent_run_id") from None
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(exp_id, tags=all_tags, run_name=params.mlflow.run_name)
    flat = [Param(k, str(v)) for k, v in params.flat().items()]
    for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=flat[i : i + 100])
    client.log_text(run.info.run_id, yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False),
                    "params.yaml")
    return uri, run.info.run_id


def previous_run(resume: str | Path) -> tuple[str, str] | None:
    """(tracking_uri, run_id) of the run whose folder holds the checkpoint `resume`, if it recorded one."""
    sidecar = Path(resume).resolve().parent.parent / TRACKING_FILE
    try:
        info = json.loads(sidecar.read_text())
        return str(info["tracking_uri"]), str(info["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def open_run(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    project_dir: str | Path = ".",
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    resume: str | Path | None = None,
) -> tuple[str, str]:
    """The run a training logs into; returns (tracking_uri, run_id) and records it in `out_dir/tracking.json`.

    Resuming from a checkpoint of a run that did not finish (killed, failed, or still marked RUNNING — which is
    then marked KILLED first) with the same params continues that run, so its metric history is one curve.
    Otherwise (it finished, or params changed) a new run starts as its child, linked by id."""
    uri = resolve_tracking_uri(params, project_dir)
    tags = dict(tags or {})
    prev = previous_run(resume) if resume is not None else None
    if prev is not None and prev[0] == uri:
        client = mlflow_client(uri)
        try:
            old = client.get_run(prev[1])
        except Exception:  # noqa: BLE001 - deleted or from another database: start afresh
            old = None
        if old is not None:
            if old.info.status == "RUNNING":  # its driver is gone: we are resuming from its checkpoint
                client.set_terminated(old.info.run_id, status="KILLED")
            same = old.data.params == {k: str(v) for k, v in params.flat().items()}
            if same and old.info.status != "FINISHED":
                client.update_run(old.info.run_id, status="RUNNING")
                n = int(old.data.tags.get(RESUMES, "0")) + 1
                for k, v in {**tags, RESUMES: str(n), resume_status_before(n):
                             old.info.status, resume_from(n): str(resume)}.items():
                    client.set_tag(old.info.run_id, k, v)
                record_run(out_dir, uri, old.info.run_id)
                return uri, old.info.run_id
            parent_run_id = parent_run_id or old.info.run_id
            tags[RESUMED_FROM_RUN] = old.info.run_id
    uri, run_id = start_run(params, data_dir, project_dir, tags=tags, parent_run_id=parent_run_id)
    record_run(out_dir, uri, run_id)
    return uri, run_id


def record_run(out_dir: str | Path, uri: str, run_id: str) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out_dir) / TRACKING_FILE, {"tracking_uri": uri, "run_id": run_id})


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    mlflow_client(tracking_uri).set_terminated(run_id, status=status)


class MlflowLogger:
    """Logs into an existing run by id (used on rank 0 inside Ray workers).

    `skip_logged=True` (a resumed or restarted run, which replays the steps after its checkpoint) drops each point
    whose step MLflow already holds for that metric, so every curve has each step once."""

    def __init__(self, tracking_uri: str, run_id: str, skip_logged: bool = False) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.client = mlflow_client(tracking_uri)
        self.skip_logged = skip_logged
        self._logged_to: dict[str, int] = {}  # metric → last step MLflow held when this logger started

    def _last_logged_step(self, key: str) -> int:
        if key not in self._logged_to:
            history = self.client.get_metric_history(self.run_id, key)
            self._logged_to[key] = max((m.step for m in history), default=-1)
        return self._logged_to[key]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.skip_logged:
            metrics = {k: v for k, v in metrics.items() if step > self._last_logged_step(k)}
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_artifact(self, path: Path, artifact_path: str = "") -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path or None)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))


class RunProgress:
    """The one progress bar of a run whose loop runs elsewhere (a Ray worker, maybe on another node), drawn by the
    driver from what the run logged: every `interval` seconds a thread reads the run's `loss/d` and `loss/g` points
    from MLflow (the same server the workers log to, so it works on a cluster too) and moves the bar to the last
    logged step. The bar appears with the first step logged since it was made (its rate then counts training, not
    Ray's start; a resumed run's earlier points do not count). Use as
    a context manager around the wait; on a normal exit the bar is brought up to date, and closed either way."""

    def __init__(self, tracking_uri: str, run_id: str, total: int, initial: int = 0, interval: float = 2.0) -> None:
        self.client = mlflow_client(tracking_uri)
        self.run_id, self.total, self.initial, self.interval = run_id, total, initial, interval
        # a resumed run's earlier points are not this training's progress (a minute's slack for a worker's clock)
        self.since = int(time.time() * 1000) - 60_000
        self.bar: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="sqgan-run-progress", daemon=True)

    def refresh(self) -> None:
        """Move the bar to the last step the run logged (never back: a restarted run replays logged steps)."""
        d = [m for m in self.client.get_metric_history(self.run_id, "loss/d") if m.timestamp >= self.since]
        last = max(d, key=lambda m: m.step, default=None)
        if last is None or last.step <= (self.bar.n if self.bar is not None else self.initial):
            return
        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=self.initial, desc="train", unit="step")
        g = {m.step: m.value for m in self.client.get_metric_history(self.run_id, "loss/g")}
        self.bar.set_postfix({"d": f"{last.value:.3f}", **({"g": f"{g[last.step]:.3f}"} if last.step in g else {})},
                             refresh=False)
        self.bar.update(last.step - self.bar.n)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001  (a busy tracking server: the bar waits for the next poll)
                continue

    def __enter__(self) -> RunProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            try:
                self.refresh()
            except Exception:  # noqa: BLE001
                pass
        if self.bar is not None:
            self.bar.close()


def checkpoint_of_run(tracking_uri: str, run_id: str, into: Path) -> Path:
    """Download the latest checkpoint run `run_id` logged (artifacts checkpoints/step_NNNNNN.pt)."""
    client = open_existing(tracking_uri, "set mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to the store that holds "
                                         "the run")
    try:
        client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types
        raise ValueError(f"--run {run_id}: no such run in {tracking_uri}; pass a run id from the MLflow UI or "
                         f"`sqgan train`'s output, or set --tracking-uri") from None
    found = [a.path for a in client.list_artifacts(run_id, "checkpoints") if re.search(r"step_\d+\.pt$", a.path)]
    if not found:
        raise ValueError(f"--run {run_id} logged no checkpoint (artifacts checkpoints/step_NNNNNN.pt): it may not "
                         f"have finished; pass --checkpoint with a file from its run folder instead")
    return Path(client.download_artifacts(run_id, sorted(found)[-1], str(into)))


def existing_run(target: tuple[str, str] | None) -> Any:
    """The MLflow run `target` names, or None (no target, or a store that no longer has that run)."""
    if target is None:
        return None
    try:
        return mlflow_client(target[0]).get_run(target[1])
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types for a missing run
        return None
