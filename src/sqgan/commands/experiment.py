"""`sqgan experiment`: a seed paper's table or figure as a file (`experiments/<name>.yaml`) that one command runs.

A file declares base params, rows and columns (each a set of params overrides), seeds, the metrics and the paper's
reported numbers with their source, and two scales: `paper` (the recipe as written, for a GPU cluster) and `demo`
(offline stand-in datasets and a short schedule, minutes on 2 CPUs). A cell is one row × one column; its params are
the base params, then `params`, the row's, the column's, then the scale's `params` (the scale wins: a short schedule
and small widths), with each dataset the cell names swapped for the scale's stand-in (`scale.data`).

`run` builds the datasets the cells need (the stages of `sqgan.data.stages`, as `dvc repro` would), then runs every
cell × seed as one Ray Tune sweep (`tune.cells` crossed with a grid over `train.seed`, FIFO: every cell to the end)
under one MLflow parent run tagged with the experiment, its scale and the file's sha256; the file and the metric keys
are logged to that run, so `table` renders from MLflow alone: per cell the mean ± std over seeds of each metric's
final value, the paper's number and the difference, as markdown, LaTeX, CSV and JSON (logged back to the parent run),
plus the curves of a figure-type experiment. A demo-scale table says in its header that its numbers are not
comparable to the paper's.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import matplotlib
import matplotlib.pyplot as plt
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sqgan.commands.eval import run_eval
from sqgan.commands.report import quiet_downloads
from sqgan.config import ConfigError, Params, flatten
from sqgan.data.manifest import read_manifest
from sqgan.data.stages import STAGES, run_stage
from sqgan.io import atomic_path, write_json_atomic
from sqgan.metrics.evaluate import METRICS
from sqgan.metrics.names import parse_metric_key
from sqgan.shells import tune as sweeps
from sqgan.shells.tracking import (
    checkpoint_of_run,
    child_runs,
    mlflow_client,
    open_existing,
    resolve_tracking_uri,
    search_all,
)
from sqgan.shells.tune import CELL
from sqgan.tags import (
    DATA_DIR,
    EVALUATED_RUN,
    EXPERIMENT,
    EXPERIMENT_SCALE,
    EXPERIMENT_SHA256,
    TRIAL_STATUS,
    TRIAL_VALUES,
)
from sqgan.train.loop import interim_key, quality_keys

EXPERIMENTS_DIR = Path("experiments")
FILE_ARTIFACT = "experiment.yaml"  # the experiment file as it ran, on the parent run
KEYS_ARTIFACT = "experiment_keys.json"  # cells → (row, column), metric → logged key, on the parent run
TABLE_DIR = "experiment"  # the rendered table's folder among the parent run's artifacts
OUTPUTS = ("table.md", "table.tex", "table.csv", "table.json")
Scale = Literal["demo", "paper"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricSpec(_Strict):
    name: str = Field(min_length=1, description="the column's name in the table (fid, is, …, or your own)")
    key: str | None = Field(None, description="what the runs log: a registry metric (fid, is, kid, sfid, lpips, pplu, "
                                              "nnmodes, ifid: its final evaluation's name) or a logged metric name; "
                                              "unset = name")
    stat: str | None = Field(None, description="a registry metric with statistics: which (mean, std, end for pplu); "
                                               "unset = mean, or the metric's only value")
    factor: float = Field(1.0, gt=0, description="ours × this, in the paper's units (e.g. 100 for an LPIPS the paper "
                                                 "prints ×100)")
    mode: Literal["min", "max"] = Field("min", description="whether lower or higher is better")
    relative_to: str | None = Field(None, description="a row: report this row's slowdown against it in % "
                                                      "(100·(rate_row / rate − 1), for a rate such as "
                                                      "time/steps_per_s) instead of the value")


class PaperNumber(_Strict):
    row: str
    column: str
    metric: str
    value: float = Field(description="the paper's number (its headline statistic, see `stat`)")
    std: float | None = Field(None, ge=0, description="± the paper gives with it, if any")
    stat: str = Field(min_length=1, description="what the number is, e.g. 'mean of the last 10 checkpoints', 'best'")
    source: str = Field(min_length=1, description="where it is printed: paper, table/figure, row, column")


class BuildSpec(_Strict):
    stage: str = Field(description="the stage that builds the folder (a name of `sqgan data prepare`'s table)")
    params: dict[str, Any] = Field(default_factory=dict, description="its params (nested like params)")


class ScaleSpec(_Strict):
    params: dict[str, Any] = Field(default_factory=dict, description="overrides on every cell (nested like params)")
    data: dict[str, str] = Field(default_factory=dict, description="dataset → the one this scale trains on instead "
                                                                   "(folder names under data.root)")
    build: dict[str, BuildSpec] = Field(default_factory=dict, description="dataset folder → how to build it when "
                                                                          "missing (a stage and its params)")
    seeds: list[int] = Field(min_length=1, description="train.seed of each repetition")
    note: str = ""


class Experiment(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    title: str = Field(min_length=1)
    kind: Literal["table", "figure", "timing"] = "table"
    source: str = Field(min_length=1, description="the seed paper and its table or figure")
    aggregate: str = Field(min_length=1, description="how ours and the paper's numbers are aggregated")
    paper_numbers: str = Field("", description="why there are none, when `paper` is empty")
    gaps: str = Field("", description="where the paper scale does not (yet) follow the paper, said in show and table")
    params: dict[str, Any] = Field(default_factory=dict, description="base overrides of every cell")
    rows: dict[str, dict[str, Any]] = Field(min_length=1)
    columns: dict[str, dict[str, Any]] = Field(min_length=1)
    metrics: list[MetricSpec] = Field(min_length=1)
    curve: str | None = Field(None, description="figure: the metric whose interim values over steps are plotted")
    paper: list[PaperNumber] = Field(default_factory=list)
    scales: dict[Scale, ScaleSpec]

    @field_validator("metrics", mode="before")
    @classmethod
    def _metric_names(cls, v: Any) -> Any:
        return [{"name": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"metrics: a name appears twice in {names}")
        for m in self.metrics:
            if m.relative_to is not None and m.relative_to not in self.rows:
                raise ValueError(f"metrics.{m.name}.relative_to: {m.relative_to!r} is not a row "
                                 f"({', '.join(self.rows)})")
        for i, n in enumerate(self.paper):
            for what, value, known in (("row", n.row, self.rows), ("column", n.column, self.columns),
                                       ("metric", n.metric, names)):
                if value not in known:
                    raise ValueError(f"paper[{i}].{what}: {value!r} is not one of {', '.join(known)}")
        if not self.paper and not self.paper_numbers.strip():
            raise ValueError("paper: no paper numbers; list them (each with its source), or say why in paper_numbers")
        missing = {"demo", "paper"} - set(self.scales)
        if missing:
            raise ValueError(f"scales: needs both demo and paper, missing {', '.join(sorted(missing))}")
        for scale, spec in self.scales.items():
            for folder, b in spec.build.items():
                if b.stage not in STAGES:
                    raise ValueError(f"scales.{scale}.build.{folder}.stage: {b.stage!r} is not a stage "
                                     f"({', '.join(STAGES)})")
        if self.kind == "figure" and self.curve not in names:
            raise ValueError(f"curve: a figure plots one of its metrics over steps; set curve to one of {names}")
        return self

    def cells(self) -> dict[str, tuple[str, str]]:
        """cell name → (row, column), rows outer."""
        return {cell_name(r, c): (r, c) for r in self.rows for c in self.columns}


def cell_name(row: str, column: str) -> str:
    return f"{row} @ {column}"


# --------------------------------------------------------------------------------------------- files
def experiment_files(folder: Path = EXPERIMENTS_DIR) -> dict[str, Path]:
    """name → file of every experiment in `folder`."""
    return {p.stem: p for p in sorted(Path(folder).glob("*.yaml"))}


def find_experiment(name: str, folder: Path = EXPERIMENTS_DIR) -> Path:
    """The file of experiment `name` (or `name` itself when it is a .yaml path); an unknown name lists the known."""
    if name.endswith((".yaml", ".yml")):
        if not Path(name).is_file():
            raise FileNotFoundError(f"experiment file {name} does not exist")
        return Path(name)
    files = experiment_files(folder)
    if name not in files:
        known = ", ".join(files) or f"none: {folder} holds no .yaml files"
        raise ValueError(f"unknown experiment {name!r}; `sqgan experiment list` shows them: {known}")
    return files[name]


def load_experiment(path: Path) -> Experiment:
    """Parse and validate an experiment file; ConfigError names the file and the field."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an experiment file holds a mapping (name, title, rows, columns, …)")
    try:
        exp = Experiment.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}: {where + ': ' if where else ''}{msg}") from None
    if exp.name != Path(path).stem:
        raise ConfigError(f"{path}: name {exp.name!r} differs from the file's name; rename one of them")
    return exp


