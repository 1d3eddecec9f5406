"""What the Kubeflow components run: each a thin call of one sqgan stage, plus the MLflow bookkeeping of a pipeline.

A component (components/*.py) only moves KFP artifacts in and out; the work is here, in plain functions of paths, so
they are the same code whatever runs them (a Kubeflow pod, `kfp.local`, a test). Every task:

- reads its params as the pipeline's params-YAML artifact plus the `--set` overrides (`task_params`), with the
  pipeline's MLflow tracking URI and parent run id on top (`mlflow.tracking_uri`, `mlflow.parent_run_id`);
- checks its input artifacts first: a missing or empty one is an error that names it (`check_input`);
- runs the stage through the same function the CLI and DVC call (`sqgan.data.stages.run_stage`, `run_training`,
  `run_eval`, `run_prior`, `sqgan tune` in a KubeRay RayJob);
- lands in MLflow nested under the pipeline's parent run (a data stage gets a run of its own, tagged
  sqgan.stage = data; training, evaluation and the sweep log as they always do), and a failing task marks the
  parent run FAILED with its name in the tag sqgan.kfp.failed_task.
"""

from __future__ import annotations

import base64
import contextlib
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from sqgan.commands.eval import run_eval
from sqgan.commands.experiment import run_experiment, write_table
from sqgan.commands.prior import run_prior
from sqgan.config import Params, load_params
from sqgan.data.prepare import download_raw
from sqgan.data.stages import FROM_SECTION, STAGES, get_stage, run_stage
from sqgan.io import atomic_path, sha256_file
from sqgan.shells import ray_train, tracking
from sqgan.shells.kuberay import RayJobSpec, kubernetes_api, rayjob_manifest, submit, wait_for_rayjob
from sqgan.shells.tracking import check_tracking, child_runs, end_run, resolve_tracking_uri, start_run
from sqgan.tags import (
    DATA_TASK_STAGE,
    KFP_FAILED_TASK,
    KFP_PIPELINE,
    KFP_RUN,
    STAGE,
    STAGE_DATA,
    STAGE_PIPELINE,
    STAGE_SWEEP,
)


class MissingInput(FileNotFoundError):
    """An input artifact that is missing or empty (its producer failed, or the wrong artifact was wired in)."""


def check_input(path: str | Path, name: str, dataset: bool = False) -> Path:
    """`path` of input artifact `name`, which must exist and not be empty (a curated dataset: hold a manifest)."""
    p = Path(path)
    if not p.exists():
        raise MissingInput(f"input artifact {name!r}: {p} does not exist; the task that produces it did not write it "
                           f"(check that task's log), or another artifact is wired to {name!r}")
    empty = not any(p.iterdir()) if p.is_dir() else p.stat().st_size == 0
    if empty:
        raise MissingInput(f"input artifact {name!r}: {p} is empty; the task that produces it wrote nothing")
    if dataset and not (p / "manifest.parquet").is_file():
        raise MissingInput(f"input artifact {name!r}: {p} holds no manifest.parquet, so it is not a curated dataset; "
                           f"wire in a data task's output")
    return p


def write_params(params_yaml: str, overrides: list[str], out: str | Path) -> dict[str, Any]:
    """The pipeline's params artifact: `params_yaml` (the text of a params.yaml) as a file, after checking that it
    and `overrides` validate — so a bad key fails the first task, naming it, before any data is built."""
    if not params_yaml.strip():
        raise ValueError("params_yaml is empty; pass the text of params.yaml (open('params.yaml').read())")
    with atomic_path(out) as tmp:
        tmp.write_text(params_yaml)
        p = load_params(tmp, overrides)
    return {"keys": len(p.flat()), "overrides": len(overrides)}


def task_params(params_path: str | Path, overrides: list[str], tracking_uri: str = "",
                parent_run_id: str = "") -> Params:
    """The task's params: the params artifact, the overrides, then the pipeline's MLflow settings."""
    check_input(params_path, "params")
    extra = [f"mlflow.tracking_uri={tracking_uri}"] if tracking_uri else []
    if parent_run_id:
        extra.append(f"mlflow.parent_run_id={parent_run_id}")
    return load_params(params_path, [*overrides, *extra])


def _client(p: Params) -> Any:
    return tracking.mlflow_client(resolve_tracking_uri(p))


