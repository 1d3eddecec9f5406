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
import json
import math
from pathlib import Path
from typing import Any

from sqgan.metrics.collapse import COLLAPSE_TAG

REPORT_FILES = ("trials.csv", "trials.md", "metric_vs_axes.png", "curves.png", "best_params.yaml")


def _client(uri: str) -> Any:
    from sqgan.tracking import _client as client

    return client(uri)


def _children(client: Any, parent: Any) -> list[Any]:
    from sqgan.tracking import child_runs

    return child_runs(client, parent)


def _last_step(client: Any, run: Any) -> int:
    tag = run.data.tags.get("sqgan.stopped_at_step")
    if tag is not None:
        return int(tag)
    return max((m.step for m in client.get_metric_history(run.info.run_id, "loss/d")), default=0)


def settle_trials(tracking_uri: str, parent_run_id: str, grid: Any, params: Any) -> None:
    """After `Tuner.fit()`: give each nested run its final status — completed (FINISHED), stopped by the scheduler
    before train.steps (KILLED, its actor was ended mid-run) or error (FAILED) — and the step it stopped at."""
    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    import re

    errors: dict[str, str] = {}
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id")
        if not trial_id and result.path:  # a trial that never reported: its id is in its folder's name
            found = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(result.path).name)
            trial_id = found.group(1) if found else None
        if result.error is not None and trial_id:
            errors[trial_id] = f"{type(result.error).__name__}: {str(result.error).splitlines()[0][:200]}"
    steps, key = int(parent.data.tags["sqgan.tune.steps"]), parent.data.tags["sqgan.tune.metric_key"]
    for run in _children(client, parent):
        tags = run.data.tags
        trial_id = tags.get("sqgan.trial_id", "")
        step = _last_step(client, run)
        client.set_tag(run.info.run_id, "sqgan.stopped_at_step", str(step))
        if tags.get("sqgan.trial_status") == "completed" and run.info.status == "FINISHED":
            continue
        if step >= steps and key in run.data.metrics and trial_id not in errors:  # ended between report and tag
            client.set_tag(run.info.run_id, "sqgan.trial_status", "completed")
            client.set_terminated(run.info.run_id, status="FINISHED")
            continue
        if trial_id in errors:
            client.set_tag(run.info.run_id, "sqgan.trial_status", "error")
            client.set_tag(run.info.run_id, "sqgan.trial_error", errors[trial_id])
            client.set_terminated(run.info.run_id, status="FAILED")
        else:
            client.set_tag(run.info.run_id, "sqgan.trial_status", f"stopped by {params.tune.scheduler}")
            client.set_terminated(run.info.run_id, status="KILLED")


def trial_table(tracking_uri: str, parent_run_id: str) -> tuple[list[dict[str, Any]], dict[str, str], list[str]]:
    """(rows sorted best first, the parent's tags, the axes) from MLflow alone."""
    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    ptags = parent.data.tags
    if ptags.get("sqgan.stage") != "sweep":
        raise ValueError(f"run {parent_run_id} in {tracking_uri} is not a sweep's parent run (its sqgan.stage tag is "
                         f"{ptags.get('sqgan.stage')!r}); pass the run id `sqgan tune` printed")
    axes = json.loads(ptags["sqgan.tune.axes"])
    metric, key, mode = ptags["sqgan.tune.metric"], ptags["sqgan.tune.metric_key"], ptags["sqgan.tune.mode"]
    interim = ptags.get("sqgan.tune.interim_key", key)
    rows = []
    for run in _children(client, parent):
        m, p, tags = run.data.metrics, run.data.params, run.data.tags
        if key in m:
            value, source = m[key], "final"
        elif interim in m:
            value, source = m[interim], "interim"
        else:
            value, source = math.nan, "-"
        status = tags.get("sqgan.trial_status") or {"RUNNING": "running", "FINISHED": "completed"}.get(
            run.info.status, run.info.status.lower())
        # collapsed: the step the collapse watch first flagged G_ema, while its latest evaluation still does
        collapsed = tags.get(COLLAPSE_TAG, "-") if m.get("diversity/collapsed", 0.0) >= 1 else "-"
        row = {"trial": tags.get("sqgan.trial_id", ""), "status": status, "step": _last_step(client, run),
               metric: value, "from": source, "collapsed": collapsed}
        row.update({a: _parse(p.get(a)) for a in axes})
        row["run_id"] = run.info.run_id
        rows.append(row)
    sign = 1 if mode == "min" else -1
    # ranked on quality among the trials not flagged as collapsed; the collapsed ones follow, then those without a value
    rows.sort(key=lambda r: (math.isnan(r[metric]), r["collapsed"] != "-",
                             sign * r[metric] if not math.isnan(r[metric]) else 0, r["trial"]))
    return rows, ptags, axes


