"""Bookkeeping at scale (issue 20 item 7), measured: how the sweep's reports grow with its number of trials.

A local sqlite MLflow store (the project's default backend: `sqgan.shells.tracking.resolve_tracking_uri`) in a temp
folder is filled, without Ray or training, with one sweep per size N (32, 64, 128, 256 trials; one experiment each)
in the layout `sqgan tune` leaves: the parent run (the sweep's params, its params.yaml, provenance and sqgan.tune.*
tags), and N nested trial runs (the trial's resolved params and params.yaml, sqgan.trial_* and ray.* tags, every
metric `sqgan.train.loop.reported_metrics` names at the log steps, interim and final evaluations with their
provenance tags, the diversity / collapse-watch metrics, samples/grid.png at each sample step and metrics.json),
settled by `sqgan.shells.tune_report.settle_trials` with a stand-in for Tune's result grid. The grid is
fq.codebook_size × fq.decay × sq.codebook_size (32 combinations) × tune.num_samples = N / 32, fq.alpha drawn; ASHA's
verdicts (rungs at steps 20 and 40), a few collapsed trials and one failed trial are drawn from a seeded RNG.
Checkpoints are not written: no report reads them.

Then, side by side for each N, in this process:
- trial table:   `sqgan.shells.tune_report.trial_table` (what both reports start from);
- tune --report: `sqgan.commands.sweep.report_tune` (what `sqgan tune --report PARENT_ID` calls): the table, the
                 plots and best_params.yaml, not logged back;
- sqgan report:  `sqgan.commands.report.render_report` with `--runs PARENT_ID` (the trials' table, curves, grids,
                 usage plots and the sweep's own section), not logged back unless `--log`.
Each row gives seconds (median of `--repeats`), seconds per trial, and the MlflowClient calls it made (every public
method counted, so a per-trial query shows as ~N calls and an N+1 pattern as calls growing with N); the growth
column is time(largest N) / time(smallest N) against the linear ratio. Goal: linear or better, 256 trials < 60 s.

Run with `python benchmarks/bookkeeping.py [--sizes 32 64] [--json PATH]`; the table goes to
benchmarks/results/bookkeeping.md (written atomically; the notes below its `<!-- notes -->` line are kept).
Numbers go in notes, never into timed tests; on a shared machine they are noisy, the ratios less so.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bookkeeping.md"
NOTES_MARK = "<!-- notes -->"
GRID = {"fq.codebook_size": [16, 32, 64, 128], "fq.decay": [0.7, 0.8, 0.9, 0.95], "sq.codebook_size": [64, 256]}
STEPS = ("trial table", "tune --report", "sqgan report")


# ------------------------------------------------------------------------------------------ counting
class CallCounter:
    """Counts every public MlflowClient method call made while it is active (the class is patched, so every client
    the code under test makes is counted); nested calls (a client method calling another) count once."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._depth = 0
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> CallCounter:
        import mlflow.artifacts
        from mlflow.tracking import MlflowClient

        for name, fn in vars(MlflowClient).items():
            if name.startswith("_") or not callable(fn):
                continue
            self._saved[name] = fn
            setattr(MlflowClient, name, self._wrap(name, fn))
        # a download by artifact URI, without a client (MlflowClient.download_artifacts calls it: counted once)
        self._download = mlflow.artifacts.download_artifacts
        mlflow.artifacts.download_artifacts = self._wrap("artifacts.download_artifacts", self._download)
        return self

    def _wrap(self, name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                self.calls[name] += 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def __exit__(self, *exc: Any) -> None:
        import mlflow.artifacts
        from mlflow.tracking import MlflowClient

        for name, fn in self._saved.items():
            setattr(MlflowClient, name, fn)
        mlflow.artifacts.download_artifacts = self._download


# ------------------------------------------------------------------------------------------- filling
def sweep_params(n: int, uri: str, root: Path, steps: int, log_every: int, eval_every: int) -> Any:
    """The sweep's params: the GRID (32 combinations) × num_samples n / 32, fq.alpha drawn, the trials' schedule."""
    from sqgan.config import default_params

    if n % 32:
        raise SystemExit(f"--sizes {n}: each size must be a multiple of 32 (the grid has 32 combinations)")
    space = {"fq": {"codebook_size": {"grid": GRID["fq.codebook_size"]}, "decay": {"grid": GRID["fq.decay"]},
                    "alpha": {"uniform": [0.5, 2.0]}},
             "sq": {"codebook_size": {"grid": GRID["sq.codebook_size"]}}}
    fixed = {"train": {"steps": steps, "log_every": log_every, "sample_every": eval_every,
                       "checkpoint_every": eval_every},
             "metrics": {"eval_every": eval_every, "diversity_every": eval_every}}
    return default_params([f"tune.space={json.dumps(space)}", f"tune.fixed={json.dumps(fixed)}",
                           f"tune.num_samples={n // 32}", f"mlflow.tracking_uri={uri}",
                           f"mlflow.artifact_root={root / 'artifacts'}", f"mlflow.experiment=sweep-{n}",
                           f"tune.out_dir={root / 'out' / f'sweep-{n}'}"])


def _png(path: Path, rng: random.Random, size: int = 274) -> Path:
    """A stand-in for an 8 × 8 grid of 32² samples (274² px with make_grid's padding): blocky noise, so the file is
    about as large as a young GAN's grid."""
    from PIL import Image

    small = Image.frombytes("RGB", (size // 4, size // 4), rng.randbytes((size // 4) ** 2 * 3))
    small.resize((size, size), Image.NEAREST).save(path)
    return path


def fill_sweep(client: Any, n: int, uri: str, root: Path, a: argparse.Namespace, provenance: dict[str, str]) -> str:
    """One sweep of n trials in the layout `sqgan tune` leaves; returns its parent run id."""
    import yaml
    from mlflow.entities import Metric, Param, RunTag

    from sqgan.metrics.names import is_quality_metric
    from sqgan.shells.tracking import ensure_experiment
    from sqgan.shells.tune import sweep_tags, trial_base, trial_tags
    from sqgan.shells.tune_report import planned_trials, settle_trials
    from sqgan.tags import (
        COLLAPSE_STEP,
        METRIC_PROVENANCE,
        PARENT_RUN_ID,
        RAY_RUN_PATH,
        RUN_NAME,
        STOPPED_AT_STEP,
        TRIAL_STATUS,
    )
    from sqgan.train.loop import quality_keys, reported_metrics

    params = sweep_params(n, uri, root, a.steps, a.log_every, a.eval_every)
    base = trial_base(params)
    exp = ensure_experiment(uri, params.mlflow.experiment, params.mlflow.artifact_root)

    def run_with(tags: dict[str, str], p: Any) -> str:
        """start_run's layout: the tags, the flat params 100 per batch, params.yaml."""
        run = client.create_run(exp, tags={**provenance, **tags}, run_name=tags.get(RUN_NAME))
        flat = [Param(k, str(v)) for k, v in p.flat().items()]
        for i in range(0, len(flat), 100):
            client.log_batch(run.info.run_id, params=flat[i : i + 100])
        client.log_text(run.info.run_id, yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False), "params.yaml")
        return run.info.run_id

    parent = run_with(sweep_tags(params, base), params)

    rng = random.Random(n)
    steps, log_every, eval_every = base.train.steps, base.train.log_every, base.metrics.eval_every
    rungs = list(range(eval_every, steps, eval_every))  # ASHA decides at each interim evaluation
    grids = root / "trials" / f"sweep-{n}"
    grids.mkdir(parents=True, exist_ok=True)
    failed = rng.randrange(n)
    results = []
    for i, plan in enumerate(planned_trials(params)):
        values = {k: (v if v is not None else round(rng.uniform(0.5, 2.0), 4)) for k, v in plan.items()}
        p = base.override(values, source="trial")
        trial_id = f"{rng.getrandbits(20):05x}_{i:05d}"
        tid = run_with(trial_tags(p, trial_id, values, None) | {PARENT_RUN_ID: parent}, p)
        # where the trial ends: ASHA keeps about half the trials at each rung; one fails at its first evaluation
        end = steps
        for rung in rungs:
            if rng.random() < 0.5:
                end = rung
                break
        if i == failed:
            end = rungs[0] if rungs else steps
        collapse = rungs[0] if rungs and rng.random() < 0.08 else None
        quality = set(quality_keys(p, p.metrics.num_fake))
        quality_interim = set(quality_keys(p, p.metrics.eval_num_fake)) - quality
        per_log = sorted(k for k in reported_metrics(p) if not is_quality_metric(k) and not k.startswith(
            ("diversity/", "d/feature_similarity", "g/clip_similarity")))
        folder = grids / trial_id  # the artifacts keep their file names: samples/grid.png, metrics.json
        folder.mkdir()
        points, tags = [], []
        now = int(time.time() * 1000)
        for step in range(log_every, end + 1, log_every):
            points += [Metric(k, rng.uniform(0.0, 2.0), now + step, step) for k in per_log]
        for step in range(eval_every, end + 1, eval_every):
            names = quality if step == steps else quality_interim
            level = 0.3 / (1 + step / steps) + rng.uniform(0.0, 0.05)
            points += [Metric(k, level * (30 if k.startswith("fid") else 1), now + step, step) for k in names]
            collapsed = float(collapse is not None and step >= collapse)
            points += [Metric("diversity/pixel", rng.uniform(0.05, 0.8), now + step, step),
                       Metric("diversity/nn_distinct", rng.uniform(0.05, 0.5), now + step, step),
                       Metric("diversity/collapsed", collapsed, now + step, step),
                       Metric("d/feature_similarity", rng.uniform(0.3, 0.9), now + step, step)]
            tags += [RunTag(f"{METRIC_PROVENANCE}{k}", json.dumps({"num_fake": p.metrics.eval_num_fake
                                                                   if step < steps else p.metrics.num_fake,
                                                                   "net": "randcnn", "seed": 0}))
                     for k in names]
            client.log_artifact(tid, str(_png(folder / "grid.png", rng)), "samples")
        for j in range(0, len(points), 1000):
            client.log_batch(tid, metrics=points[j : j + 1000])
        tags = list({tg.key: tg for tg in tags}.values())
        if collapse is not None:
            tags.append(RunTag(COLLAPSE_STEP, str(collapse)))
        if tags:
            client.log_batch(tid, tags=tags)
        if i == failed:
            results.append(SimpleNamespace(metrics={"trial_id": trial_id}, path=None,
                                           error=RuntimeError("stand-in: the trial's worker died")))
            client.set_terminated(tid, "FAILED")
        elif end == steps:
            metrics_json = folder / "metrics.json"
            metrics_json.write_text(json.dumps({"step": steps, **{m.key: m.value for m in points
                                                                  if m.step == steps}}))
            client.log_artifact(tid, str(metrics_json), None)
            client.log_batch(tid, tags=[RunTag(TRIAL_STATUS, "completed"),
                                        RunTag(RAY_RUN_PATH, str(root / "ray" / trial_id))])
            client.set_terminated(tid, "FINISHED")
        else:  # RecordingASHA tags the run when it decides; settle_trials marks it KILLED
            client.log_batch(tid, tags=[RunTag(TRIAL_STATUS, "stopped by asha"), RunTag(STOPPED_AT_STEP, str(end))])
            results.append(SimpleNamespace(metrics={"trial_id": trial_id}, path=None, error=None))
        if i % 32 == 31:
            print(f"  sweep-{n}: {i + 1}/{n} trials", flush=True)
    settle_trials(uri, parent, results, params)
    client.set_terminated(parent, "FINISHED")
    return parent


# ------------------------------------------------------------------------------------------ timing
def time_step(step: str, uri: str, parent: str, params: Any, out: Path, log: bool) -> tuple[float, Counter[str], int]:
    """(seconds, MlflowClient calls, rows) of one report step on sweep `parent`."""
    from sqgan.commands.report import GRID_ARTIFACT, render_report
    from sqgan.commands.sweep import report_tune
    from sqgan.shells.tune_report import trial_table

    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    with CallCounter() as counter:
        t0 = time.perf_counter()
        if step == "trial table":
            rows = len(trial_table(uri, parent)[0])
        elif step == "tune --report":
            rows = len(report_tune(params, parent, out)[0])
        else:
            result = render_report(uri, out, run_ids=[parent], force=True, log=log, progress=False)
            rows = len(result.runs)
        dt = time.perf_counter() - t0
    if step == "sqgan report" and sum(i.startswith("grids/") for i in result.images) != rows:
        raise RuntimeError(f"sqgan report showed {len(result.images)} images for {rows} trials: the stand-in sweep "
                           f"lacks a trial's {GRID_ARTIFACT}")
    shutil.rmtree(out, ignore_errors=True)
    return dt, counter.calls, rows


def _load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def _calls(c: Counter[str]) -> str:
    top = ", ".join(f"{k} {v}" for k, v in c.most_common(3))
    return f"{sum(c.values())} ({top})"


def write_results(path: Path, text: str) -> None:
    """The generated part replaces the file's top; what follows its NOTES_MARK line (hand-written) is kept."""
    from sqgan.io import atomic_path

    notes = ""
    if path.exists():
        old = path.read_text()
        if NOTES_MARK in old:
            notes = old[old.index(NOTES_MARK):]
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text + ("\n" + notes if notes else f"\n{NOTES_MARK}\n"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256], help="trials per sweep")
    ap.add_argument("--steps", type=int, default=60, help="trials' train.steps (tune.fixed, as the demo sweep)")
    ap.add_argument("--log-every", type=int, default=2, help="trials' train.log_every: points per loss curve")
    ap.add_argument("--eval-every", type=int, default=20, help="trials' metrics.eval_every (and ASHA's rungs)")
    ap.add_argument("--repeats", type=int, default=3, help="timings per step and size (the median is shown)")
    ap.add_argument("--only", action="append", choices=STEPS, help="time only these steps (repeatable)")
    ap.add_argument("--log", action="store_true", help="sqgan report logs its folder back (the CLI's default)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="the markdown table (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="also write every number here")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (its mlflow.db) and print where")
    ap.add_argument("--profile", choices=STEPS, help="cProfile this step at the largest size, print the top 25")
    a = ap.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    steps = [s for s in STEPS if not a.only or s in a.only]
    sizes = sorted(set(a.sizes))

    from mlflow.tracking import MlflowClient

    from sqgan.shells.tracking import git_sha, package_versions
    from sqgan.tags import DATA_DIR, GIT_SHA, VERSION

    tmp = Path(tempfile.mkdtemp(prefix="sqgan-bookkeeping-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    print(f"temp folder {tmp}; {_load()}")
    provenance = {GIT_SHA: git_sha(ROOT), DATA_DIR: str(ROOT / "data" / "demo"), "command": "sqgan tune",
                  **{f"{VERSION}{k}": v for k, v in package_versions().items()}}
    client = MlflowClient(tracking_uri=uri)
    results: dict[int, dict[str, Any]] = {}
    try:
        parents, fill_s = {}, {}
        for n in sizes:
            t0 = time.perf_counter()
            parents[n] = fill_sweep(client, n, uri, tmp, a, provenance)
            fill_s[n] = time.perf_counter() - t0
            print(f"filled sweep-{n}: {n} trials in {fill_s[n]:.1f} s (parent {parents[n]})")
        for step in steps:  # untimed: imports, the first sqlite connection, matplotlib's font cache
            time_step(step, uri, parents[sizes[0]], sweep_params(sizes[0], uri, tmp, a.steps, a.log_every,
                                                                 a.eval_every), tmp / "report", a.log)
        # what the process imported (torch, Ray, matplotlib, …) is not re-scanned by each full garbage collection:
        # otherwise whether one falls inside a step, at a cost of that heap, decides a small size's time
        gc.collect()
        gc.freeze()
        load_before = _load()
        for n in sizes:
            params = sweep_params(n, uri, tmp, a.steps, a.log_every, a.eval_every)
            results[n] = {"fill_s": fill_s[n], "parent": parents[n]}
            for step in steps:
                runs = [time_step(step, uri, parents[n], params, tmp / "report", a.log) for _ in range(a.repeats)]
                secs = statistics.median(r[0] for r in runs)
                results[n][step] = {"s": secs, "s_per_trial": secs / n, "calls": dict(runs[0][1]),
                                    "rows": runs[0][2], "all_s": [r[0] for r in runs]}
                print(f"N={n:4d} {step:<14} {secs:8.2f} s  {secs / n * 1000:7.1f} ms/trial  "
                      f"rows {runs[0][2]}  calls {_calls(runs[0][1])}")
        load_after = _load()
        if a.profile:
            import cProfile
            import pstats

            n = sizes[-1]
            prof = cProfile.Profile()
            prof.enable()
            time_step(a.profile, uri, parents[n], sweep_params(n, uri, tmp, a.steps, a.log_every, a.eval_every),
                      tmp / "report", a.log)
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    finally:
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    lo, hi = sizes[0], sizes[-1]
    linear = hi / lo
    head = "| trials | " + " | ".join(f"{s} s | {s} ms/trial | {s} MLflow calls" for s in steps) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(steps))]
    for n in sizes:
        cells = []
        for s in steps:
            r = results[n][s]
            cells += [f"{r['s']:.2f}", f"{r['s_per_trial'] * 1000:.1f}", str(sum(r["calls"].values()))]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    growth = {s: results[hi][s]["s"] / results[lo][s]["s"] for s in steps}
    calls_growth = {s: sum(results[hi][s]["calls"].values()) / max(1, sum(results[lo][s]["calls"].values()))
                    for s in steps}
    verdict = [f"- {s}: time ×{growth[s]:.2f}, MLflow calls ×{calls_growth[s]:.2f} from {lo} to {hi} trials "
               f"(linear: ×{linear:g}) — {'linear or better' if growth[s] <= linear * 1.15 else 'WORSE than linear'}"
               f"; {hi} trials in {results[hi][s]['s']:.1f} s ({'<' if results[hi][s]['s'] < 60 else '≥'} 60 s)"
               for s in steps]
    calls = [f"- {s} at {hi} trials: " + ", ".join(f"{k} {v}" for k, v in sorted(
        results[hi][s]["calls"].items(), key=lambda kv: -kv[1])) for s in steps]
    text = "\n".join([
        "# Bookkeeping at scale: sweep reports against the number of trials (`benchmarks/bookkeeping.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({platform.machine()}, Python "
        f"{platform.python_version()}), sqlite MLflow in a temp folder, "
        f"`{shlex.join(['python', 'benchmarks/bookkeeping.py', *sys.argv[1:]])}`.",
        f"Trials: {a.steps} steps, loss curves every {a.log_every} steps, interim evaluations every {a.eval_every} "
        f"(ASHA's rungs), the final one at the end; `sqgan report` {'logged' if a.log else 'not logged'} back. "
        f"Median of {a.repeats} timing(s) per cell after one untimed warm-up of each step; one process, the steps "
        f"side by side per size; the imported modules' objects frozen out of the garbage collector (gc.freeze) "
        f"and a collection before each timing.",
        f"Load: {load_before} before the timings, {load_after} after. The machine is shared (other jobs ran on the "
        f"same cores), so single seconds are noisy; the growth ratios and call counts are what to read.",
        "",
        *lines,
        "",
        "Growth:",
        *verdict,
        "",
        "MLflow calls (MlflowClient methods) by kind:",
        *calls,
        "",
        "Filling the store (not timed as a report step): " + ", ".join(f"{n} trials {results[n]['fill_s']:.0f} s"
                                                                      for n in sizes) + ".",
        "",
    ])
    print()
    print(text)
    write_results(a.out, text)
    print(f"wrote {a.out}")
    if a.json:
        a.json.write_text(json.dumps({"sizes": sizes, "results": results, "load_before": load_before,
                                      "load_after": load_after}, indent=2, default=str) + "\n")
        print(f"wrote {a.json}")
    if any(growth[s] > linear * 1.15 or results[hi][s]["s"] >= 60 for s in steps) and not math.isnan(linear):
        print("NOTE: a step grew worse than linear or took ≥ 60 s at the largest size")


if __name__ == "__main__":
    main()