# --------------------------------------------------------------------------------------------- cells
def cell_values(exp: Experiment, scale: Scale, row: str, column: str) -> dict[str, Any]:
    """A cell's dotted overrides on top of the experiment's base: row, column, the scale's params, the scale's
    dataset stand-in."""
    values = {**flatten(exp.rows[row]), **flatten(exp.columns[column]), **flatten(exp.scales[scale].params)}
    return values


def base_params(params: Params, exp: Experiment, path: Path) -> Params:
    """The user's params (mlflow, ray, paths) with the experiment's base params; metrics.names gains every registry
    metric the experiment reports."""
    base = params.override(flatten(exp.params), source=f"{path}: params")
    wanted = [k for k in (m.key or m.name for m in exp.metrics) if k in METRICS and k not in base.metrics.names]
    return base.override({"metrics.names": [*base.metrics.names, *wanted]}, source=f"{path}: metrics") if wanted \
        else base


def resolve_cells(params: Params, exp: Experiment, path: Path, scale: Scale) -> tuple[Params, dict[str, dict]]:
    """(base params, cell → its dotted overrides incl. the stand-in dataset): every cell resolved against the params
    schema, a bad key or value a ConfigError naming the file, the cell and the key."""
    spec = exp.scales[scale]
    # the scale's params on the base too: what every trial shares (schedule, metrics) is the sweep's own
    base = base_params(params, exp, path).override(flatten(spec.params), source=f"{path}: scales.{scale}.params")
    cells: dict[str, dict[str, Any]] = {}
    for name, (row, column) in exp.cells().items():
        values = cell_values(exp, scale, row, column)
        p = base.override(values, source=f"{path}: cell '{name}' ({scale} scale)")
        dataset = spec.data.get(p.data.dataset, p.data.dataset)
        if dataset != p.data.dataset or "data.dataset" in values:
            values["data.dataset"] = dataset
        cells[name] = values
    return base, cells