def open_pipeline_run(params_path: str | Path, overrides: list[str], tracking_uri: str, parent_run_id: str,
                      pipeline: str, kfp_run: str) -> str:
    """The run every task of this pipeline run nests under: `parent_run_id` when given (it must exist), else a new
    run tagged sqgan.stage = pipeline with the params. Returns its id."""
    p = task_params(params_path, overrides, tracking_uri)
    check_tracking(resolve_tracking_uri(p))
    tags = {KFP_PIPELINE: pipeline, KFP_RUN: kfp_run}
    if parent_run_id:
        client = _client(p)
        try:
            client.get_run(parent_run_id)
        except Exception:  # noqa: BLE001
            raise ValueError(f"parent_run_id {parent_run_id}: no such run in {resolve_tracking_uri(p)}; pass an "
                             f"existing run's id, or leave it empty for a new parent run") from None
        for k, v in tags.items():
            client.set_tag(parent_run_id, k, v)
        return parent_run_id
    p = p.model_copy(update={"mlflow": p.mlflow.model_copy(update={"run_name": p.mlflow.run_name or pipeline})})
    with tempfile.TemporaryDirectory() as nothing:  # a pipeline run has no dataset of its own yet
        _, run_id = start_run(p, nothing, tags={STAGE: STAGE_PIPELINE, **tags})
    return run_id


def finish_pipeline_run(params_path: str | Path, overrides: list[str], tracking_uri: str, run_id: str,
                        given_parent: str = "") -> str:
    """Mark the pipeline's parent run FINISHED (a parent the user passed in is left as it is)."""
    p = task_params(params_path, overrides, tracking_uri)
    if run_id != given_parent:
        _client(p).set_terminated(run_id, status="FINISHED")
    return run_id


@contextlib.contextmanager
def _task(p: Params, name: str) -> Iterator[None]:
    """A failing task marks the pipeline's parent run FAILED, naming itself, then fails as it would."""
    try:
        yield
    except BaseException:
        parent = p.mlflow.parent_run_id
        if parent:
            with contextlib.suppress(Exception):  # the task's own error is the one to report
                client = _client(p)
                client.set_tag(parent, KFP_FAILED_TASK, name)
                client.set_terminated(parent, status="FAILED")
        raise


def _log_data_run(p: Params, stage: str, out: Path, report: dict[str, Any]) -> str:
    """A data task's run: its params, the stage's report as metrics, the manifest and the stage's JSON and plots."""
    p = p.model_copy(update={"mlflow": p.mlflow.model_copy(update={"run_name": p.mlflow.run_name or f"data-{stage}"})})
    uri, run_id = start_run(p, out, tags={STAGE: STAGE_DATA, DATA_TASK_STAGE: stage})
    client = _client(p)
    for k, v in numbers(report).items():
        client.log_metric(run_id, k, v, step=0)
    for f in sorted(out.iterdir()):
        if f.is_file() and (f.suffix in (".json", ".png") or f.name == "manifest.parquet"):
            client.log_artifact(run_id, str(f), "data")
    end_run(uri, run_id, "FINISHED")
    return run_id


def download_task(dataset: str, params_path: str | Path, overrides: list[str], tracking_uri: str,
                  parent_run_id: str, out: str | Path) -> dict[str, Any]:
    """Dataset `dataset`'s raw files from data.<dataset>.url (+ sha256) or .path into the folder `out`."""
    p = task_params(params_path, overrides, tracking_uri, parent_run_id)
    if dataset not in STAGES or STAGES[dataset].source != "raw":
        raw = [n for n, s in STAGES.items() if s.source == "raw"]
        raise ValueError(f"dataset {dataset!r} has no raw source to download; choose one of {', '.join(raw)}")
    with _task(p, f"download {dataset}"):
        download_raw(dataset, getattr(p.data, dataset), out)
    files = sum(1 for f in Path(out).rglob("*") if f.is_file())
    return {"files": files}


