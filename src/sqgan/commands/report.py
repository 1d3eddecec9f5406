"""`sqgan report`: an experiment's runs rendered from MLflow alone, as `report.html` + `report.md` with PNG plots beside
them, or as a paper-style table (markdown + LaTeX) of one metric grouped by two params.

The report (`render_report`):
- the runs table: id, name, status, the params that differ between the runs (the constant ones listed once) and
  the final value of every quality metric (`sqgan.metrics.names`; a `_mean`/`_std` pair is one `mean ± std` cell)
  and of the codebook-usage and similarity diagnostics;
- `quality_curves.png`: every quality metric logged at more than one step, one series per run and name (an
  interim evaluation on fewer images has another name than the final one, so it is its own series);
- `grids.png` and `grids/<run id>.png`: each run's `samples/grid.png` side by side;
- `codebook_usage.png`: SQ and per-layer FQ utilisation and perplexity, D's feature / CLIP similarity, over steps;
- for each sweep parent run (tag sqgan.stage = sweep) among them: its trial table and the metric against each axis
  (`sqgan.shells.tune_report`, the sweep's own report) under `sweeps/<parent id>/`.

Which runs: with `--runs`, those (a sweep's parent brings its nested trials); else every run of the experiment but
sweep parents (each becomes a sweep section), codebook-prior runs, earlier reports, and a Kubeflow pipeline's parent
and data-stage runs.

Where it is logged back: reporting exactly one sweep (its parent, or an experiment holding only that sweep), the
folder goes onto the sweep's parent run under `report/`; otherwise onto a new run tagged sqgan.stage = report in
the experiment (never a training run, whose artifacts stay its own), which later reports leave out.

The table (`paper_table`): for each (ROWS value, COLS value) of params or tags, mean ± sample std (n − 1) over its
runs (seeds) of each run's best value of the metric over its logged steps — the minimum, or the maximum for
precision, recall, IS, LPIPS diversity and the NN-mode count (higher is better there), codebook utilisation and
perplexity.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import html
import io
import json
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import mlflow.artifacts
from mlflow.exceptions import MlflowException
from PIL import Image
from tqdm import tqdm

from sqgan.io import MARKER, atomic_path, check_output, stage_output
from sqgan.metrics.names import QUALITY_METRICS, MetricKey, parse_metric_key
from sqgan.shells.tracking import child_runs, git_sha, open_existing, search_all
from sqgan.shells.tune_report import write_report
from sqgan.tags import COLLAPSE_STEP, GIT_SHA, PARENT_RUN_ID, REPORT_OF, REPORT_RUNS, RUN_NAME, STAGE

REPORT_STAGE = "report"  # the marker of a report folder (sqgan.io.stage_output)
TABLE_STAGE = "report-table"
PLOTS = ("quality_curves.png", "grids.png", "codebook_usage.png")  # always written: DVC declares them as plots
GRID_ARTIFACT = "samples/grid.png"
# Not runs of the table: sweep parents get a section of their own; a Kubeflow pipeline's parent run and its
# data-stage task runs hold no training.
LEFT_OUT_STAGES = ("sweep", "report", "prior", "pipeline", "data")
USAGE = re.compile(r"^(sq/(utilisation|perplexity)|fq/layer\d+/(utilisation|perplexity)|d/feature_similarity"
                   r"|g/clip_similarity)$")
HIGHER_IS_BETTER = ("precision", "recall", "is", "lpips", "nnmodes")  # lpips here is the diversity of generated pairs
# Names logged before sqgan.metrics.names (`fid_randcnn`, `interim/kid_randcnn_mean`): still read from old runs.
LEGACY = re.compile(r"^(?:interim/)?(fid|kid)_([a-z][a-z0-9-]*)(?:_(mean|std))?$")
TAG_LIMIT = 5000  # characters of a tag value we write (MLflow caps them)


class ReportError(ValueError):
    """A report input that does not fit (experiment, run id, metric, key), with the fix in the message."""


# ---------------------------------------------------------------------------------------------------------------
# metric names


def quality_key(key: str) -> MetricKey | None:
    """The parts of a quality metric's name (sqgan.metrics.names), also of the names older runs logged."""
    parsed = parse_metric_key(key)
    if parsed is not None:
        return parsed
    m = LEGACY.match(key)
    return MetricKey(m[1], "?", None, m[2], m[3]) if m else None