def same_runs(base: Params, cells: dict[str, dict[str, Any]]) -> dict[str, str]:
    """cell → the earlier cell whose params are the same (at demo scale the columns' datasets often share one
    stand-in): such a cell is trained once and shown in both places."""
    seen: dict[str, str] = {}
    out = {}
    for name, values in cells.items():
        resolved = json.dumps(base.override(values).model_dump(mode="json"), sort_keys=True)
        if resolved in seen:
            out[name] = seen[resolved]
        else:
            seen[resolved] = name
    return out


# params that change what an evaluation measures and not what training makes: cells that differ only in them share
# one training (per seed), and each is its trained G evaluated with its own values (`sqgan eval`)
EVAL_ONLY_KEYS = ("sample.", "metrics.truncation")


def _training_params(p: Params) -> str:
    flat = {k: v for k, v in p.flat().items() if not k.startswith(EVAL_ONLY_KEYS)}
    return json.dumps(flat, sort_keys=True, default=str)


def evaluation_cells(base: Params, cells: dict[str, dict[str, Any]]) -> dict[str, str]:
    """cell → the earlier cell whose params differ from it only in EVAL_ONLY_KEYS (the elbow study's N centres, a
    ψ grid): such a cell is not trained; the other cell's trained G is evaluated with its values. Cells with the same
    params altogether are `same_runs`' and not listed here."""
    same = same_runs(base, cells)
    seen: dict[str, str] = {}
    out = {}
    for name, values in cells.items():
        if name in same:
            continue
        trained = _training_params(base.override(values))
        if trained in seen:
            out[name] = seen[trained]
        else:
            seen[trained] = name
    return out


def cell_metric_keys(exp: Experiment, base: Params, cells: dict[str, dict[str, Any]], path: Path) -> dict[str, str]:
    """metric_keys of the cells, which must agree (one column per metric in the table)."""
    found: dict[str, str] | None = None
    for name, values in cells.items():
        keys = metric_keys(exp, base.override(values))
        if found is not None and keys != found:
            diff = [m for m in keys if keys[m] != found[m]]
            raise ConfigError(f"{path}: cell '{name}' logs {diff[0]} as {keys[diff[0]]} but an earlier cell as "
                              f"{found[diff[0]]}; give every cell the same metrics.* (num_fake, features)")
        found = keys
    return found or {}


def metric_keys(exp: Experiment, params: Params) -> dict[str, str]:
    """metric name → the key a run logs for it (a registry metric: its final evaluation's, mean where it has
    statistics)."""
    out = {}
    for m in exp.metrics:
        key = m.key or m.name
        if key in METRICS:
            keys = quality_keys(params.override({"metrics.names": [key]}), params.metrics.num_fake)
            wanted = (m.stat,) if m.stat else (None, "mean")
            found = [k for k in keys if parse_metric_key(k).stat in wanted]
            if not found:
                stats = sorted({str(parse_metric_key(k).stat) for k in keys})
                raise ConfigError(f"metrics.{m.name}: {key} has no statistic {m.stat!r}; pick one of {stats}")
            key = found[0]
        out[m.name] = key
    return out