def best_trial(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The first row (rows are sorted best first) that has the metric and is not collapsed, completed trials before
    stopped ones; only when every trial collapsed, the best collapsed one (its `collapsed` column says so, and
    best_params.yaml's header); None when no trial has a value."""
    valued = [r for r in rows if not math.isnan(r[metric])]
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


def _plots(client: Any, rows: list[dict[str, Any]], ptags: dict[str, str], axes: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sqgan.io import atomic_path

    metric, key = ptags["sqgan.tune.metric"], ptags["sqgan.tune.metric_key"]
    interim = ptags.get("sqgan.tune.interim_key", key)
    fig, axs = plt.subplots(1, len(axes), figsize=(4 * len(axes), 3.4), squeeze=False)
    for ax, axis in zip(axs[0], axes, strict=True):
        for status, marker in (("completed", "o"), (None, "x")):
            pts = [(r[axis], r[metric]) for r in rows if (r["status"] == "completed") == (status == "completed")
                   and isinstance(r[axis], (int, float)) and not math.isnan(r[metric])]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, label="completed" if status else "stopped early")
        values = [r[axis] for r in rows if isinstance(r[axis], (int, float)) and r[axis] > 0]
        if axis == "fq.codebook_size" or (values and max(values) / min(values) >= 100):
            ax.set_xscale("log", base=2 if axis == "fq.codebook_size" else 10)
        ax.set_xlabel(axis)
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    fig.suptitle(f"{metric} ({key}) per trial against each axis", fontsize=9)
    fig.tight_layout()
    with atomic_path(out / "metric_vs_axes.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        names = list(dict.fromkeys([interim, key]))  # interim (eval_num_fake images), then final
        pts = sorted((m.step, m.value) for n in names for m in client.get_metric_history(r["run_id"], n))
        if pts:
            label = f"{r['trial']} " + " ".join(f"{a.split('.')[-1]}={_fmt(r[a])}" for a in axes)
            ax.plot(*zip(*pts, strict=True), marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{metric} (interim, then final)" if metric in ("kid", "fid") else metric)
    ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(out / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(tracking_uri: str, parent_run_id: str, out: str | Path, log: bool = True) -> list[dict[str, Any]]:
    """Render the sweep report into `out` (atomically, file by file) and, with `log`, onto the parent run."""
    import yaml

    from sqgan.io import atomic_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    client = _client(tracking_uri)
    rows, ptags, axes = trial_table(tracking_uri, parent_run_id)
    for name, text in (("trials.csv", _csv(rows)), ("trials.md", _markdown(rows))):
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(text)
    _plots(client, rows, ptags, axes, out)
    metric = ptags["sqgan.tune.metric"]
    best = best_trial(rows, metric)
    best_file = out / "best_params.yaml"
    if best is not None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="sqgan-best-") as d:
            text = Path(client.download_artifacts(best["run_id"], "params.yaml", d)).read_text()
        warn = (f"# WARNING: every trial was flagged as collapsed (this one at step {best['collapsed']}): the sweep "
                f"found no configuration that learned; look at the grids before training it\n"
                if best["collapsed"] != "-" else "")
        header = (f"{warn}# best trial {best['trial']} of sweep run {parent_run_id} "
                  f"({best['status']} at step {best['step']}): {metric} = {_fmt(best[metric])} ({best['from']})\n"
                  f"# its values: {json.dumps({a: best[a] for a in axes})}\n"
                  f"# train it: sqgan train --params best_params.yaml (add --set train.steps=N for a longer run)\n")
        yaml.safe_load(text)  # what MLflow holds must still be params
        with atomic_path(best_file) as tmp:
            Path(tmp).write_text(header + text)
    elif best_file.exists():
        best_file.unlink()
    if log:
        for name in REPORT_FILES:
            if (out / name).exists():
                client.log_artifact(parent_run_id, str(out / name), "sweep")
        if best is not None:
            client.set_tag(parent_run_id, "sqgan.tune.best_trial", best["trial"])
            client.set_tag(parent_run_id, "sqgan.tune.best_run_id", best["run_id"])
            client.log_metric(parent_run_id, f"best_{metric}", float(best[metric]))
    return rows