def best_mode(key: str) -> str:
    """'max' where higher is better (precision, recall, IS, LPIPS diversity, codebook usage), else 'min'."""
    q = quality_key(key)
    if q is not None:
        return "max" if q.metric in HIGHER_IS_BETTER else "min"
    return "max" if key.endswith(("/utilisation", "/perplexity")) else "min"


def _images(n: str) -> int:
    """'500' → 500, '50k' → 50000, '?' (an old name) → 0."""
    if n.endswith("k"):
        return int(n[:-1]) * 1000
    return int(n) if n.isdigit() else 0


def _quality_order(key: str) -> tuple[Any, ...]:
    q = quality_key(key)
    assert q is not None
    return (QUALITY_METRICS.index(q.metric), key.startswith("interim/"), -_images(q.n), q.net, q.split or "", key)


def _base(key: str) -> str:
    """A quality metric's name without its _mean/_std suffix (one column, one curve)."""
    q = quality_key(key)
    return key.removesuffix(f"_{q.stat}") if q is not None and q.stat else key


# ---------------------------------------------------------------------------------------------------------------
# which runs


@dataclass
class Selection:
    tracking_uri: str
    experiment_id: str
    experiment: str
    runs: list[Any]  # mlflow Run objects, oldest first
    sweeps: list[Any] = field(default_factory=list)  # sweep parent runs

    def one_sweep(self) -> str | None:
        """The parent run id when the selection is exactly one sweep (its trials, nothing else)."""
        if len(self.sweeps) != 1:
            return None
        pid = self.sweeps[0].info.run_id
        return pid if all(r.data.tags.get(PARENT_RUN_ID) == pid for r in self.runs) else None


def _stage(run: Any) -> str | None:
    return run.data.tags.get(STAGE)


def label(run: Any) -> str:
    return run.data.tags.get(RUN_NAME) or run.info.run_id[:8]


def open_tracking(tracking_uri: str) -> Any:
    """An MlflowClient for `tracking_uri`, after checking it answers (a report never creates a database)."""
    try:
        return open_existing(tracking_uri, "train first (`make demo`) or pass the --tracking-uri your runs were "
                                           "logged to")
    except FileNotFoundError as e:
        raise ReportError(str(e)) from None


def split_ids(run_ids: Iterable[str] | None) -> list[str]:
    """`--runs a --runs b,c` → [a, b, c]."""
    return [i for item in run_ids or () for i in re.split(r"[,\s]+", item.strip()) if i]


def select_runs(tracking_uri: str, experiment: str | None = None, run_ids: Iterable[str] | None = None,
                default_experiment: str = "sqgan", client: Any = None) -> Selection:
    """The runs to report: `run_ids` (a sweep parent brings its trials), else the experiment's runs (by name;
    `default_experiment` when none is given) but sweep parents, codebook priors and reports."""
    client = client or open_tracking(tracking_uri)
    ids = split_ids(run_ids)
    if ids:
        given = []
        for rid in ids:
            try:
                given.append(client.get_run(rid))
            except MlflowException:
                raise ReportError(f"--runs {rid}: no such run in {tracking_uri}; copy the run id from the MLflow UI "
                                  f"(`make ui`) or `sqgan summary`, or pass the --tracking-uri it was logged to"
                                  ) from None
        exp_ids = sorted({r.info.experiment_id for r in given})
        names = {e: client.get_experiment(e).name for e in exp_ids}
        if len(exp_ids) > 1:
            raise ReportError(f"--runs: the runs belong to {len(exp_ids)} experiments "
                              f"({', '.join(repr(n) for n in names.values())}); report one experiment at a time")
        exp_id = exp_ids[0]
        if experiment is not None and experiment != names[exp_id]:
            raise ReportError(f"--runs {given[0].info.run_id} belongs to experiment {names[exp_id]!r}, not "
                              f"--experiment {experiment!r}; drop --experiment or pass runs of {experiment!r}")
        runs, sweeps = [], []
        for r in given:
            if _stage(r) == "sweep":
                sweeps.append(r)
                trials = child_runs(client, r)
                if not trials:
                    raise ReportError(f"--runs {r.info.run_id} is a sweep's parent run without trials; run the sweep "
                                      f"(`sqgan tune`) or pass the runs you want")
                runs.extend(trials)
            else:
                runs.append(r)
        seen: set[str] = set()
        runs = [r for r in runs if not (r.info.run_id in seen or seen.add(r.info.run_id))]
        return Selection(tracking_uri, exp_id, names[exp_id], runs, sweeps)

    name = experiment or default_experiment
    exp = client.get_experiment_by_name(name)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"--experiment {name!r}: no such experiment in {tracking_uri} (it has: "
                          f"{', '.join(repr(k) for k in known) or 'none'}); pass one of them, or the --tracking-uri "
                          f"your runs were logged to")
    every = search_all(client, exp.experiment_id)
    runs = [r for r in every if _stage(r) not in LEFT_OUT_STAGES]
    if not runs:
        raise ReportError(f"--experiment {name!r} in {tracking_uri} has no runs to report"
                          f"{' (only sweep parents, priors or reports)' if every else ''}; train first "
                          f"(`make demo`, `sqgan train`, `sqgan tune`) or pass another --experiment")
    sweeps = [r for r in every if _stage(r) == "sweep"]
    return Selection(tracking_uri, exp.experiment_id, name, runs, sweeps)