def data_task(stage: str, params_path: str | Path, overrides: list[str], tracking_uri: str, parent_run_id: str,
              out: str | Path, src: str | Path | None = None, raw: str | Path | None = None) -> dict[str, Any]:
    """Stage `stage` of the stage table into `out` (from `src`, a curated dataset, or `raw`, downloaded files);
    returns the stage's report with the manifest's sha256 and the task's MLflow run id."""
    p = task_params(params_path, overrides, tracking_uri, parent_run_id)
    src = check_input(src, "src", dataset=get_stage(stage).source in FROM_SECTION) if src is not None else None
    raw = check_input(raw, "raw") if raw is not None else None
    with _task(p, stage):
        report = dict(run_stage(stage, p, src, out, raw=raw))
        out = Path(out)
        report["manifest_sha256"] = sha256_file(out / "manifest.parquet")
        report["mlflow_run_id"] = _log_data_run(p, stage, out, report)
    return report


def train_task(params_path: str | Path, overrides: list[str], tracking_uri: str, parent_run_id: str,
               data: str | Path, out: str | Path, samples_html: str | Path | None = None) -> dict[str, Any]:
    """`sqgan train` on `data` into the run folder `out` (checkpoints, samples, metrics.json); returns the run id
    and the final metrics. `samples_html`: the sample grid as an HTML page for the Kubeflow UI."""
    p = task_params(params_path, overrides, tracking_uri, parent_run_id)
    data = check_input(data, "data", dataset=True)
    with _task(p, "train"):
        run = ray_train.run_training(p, data, out)
    if samples_html is not None:
        grid = Path(out) / "grid.png"
        img = base64.b64encode(grid.read_bytes()).decode() if grid.is_file() else ""
        with atomic_path(samples_html) as tmp:
            tmp.write_text(f"<html><body><h3>G_ema samples, MLflow run {run.run_id}</h3>"
                           f"<img src=\"data:image/png;base64,{img}\"/></body></html>\n")
    return {"run_id": run.run_id, "metrics": numbers(run.metrics)}


def prior_task(params_path: str | Path, overrides: list[str], tracking_uri: str, parent_run_id: str,
               data: str | Path, out: str | Path) -> dict[str, Any]:
    """`sqgan prior` on `data`: the CLIP codebook prior file `out` (train with --set sq.prior=<it>)."""
    p = task_params(params_path, overrides, tracking_uri, parent_run_id)
    data = check_input(data, "data", dataset=True)
    with _task(p, "prior"):
        return dict(run_prior(p, data, out))


def eval_task(params_path: str | Path, overrides: list[str], tracking_uri: str, parent_run_id: str,
              model: str | Path, data: str | Path, out: str | Path) -> dict[str, float]:
    """`sqgan eval` of the training run folder `model` against `data`; results into its MLflow run and `out`."""
    p = task_params(params_path, overrides, tracking_uri, parent_run_id)
    model = check_input(model, "model")
    data = check_input(data, "data", dataset=True)
    with _task(p, "eval"):
        result = run_eval(p, checkpoint=model, data_dir=data, out=out, progress=False)
    return dict(result.metrics)


def find_sweep_run(p: Params, parent_run_id: str, since_ms: int) -> Any:
    """The sweep parent run that `sqgan tune` opened under `parent_run_id` after `since_ms` (the newest)."""
    client = _client(p)
    parent = client.get_run(parent_run_id)
    found = [r for r in child_runs(client, parent)
             if r.data.tags.get(STAGE) == STAGE_SWEEP and r.info.start_time >= since_ms]
    if not found:
        raise RuntimeError(f"the RayJob succeeded, but MLflow holds no sweep run under the pipeline's run "
                           f"{parent_run_id} (at {p.mlflow.tracking_uri}); did the RayJob's pods reach that "
                           f"tracking server? Its log: kubectl logs -l job-name=<the RayJob>")
    return max(found, key=lambda r: r.info.start_time)


