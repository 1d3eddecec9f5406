"""A sweep's report, read from MLflow alone: the trial table (CSV + markdown, sorted by the metric among the trials
whose generator did not collapse — a `collapsed` column gives the step the collapse watch flagged, and those trials
follow the others — with each trial's status and the step it stopped at), the metric against each axis, every
trial's metric-over-steps curve, and `best_params.yaml` (the best completed trial's resolved params, which
`sqgan train --params` takes as is; never a collapsed trial's).

`sqgan tune` writes it into the sweep folder and logs it to the parent run when the sweep ends;
`sqgan tune --report PARENT_RUN_ID` renders it again from the tracking server.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import yaml

from sqgan.config import Params, flatten
from sqgan.io import atomic_path
from sqgan.shells.tracking import child_runs, mlflow_client
from sqgan.tags import (
    COLLAPSE_STEP,
    STAGE,
    STAGE_SWEEP,
    STOPPED_AT_STEP,
    TRIAL_ERROR,
    TRIAL_ID,
    TRIAL_NODE,
    TRIAL_NODES,
    TRIAL_STATUS,
    TRIAL_VALUES,
    TUNE_AXES,
    TUNE_BEST_RUN_ID,
    TUNE_BEST_TRIAL,
    TUNE_INTERIM_KEY,
    TUNE_METRIC,
    TUNE_METRIC_KEY,
    TUNE_MODE,
    TUNE_STEPS,
)

REPORT_FILES = ("trials.csv", "trials.md", "metric_vs_axes.png", "curves.png", "best_params.yaml")


def _last_step(client: Any, run: Any) -> int:
    tag = run.data.tags.get(STOPPED_AT_STEP)
    if tag is not None:
        return int(tag)
    return max((m.step for m in client.get_metric_history(run.info.run_id, "loss/d")), default=0)


def settle_trials(tracking_uri: str, parent_run_id: str, grid: Any, params: Any, interrupted: bool = False,
                  lost_nodes: frozenset[str] = frozenset()) -> None:
    """After `Tuner.fit()`: give each nested run its final status — completed (FINISHED), stopped by the scheduler
    before train.steps (KILLED, its actor was ended mid-run; ASHA tags the run when it decides), killed by the
    sweep's interruption (KILLED; `grid` is None when Tune did not return) or error (FAILED; an error of a trial
    whose node is among `lost_nodes`, Ray node ids, names the node: Ray's own message only says its actor is gone)
    — and the step it stopped at."""
    client = mlflow_client(tracking_uri)
    parent = client.get_run(parent_run_id)

    errors: dict[str, str] = {}
    for result in grid or []:
        trial_id = (result.metrics or {}).get("trial_id")
        if not trial_id and result.path:  # a trial that never reported: its id is in its folder's name
            found = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(result.path).name)
            trial_id = found.group(1) if found else None
        if result.error is not None and trial_id:
            errors[trial_id] = f"{type(result.error).__name__}: {str(result.error).splitlines()[0][:200]}"
    steps, key = int(parent.data.tags[TUNE_STEPS]), parent.data.tags[TUNE_METRIC_KEY]
    for run in child_runs(client, parent):
        tags = run.data.tags
        trial_id = tags.get(TRIAL_ID, "")
        step = _last_step(client, run)
        client.set_tag(run.info.run_id, STOPPED_AT_STEP, str(step))
        if tags.get(TRIAL_STATUS) == "completed" and run.info.status == "FINISHED":
            continue
        if step >= steps and key in run.data.metrics and trial_id not in errors:  # ended between report and tag
            client.set_tag(run.info.run_id, TRIAL_STATUS, "completed")
            client.set_terminated(run.info.run_id, status="FINISHED")
            continue
        if trial_id in errors:
            error = errors[trial_id]
            if tags.get(TRIAL_NODE) in lost_nodes:
                node = (tags.get(TRIAL_NODES) or tags[TRIAL_NODE]).split(", ")[-1]
                error = f"its Ray node {node} was lost: {error}"
            client.set_tag(run.info.run_id, TRIAL_STATUS, "error")
            client.set_tag(run.info.run_id, TRIAL_ERROR, error)
            client.set_terminated(run.info.run_id, status="FAILED")
        elif tags.get(TRIAL_STATUS, "").startswith("stopped by"):  # the scheduler's stop, recorded then
            client.set_terminated(run.info.run_id, status="KILLED")
        elif interrupted:
            client.set_tag(run.info.run_id, TRIAL_STATUS, "killed")
            client.set_terminated(run.info.run_id, status="KILLED")
        else:
            client.set_tag(run.info.run_id, TRIAL_STATUS, f"stopped by {params.tune.scheduler}")
            client.set_terminated(run.info.run_id, status="KILLED")


def trial_table(tracking_uri: str, parent_run_id: str) -> tuple[list[dict[str, Any]], dict[str, str], list[str]]:
    """(rows sorted best first, the parent's tags, the axes) from MLflow alone."""
    rows, ptags, axes, _ = _trial_table(mlflow_client(tracking_uri), tracking_uri, parent_run_id)
    return rows, ptags, axes


def _trial_table(client: Any, tracking_uri: str, parent_run_id: str) -> tuple[
        list[dict[str, Any]], dict[str, str], list[str], dict[str, set[str]]]:
    """trial_table's, and each trial run's logged metric names (run id → names: whose history there is to read)."""
    parent = client.get_run(parent_run_id)
    ptags = parent.data.tags
    if ptags.get(STAGE) != STAGE_SWEEP:
        raise ValueError(f"run {parent_run_id} in {tracking_uri} is not a sweep's parent run (its sqgan.stage tag is "
                         f"{ptags.get(STAGE)!r}); pass the run id `sqgan tune` printed")
    axes = json.loads(ptags[TUNE_AXES])
    key, mode = ptags[TUNE_METRIC_KEY], ptags[TUNE_MODE]
    interim = ptags.get(TUNE_INTERIM_KEY, key)
    rows, logged = [], {}
    for run in child_runs(client, parent):
        m, p, tags = run.data.metrics, run.data.params, run.data.tags
        status = tags.get(TRIAL_STATUS) or {"RUNNING": "running", "FINISHED": "completed"}.get(
            run.info.status, run.info.status.lower())
        # collapsed: the step the collapse watch first flagged G_ema, while its latest evaluation still does
        collapsed = tags.get(COLLAPSE_STEP, "-") if m.get("diversity/collapsed", 0.0) >= 1 else "-"
        # the final and the last interim evaluation are separate columns, named with their N (never one mixed column)
        row = {"trial": tags.get(TRIAL_ID, ""), "status": status, "step": _last_step(client, run),
               key: m.get(key, math.nan), **({interim: m.get(interim, math.nan)} if interim != key else {}),
               "collapsed": collapsed}
        values = json.loads(tags.get(TRIAL_VALUES, "{}"))
        # a cell (tune.cells) is no param of the run: its name is among the trial's values
        row.update({a: values.get(a) if a == "cell" else _parse(p.get(a)) for a in axes})
        row["run_id"] = run.info.run_id
        rows.append(row)
        logged[run.info.run_id] = set(m)
    rows += _not_started(client, parent_run_id, rows, axes, [key, interim])
    sign = 1 if mode == "min" else -1
    # ranked among the trials not flagged as collapsed: on the final evaluation, then (stopped trials) on the last
    # interim one; the collapsed ones follow, then those without a value
    rows.sort(key=lambda r: (math.isnan(rank_value(r, key, interim)), r["collapsed"] != "-", math.isnan(r[key]),
                             sign * rank_value(r, key, interim) if not math.isnan(rank_value(r, key, interim)) else 0,
                             r["trial"]))
    return rows, ptags, axes, logged


def rank_value(row: dict[str, Any], key: str, interim: str | None = None) -> float:
    """What a row is ranked on: its final evaluation, else (a stopped trial) its last interim one."""
    value = row.get(key, math.nan)
    return row.get(interim, math.nan) if math.isnan(value) and interim else value


def planned_trials(params: Any) -> list[dict[str, Any]]:
    """Every trial the sweep will run, as its axis values: the grid axes' product (× tune.num_samples); an axis
    that is drawn (choice, uniform, …) is None until its trial starts. The trial table lists the ones that did not."""
    axes = params.tune.axes()
    if params.tune.cells:  # the axis over tune.cells, first (as the sweep's axes tag lists it)
        axes = {"cell": ("grid", list(params.tune.cells)), **axes}
    grid = {k: args for k, (name, args) in axes.items() if name == "grid"}
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    drawn = {k: None for k in axes if k not in grid}
    return [{**drawn, **c} for _ in range(params.tune.num_samples) for c in combos]


def _not_started(client: Any, parent_run_id: str, rows: list[dict[str, Any]], axes: list[str],
                 keys: list[str]) -> list[dict[str, Any]]:
    """Rows for the planned trials (the sweep's params.yaml on its parent run) that have no run yet."""
    params = _sweep_params(client, parent_run_id)
    if params is None:  # a parent run without its params: the table has the trials that ran
        return []
    left = planned_trials(params)
    for row in rows:
        for i, plan in enumerate(left):
            if all(v is None or row.get(k) == v for k, v in plan.items()):
                del left[i]
                break
    return [{"trial": "-", "status": "not started", "step": 0, **dict.fromkeys(keys, math.nan), "collapsed": "-",
             **{a: plan.get(a) for a in axes}, "run_id": "-"} for plan in left]


def _sweep_params(client: Any, parent_run_id: str) -> Any:
    """The sweep's own params (its parent run's params.yaml), or None."""
    try:
        with tempfile.TemporaryDirectory(prefix="sqgan-sweep-") as d:
            return Params.model_validate(yaml.safe_load(
                Path(client.download_artifacts(parent_run_id, "params.yaml", d)).read_text()))
    except Exception:  # noqa: BLE001 - deleted artifacts, a run that is not a sweep's
        return None


# the trials' short schedule (tune.fixed) that best_params.yaml replaces by the sweep's own: a full training of the
# best configuration, not another 60-step trial checkpointing every 20 steps
SCHEDULE_KEYS = ("train.steps", "train.log_every", "train.sample_every", "train.checkpoint_every",
                 "metrics.eval_every", "metrics.eval_num_fake", "metrics.num_fake", "metrics.diversity_every")


def with_base_schedule(text: str, sweep: Any) -> tuple[str, dict[str, Any]]:
    """A trial's params.yaml with the schedule keys tune.fixed set put back to the sweep's values; (the text, what
    was put back)."""
    data = yaml.safe_load(text)
    if sweep is None:
        return text, {}
    base = sweep.flat()
    restored = {k: base[k] for k in flatten(sweep.tune.fixed) if k in SCHEDULE_KEYS and k in base}
    for k, v in restored.items():
        section, name = k.split(".", 1)
        data[section][name] = v
    Params.model_validate(data)  # still params `sqgan train --params` takes
    return yaml.safe_dump(data, sort_keys=False), restored


def best_trial(rows: list[dict[str, Any]], key: str, interim: str | None = None) -> dict[str, Any] | None:
    """The first row (rows are sorted best first) that has a value (`key`, the final evaluation, else `interim`)
    and is not collapsed, completed trials before stopped ones; only when every trial collapsed, the best collapsed
    one (its `collapsed` column says so, and best_params.yaml's header); None when no trial has a value."""
    valued = [r for r in rows if not math.isnan(rank_value(r, key, interim))]
    healthy = [r for r in valued if r["collapsed"] == "-"] or valued
    done = [r for r in healthy if r["status"] == "completed"]
    return done[0] if done else next(iter(healthy), None)


def _parse(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def _markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.5g}"
    return str(v)


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def axis_series(rows: list[dict[str, Any]], key: str, interim: str) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """metric_vs_axes.png's series, one panel row each: (metric name, what, rows) — the final evaluation of the
    trials that have one, then the last interim one of those stopped before it; never one series of both."""
    series = [(key, "final", [r for r in rows if not math.isnan(r[key])])]
    if interim != key:
        series.append((interim, "last interim, trials stopped before the end",
                       [r for r in rows if math.isnan(r[key]) and not math.isnan(r[interim])]))
    return [s for s in series if s[2]] or series[:1]


def _plots(client: Any, rows: list[dict[str, Any]], ptags: dict[str, str], axes: list[str], out: Path,
           logged: dict[str, set[str]], histories: Mapping[str, Mapping[str, list[tuple[int, float]]]] | None = None,
           ) -> None:
    """metric_vs_axes.png (a row of panels per evaluation: the final one, then the last interim one of the trials
    that have no final) and curves.png (the interim evaluations over steps and the final values, side by side):
    evaluations of different N never share an axis. A curve is read from MLflow (a query per trial and metric) only
    where the trial logged that metric and `histories` (run id → metric → sorted (step, value)) lacks it."""
    matplotlib.use("Agg")


    metric, key = ptags[TUNE_METRIC], ptags[TUNE_METRIC_KEY]
    interim = ptags.get(TUNE_INTERIM_KEY, key)
    series = axis_series(rows, key, interim)
    fig, axs = plt.subplots(len(series), len(axes), figsize=(4 * len(axes), 3.2 * len(series)), squeeze=False)
    for (name, what, subset), panel in zip(series, axs, strict=True):
        for ax, axis in zip(panel, axes, strict=True):
            pts = [(r[axis], r[name]) for r in subset if isinstance(r[axis], (int, float))]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker="o" if what == "final" else "x", label=f"{name} ({what})")
                ax.legend(fontsize=7)
            values = [r[axis] for r in rows if isinstance(r[axis], (int, float)) and r[axis] > 0]
            if axis == "fq.codebook_size" or (values and max(values) / min(values) >= 100):
                ax.set_xscale("log", base=2 if axis == "fq.codebook_size" else 10)
            ax.set_xlabel(axis)
            ax.set_ylabel(name, fontsize=7)
    fig.suptitle(f"{metric} per trial against each axis", fontsize=9)
    fig.tight_layout()
    with atomic_path(out / "metric_vs_axes.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

    ran = [r for r in rows if r["run_id"] != "-"]
    panels = [interim, key] if interim != key else [key]
    fig, axs = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, name in zip(axs[0], panels, strict=True):
        for r in ran:
            pts = _curve(client, r["run_id"], name, logged, histories)
            if pts:
                label = f"{r['trial']} " + " ".join(f"{a.split('.')[-1]}={_fmt(r[a])}" for a in axes)
                ax.plot(*zip(*pts, strict=True), marker="." if name == interim != key else "*", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title("interim evaluations" if name == interim != key else "final evaluation", fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(out / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _curve(client: Any, run_id: str, name: str, logged: dict[str, set[str]],
           histories: Mapping[str, Mapping[str, list[tuple[int, float]]]] | None) -> list[tuple[int, float]]:
    """Run `run_id`'s sorted (step, value) of metric `name`: none when it never logged it, else from `histories`
    when they hold it, else from MLflow."""
    if name not in logged.get(run_id, ()):
        return []
    known = (histories or {}).get(run_id, {}).get(name)
    if known is not None:
        return list(known)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))


def write_report(tracking_uri: str, parent_run_id: str, out: str | Path, log: bool = True,
                 partial: bool = False,
                 histories: Mapping[str, Mapping[str, list[tuple[int, float]]]] | None = None) -> list[dict[str, Any]]:
    """Render the sweep report into `out` (atomically, file by file) and, with `log`, onto the parent run. A
    `partial` report (an interrupted sweep) has no best_params.yaml: the best of the trials that ran is not the
    sweep's answer. `histories` (run id → metric → sorted (step, value)): curves already read, e.g. by
    `sqgan report`, which are not read again."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    client = mlflow_client(tracking_uri)
    rows, ptags, axes, logged = _trial_table(client, tracking_uri, parent_run_id)
    for name, text in (("trials.csv", _csv(rows)), ("trials.md", _markdown(rows))):
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(text)
    _plots(client, rows, ptags, axes, out, logged, histories)
    metric, key = ptags[TUNE_METRIC], ptags[TUNE_METRIC_KEY]
    interim = ptags.get(TUNE_INTERIM_KEY, key)
    best = None if partial else best_trial(rows, key, interim)
    best_file = out / "best_params.yaml"
    if best is not None:
        with tempfile.TemporaryDirectory(prefix="sqgan-best-") as d:
            text = Path(client.download_artifacts(best["run_id"], "params.yaml", d)).read_text()
        warn = (f"# WARNING: every trial was flagged as collapsed (this one at step {best['collapsed']}): the sweep "
                f"found no configuration that learned; look at the grids before training it\n"
                if best["collapsed"] != "-" else "")
        header = (f"{warn}# best trial {best['trial']} of sweep run {parent_run_id} "
                  f"({best['status']} at step {best['step']}): {metric} = {_fmt(rank_value(best, key, interim))} "
                  f"({key if not math.isnan(best[key]) else interim})\n"
                  f"# its values: {json.dumps({a: best[a] for a in axes})}\n"
                  f"# train it: sqgan train --params best_params.yaml (add --set train.steps=N for a longer run)\n")
        text, restored = with_base_schedule(text, _sweep_params(client, parent_run_id))
        if restored:
            header += ("# schedule: the sweep's own (" + ", ".join(f"{k} {v}" for k, v in restored.items()) +
                       "), not the trials' short one from tune.fixed\n")
        with atomic_path(best_file) as tmp:
            Path(tmp).write_text(header + text)
    elif best_file.exists():
        best_file.unlink()
    if log:
        for name in REPORT_FILES:
            if (out / name).exists():
                client.log_artifact(parent_run_id, str(out / name), "sweep")
        if best is not None:
            client.set_tag(parent_run_id, TUNE_BEST_TRIAL, best["trial"])
            client.set_tag(parent_run_id, TUNE_BEST_RUN_ID, best["run_id"])
            client.log_metric(parent_run_id, f"best_{metric}", float(rank_value(best, key, interim)))
    return rows
