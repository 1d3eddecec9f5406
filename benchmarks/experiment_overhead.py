"""Measured: what `sqgan experiment run` costs beyond its cells' training loops (the orchestration share).

One demo-scale experiment (default `fqgan-cifar`) run as users run it — `sqgan experiment run NAME` in a fresh
process, its own local Ray, sqlite MLflow — into a temp folder, its datasets built first by their stage (timed apart).
Then from MLflow: each trial's loop seconds (the sum over its `time/steps_per_s` windows, as ray_overhead.py) and its
run's span. The ratio reported is wall / (Σ loop / trials at once): 1.0 would be a sweep that costs nothing beyond
its loops when they run `max_concurrent_trials` at a time; the rest is process and Ray start-up, each trial's start
(model build, reference features, MLflow run), evaluations, checkpoints and the table.

Run with `python benchmarks/experiment_overhead.py [--name NAME] [--json PATH]`; numbers go in notes, never into
timed tests. Everything is written under one temp folder, removed at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ray_overhead import _history, _loop_seconds, _span

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="fqgan-cifar", help="experiment in experiments/ (demo scale)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    a = ap.parse_args()

    from mlflow.tracking import MlflowClient

    from sqgan.commands.experiment import build_data, datasets_needed, find_experiment, load_experiment, sweep_params
    from sqgan.config import default_params

    tmp = Path(tempfile.mkdtemp(prefix="sqgan-exp-bench-"))
    sets = {"mlflow.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "mlflow.artifact_root": str(tmp / "art"),
            "ray.storage_path": str(tmp / "ray"), "data.root": str(tmp / "data"), "ray.cpus_per_worker": 1}
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_V2_ENABLED": "1", "HF_HUB_OFFLINE": "1",
           "RAY_TMPDIR": str(tmp / "rtmp")}
    try:
        path = find_experiment(a.name, ROOT / "experiments")
        exp = load_experiment(path)
        sp = sweep_params(default_params([f"{k}={v}" for k, v in sets.items()]), exp, path, "demo")
        t0 = time.perf_counter()
        build_data(sp, datasets_needed(sp, sp.tune.cells), exp.scales["demo"].build)
        data_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "sqgan.cli", "experiment", "run", str(path), "--out", str(tmp / "exp"),
               "--no-params-file", *args]
        r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"experiment failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        info = json.loads((tmp / "exp" / "sweep.json").read_text())
        client = MlflowClient(tracking_uri=sets["mlflow.tracking_uri"])
        parent = client.get_run(info["parent_run_id"])
        runs = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{info['parent_run_id']}'")
        loops = [_loop_seconds(_history(client, x.info.run_id)) for x in runs]
        spans = [_span(x) or 0.0 for x in runs]
        at_once = info["max_concurrent_trials"]
        out = {"experiment": a.name, "trials": len(runs), "trials_at_once": at_once, "data_build_s": data_s,
               "wall_s": wall, "sum_loop_s": sum(loops), "sum_trial_run_s": sum(spans),
               "ratio_wall_over_loops_at_once": wall / (sum(loops) / at_once),
               "orchestration_share": 1 - (sum(loops) / at_once) / wall,
               "cpus": os.cpu_count(), "load_after": os.getloadavg()[0]}
        print(f"{a.name} (demo scale): {len(runs)} trials, {at_once} at once; datasets built in {data_s:.1f} s")
        print(f"wall {wall:.1f} s; Σ loop {sum(loops):.1f} s (Σ trial runs {sum(spans):.1f} s); "
              f"wall / (Σ loop / {at_once}) = {out['ratio_wall_over_loops_at_once']:.2f}x; orchestration "
              f"{100 * out['orchestration_share']:.0f} % of the wall time; load {out['load_after']:.1f}")
        if a.json:
            a.json.write_text(json.dumps(out, indent=1))
    finally:
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