# ---------------------------------------------------------------------------------------------------------------
# the runs table


@dataclass
class RunsTable:
    params: list[str]  # keys whose values differ between the runs
    constant: dict[str, str]  # key → the value every run has
    metrics: list[str]  # column names: quality bases (mean ± std in one cell), then usage keys
    rows: list[dict[str, str]]  # run_id, name, status, each param, each metric column (formatted)


def _short(value: str, limit: int = 60) -> str:
    """A param value as a table cell shows it (a long one, e.g. a search space, cut; MLflow holds it whole)."""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _num(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.4g}"


def runs_table(runs: list[Any]) -> RunsTable:
    keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    constant = {k: runs[0].data.params[k] for k in keys if k not in differing}
    logged = {k for r in runs for k in r.data.metrics}
    quality = sorted({_base(k) for k in logged if quality_key(k)}, key=_quality_order)
    usage = sorted(k for k in logged if USAGE.match(k))
    rows = []
    for r in runs:
        m = r.data.metrics
        row = {"run_id": r.info.run_id, "name": label(r), "status": r.info.status}
        row.update({k: _short(r.data.params.get(k, "–")) for k in differing})
        for base in quality:
            if base in m:
                row[base] = _num(m[base])
            elif f"{base}_mean" in m:
                std = m.get(f"{base}_std")
                row[base] = _num(m[f"{base}_mean"]) + ("" if std is None else f" ± {std:.2g}")
            else:
                row[base] = "–"
        row.update({k: _num(m[k]) if k in m else "–" for k in usage})
        rows.append(row)
    return RunsTable(differing, constant, quality + usage, rows)


# ---------------------------------------------------------------------------------------------------------------
# plots


def _pyplot() -> Any:
    matplotlib.use("Agg")

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _pyplot().close(fig)


def _placeholder(path: Path, text: str) -> None:
    """A small PNG that says why a plot is empty (DVC expects every declared plot)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, wrap=True)
    _save(fig, path)


def histories(client: Any, runs: list[Any], progress: bool = True) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """run id → metric → sorted (step, value), for every quality and usage metric the run logged that a plot draws
    (not a `_std`: one MLflow query per run and name, so none is read for nothing)."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in tqdm(runs, desc="metric histories", unit="run", disable=not progress, leave=False):
        keys = [k for k in r.data.metrics if ((q := quality_key(k)) and q.stat != "std") or USAGE.match(k)]
        out[r.info.run_id] = {k: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k))
                              for k in keys}
    return out


def _legend(ax: Any, n: int) -> None:
    if n:  # beside the axes, so it never hides a curve
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if n <= 24 else 2)


def _styles(runs: list[Any]) -> dict[str, Any]:
    """One colour per run (the names of one run share it; each name gets its own line style)."""
    cmap = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20" if len(runs) <= 20 else "viridis"]
    n = max(len(runs) - 1, 1)
    return {r.info.run_id: cmap(i if len(runs) <= 20 else i / n) for i, r in enumerate(runs)}


LINESTYLES = ("-", "--", ":", "-.")


