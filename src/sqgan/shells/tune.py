"""Ray Tune shell: `sqgan tune` runs a sweep of trainings, one MLflow parent run with a nested run per trial.

Ray 2.60 Train V2: each trial is a Tune function. With train.workers = 1 it runs the training loop itself, in the
trial's process, and reports to Tune at every log step (`train_in_trial`); with more it builds the same
`TorchTrainer` as `sqgan train` (`ray_train.build_trainer`) and calls `fit()`, a Train callback handing the reports
to Tune. ASHA prunes on the interim KID/FID. Before any trial starts, the search space is checked against the
params schema (unknown key, empty grid, a value the schema rejects, a metric the run does not report: exit 2,
naming the key), and the resources, storage and tracking server like a training's. The sweep folder's
`sweep.json` names the parent run and Ray's experiment, so `sqgan tune --resume SWEEP_DIR` (`Tuner.restore`)
re-runs nothing finished, continues unfinished trials from their last checkpoints and logs into the same runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import ray
import torch
import yaml
from ray import tune
from ray.tune import PlacementGroupFactory
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from sqgan.config import ConfigError, Params, _unknown_key_message, flatten, flatten_space, load_params
from sqgan.data.manifest import read_manifest
from sqgan.data.stages import run_stage
from sqgan.io import check_output, mark_output, sigint_observed, sigterm_as_interrupt, stage_of, write_json_atomic
from sqgan.metrics.names import (
    is_quality_metric,  # a quality metric comes from the evaluations, not each log step
    parse_metric_key,
)
from sqgan.shells import ray_train
from sqgan.shells.ray_train import (
    available_resources,
    build_trainer,
    check_compile,
    check_environment,
    node_label,
    node_resources,
    quiet_console,
    train_under_ray,
    uses_reference,
    worker_slots,
)
from sqgan.shells.scheduler import RecordingASHA
from sqgan.shells.tracking import MlflowLogger, end_run, mlflow_client, record_run, start_run, trial_runs
from sqgan.shells.tune_report import settle_trials, write_report
from sqgan.tags import (
    RAY_RUN_PATH,
    RAY_TRIAL_ID,
    RUN_NAME,
    STAGE,
    STAGE_SWEEP,
    STAGE_TRIAL,
    TRIAL_ID,
    TRIAL_NODE,
    TRIAL_NODES,
    TRIAL_STARTS,
    TRIAL_STATUS,
    TRIAL_VALUES,
    TUNE_AXES,
    TUNE_INTERIM_KEY,
    TUNE_METRIC,
    TUNE_METRIC_KEY,
    TUNE_MODE,
    TUNE_SCHEDULER,
    TUNE_SEARCHER,
    TUNE_STEPS,
)
from sqgan.train import loop
from sqgan.train.loop import absolute_init_from, init_source, interim_key, quality_keys, reported_metrics

SWEEP_FILE = "sweep.json"  # in a sweep folder: tracking URI, parent run, Ray experiment path, params
METRIC_ALIASES = ("kid", "fid")
CELL = "cell"  # the Tune axis over tune.cells (its values are the cells' names)
# With train.workers > 1 a trial's own process only starts its TorchTrainer and waits: no CPU (its workers hold
# them), but Ray needs some resource in the bundle, so it asks for a little memory.
TRIAL_DRIVER = {"CPU": 0, "memory": 256 * 2**20}


@dataclass
class SweepSpec:
    """What every trial function needs (passed with tune.with_parameters; plain values only)."""

    base: dict[str, Any]  # Params as JSON: the sweep's params with tune.fixed and the per-trial resources applied
    data_dir: str
    sweep_dir: str
    project_dir: str
    tracking_uri: str
    parent_run_id: str
    storage: str
    name: str
    use_gpu: bool
    metric: str  # the key Tune ranks on: an alias (kid, fid) or a logged metric
    cell_data: dict[str, str] = field(default_factory=dict)  # cell → its own dataset folder (one setting data.dataset)
    fault: str | None = None  # tests only ($SQGAN_TEST_WORKER_FAULT, as ray_train's): a workers: 1 trial exits once


@dataclass
class Sweep:
    """What a finished `sqgan tune` leaves behind."""

    sweep_dir: Path
    parent_run_id: str
    tracking_uri: str
    table: list[dict[str, Any]]


# ------------------------------------------------------------------------------------ checks
def trial_base(params: Params) -> Params:
    """The params every trial starts from: the sweep's, then tune.fixed, then tune.workers/use_gpu/cpus_per_worker."""
    t = params.tune
    fixed = flatten(t.fixed)
    base = params.override(fixed, source="tune.fixed") if fixed else params
    per_trial = {"train.workers": t.workers, "train.use_gpu": t.use_gpu, "ray.cpus_per_worker": t.cpus_per_worker}
    return base.override({k: v for k, v in per_trial.items() if v is not None}, source="tune")