def datasets_needed(params: Params, cells: dict[str, dict[str, Any]]) -> list[str]:
    names = []
    for values in cells.values():
        d = values.get("data.dataset", params.data.dataset)
        if d not in names:
            names.append(d)
    return names


def build_data(params: Params, names: list[str], build: dict[str, BuildSpec] | None = None) -> list[str]:
    """Each dataset folder data.root/<name> that has no manifest yet is built by its stage (the function `dvc repro`
    runs; `build` names another stage and its params for a folder, e.g. the labelled demo); returns the names built.
    A name with no stage and no folder is an error naming the fix."""
    built = []
    for name in names:
        folder = Path(params.data.root) / name
        if (folder / "manifest.parquet").is_file():
            continue
        if build and name in build:
            b = build[name]
            run_stage(b.stage, params.override(flatten(b.params), source=f"build of {name}"), out=folder)
            built.append(name)
            continue
        if name not in STAGES:
            raise FileNotFoundError(f"dataset {folder} does not exist and {name!r} is no stage ({', '.join(STAGES)}); "
                                    f"build it first (e.g. `sqgan data curate --src … --out {folder}`)")
        run_stage(name, params)
        built.append(name)
    for name in names:
        read_manifest(Path(params.data.root) / name)
    return built


def sweep_params(params: Params, exp: Experiment, path: Path, scale: Scale) -> Params:
    """The sweep that runs the experiment: the cells as tune.cells, seeds as the only axis, FIFO (a table needs every
    cell to the end), ranked on the first metric."""
    base, cells = resolve_cells(params, exp, path, scale)
    skip = {**same_runs(base, cells), **evaluation_cells(base, cells)}
    cells = {c: v for c, v in cells.items() if c not in skip}
    first = exp.metrics[0]
    ranked = first.key or first.name
    metric = ranked if ranked not in METRICS or ranked in ("fid", "kid") else \
        cell_metric_keys(exp, base, cells, path)[first.name]
    return base.override({
        "tune.cells": cells, "tune.space": {"train": {"seed": {"grid": exp.scales[scale].seeds}}}, "tune.fixed": {},
        "tune.scheduler": "fifo", "tune.searcher": "grid", "tune.num_samples": 1, "tune.metric": metric,
        "tune.mode": first.mode, "mlflow.run_name": params.mlflow.run_name or f"experiment-{exp.name}-{scale}",
    }, source=f"{path}")


# ----------------------------------------------------------------------------------------------- run
def run_experiment(params: Params, name: str, scale: Scale = "demo", out: Path | None = None, resume: bool = False,
                   force: bool = False, folder: Path = EXPERIMENTS_DIR, project_dir: Path = Path(".")
                   ) -> tuple[str, str, Path]:
    """Run (or resume) an experiment; returns (tracking URI, parent run id, sweep folder). Every check — the file,
    each cell's params, the sweep's space — happens before any data or Ray work."""
    path = find_experiment(name, folder)
    exp = load_experiment(path)
    out = Path(out or f"runs/experiments/{exp.name}-{scale}")
    if resume:
        sweep = sweeps.resume_sweep(out)
        evaluate_cells(params, sweep.tracking_uri, sweep.parent_run_id, project_dir)
        return sweep.tracking_uri, sweep.parent_run_id, sweep.sweep_dir
    sp = sweep_params(params, exp, path, scale)
    sweeps.check_sweep(sp)
    other: Scale = "paper" if scale == "demo" else "demo"
    sweeps.check_sweep(sweep_params(params, exp, path, other))  # a file must hold at both scales
    if sp.train.use_gpu == "true" and not sp.ray.address and torch.cuda.device_count() == 0:
        raise RuntimeError(f"the {scale} scale of {exp.name} trains on GPUs (train.use_gpu true) and this machine has "
                           f"none; run it on a Ray cluster (--set ray.address=ray://HEAD:10001, or the Kubeflow "
                           f"experiment pipeline), or look first with --scale demo")
    names = datasets_needed(sp, sp.tune.cells)
    build_data(sp, names, exp.scales[scale].build)
    text = Path(path).read_text()
    keys = {"cells": {c: list(rc) for c, rc in exp.cells().items()},
            "same_as": same_runs(*resolve_cells(params, exp, path, scale)),
            "evaluates": evaluation_cells(*resolve_cells(params, exp, path, scale)),
            "curve_key": interim_key(sp, metric_keys(exp, sp)[exp.curve]) if exp.curve else None,
            "metrics": cell_metric_keys(exp, sp, sp.tune.cells, path),
            "scale": scale, "datasets": names}
    tags = {EXPERIMENT: exp.name, EXPERIMENT_SCALE: scale,
            EXPERIMENT_SHA256: hashlib.sha256(text.encode()).hexdigest()}
    data_dir = Path(sp.data.root) / sp.tune.cells[next(iter(sp.tune.cells))].get("data.dataset", sp.data.dataset)
    sweep = sweeps.run_sweep(sp, data_dir, out, project_dir=project_dir, force=force, tags=tags,
                             files={FILE_ARTIFACT: text, KEYS_ARTIFACT: json.dumps(keys, indent=1)})
    evaluate_cells(params, sweep.tracking_uri, sweep.parent_run_id, project_dir)
    return sweep.tracking_uri, sweep.parent_run_id, sweep.sweep_dir