def plot_quality_curves(runs: list[Any], hist: dict[str, Any], path: Path) -> list[str]:
    """One panel per quality metric (fid, kid, …), a series per run and name logged at more than one step, and a
    dotted vertical line at the step a run was flagged as collapsed (tag sqgan.collapse_step); returns the names
    plotted."""
    curves = sorted({k for h in hist.values() for k, pts in h.items()
                     if quality_key(k) and quality_key(k).stat != "std" and len(pts) > 1}, key=_quality_order)
    if not curves:
        _placeholder(path, "no quality metric was logged at more than one step")
        return []
    families = list(dict.fromkeys(quality_key(k).metric for k in curves))
    plt = _pyplot()
    colour = _styles(runs)
    fig, axs = plt.subplots(len(families), 1, figsize=(10, 3.2 * len(families)), squeeze=False)
    for ax, family in zip(axs[:, 0], families, strict=True):
        n, names = 0, [k for k in curves if quality_key(k).metric == family]
        for r in runs:
            for i, k in enumerate(names):
                pts = hist[r.info.run_id].get(k, [])
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=".", color=colour[r.info.run_id],
                            linestyle=LINESTYLES[i % len(LINESTYLES)], label=f"{label(r)}: {k}")
                    n += 1
            collapsed = r.data.tags.get(COLLAPSE_STEP)
            if collapsed is not None:  # the step the collapse watch first flagged this run's G_ema
                ax.axvline(int(collapsed), color=colour[r.info.run_id], linestyle=":", linewidth=1.5,
                           label=f"{label(r)}: collapsed at step {collapsed}")
                n += 1
        ax.set_xlabel("step")
        ax.set_ylabel(family)
        _legend(ax, n)
    fig.suptitle("quality over training (each name its own series: N differs between interim and final)",
                 fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return curves


def plot_usage_curves(runs: list[Any], hist: dict[str, Any], path: Path) -> list[str]:
    """Utilisation, perplexity and similarity panels, a series per run and name; returns the names plotted."""
    names = sorted({k for h in hist.values() for k in h if USAGE.match(k)})
    panels = [p for p in ("utilisation", "perplexity", "similarity") if any(k.endswith(p) for k in names)]
    if not panels:
        _placeholder(path, "no codebook usage (sq/*, fq/layer*/*) or similarity metric was logged")
        return []
    plt = _pyplot()
    colour = _styles(runs)
    fig, axs = plt.subplots(len(panels), 1, figsize=(10, 3 * len(panels)), squeeze=False)
    for ax, panel in zip(axs[:, 0], panels, strict=True):
        n = 0
        for r in runs:
            for k in names:
                pts = hist[r.info.run_id].get(k, [])
                if k.endswith(panel) and pts:
                    ax.plot(*zip(*pts, strict=True), color=colour[r.info.run_id],
                            linestyle=LINESTYLES[names.index(k) % len(LINESTYLES)], label=f"{label(r)}: {k}")
                    n += 1
        ax.set_xlabel("step")
        ax.set_ylabel(panel)
        _legend(ax, n)
    fig.tight_layout()
    _save(fig, path)
    return names


@contextlib.contextmanager
def quiet_downloads() -> Iterator[None]:
    """MLflow draws a progress bar per downloaded artifact; the report shows one bar over all runs instead."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def fetch_grids(client: Any, runs: list[Any], folder: Path, progress: bool = True) -> dict[str, str]:
    """Each run's samples/grid.png as `folder/<run id>.png`; returns run id → path relative to folder's parent.
    Read from the run's artifact URI, which the run in hand names: `client.download_artifacts(run_id, …)` would
    look the run up again for each grid (6× the time of the download itself on a local store)."""
    folder.mkdir(parents=True, exist_ok=True)
    got = {}
    with tempfile.TemporaryDirectory(prefix="sqgan-grids-") as d:
        for r in tqdm(runs, desc="sample grids", unit="run", disable=not progress, leave=False):
            try:
                src = mlflow.artifacts.download_artifacts(artifact_uri=f"{r.info.artifact_uri}/{GRID_ARTIFACT}",
                                                          dst_path=d, tracking_uri=client.tracking_uri)
            except (MlflowException, OSError):
                continue  # a run that logged no grid (failed early, or not a training)
            shutil.copyfile(src, folder / f"{r.info.run_id}.png")
            got[r.info.run_id] = f"{folder.name}/{r.info.run_id}.png"
    return got


def plot_grids(runs: list[Any], grids: dict[str, str], root: Path, path: Path) -> None:
    """The runs' grids side by side in one PNG (titled by run name)."""
    shown = [r for r in runs if r.info.run_id in grids]
    if not shown:
        _placeholder(path, f"no run logged {GRID_ARTIFACT}")
        return
    plt = _pyplot()
    cols = min(len(shown), 6)
    rows = math.ceil(len(shown) / cols)
    fig, axs = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axs.flat:
        ax.axis("off")
    for ax, r in zip(axs.flat, shown, strict=False):
        with Image.open(root / grids[r.info.run_id]) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_title(f"{label(r)}\n{r.info.run_id[:8]}", fontsize=7)
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# rendering


def _md_table(cols: list[str], rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _html_table(cols: list[str], rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;
vertical-align:top;max-width:24em;overflow-wrap:anywhere}
th{background:#f3f3f3}.scroll{overflow-x:auto}.grids{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0}figcaption{font-size:11px;max-width:220px;word-break:break-all}img.plot{max-width:100%}
.grids img{width:200px;image-rendering:pixelated}.note{color:#666;font-size:12px}"""


@dataclass
class SweepSection:
    run_id: str
    name: str
    folder: str  # relative to the report
    rows: list[dict[str, Any]]
    error: str | None = None


@dataclass
class ReportResult:
    out: Path
    experiment: str
    runs: list[str]  # run ids in the table
    sweeps: list[str]  # sweep parent run ids with a section
    images: list[str]  # every PNG, relative to out
    logged_to: str | None = None  # the run the folder was logged onto


def _sweep_section(sel: Selection, parent: Any, out: Path, hist: dict[str, Any] | None = None) -> SweepSection:
    """The sweep's own report (sqgan.shells.tune_report: trial table, metric against each axis, curves, best params)
    under sweeps/<parent id>/; its curves come from `hist` (the report's histories) where it holds them."""
    folder = f"sweeps/{parent.info.run_id}"
    try:
        rows = write_report(sel.tracking_uri, parent.info.run_id, out / folder, log=False, histories=hist)
        return SweepSection(parent.info.run_id, label(parent), folder, rows)
    except Exception as e:  # noqa: BLE001 - one broken sweep must not hide the rest of the report; it is shown
        return SweepSection(parent.info.run_id, label(parent), folder, [], f"{type(e).__name__}: {e}")


def _render(sel: Selection, client: Any, out: Path, progress: bool) -> list[str]:
    """Write report.html, report.md and the PNGs into `out`; returns the PNGs relative to `out`."""
    table = runs_table(sel.runs)
    hist = histories(client, sel.runs, progress)
    curves = plot_quality_curves(sel.runs, hist, out / "quality_curves.png")
    usage = plot_usage_curves(sel.runs, hist, out / "codebook_usage.png")
    with quiet_downloads():
        grids = fetch_grids(client, sel.runs, out / "grids", progress)
        sweeps = [_sweep_section(sel, p, out, hist) for p in sel.sweeps]
    plot_grids(sel.runs, grids, out, out / "grids.png")

    cols = ["run_id", "name", "status", *table.params, *table.metrics]
    when = time.strftime("%Y-%m-%d %H:%M:%S %z")
    title = f"sqgan report: experiment {sel.experiment}"
    intro = (f"{len(sel.runs)} runs of experiment {sel.experiment!r} (id {sel.experiment_id}) in {sel.tracking_uri}, "
             f"read {when}. Metrics are each run's last logged value.")
    constant = [{"param": k, "value": v} for k, v in table.constant.items()]
    sweep_plots = [f"{s.folder}/{n}" for s in sweeps if s.error is None for n in ("metric_vs_axes.png", "curves.png")]
    images = [*PLOTS, *grids.values(), *sweep_plots]

    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>",
         "<h2>Runs</h2>", _html_table(cols, table.rows),
         f"<details><summary>params every run shares ({len(constant)})</summary>"
         f"{_html_table(['param', 'value'], constant)}</details>",
         "<h2>Quality over training</h2>",
         f"<p class='note'>{html.escape(', '.join(curves) or 'no quality metric logged at more than one step')}</p>",
         "<img class='plot' src='quality_curves.png' alt='quality curves'>",
         "<h2>Sample grids</h2><div class='grids'>"]
    for r in sel.runs:
        rid = r.info.run_id
        if rid in grids:
            h.append(f"<figure><img src='{html.escape(grids[rid])}' alt='grid of {rid}'>"
                     f"<figcaption>{html.escape(label(r))}<br>{rid}</figcaption></figure>")
    h.append("</div>")
    missing = [label(r) for r in sel.runs if r.info.run_id not in grids]
    if missing:
        h.append(f"<p class='note'>no {GRID_ARTIFACT}: {html.escape(', '.join(missing))}</p>")
    h += ["<h2>Codebook usage</h2>",
          f"<p class='note'>{html.escape(', '.join(usage) or 'no codebook usage logged')}</p>",
          "<img class='plot' src='codebook_usage.png' alt='codebook usage'>"]

    m = [f"# {title}\n", intro + "\n", "## Runs\n", _md_table(cols, table.rows),
         f"\nParams every run shares ({len(constant)}): "
         + ", ".join(f"`{k}={v}`" for k, v in table.constant.items()) + "\n",
         "## Plots\n", "![quality over training](quality_curves.png)\n",
         "![sample grids side by side](grids.png)\n", "![codebook usage](codebook_usage.png)\n"]
    for r in sel.runs:
        if r.info.run_id in grids:
            m.append(f"![grid of {label(r)} ({r.info.run_id})]({grids[r.info.run_id]})\n")

    for s in sweeps:
        heading = f"Sweep {s.name} ({s.run_id})"
        h.append(f"<h2>{html.escape(heading)}</h2>")
        m.append(f"## {heading}\n")
        if s.error is not None:
            h.append(f"<p class='note'>its report failed: {html.escape(s.error)}</p>")
            m.append(f"Its report failed: {s.error}\n")
            continue
        h += [_html_table(list(s.rows[0]) if s.rows else [], s.rows),
              f"<p class='note'>trials.csv, best_params.yaml: {html.escape(s.folder)}/</p>",
              f"<img class='plot' src='{s.folder}/metric_vs_axes.png' alt='metric against each axis'>",
              f"<img class='plot' src='{s.folder}/curves.png' alt='trial curves'>"]
        m += [(out / s.folder / "trials.md").read_text(),
              f"\n![metric against each axis]({s.folder}/metric_vs_axes.png)\n",
              f"![trial curves]({s.folder}/curves.png)\n"]
    h.append("</body></html>\n")
    (out / "report.html").write_text("\n".join(h))
    (out / "report.md").write_text("\n".join(m))
    return images


def log_folder(client: Any, sel: Selection, folder: Path, artifact_path: str) -> str:
    """Log `folder` (its marker aside) onto the sweep's parent when `sel` is one sweep, else onto a new run tagged
    sqgan.stage = report in the experiment; returns that run's id."""
    target, new = sel.one_sweep(), False
    if target is None:
        ids = ",".join(r.info.run_id for r in sel.runs)
        tags = {STAGE: REPORT_STAGE, REPORT_OF: artifact_path, GIT_SHA: git_sha(),
                REPORT_RUNS: ids if len(ids) <= TAG_LIMIT else ids[: TAG_LIMIT - 1] + "…"}
        run = client.create_run(sel.experiment_id, run_name=f"{artifact_path}-{time.strftime('%Y%m%d-%H%M%S')}",
                                tags=tags)
        target, new = run.info.run_id, True
    try:
        for p in sorted(folder.iterdir()):
            if p.name == MARKER:
                continue
            if p.is_dir():
                client.log_artifacts(target, str(p), f"{artifact_path}/{p.name}")
            else:
                client.log_artifact(target, str(p), artifact_path)
    except BaseException:
        if new:
            client.set_terminated(target, status="FAILED")
        raise
    if new:
        client.set_terminated(target, status="FINISHED")
    return target


def render_report(tracking_uri: str, out: str | Path, experiment: str | None = None,
                  run_ids: Iterable[str] | None = None, default_experiment: str = "sqgan", force: bool = False,
                  log: bool = True, progress: bool = True) -> ReportResult:
    """Render the report into `out` (a temp folder renamed when complete; an existing `out` is replaced only when
    it is an earlier report, or with `force`) and, with `log`, log the folder back to MLflow."""
    check_output(out, REPORT_STAGE, (), force)  # before reading MLflow: a refused folder costs nothing
    client = open_tracking(tracking_uri)
    sel = select_runs(tracking_uri, experiment, run_ids, default_experiment, client)
    with stage_output(out, REPORT_STAGE, (), force) as tmp:
        images = _render(sel, client, tmp, progress)
    result = ReportResult(Path(out), sel.experiment, [r.info.run_id for r in sel.runs],
                          [s.info.run_id for s in sel.sweeps], images)
    if log:
        result.logged_to = log_folder(client, sel, Path(out), REPORT_STAGE)
    return result


# ---------------------------------------------------------------------------------------------------------------
# the paper table


@dataclass
class Cell:
    best: list[float]  # each run's best value over its logged steps
    run_ids: list[str]

    @property
    def n(self) -> int:
        return len(self.best)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.best)

    @property
    def std(self) -> float:
        """Sample standard deviation over the runs (n − 1); nan for one run."""
        return statistics.stdev(self.best) if self.n > 1 else math.nan


@dataclass
class PaperTable:
    metric: str
    mode: str  # min | max: which of a run's logged values is its best, and which cell of a row is bold
    rows_key: str
    cols_key: str
    row_values: list[str]
    col_values: list[str]
    cells: dict[tuple[str, str], Cell]
    left_out: list[str] = field(default_factory=list)  # runs without the metric

    def best_in_row(self, row: str) -> set[str]:
        means = {c: self.cells[(row, c)].mean for c in self.col_values if (row, c) in self.cells}
        if not means:
            return set()
        best = (min if self.mode == "min" else max)(means.values())
        return {c for c, v in means.items() if v == best}

    def _decimals(self) -> int:
        """3 significant digits of the largest mean (at least 1 decimal, at most 6)."""
        top = max((abs(c.mean) for c in self.cells.values()), default=0.0)
        return 2 if top == 0 else min(6, max(1, 2 - math.floor(math.log10(top))))

    def _same_n(self) -> bool:
        return len({c.n for c in self.cells.values()}) <= 1

    def cell_text(self, row: str, col: str, latex: bool = False) -> str:
        cell = self.cells.get((row, col))
        if cell is None:
            return "–" if not latex else "--"
        d = self._decimals()
        pm = r" \pm " if latex else " ± "
        text = f"{cell.mean:.{d}f}" + ("" if math.isnan(cell.std) else f"{pm}{cell.std:.{d}f}")
        if not self._same_n():
            text += f" (n={cell.n})" if not latex else rf"\,(n{{=}}{cell.n})"
        return text

    def caption(self) -> str:
        ns = sorted({c.n for c in self.cells.values()})
        n = f"n = {ns[0]} runs per cell" if len(ns) == 1 else "n runs per cell as shown"
        return (f"{self.metric}: each run's {'minimum' if self.mode == 'min' else 'maximum'} over its logged steps; "
                f"mean ± sample std (n − 1) over the runs of a cell ({n}); the best cell of each row in bold")

    def markdown(self) -> str:
        corner = f"{self.rows_key} \\ {self.cols_key}"
        lines = [f"{self.caption()}\n", "| " + " | ".join([corner, *self.col_values]) + " |",
                 "|" + "|".join("---" for _ in range(len(self.col_values) + 1)) + "|"]
        for r in self.row_values:
            bold = self.best_in_row(r)
            cells = [f"**{self.cell_text(r, c)}**" if c in bold else self.cell_text(r, c) for c in self.col_values]
            lines.append("| " + " | ".join([r, *cells]) + " |")
        if self.left_out:
            lines.append(f"\nLeft out (no {self.metric}): {', '.join(self.left_out)}")
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        k = len(self.col_values)
        lines = [f"% {self.caption()}", "% needs \\usepackage{booktabs}",
                 f"\\begin{{tabular}}{{l{'c' * k}}}", r"\toprule",
                 f"{_tex(self.rows_key)} & \\multicolumn{{{k}}}{{c}}{{{_tex(self.cols_key)}}} \\\\",
                 f"\\cmidrule(lr){{2-{k + 1}}}",
                 " & " + " & ".join(_tex(c) for c in self.col_values) + r" \\", r"\midrule"]
        for r in self.row_values:
            bold = self.best_in_row(r)
            cells = []
            for c in self.col_values:
                t = self.cell_text(r, c, latex=True)
                cells.append(t if (r, c) not in self.cells else
                             f"$\\mathbf{{{t}}}$" if c in bold else f"${t}$")
            lines.append(_tex(r) + " & " + " & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([self.rows_key, self.cols_key, "n", "mean", "std", "best_values", "run_ids"])
        for (r, c), cell in sorted(self.cells.items()):
            w.writerow([r, c, cell.n, repr(cell.mean), repr(cell.std), json.dumps(cell.best),
                        " ".join(cell.run_ids)])
        return buf.getvalue()


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    """`text` as LaTeX prints it (the special characters escaped)."""
    return "".join(_TEX.get(ch, ch) for ch in text)


def _group_value(run: Any, key: str) -> str | None:
    if key in run.data.params:
        return run.data.params[key]
    return run.data.tags.get(key)


def _natural(values: Iterable[str]) -> list[str]:
    """Numbers in numeric order, then the rest alphabetically."""
    def key(v: str) -> tuple[int, float, str]:
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)

    return sorted(values, key=key)


def default_metric(runs: list[Any]) -> str:
    """The FID every run logged: the Inception one before a random-feature one, then the most images."""
    fids = [{k for k in r.data.metrics if (q := quality_key(k)) and q.metric == "fid"} for r in runs]
    shared = set.intersection(*fids) if fids else set()
    if not shared:
        each = "; ".join(f"{label(r)}: {', '.join(sorted(f)) or 'no FID'}"
                         for r, f in zip(runs[:6], fids[:6], strict=True))
        raise ReportError(f"the {len(runs)} runs share no FID metric ({each}{'; …' if len(runs) > 6 else ''}); "
                          f"pass --metric NAME that they all logged, or choose runs that share one with --runs")
    return max(shared, key=lambda k: (quality_key(k).net.startswith("inception"), _images(quality_key(k).n), k))


def paper_table(tracking_uri: str, rows_key: str, cols_key: str, metric: str | None = None, mode: str | None = None,
                experiment: str | None = None, run_ids: Iterable[str] | None = None,
                default_experiment: str = "sqgan", progress: bool = True, client: Any = None,
                sel: Selection | None = None) -> PaperTable:
    """Mean ± sample std over the runs of each (rows_key, cols_key) group of each run's best `metric`."""
    client = client or open_tracking(tracking_uri)
    sel = sel or select_runs(tracking_uri, experiment, run_ids, default_experiment, client)
    runs = sel.runs
    for which, key in (("ROWS", rows_key), ("COLS", cols_key)):
        if all(_group_value(r, key) is None for r in runs):
            known = sorted({k for r in runs for k in (*r.data.params, *r.data.tags)})
            near = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            raise ReportError(f"--table {which} {key!r} is neither a param nor a tag of any of the {len(runs)} runs "
                              f"of experiment {sel.experiment!r}"
                              + (f"; did you mean {', '.join(repr(n) for n in near)}?" if near else
                                 f"; pass one they have, e.g. {', '.join(known[:8])}"))
    if metric is None:
        metric = default_metric(runs)
    with_metric = [r for r in runs if metric in r.data.metrics]
    if not with_metric:
        logged = sorted({k for r in runs for k in r.data.metrics if quality_key(k) or USAGE.match(k)})
        raise ReportError(f"--metric {metric!r}: none of the {len(runs)} runs of experiment {sel.experiment!r} "
                          f"logged it (they have: {', '.join(logged) or 'no quality metric'}); pass one of those")
    if mode is None:
        mode = best_mode(metric)
    if mode not in ("min", "max"):
        raise ReportError(f"--mode {mode!r}: choose min or max")
    pick = min if mode == "min" else max
    cells: dict[tuple[str, str], Cell] = {}
    for r in tqdm(with_metric, desc=f"best {metric}", unit="run", disable=not progress, leave=False):
        values = [m.value for m in client.get_metric_history(r.info.run_id, metric) if math.isfinite(m.value)]
        if not values:
            continue
        group = (_group_value(r, rows_key) or "–", _group_value(r, cols_key) or "–")
        cell = cells.setdefault(group, Cell([], []))
        cell.best.append(pick(values))
        cell.run_ids.append(r.info.run_id)
    left_out = [r.info.run_id for r in runs if r.info.run_id not in {i for c in cells.values() for i in c.run_ids}]
    return PaperTable(metric, mode, rows_key, cols_key, _natural({g[0] for g in cells}),
                      _natural({g[1] for g in cells}), cells, left_out)


@dataclass
class TableResult:
    out: Path
    table: PaperTable
    logged_to: str | None = None


def write_table(tracking_uri: str, out: str | Path, rows_key: str, cols_key: str, metric: str | None = None,
                mode: str | None = None, experiment: str | None = None, run_ids: Iterable[str] | None = None,
                default_experiment: str = "sqgan", force: bool = False, log: bool = True,
                progress: bool = True) -> TableResult:
    """table.md, table.tex (booktabs) and table.csv (the numbers) into `out`, atomically; with `log`, logged back
    like the report (under `table/`)."""
    check_output(out, TABLE_STAGE, (), force)
    client = open_tracking(tracking_uri)
    sel = select_runs(tracking_uri, experiment, run_ids, default_experiment, client)
    table = paper_table(tracking_uri, rows_key, cols_key, metric, mode, progress=progress, client=client, sel=sel)
    with stage_output(out, TABLE_STAGE, (), force) as tmp:
        (tmp / "table.md").write_text(table.markdown())
        (tmp / "table.tex").write_text(table.latex())
        (tmp / "table.csv").write_text(table.csv())
    result = TableResult(Path(out), table)
    if log:
        result.logged_to = log_folder(client, sel, Path(out), "table")
    return result