def probe_values(name: str, args: list[Any]) -> list[Any]:
    """Values of an axis to check against the schema: every listed or (≤ 512) integer value, else the range's ends
    and points between."""
    if name in ("grid", "choice"):
        return list(args)
    if name == "randint":
        lo, hi = args
        return list(range(lo, hi + 1)) if hi - lo <= 512 else [lo + (hi - lo) * i // 16 for i in range(17)]
    if name == "qrandint":
        lo, hi, q = args
        values = list(range(math.ceil(lo / q) * q, hi + 1, q))
        return values if len(values) <= 512 else values[:: max(1, len(values) // 16)] + [values[-1]]
    lo, hi = args
    if name == "loguniform":
        return [math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / 4) for i in range(5)]
    return [lo + (hi - lo) * i / 4 for i in range(5)]


def metric_key(params: Params, metric: str) -> str:
    """The logged name behind `tune.metric` in a run's final metrics: kid → kid500_train_<net>_mean, fid →
    fid500_train_<net> (metrics.num_fake images against metrics.reference_split)."""
    if metric not in METRIC_ALIASES:
        return metric
    keys = quality_keys(params.override({"metrics.names": [metric]}), params.metrics.num_fake)
    return next(k for k in keys if parse_metric_key(k).stat in (None, "mean"))


def asha_grace(params: Params, base: Params) -> int:
    """ASHA's grace period: tune.grace_period, else the trials' first interim evaluation (or first log step for a
    metric that is not evaluated)."""
    evaluated = is_quality_metric(metric_key(base, params.tune.metric))
    return params.tune.grace_period or (base.metrics.eval_every if evaluated else base.train.log_every)


def check_sweep(params: Params) -> Params:
    """Every check of the search space that needs no Ray; returns the trials' base params. ConfigError names the key."""
    base = trial_base(params)
    t = params.tune
    for key, (name, args) in t.axes().items():
        if key.startswith("tune."):
            raise ConfigError(f"tune.space.{key}: a sweep cannot sweep its own settings; pick params outside tune")
        msg = _unknown_key_message(key.split("."), f"tune.space.{key}")
        if msg:
            raise ConfigError(msg)
        for value in probe_values(name, args):
            try:
                base.override({key: value}, source=f"tune.space.{key}")
            except ConfigError as e:
                hint = " (K = 2^P: list powers of two, e.g. {grid: [16, 32, 64]})" if key == "fq.codebook_size" else ""
                raise ConfigError(f"{e}; {name} {args} includes {value!r}, which the params schema rejects{hint}") \
                    from None
    check_cells(params, base)
    reported = reported_metrics(base)
    key = metric_key(base, t.metric)
    if key not in reported:
        known = ", ".join(sorted(reported))
        raise ConfigError(f"tune.metric {t.metric!r} is not a metric the run reports; use kid, fid or one of: {known}")
    if t.scheduler == "asha":
        if is_quality_metric(key) and interim_key(base, key) not in reported:
            raise ConfigError(f"tune.scheduler=asha prunes on {t.metric}, but the trials evaluate it only at the end "
                              f"(metrics.eval_every={base.metrics.eval_every}, train.steps={base.train.steps}); set "
                              f"--set tune.fixed.metrics.eval_every=N with N < train.steps, or tune.scheduler=fifo")
        grace = asha_grace(params, base)
        if grace >= base.train.steps:
            raise ConfigError(f"tune.grace_period={grace} is not below the trials' train.steps={base.train.steps}, so "
                              f"ASHA could never stop a trial; lower it or use tune.scheduler=fifo")
    return base


def check_cells(params: Params, base: Params) -> None:
    """Each of tune.cells resolves on the trials' base params (and with each grid value of the axes): an unknown key
    or a value the schema rejects is a ConfigError naming the cell and the key; a cell may not set tune.* or a key
    that an axis sweeps."""
    axes = params.tune.axes()
    for name in params.tune.cells:
        values = params.tune.cell_values(name)
        where = f"tune.cells.{name}"
        for key in values:
            if key.startswith("tune."):
                raise ConfigError(f"{where}.{key}: a cell cannot set the sweep's own settings; pick params outside "
                                  f"tune")
            if key in axes:
                raise ConfigError(f"{where}.{key}: tune.space sweeps {key} too; set it in the cells or in the space, "
                                  f"not both")
            msg = _unknown_key_message(key.split("."), f"{where}.{key}")
            if msg:
                raise ConfigError(msg)
        cell = base.override(values, source=where)
        for key, (kind, args) in axes.items():
            for value in args if kind in ("grid", "choice") else []:
                cell.override({key: value}, source=f"{where} with tune.space.{key}={value!r}")


def cell_params(base: Params, config: dict[str, Any]) -> tuple[Params, dict[str, Any]]:
    """A trial's params from Tune's `config`: its cell's values (when the sweep has cells), then its axes' values;
    returns (params, the dotted values applied)."""
    values = dict(config)
    name = values.pop(CELL, None)
    if name is not None:
        values = {**base.tune.cell_values(name), **values}
    return base.override(values, source=f"cell {name}" if name is not None else "trial"), values


def cell_data_dirs(base: Params, data_dir: Path) -> dict[str, str]:
    """The dataset folder of each cell that sets data.dataset or data.root to another than the sweep's (absolute:
    a trial's process runs in its own folder)."""
    out = {}
    for name in base.tune.cells:
        values = base.tune.cell_values(name)
        if "data.dataset" in values or "data.root" in values:
            p = base.override(values).data
            folder = (Path(p.root) / p.dataset).resolve()
            if folder != data_dir:
                out[name] = str(folder)
    return out


def sweep_concurrency(params: Params, base: Params, available: dict[str, float],
                      nodes: dict[str, dict[str, float]] | None = None) -> int:
    """tune.max_concurrent_trials, capped by how many trials' workers fit at once (never 0: one must fit) — on a
    cluster (`nodes`), node by node, since a worker's CPUs sit on one node."""
    workers = worker_slots(base.ray.cpus_per_worker, available, nodes)
    return min(params.tune.max_concurrent_trials, max(1, workers // base.train.workers))


# ------------------------------------------------------------------------------ search space
def ray_space(params: Params) -> dict[str, Any]:
    """tune.space as Ray Tune's param_space ({"fq.decay": tune.grid_search([...]), …})."""
    grid_as_choice = params.tune.searcher != "grid"  # random and optuna draw from grids like from choices
    space: dict[str, Any] = {}
    for key, (name, args) in params.tune.axes().items():
        if name == "grid":
            space[key] = tune.choice(args) if grid_as_choice else tune.grid_search(args)
        elif name == "choice":
            space[key] = tune.choice(args)
        elif name == "uniform":
            space[key] = tune.uniform(*args)
        elif name == "loguniform":
            space[key] = tune.loguniform(*args)
        elif name == "randint":
            space[key] = tune.randint(args[0], args[1] + 1)  # Ray's upper end is exclusive; ours is included
        elif name == "qrandint":
            space[key] = tune.qrandint(*args)
    if params.tune.cells:
        names = list(params.tune.cells)
        space[CELL] = tune.choice(names) if grid_as_choice else tune.grid_search(names)
    return space


def build_searcher(params: Params, metric: str, concurrency: int) -> Any:
    t = params.tune
    if t.searcher == "optuna":  # a Searcher: TuneConfig.max_concurrent_trials limits it
        return RankedOptunaSearch(metric=metric, mode=t.mode, seed=t.seed)

    # Ray ignores TuneConfig.max_concurrent_trials for this generator: it takes the limit itself, or every trial
    # starts at once and those whose workers cannot start in 60 s fail.
    return BasicVariantGenerator(random_state=t.seed, max_concurrent=concurrency)


class RankedOptunaSearch(OptunaSearch):
    """OptunaSearch that takes a trial's intermediate value from the reports that hold the metric and passes over
    the others (a workers: 1 trial reports every log step to Tune; Optuna's own would fail on a missing key)."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


def build_scheduler(params: Params, base: Params, tracking_uri: str, parent_run_id: str) -> Any:
    """FIFO, or ASHA recording each early stop on the trial's run (`sqgan.shells.scheduler`)."""
    t = params.tune
    if t.scheduler == "fifo":
        return FIFOScheduler()

    grace = asha_grace(params, base)
    # stop_last_trials=False: a trial that reaches train.steps ends by itself (its run marked completed), not killed
    return RecordingASHA(tracking_uri=tracking_uri, parent_run_id=parent_run_id, time_attr="step",
                         max_t=base.train.steps, grace_period=grace, reduction_factor=t.reduction_factor,
                         stop_last_trials=False)


# ------------------------------------------------------------------------------------- trial
COLLAPSED_VALUE = {"min": float("inf"), "max": float("-inf")}  # what Tune sees of a collapsed trial's metric


class TuneMetric:
    """What Tune sees of a trial's reports: the ranked metric, the alias (kid, fid) filled from the final evaluation
    or else the interim one. From an evaluation that flagged G_ema as collapsed (diversity/collapsed) until one that
    does not, the metric is reported as the worst value, so ASHA stops the trial and the searcher ranks it last. Both
    trial paths (a TorchTrainer's callback, the loop in the trial's process) rank through one of these."""

    def __init__(self, params: Params, metric: str) -> None:
        self.metric, self.mode = metric, params.tune.mode
        self.final_key = metric_key(params, metric)
        self.interim = loop.interim_key(params, self.final_key)
        self.collapsed = False  # the latest evaluation's verdict of the collapse watch

    def translate(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The report as Tune gets it; it holds `self.metric` only where the run measured it."""
        m = dict(metrics)
        if self.metric in METRIC_ALIASES:
            value = m.get(self.final_key, m.get(self.interim))
            if value is not None:
                m[self.metric] = value
        self.collapsed = bool(m.get("diversity/collapsed", self.collapsed))
        if self.collapsed and self.metric in m:  # a collapsed generator ranks last, whatever its FID says
            m[self.metric] = COLLAPSED_VALUE[self.mode]
        return m


def _report_callback(ranking: TuneMetric) -> Any:
    """A Train callback (built inside the trial) that hands each report of the TorchTrainer that holds the ranked
    metric to Tune (the others need not reach it: Train holds the checkpoints and stops its workers itself)."""
    class ReportToTune(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            m = ranking.translate(metrics[0])
            if ranking.metric in m:
                super().after_report(run_context, [m], None)  # Train keeps the checkpoints; Tune needs none

    return ReportToTune()


def run_trial(config: dict[str, Any], spec: SweepSpec) -> None:
    """One trial: the sweep's params with this trial's values, trained into SWEEP_DIR/trials/<trial id> and logged
    to a nested MLflow run (the same one again when the trial is resumed). With train.workers = 1 the loop runs in
    the trial's own process (`train_in_trial`); with more, the trial starts the same TorchTrainer as `sqgan train`."""
    trial_id = tune.get_context().get_trial_id()
    params, values = cell_params(Params.model_validate(spec.base), config)
    out_dir = Path(spec.sweep_dir) / "trials" / trial_id
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = trial_data(params, values, Path(spec.cell_data.get(config.get(CELL), spec.data_dir)), out_dir)
    run_id, done = trial_run(params, spec, trial_id, config, out_dir, data_dir)
    if done is not None:  # finished before the driver died, but Ray's sweep state had not caught up: not re-run
        final_key = metric_key(params, spec.metric)
        tune.report({**done, "step": params.train.steps,
                     **({spec.metric: done[final_key]} if final_key in done else {})})
        return
    try:
        if params.train.workers == 1:
            ray_path = train_in_trial(params, spec, run_id, out_dir, data_dir)
        else:
            ray_path = train_with_trainer(params, spec, trial_id, run_id, out_dir, data_dir)
    except SystemExit:  # Tune ended the trial (ASHA, an interrupted sweep): the sweep settles its run
        raise
    except BaseException:
        end_run(spec.tracking_uri, run_id, "FAILED")
        raise
    MlflowLogger(spec.tracking_uri, run_id).set_tags({TRIAL_STATUS: "completed", RAY_RUN_PATH: ray_path})
    end_run(spec.tracking_uri, run_id, "FINISHED")


def train_with_trainer(params: Params, spec: SweepSpec, trial_id: str, run_id: str, out_dir: Path,
                       data_dir: Path) -> str:
    """train.workers > 1: the trial's process starts the shared TorchTrainer (a worker group of its own) and waits;
    returns Ray Train's run folder."""
    trainer = build_trainer(
        params, data_dir, out_dir, tracking_uri=spec.tracking_uri, run_id=run_id, use_gpu=spec.use_gpu,
        storage_path=spec.storage, name=f"{spec.name}-{trial_id}",
        callbacks=[_report_callback(TuneMetric(params, spec.metric))], report_logs=True,
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"trial {trial_id} failed: {result.error}") from result.error
    return result.path


def train_in_trial(params: Params, spec: SweepSpec, run_id: str, out_dir: Path, data_dir: Path) -> str:
    """train.workers = 1: the plain loop in the trial's own process, on the CPUs (and GPU) the trial holds — no
    worker group to start. Every report of the loop goes to Tune, with the checkpoint taken at it: Tune keeps the
    checkpoints (a restarted or resumed trial continues from the latest) and a trial that ASHA or an interruption
    stops ends at its next report (Tune ends a trial's function only there). Those between evaluations lack the ranked
    metric, which Tune is told to allow (TUNE_DISABLE_STRICT_METRIC_CHECKING; ASHA skips them, the Optuna searcher
    is `RankedOptunaSearch`). Logs like a Train worker: each step once after a restart. Returns the trial's folder
    in Ray's storage."""
    torch.set_num_threads(max(1, params.ray.cpus_per_worker))
    quiet_console()
    ranking = TuneMetric(params, spec.metric)
    train_under_ray(
        params, data_dir, out_dir, tracking_uri=spec.tracking_uri, run_id=run_id,
        runtime=loop.Runtime(device=torch.device("cuda" if spec.use_gpu else "cpu")),
        restored=tune.get_checkpoint(), resume=None,
        send=lambda metrics, checkpoint: tune.report(ranking.translate(metrics), checkpoint=checkpoint),
        checkpoint_type=tune.Checkpoint, reference=uses_reference(params, spec.storage), fault=spec.fault,
    )
    # get_trial_dir() is this node's staging folder; the trial's folder of the same name lies in the sweep's storage
    return _join(_join(spec.storage, spec.name), Path(tune.get_context().get_trial_dir()).name)


def trial_data(params: Params, values: dict[str, Any], data_dir: Path, out_dir: Path) -> Path:
    """The dataset a trial trains on: the sweep's, or — when the trial sets data.selffilter.* (a sweep over the
    self-filtering fraction, say) — its own self-filtered copy of it in <trial>/data (`sqgan data selffilter` with the
    trial's values; a retried trial rebuilds it, the same for the same seed)."""
    if not any(k.startswith("data.selffilter.") for k in values):
        return data_dir

    out = out_dir / "data"
    run_stage("selffilter", params, src=data_dir, out=out)
    return out


def trial_run(
    params: Params, spec: SweepSpec, trial_id: str, values: dict[str, Any], out_dir: Path, data_dir: Path | None = None
) -> tuple[str, dict[str, float] | None]:
    """(run id, its final metrics if it already completed): the trial's nested run — the one it already has
    when resumed or retried, else a new one with the resolved params, the trial's values and the Ray trial id."""
    client = mlflow_client(spec.tracking_uri)
    parent = client.get_run(spec.parent_run_id)
    found = trial_runs(client, parent, trial_id)
    if found:
        run = found[0]
        if run.info.status == "FINISHED" and run.data.tags.get(TRIAL_STATUS) == "completed":
            return run.info.run_id, dict(run.data.metrics)
        client.update_run(run.info.run_id, status="RUNNING")
        n = int(run.data.tags.get(TRIAL_STARTS, "1")) + 1
        nodes = ", ".join(x for x in (run.data.tags.get(TRIAL_NODES), this_node()[1]) if x)
        for key, value in {TRIAL_STARTS: str(n), TRIAL_NODE: this_node()[0], TRIAL_NODES: nodes}.items():
            client.set_tag(run.info.run_id, key, value)
        return run.info.run_id, None
    _, run_id = start_run(params, data_dir or spec.data_dir, spec.project_dir,
                          tags=trial_tags(params, trial_id, values, this_node()), parent_run_id=spec.parent_run_id)
    record_run(out_dir, spec.tracking_uri, run_id)
    return run_id, None


def trial_tags(params: Params, trial_id: str, values: dict[str, Any], node: tuple[str, str] | None) -> dict[str, str]:
    """A trial run's tags when it first starts: its ids, the sampled `values`, the Ray node (id, label) it runs on."""
    tags = {STAGE: STAGE_TRIAL, TRIAL_ID: trial_id, RAY_TRIAL_ID: trial_id, TRIAL_STARTS: "1",
            TRIAL_VALUES: json.dumps(values, sort_keys=True)}
    if node is not None:
        tags |= {TRIAL_NODE: node[0], TRIAL_NODES: node[1]}
    if params.mlflow.run_name is None:
        tags[RUN_NAME] = f"trial-{trial_id}"
    return tags


def this_node() -> tuple[str, str]:
    """(Ray node id, "IP (id…)") of the node this trial's process runs on."""
    node = ray.get_runtime_context().get_node_id()
    return node, node_label(ray.util.get_node_ip_address(), node)


# ------------------------------------------------------------------------------------- sweep
def run_sweep(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    project_dir: str | Path = ".",
    force: bool = False,
    tags: dict[str, str] | None = None,
    files: dict[str, str] | None = None,
) -> Sweep:
    """Check everything, open the parent run, run the trials under Ray Tune, write and log the report. `tags` go on
    the parent run beside the sweep's own, and `files` (name → text) are logged to it before any trial starts (what
    `sqgan experiment` needs to render its table from MLflow alone)."""
    params = absolute_init_from(params)
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()
    project_dir = Path(project_dir).resolve()
    base = check_sweep(params)
    if params.train.init_from:
        init_source(params)  # before Ray starts: a checkpoint that does not fit fails here, not in every trial
    check_output(out_dir, "sweep", (data_dir,), force)
    if (out_dir / SWEEP_FILE).exists() and not force:
        raise RuntimeError(f"--out {out_dir} holds an earlier sweep; continue it with `sqgan tune --resume {out_dir}`, "
                           f"choose another --out, or add --force to replace it (its runs stay in MLflow)")
    cell_data = cell_data_dirs(base, data_dir)
    use_gpu, storage, tracking_uri = _preflight(base, data_dir, project_dir, cell_data)
    available = available_resources(base)[0]
    concurrency = sweep_concurrency(params, base, available, node_resources() if base.ray.address else None)

    if force and stage_of(out_dir) == "sweep":  # an earlier sweep's folder: replaced whole, no stale trials left
        shutil.rmtree(out_dir)
    ray_train.init_ray(params)
    parent_run_id = open_sweep_run(params, base, data_dir, project_dir, tags)
    client = mlflow_client(tracking_uri)
    for file, text in (files or {}).items():
        client.log_text(parent_run_id, text, file)
    name = f"sweep-{parent_run_id[:12]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    mark_output(out_dir, "sweep")
    (out_dir / "params.yaml").write_text(_dump_params(params))
    spec = SweepSpec(base=base.model_dump(mode="json"), data_dir=str(data_dir), sweep_dir=str(out_dir),
                     project_dir=str(project_dir), tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                     storage=storage, name=name, use_gpu=use_gpu, metric=params.tune.metric, cell_data=cell_data,
                     fault=os.environ.get("SQGAN_TEST_WORKER_FAULT"))
    spec_fields = {k: v for k, v in asdict(spec).items() if k != "base"}  # base: params.yaml beside it
    write_json_atomic(out_dir / SWEEP_FILE, {**spec_fields, "experiment_path": _join(storage, name),
                                             "max_concurrent_trials": concurrency})
    tuner = _tuner(params, base, spec, concurrency)
    return _fit_and_report(tuner, params, spec, out_dir)


def open_sweep_run(params: Params, base: Params, data_dir: Path, project_dir: Path,
                   tags: dict[str, str] | None = None) -> str:
    """The sweep's parent run: the sweep's params (tune.* among them) and provenance, the search set-up as tags
    (and the caller's `tags`)."""
    return start_run(params, data_dir, project_dir, tags={**sweep_tags(params, base), **(tags or {})})[1]


def sweep_tags(params: Params, base: Params) -> dict[str, str]:
    """The sweep's parent run's tags: its search set-up (axes, metric and keys, mode, searcher, scheduler, steps)."""
    t = params.tune
    key = metric_key(base, t.metric)
    axes = ([CELL] if t.cells else []) + list(t.axes())
    tags = {STAGE: STAGE_SWEEP, TUNE_AXES: json.dumps(axes), TUNE_METRIC: t.metric, TUNE_METRIC_KEY: key,
            TUNE_INTERIM_KEY: interim_key(base, key), TUNE_MODE: t.mode, TUNE_SEARCHER: t.searcher,
            TUNE_SCHEDULER: t.scheduler, TUNE_STEPS: str(base.train.steps)}
    if params.mlflow.run_name is None:
        tags[RUN_NAME] = f"sweep-{'-'.join(k.split('.')[-1] for k in axes)}"
    return tags


def resume_sweep(sweep_dir: str | Path) -> Sweep:
    """Continue an interrupted sweep from its folder: same params, parent run, trials and Ray experiment."""
    sweep_dir = Path(sweep_dir).resolve()
    info_file = sweep_dir / SWEEP_FILE
    if not info_file.is_file():
        raise FileNotFoundError(f"--resume {sweep_dir}: no {SWEEP_FILE} there; pass the --out folder of a sweep "
                                f"that `sqgan tune` started")
    info = json.loads(info_file.read_text())
    params = load_params(sweep_dir / "params.yaml")
    base = check_sweep(params)
    _, _, tracking_uri = _preflight(base, Path(info["data_dir"]), Path(info["project_dir"]),
                                    info.get("cell_data", {}))
    if tracking_uri != info["tracking_uri"]:
        raise RuntimeError(f"the sweep logged to {info['tracking_uri']}, but this shell resolves {tracking_uri}; "
                           f"set MLFLOW_TRACKING_URI={info['tracking_uri']} (or unset it) and resume again")
    if not tune.Tuner.can_restore(info["experiment_path"]):
        raise RuntimeError(f"--resume {sweep_dir}: Ray has no sweep state at {info['experiment_path']} (the driver "
                           f"died before the first trial started?); start it again with `sqgan tune --out NEW_DIR`")
    ray_train.init_ray(params)
    mlflow_client(info["tracking_uri"]).update_run(info["parent_run_id"], status="RUNNING")
    spec = SweepSpec(base=base.model_dump(mode="json"),
                     **{f.name: info[f.name] for f in fields(SweepSpec) if f.name != "base" and f.name in info})
    tuner = tune.Tuner.restore(info["experiment_path"], trainable=_trainable(spec), resume_unfinished=True,
                               resume_errored=True)
    return _fit_and_report(tuner, params, spec, sweep_dir)


def _preflight(base: Params, data_dir: Path, project_dir: Path,
               cell_data: dict[str, str] | None = None) -> tuple[bool, str, str]:
    """A trial's checks before Ray starts, as `sqgan train`'s: the datasets (the sweep's and each cell's own), then
    storage, tracking server and resources. Returns (use_gpu, storage, tracking URI)."""
    read_manifest(data_dir)
    for folder in (cell_data or {}).values():
        read_manifest(Path(folder))
    use_gpu, storage, uri = check_environment(base, project_dir)
    if not base.train.compile and compiles_in_a_trial(base):
        check_compile(use_gpu)  # the base trains eagerly, so check_environment did not try
    return use_gpu, storage, uri


def compiles_in_a_trial(params: Params) -> bool:
    """Whether a cell or an axis of the sweep switches train.compile on (its values as the schema reads them)."""
    values = [flatten(v).get("train.compile") for v in params.tune.cells.values()]
    space = flatten_space(params.tune.space).get("train.compile")
    values += list(space[1]) if space and space[0] in ("grid", "choice") else []
    return any(v is not None and Params().override({"train.compile": v}).train.compile for v in values)


def _trainable(spec: SweepSpec) -> Any:
    """The trial function as Tune runs it, for a new sweep and a restored one alike."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # Ray's sweep state at most ~1 s behind (default ≥ 10)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # reports between evaluations lack the metric
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec), TrialResources(spec))


class TrialResources:
    """What a trial asks Ray for, from its own values: with train.workers = 1 the loop's ray.cpus_per_worker CPUs
    (and a GPU when the sweep trains on them), held by the trial's process that runs it; with more, TRIAL_DRIVER
    (its worker group holds the CPUs)."""

    def __init__(self, spec: SweepSpec) -> None:
        self.base, self.use_gpu = spec.base, spec.use_gpu

    def __call__(self, config: dict[str, Any]) -> PlacementGroupFactory:
        workers = config.get("train.workers", self.base["train"]["workers"])
        if workers > 1:
            return PlacementGroupFactory([TRIAL_DRIVER])
        cpus = config.get("ray.cpus_per_worker", self.base["ray"]["cpus_per_worker"])
        return PlacementGroupFactory([{"CPU": cpus, **({"GPU": 1} if self.use_gpu else {})}])


def _tuner(params: Params, base: Params, spec: SweepSpec, concurrency: int) -> Any:
    t = params.tune
    return tune.Tuner(
        _trainable(spec),
        param_space=ray_space(params),
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, num_samples=t.num_samples,
            max_concurrent_trials=concurrency if t.searcher == "optuna" else None,  # grid/random: in the generator
            search_alg=build_searcher(params, t.metric, concurrency),
            scheduler=build_scheduler(params, base, spec.tracking_uri, spec.parent_run_id),
        ),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=spec.storage, failure_config=tune.FailureConfig(max_failures=t.max_failures),
            verbose=1,
        ),
    )


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a sweep; the message says what was kept and how to continue."""


class _NoRayRestoreHint:
    """Drops Ray Tune's "Resume experiment with: Tuner.restore(…)" line: `sqgan tune --resume DIR` is the way."""

    def filter(self, record: Any) -> bool:
        return "Tuner.restore" not in record.getMessage()


def _fit_and_report(tuner: Any, params: Params, spec: SweepSpec, sweep_dir: Path) -> Sweep:
    """`tuner.fit()` and the report. Ray Tune answers the first Ctrl-C itself (it saves its state, stops the trials
    and returns normally), so the signal is observed: an interrupted sweep settles its trials as killed, writes its
    table with every planned trial's state but no best_params.yaml, marks the parent run KILLED and raises
    `SweepInterrupted` (status 130: a DVC stage never records it)."""
    grid: Any = None
    seen: list[int] = []
    hint = _NoRayRestoreHint()
    logging.getLogger("ray.tune.tune").addFilter(hint)
    try:
        with sigterm_as_interrupt(), sigint_observed() as seen:
            grid = tuner.fit()
    except KeyboardInterrupt:  # SIGTERM, or a Ctrl-C outside Tune's own handler
        seen = seen or [2]
    except BaseException:
        end_run(spec.tracking_uri, spec.parent_run_id, "FAILED")
        raise
    finally:
        logging.getLogger("ray.tune.tune").removeFilter(hint)
    interrupted = bool(seen)
    lost = frozenset(n["NodeID"] for n in ray.nodes() if not n.get("Alive"))
    settle_trials(spec.tracking_uri, spec.parent_run_id, grid, params, interrupted=interrupted, lost_nodes=lost)
    table = write_report(spec.tracking_uri, spec.parent_run_id, sweep_dir, partial=interrupted)
    if interrupted:
        end_run(spec.tracking_uri, spec.parent_run_id, "KILLED")
        states: dict[str, int] = {}
        for row in table:
            states[row["status"]] = states.get(row["status"], 0) + 1
        counts = ", ".join(f"{n} {state}" for state, n in states.items())
        raise SweepInterrupted(f"interrupted: {len(table)} planned trials ({counts}); the sweep run is marked KILLED, "
                               f"{sweep_dir / 'trials.md'} lists every trial's state and no best_params.yaml was "
                               f"written. Continue with `sqgan tune --resume {sweep_dir}`")
    errors = [r for r in grid if r.error is not None]
    end_run(spec.tracking_uri, spec.parent_run_id, "FAILED" if errors and len(errors) == len(grid) else "FINISHED")
    return Sweep(sweep_dir, spec.parent_run_id, spec.tracking_uri, table)


def _dump_params(params: Params) -> str:
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)


def _join(storage: str, name: str) -> str:
    return storage.rstrip("/") + "/" + name if "://" in storage else str(Path(storage) / name)