def evaluate_cells(params: Params, tracking_uri: str, parent_id: str, project_dir: Path = Path(".")) -> list[str]:
    """The evaluation-only cells (`evaluation_cells`), after the sweep: for each seed whose trained cell completed
    and that has no evaluation of this cell yet (so a resumed experiment adds only what is missing), its latest
    checkpoint evaluated by `sqgan eval` with the cell's params — the metrics its training would have logged
    (metrics.names on metrics.num_fake images) — in a run nested under the experiment's parent, tagged as the cell's
    trial, which `table` reads like any other. Runs in this process (the driver). Returns the new runs' ids."""
    client = mlflow_client(tracking_uri)
    parent = client.get_run(parent_id)
    keys = json.loads(_artifact_text(client, parent_id, KEYS_ARTIFACT))
    evaluates: dict[str, str] = keys.get("evaluates", {})
    if not evaluates:
        return []
    exp = Experiment.model_validate(yaml.safe_load(_artifact_text(client, parent_id, FILE_ARTIFACT)))
    label = Path(f"{exp.name}.yaml (as run {parent_id})")
    base, cells = resolve_cells(params, exp, label, keys["scale"])
    base = base.override({"mlflow.tracking_uri": tracking_uri}, source=str(label))
    done: dict[str, dict[Any, Any]] = {}  # cell → seed → its completed run
    for run in child_runs(client, parent):
        values = json.loads(run.data.tags.get(TRIAL_VALUES, "{}"))
        if run.info.status == "FINISHED" and run.data.tags.get(TRIAL_STATUS) == "completed":
            done.setdefault(values.get(CELL), {})[values.get("train.seed")] = run
    new = []
    for cell, trained in evaluates.items():
        for seed, run in sorted(done.get(trained, {}).items(), key=lambda kv: str(kv[0])):
            if seed in done.get(cell, {}):
                continue
            p = base.override({**cells[cell], "train.seed": seed}, source=f"{label}: cell '{cell}'")
            p = p.override({"eval.metrics": list(p.metrics.names), "eval.num_fake": p.metrics.num_fake,
                            "eval.lpips_pairs": max(1, p.metrics.num_fake // 2),
                            "mlflow.run_name": f"{cell} seed {seed} (evaluates {run.info.run_id[:8]})"},
                           source=f"{label}: cell '{cell}'")
            tags = {TRIAL_VALUES: json.dumps({CELL: cell, "train.seed": seed}, sort_keys=True),
                    TRIAL_STATUS: "completed", EVALUATED_RUN: run.info.run_id}
            with tempfile.TemporaryDirectory(prefix="sqgan-exp-eval-") as d:
                ckpt = checkpoint_of_run(tracking_uri, run.info.run_id, Path(d))
                result = run_eval(p, checkpoint=ckpt, data_dir=run.data.tags.get(DATA_DIR), out=Path(d) / "eval.json",
                                  project_dir=project_dir, progress=False, new_run_tags=tags,
                                  parent_run_id=parent_id)
            new.append(result.run_id)
            print(f"experiment {exp.name}: cell '{cell}' seed {seed}: evaluated {run.info.run_id} as run "
                  f"{result.run_id}", flush=True)
    return new


# --------------------------------------------------------------------------------------------- table
def find_parent(tracking_uri: str, name: str, scale: Scale | None, run_id: str | None) -> Any:
    """The parent run of experiment `name` (the newest, at `scale` when given), or run `run_id`."""
    client = open_existing(tracking_uri, "run `sqgan experiment run NAME` first, or set mlflow.tracking_uri")
    if run_id is not None:
        run = client.get_run(run_id)
        if run.data.tags.get(EXPERIMENT) != name:
            raise ValueError(f"run {run_id} is not a run of experiment {name!r} (its {EXPERIMENT} tag is "
                             f"{run.data.tags.get(EXPERIMENT)!r})")
        return run
    query = f"tags.`{EXPERIMENT}` = '{name}'" + (f" and tags.`{EXPERIMENT_SCALE}` = '{scale}'" if scale else "")
    runs = [r for e in client.search_experiments() for r in search_all(client, e.experiment_id, query)]
    if not runs:
        at = f" at {scale} scale" if scale else ""
        raise ValueError(f"no run of experiment {name!r}{at} in {tracking_uri}; run `sqgan experiment run {name}`")
    return max(runs, key=lambda r: r.info.start_time)


def _artifact_text(client: Any, run_id: str, name: str) -> str:
    with tempfile.TemporaryDirectory(prefix="sqgan-exp-") as d, quiet_downloads():
        return Path(client.download_artifacts(run_id, name, d)).read_text()


def collect(tracking_uri: str, parent: Any) -> tuple[Experiment, dict[str, Any], dict[str, list[dict[str, float]]]]:
    """From MLflow alone: the experiment as it ran, its keys, and cell → the completed trials' final metrics (one
    dict per seed)."""
    client = mlflow_client(tracking_uri)
    pid = parent.info.run_id
    raw = yaml.safe_load(_artifact_text(client, pid, FILE_ARTIFACT))
    exp = Experiment.model_validate(raw)
    keys = json.loads(_artifact_text(client, pid, KEYS_ARTIFACT))
    per_cell: dict[str, list[dict[str, float]]] = {c: [] for c in keys["cells"]}
    for run in child_runs(client, parent):
        values = json.loads(run.data.tags.get(TRIAL_VALUES, "{}"))
        if run.info.status != "FINISHED" or run.data.tags.get(TRIAL_STATUS) != "completed":
            continue
        cell = values.get(CELL)
        if cell in per_cell:
            per_cell[cell].append({"seed": values.get("train.seed"), "run_id": run.info.run_id, **run.data.metrics})
    for runs in per_cell.values():
        runs.sort(key=lambda r: (r["seed"] is None, r["seed"]))
    return exp, keys, per_cell


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def table_rows(exp: Experiment, keys: dict[str, Any], per_cell: dict[str, list[dict[str, float]]]
               ) -> list[dict[str, Any]]:
    """One entry per cell × metric: ours (mean, std, n over seeds of the final values), the paper's, Δ = ours − paper
    (a `relative_to` metric: the slowdown in % against its row's mean rate, n the seeds of this cell)."""
    paper = {(n.row, n.column, n.metric): n for n in exp.paper}
    same = keys.get("same_as", {})
    per_cell = {c: per_cell.get(same.get(c, c), []) for c in keys["cells"]}
    out = []
    for cell, (row, column) in ((c, tuple(rc)) for c, rc in keys["cells"].items()):
        for m in exp.metrics:
            key = keys["metrics"][m.name]
            vals = [m.factor * r[key] for r in per_cell.get(cell, []) if key in r and math.isfinite(r[key])]
            mean, std = _mean_std(vals)
            if m.relative_to is not None:
                ref_cell = cell_name(m.relative_to, column)
                ref = [r[key] for r in per_cell.get(ref_cell, []) if key in r and math.isfinite(r[key])]
                ref_mean = _mean_std(ref)[0]
                mean = 100.0 * (ref_mean / mean - 1.0) if vals and ref and mean > 0 else math.nan
                std = math.nan
            p = paper.get((row, column, m.name))
            out.append({"row": row, "column": column, "metric": m.name, "key": key, "mean": mean, "std": std,
                        "n": len(vals), "seeds": [r["seed"] for r in per_cell.get(cell, []) if key in r],
                        "paper": p.value if p else math.nan,
                        "paper_std": p.std if p and p.std is not None else math.nan,
                        "paper_stat": p.stat if p else "", "paper_source": p.source if p else "",
                        "diff": mean - p.value if p and not math.isnan(mean) else math.nan})
    return out


def _num(v: float, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def _ours(r: dict[str, Any]) -> str:
    if r["n"] == 0:
        return "–"
    std = "" if math.isnan(r["std"]) or r["n"] < 2 else f" ± {_num(r['std'], 2)}"
    return f"{_num(r['mean'])}{std} (n={r['n']})"


def _paper(r: dict[str, Any]) -> str:
    if math.isnan(r["paper"]):
        return "–"
    return _num(r["paper"]) + ("" if math.isnan(r["paper_std"]) else f" ± {_num(r['paper_std'], 2)}")


def header(exp: Experiment, scale: str, parent_id: str, same: dict[str, str] | None = None,
           evaluates: dict[str, str] | None = None) -> list[str]:
    lines = [f"# {exp.title}", "", f"Source: {exp.source}. Aggregation: {exp.aggregate}",
             f"MLflow parent run {parent_id}, scale **{scale}**."]
    if scale == "demo":
        lines.append("**DEMO SCALE: stand-in data and a short schedule; these numbers are NOT comparable to the "
                     "paper's.**")
    if not exp.paper:
        lines.append(f"Paper numbers: {exp.paper_numbers.strip()}.")
    if exp.gaps.strip():
        lines.append(f"Where the paper scale departs from the paper: {exp.gaps.strip()}.")
    for cell, earlier in (same or {}).items():
        lines.append(f"'{cell}' has the same params as '{earlier}' at this scale: trained once, shown in both.")
    for cell, trained in (evaluates or {}).items():
        lines.append(f"'{cell}' differs from '{trained}' only in evaluation params (sample.*, metrics.truncation): "
                     f"not trained; '{trained}''s G evaluated with its values.")
    return lines


def render_markdown(exp: Experiment, rows: list[dict[str, Any]], scale: str, parent_id: str,
                    same: dict[str, str] | None = None, evaluates: dict[str, str] | None = None) -> str:
    lines = header(exp, scale, parent_id, same, evaluates)
    for m in exp.metrics:
        sub = [r for r in rows if r["metric"] == m.name]
        what = f"slowdown vs {m.relative_to}, %" if m.relative_to else f"{sub[0]['key']}, {m.mode} is better"
        lines += ["", f"## {m.name} ({what})", "",
                  "| | " + " | ".join(f"{c}: ours | {c}: paper | {c}: Δ" for c in exp.columns) + " |",
                  "|---|" + "---|---|---|" * len(exp.columns)]
        for row in exp.rows:
            cells = []
            for c in exp.columns:
                r = next(x for x in sub if x["row"] == row and x["column"] == c)
                cells += [_ours(r), _paper(r), _num(r["diff"])]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    sources = sorted({f"{r['metric']}: {r['paper_source']} ({r['paper_stat']})" for r in rows if r["paper_source"]})
    if sources:
        lines += ["", "Paper numbers:"] + [f"- {s}" for s in sources]
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    return s.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%").replace("_", r"\_") \
        .replace("#", r"\#").replace("±", r"$\pm$").replace("–", "--").replace("Δ", r"$\Delta$")


def render_latex(exp: Experiment, rows: list[dict[str, Any]], scale: str) -> str:
    cols = list(exp.columns)
    out = [f"% {exp.title} -- {scale} scale" + (" (NOT comparable to the paper)" if scale == "demo" else ""),
           r"\begin{tabular}{l" + "rr" * len(cols) * len(exp.metrics) + "}", r"\toprule",
           " & " + " & ".join(rf"\multicolumn{{2}}{{c}}{{{_tex(c)}: {_tex(m.name)}}}" for m in exp.metrics
                              for c in cols) + r" \\",
           " & " + " & ".join("ours & paper" for _ in exp.metrics for _ in cols) + r" \\", r"\midrule"]
    for row in exp.rows:
        cells = []
        for m in exp.metrics:
            for c in cols:
                r = next(x for x in rows if x["row"] == row and x["column"] == c and x["metric"] == m.name)
                cells += [_tex(_ours(r)), _tex(_paper(r))]
        out.append(_tex(row) + " & " + " & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


CSV_FIELDS = ("row", "column", "metric", "key", "mean", "std", "n", "paper", "paper_std", "diff", "paper_stat",
              "paper_source")


def render_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def render_json(exp: Experiment, rows: list[dict[str, Any]], scale: str) -> dict[str, Any]:
    """DVC-metrics shaped: {row: {column: {metric: {mean, std, n, paper, diff}}}} (NaN as null)."""
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else v

    out: dict[str, Any] = {"experiment": exp.name, "scale": scale, "comparable_to_paper": scale == "paper"}
    for r in rows:
        out.setdefault(r["row"], {}).setdefault(r["column"], {})[r["metric"]] = {
            k: clean(r[k]) for k in ("mean", "std", "n", "paper", "diff")}
    return out


def _curves(client: Any, exp: Experiment, keys: dict[str, Any], per_cell: dict[str, list[dict[str, float]]],
            out: Path) -> list[Path]:
    """A figure: the curve metric's interim evaluations over steps (its own N, never mixed with the final one), mean
    over seeds per cell, as curves.png and curves.csv (cell, step, mean, n: a DVC plot)."""
    matplotlib.use("Agg")
    key = keys.get("curve_key") or keys["metrics"][exp.curve]
    same = keys.get("same_as", {})
    points: list[tuple[str, int, float, int]] = []
    for cell in keys["cells"]:
        series: dict[int, list[float]] = {}
        for r in per_cell.get(same.get(cell, cell), []):
            for m in client.get_metric_history(r["run_id"], key):
                series.setdefault(m.step, []).append(m.value)
        points += [(cell, s, sum(v) / len(v), len(v)) for s, v in sorted(series.items())]
    if not points:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for cell in keys["cells"]:
        mine = [p for p in points if p[0] == cell]
        if mine:
            ax.plot([p[1] for p in mine], [p[2] for p in mine], marker="o", label=cell)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["cell", "step", key, "n"])
    w.writerows(points)
    with atomic_path(out / "curves.csv") as tmp:
        tmp.write_text(buf.getvalue())
    return [out / "curves.png", out / "curves.csv"]


def write_table(tracking_uri: str, parent: Any, out: Path, log: bool = True) -> tuple[list[dict[str, Any]], str]:
    """Render the table of experiment run `parent` from MLflow into `out` (each file atomically) and, with `log`,
    log the files to the parent run under experiment/. Returns (rows, markdown)."""
    exp, keys, per_cell = collect(tracking_uri, parent)
    scale = parent.data.tags.get(EXPERIMENT_SCALE, keys.get("scale", "?"))
    rows = table_rows(exp, keys, per_cell)
    out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(exp, rows, scale, parent.info.run_id, keys.get("same_as"), keys.get("evaluates"))
    texts = {"table.md": md, "table.tex": render_latex(exp, rows, scale), "table.csv": render_csv(rows)}
    for name, text in texts.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    write_json_atomic(out / "table.json", render_json(exp, rows, scale))
    files = [out / n for n in OUTPUTS]
    if exp.kind == "figure":
        files += _curves(mlflow_client(tracking_uri), exp, keys, per_cell, out)
    if log:
        client = mlflow_client(tracking_uri)
        for f in files:
            client.log_artifact(parent.info.run_id, str(f), TABLE_DIR)
    return rows, md


def show_experiment(name: str, folder: Path = EXPERIMENTS_DIR) -> str:
    """What `sqgan experiment show` prints: the file's summary and its cells at both scales."""
    path = find_experiment(name, folder)
    exp = load_experiment(path)
    lines = [f"{exp.name}: {exp.title} ({exp.kind})", f"source: {exp.source}", f"aggregate: {exp.aggregate}",
             f"rows: {', '.join(exp.rows)}", f"columns: {', '.join(exp.columns)}",
             f"metrics: {', '.join(m.name for m in exp.metrics)}",
             f"paper numbers: {len(exp.paper)}" + ("" if exp.paper else f" ({exp.paper_numbers.strip()})")]
    if exp.gaps.strip():
        lines.append(f"departs from the paper: {exp.gaps.strip()}")
    for scale, spec in exp.scales.items():
        data = ", ".join(f"{a} → {b}" for a, b in spec.data.items()) or "as the cells name them"
        base, cells = resolve_cells(Params(), exp, path, scale)
        same, evaluated = same_runs(base, cells), evaluation_cells(base, cells)
        trained = len(cells) - len(same) - len(evaluated)
        lines.append(f"{scale} scale: {len(cells)} cells × {len(spec.seeds)} seeds = {trained * len(spec.seeds)} "
                     f"trainings" + (f" ({len(same)} cells share another's params)" if same else "")
                     + (f" and {len(evaluated) * len(spec.seeds)} evaluations of trained cells" if evaluated else "")
                     + f"; data {data}" + (f"; {spec.note}" if spec.note else ""))
    return "\n".join(lines)


def list_experiments(folder: Path = EXPERIMENTS_DIR) -> Iterator[tuple[str, str]]:
    """(name, title) of each experiment file (a file that does not validate: its error as the title)."""
    for name, path in experiment_files(folder).items():
        try:
            yield name, load_experiment(path).title
        except ConfigError as e:
            yield name, f"INVALID: {e}"


def default_table_dir(name: str, scale: str) -> Path:
    return Path(f"runs/experiments/{name}-{scale}-table")


def table_experiment(params: Params, name: str, scale: Scale | None = None, run_id: str | None = None,
                     out: Path | None = None) -> tuple[list[dict[str, Any]], str, Path]:
    """`sqgan experiment table NAME`: the newest run's table (or run `run_id`'s) from MLflow alone."""
    uri = resolve_tracking_uri(params)
    parent = find_parent(uri, name, scale, run_id)
    where = out or default_table_dir(name, parent.data.tags.get(EXPERIMENT_SCALE, "demo"))
    rows, md = write_table(uri, parent, where)
    return rows, md, where