def sweep_task(params_path: str | Path, overrides: list[str], tracking_uri: str, parent_run_id: str,
               data: str | Path, data_uri: str, image: str, namespace: str, storage_path: str, timeout_s: float,
               poll_s: float, worker_gpus: int, max_workers: int, trials_md: str | Path, trials_csv: str | Path,
               best_params: str | Path, api: Any = None) -> str:
    """`sqgan tune` as a KubeRay RayJob on the dataset at `data_uri`: submit, wait (at most `timeout_s`), then take
    the sweep's trial table and best params from its MLflow parent run. `best_params` is the best trial's params
    with this pipeline's `ray` and `mlflow` sections, ready for the final train task. Returns the sweep's run id."""
    p = task_params(params_path, overrides, tracking_uri, parent_run_id)
    check_input(data, "data", dataset=True)
    with _task(p, "sweep"):
        spec = RayJobSpec(
            name=f"sqgan-sweep-{uuid.uuid4().hex[:8]}", image=image,
            params_yaml=yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False), data_uri=data_uri,
            tracking_uri=resolve_tracking_uri(p), parent_run_id=parent_run_id, storage_path=storage_path,
            namespace=namespace, worker_gpus=worker_gpus, max_workers=max_workers,
            min_workers=min(1, max_workers),
        )
        manifest = rayjob_manifest(spec)  # checks the spec before anything is submitted
        api = api if api is not None else kubernetes_api()
        since_ms = int(time.time() * 1000) - 1
        submit(api, manifest)
        print(f"submitted RayJob {spec.namespace}/{spec.name} (image {spec.image})", flush=True)
        wait_for_rayjob(api, spec.name, spec.namespace, timeout_s, poll_s)
        sweep = find_sweep_run(p, parent_run_id, since_ms)
        client = _client(p)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                folder = Path(client.download_artifacts(sweep.info.run_id, "sweep", tmp))
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"sweep run {sweep.info.run_id}: its sweep/ artifacts could not be read ({e}); "
                                   f"did the sweep end with no completed trial?") from None
            for name in ("trials.md", "trials.csv", "best_params.yaml"):
                if not (folder / name).is_file():
                    raise RuntimeError(f"sweep run {sweep.info.run_id} logged no sweep/{name}; did every trial fail?")
            best = yaml.safe_load((folder / "best_params.yaml").read_text())
            best["ray"], best["mlflow"] = (p.model_dump(mode="json")[k] for k in ("ray", "mlflow"))
            Params.model_validate(best)
            for src, dst in (("trials.md", trials_md), ("trials.csv", trials_csv)):
                with atomic_path(dst) as t:
                    t.write_bytes((folder / src).read_bytes())
            with atomic_path(best_params) as t:
                t.write_text(f"# best trial of sweep run {sweep.info.run_id}, with this pipeline's ray and mlflow\n"
                             + yaml.safe_dump(best, sort_keys=False))
    return str(sweep.info.run_id)


def experiment_task(params_path: str | Path, overrides: list[str], tracking_uri: str, parent_run_id: str, name: str,
                    scale: str, experiment_yaml: str, experiments_dir: str | Path, work: str | Path,
                    table_md: str | Path, table_csv: str | Path) -> dict[str, Any]:
    """`sqgan experiment run NAME --scale SCALE` in this task's pod (its local Ray, or ray.address from the params):
    the experiment file is `experiment_yaml` (its text) when given, else NAME in `experiments_dir` (the image's
    experiments/); datasets are built under data.root, the sweep runs into `work` and nests under the pipeline's
    parent run. Returns the experiment's parent run id and its cells; the table goes to `table_md` / `table_csv`."""
    p = task_params(params_path, overrides, tracking_uri, parent_run_id)
    if scale not in ("demo", "paper"):
        raise ValueError(f"scale {scale!r}: pass demo or paper")
    with _task(p, f"experiment {name}"), tempfile.TemporaryDirectory(prefix="sqgan-experiment-") as tmp:
        source: str | Path = name
        if experiment_yaml.strip():
            source = Path(tmp) / f"{name}.yaml"
            source.write_text(experiment_yaml)
        uri, run_id, sweep_dir = run_experiment(p, str(source), scale, Path(work), folder=Path(experiments_dir))  # type: ignore[arg-type]
        parent = tracking.mlflow_client(uri).get_run(run_id)
        rows, md = write_table(uri, parent, Path(sweep_dir) / "table")
    with atomic_path(table_md) as t:
        t.write_text(md)
    with atomic_path(table_csv) as t:
        t.write_bytes((Path(sweep_dir) / "table" / "table.csv").read_bytes())
    return {"experiment_run_id": run_id, "cells": len({(r["row"], r["column"]) for r in rows})}


def numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_numbers(metrics: Any, values: dict[str, Any]) -> None:
    """Each number of `values` onto a KFP Metrics artifact (what the Kubeflow UI shows of a task)."""
    for k, v in numbers(values).items():
        metrics.log_metric(k, v)
