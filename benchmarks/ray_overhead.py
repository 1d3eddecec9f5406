"""Measured, side by side in one run: what Ray Train and Ray Tune cost on top of the plain training loop.

1. One training, the same params in each row, each row a fresh `python benchmarks/ray_overhead.py --child KIND`
   process, so interpreter start, imports and (for Ray) `ray.init` and the shutdown are inside its wall time:
   - plain:        `sqgan.train.loop.train` in the process, no tracking;
   - plain+mlflow: the same with the MLflow run and logger `sqgan train` uses (so MLflow's share is not charged
     to Ray);
   - ray ×W:       `sqgan.shells.ray_train.run_training` (a Ray Train TorchTrainer with W workers, MLflow run).
   Each row reports its wall seconds and the loop's own steps/s (the sum over the loop's `time/steps_per_s`
   windows, i.e. the step time alone), so the fixed start-up/teardown cost and the per-step cost separate:
   wall_ray − wall_plain = steps × (1/sps_ray − 1/sps_plain) [per step] + the rest [fixed].
   torch uses the same number of threads in every row (`--threads`: ray.cpus_per_worker in the Ray worker,
   torch.set_num_threads and OMP_NUM_THREADS in the plain child).
2. Ray Tune's overhead per trial: a sweep (`sqgan.shells.tune.run_sweep`) of `--trials` trials, a grid over
   fq.decay, scheduler fifo, max_concurrent_trials 1, tune.fixed = the same schedule as above; with train.workers
   1 (the loop runs in the trial's own process) and, with `--workers W > 1`, W (a TorchTrainer per trial).
   Per trial: its wall time (Ray Tune's `time_total_s`, and the span of its nested MLflow run) minus its training
   time (the loop's steps/s windows from the run's metric history), split into before and after the loop; for the sweep:
   run_sweep's wall time (and the child process's) minus the sum of the trainings. Where trials run at the same
   time, a trial's wall time holds its wait for the other's workers; 'waited s' (another trial's loop within this
   trial's run) is subtracted in the last column, and run_sweep − Σ loop stays the fair total.
3. `--device cuda`: the same with train.use_gpu=true (GPU workers) against the plain loop on cuda; skipped with a
   message where torch.cuda.is_available() is False. `--workers 2` adds a Ray row with 2 workers (DDP, batch per
   worker, so images/s is the throughput to compare): 1 vs 2 GPU-worker throughput needs a machine with 2 GPUs
   (the row is skipped with fewer); on CPU the 2 workers share the cores (ray.num_cpus is raised to fit).

Everything is written under one temp folder (sqlite tracking DB, MLflow artifacts, ray.storage_path, run folders,
Ray's session files via RAY_TMPDIR), removed at the end unless `--keep`; nothing goes into the checkout.
Run with `python benchmarks/ray_overhead.py [--json PATH]`; numbers go in notes, never into timed tests. On a
shared machine state the load (printed before and after) with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REPO_OUTPUTS = ("mlflow.db", "mlartifacts", "ray_results", "runs")  # what a run would leave in a project folder
SPS = "time/steps_per_s"
KINDS = ("plain", "plain-mlflow", "ray", "tune", "warm")


# ------------------------------------------------------------------------------------------- child
def _loop_seconds(points: dict[int, float]) -> float:
    """Seconds the loop spent in its steps: each `time/steps_per_s` window (steps since the previous log) / its rate."""
    total, prev = 0.0, 0
    for step in sorted(points):
        total += (step - prev) / points[step]
        prev = step
    return total


def _history(client: Any, run_id: str) -> dict[int, float]:
    return {int(m.step): float(m.value) for m in client.get_metric_history(run_id, SPS)}


def _span(run: Any) -> float | None:
    info = run.info
    return (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None


def _timeline(client: Any, run_id: str) -> dict[str, float | None]:
    """When a tracked run's loop ran, in epoch seconds: it ends at its last `time/steps_per_s` log (logged as it is
    computed) and starts that first window's length before its first log; and the run's own start and end."""
    hist = sorted(client.get_metric_history(run_id, SPS), key=lambda m: m.step)
    info = client.get_run(run_id).info
    out: dict[str, float | None] = {"run_start": info.start_time / 1000 if info.start_time else None,
                                    "run_end": info.end_time / 1000 if info.end_time else None,
                                    "loop_start": None, "loop_end": None}
    if hist:
        out["loop_start"] = hist[0].timestamp / 1000 - hist[0].step / hist[0].value
        out["loop_end"] = hist[-1].timestamp / 1000
    return out


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _child(kind: str, spec_path: Path, result_path: Path) -> None:
    t_entry = time.time()
    if kind == "warm":  # unmeasured: reads every module once, so the first measured row does not pay a cold disk
        import mlflow.tracking  # noqa: F401
        import ray.train.torch  # noqa: F401
        import ray.tune  # noqa: F401
        import torch  # noqa: F401

        import sqgan.shells.tune  # noqa: F401
        import sqgan.train.loop  # noqa: F401
        return
    spec = json.loads(spec_path.read_text())
    import torch

    from sqgan.config import default_params

    if kind in ("ray", "tune"):
        import ray
        import ray.train.torch  # noqa: F401  (the driver builds a TorchTrainer)

        from sqgan.shells.ray_train import init_ray, run_training
        from sqgan.shells.tune import run_sweep
        from sqgan.tags import TRIAL_ID
    else:
        from sqgan.train.loop import Hooks, Runtime, train
    from mlflow.tracking import MlflowClient

    from sqgan.shells.tracking import MlflowLogger, end_run, open_run

    t_imported = time.time()
    torch.set_num_threads(spec["threads"])
    params = default_params(spec["overrides"])
    data, out, project = Path(spec["data"]), Path(spec["out"]), Path(spec["project"])
    res: dict[str, Any] = {"kind": kind, "t_entry": t_entry, "import_s": t_imported - t_entry,
                           "threads": torch.get_num_threads(), "steps": params.train.steps,
                           "workers": params.train.workers}

    if kind in ("plain", "plain-mlflow"):
        points: dict[int, float] = {}
        logger = None
        t0 = time.time()
        if kind == "plain-mlflow":
            uri, run_id = open_run(params, data, out, project, tags={"sqgan.stage": "train"})
            logger = MlflowLogger(uri, run_id)

        def log_metrics(metrics: dict[str, float], step: int) -> None:
            if SPS in metrics:
                points[step] = metrics[SPS]
            if logger is not None:
                logger.log_metrics(metrics, step)

        hooks = Hooks(log_metrics=log_metrics, log_artifact=logger.log_artifact if logger else Hooks.log_artifact)
        train(params, data, out, runtime=Runtime(device=torch.device(spec["device"])), hooks=hooks)
        if logger is not None:
            end_run(logger.tracking_uri, logger.run_id, "FINISHED")
        res.update(run_s=time.time() - t0, loop_s=_loop_seconds(points))
    else:  # ray and tune both start Ray first, inside the measured time
        t0 = time.time()
        init_ray(params)
        res["ray_init_s"] = time.time() - t0
    if kind == "ray":
        t0 = time.time()
        run = run_training(params, data, out, project_dir=project)
        res["run_s"] = time.time() - t0
        client = MlflowClient(run.tracking_uri)
        tl = _timeline(client, run.run_id)
        res.update(loop_s=_loop_seconds(_history(client, run.run_id)), mlflow_span_s=_span(client.get_run(run.run_id)),
                   last_window_steps_per_s=run.metrics.get(SPS), timeline=tl,
                   pre_loop_s=tl["loop_start"] - tl["run_start"], post_loop_s=tl["run_end"] - tl["loop_end"])
        t0 = time.time()
        ray.shutdown()
        res["shutdown_s"] = time.time() - t0
    elif kind == "tune":
        t0 = time.time()
        sweep = run_sweep(params, data, out, project_dir=project)
        res["run_s"] = time.time() - t0
        info = json.loads((out / "sweep.json").read_text())
        client = MlflowClient(sweep.tracking_uri)
        parent = client.get_run(sweep.parent_run_id)
        children = client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{sweep.parent_run_id}'")
        ray_results: dict[str, dict[str, Any]] = {}
        for f in Path(info["experiment_path"]).glob("*/result.json"):
            lines = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            if lines:
                ray_results[lines[-1]["trial_id"]] = lines[-1]
        trials = []
        for r in sorted(children, key=lambda r: r.info.start_time):
            tid = r.data.tags.get(TRIAL_ID, "?")
            loop_s = _loop_seconds(_history(client, r.info.run_id))
            trials.append({"trial_id": tid, "values": json.loads(r.data.tags.get("sqgan.trial_values", "{}")),
                           "status": r.info.status, "mlflow_span_s": _span(r),
                           "ray_time_total_s": ray_results.get(tid, {}).get("time_total_s"), "loop_s": loop_s,
                           "steps_per_s": params.train.steps / loop_s if loop_s else None,
                           "timeline": _timeline(client, r.info.run_id)})
        bad = [t for t in trials if t["status"] != "FINISHED" or t["timeline"]["loop_start"] is None]
        if bad or len(trials) != spec["trials"]:
            for f in sorted(Path(info["experiment_path"]).glob("*/error.txt")):
                print(f"--- {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]), flush=True)
            raise RuntimeError(f"sweep: expected {spec['trials']} FINISHED trials, got "
                               f"{[(t['trial_id'], t['status']) for t in trials]}; see the log above")
        for t in trials:
            a = t["timeline"]
            t["pre_loop_s"], t["post_loop_s"] = a["loop_start"] - a["run_start"], a["run_end"] - a["loop_end"]
            # the time this trial's run spent while another trial's loop held the CPUs/GPUs
            t["waited_s"] = sum(_overlap(a["run_start"], a["run_end"], o["timeline"]["loop_start"],
                                         o["timeline"]["loop_end"]) for o in trials if o is not t)
            t["runs_overlapped"] = any(_overlap(a["run_start"], a["run_end"], o["timeline"]["run_start"],
                                                o["timeline"]["run_end"]) > 0 for o in trials if o is not t)
        res.update(trials=trials, loop_s=sum(t["loop_s"] for t in trials), mlflow_span_s=_span(client.get_run(
            sweep.parent_run_id)))
        t0 = time.time()
        ray.shutdown()
        res["shutdown_s"] = time.time() - t0
    res["t_exit"] = time.time()
    result_path.write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------ parent
def _overrides(a: argparse.Namespace, d: Path, workers: int, kind: str) -> list[str]:
    s = a.steps
    o = {
        "train.steps": s, "train.batch_size": a.batch, "model.resolution": a.resolution, "fq.enabled": "true",
        "train.log_every": a.log_every, "train.sample_every": s, "train.checkpoint_every": s,
        "metrics.eval_every": 0, "metrics.num_fake": a.num_fake, "metrics.batch_size": a.num_fake,
        "metrics.kid_max_subset_size": min(32, a.num_fake), "metrics.kid_subsets": 10,
        "train.workers": workers, "train.use_gpu": "true" if a.device == "cuda" else "false",
        "train.out_dir": d / "out", "ray.cpus_per_worker": a.threads,
        "ray.num_cpus": max(os.cpu_count() or 1, a.threads * workers), "ray.storage_path": d / "ray_results",
        "ray.max_failures": 0, "mlflow.tracking_uri": f"sqlite:///{d / 'mlflow.db'}",
        "mlflow.artifact_root": d / "mlartifacts", "mlflow.experiment": "ray-overhead",
    }
    if kind == "tune":
        n = a.trials
        decays = [round(0.8 + 0.1 * i / max(n - 1, 1), 4) for i in range(n)]
        fixed = {"train": {"steps": s, "log_every": a.log_every, "sample_every": s, "checkpoint_every": s},
                 "metrics": {"eval_every": 0}}
        o.update({"tune.space": json.dumps({"fq": {"decay": {"grid": decays}}}), "tune.fixed": json.dumps(fixed),
                  "tune.scheduler": "fifo", "tune.searcher": "grid", "tune.num_samples": 1,
                  "tune.max_concurrent_trials": 1, "tune.max_failures": 0, "tune.metric": "kid",
                  "tune.out_dir": d / "out"})
    return [f"{k}={v}" for k, v in o.items()]


def _run_child(a: argparse.Namespace, tmp: Path, label: str, kind: str, workers: int, data: Path) -> dict[str, Any]:
    d = tmp / label
    d.mkdir(parents=True)
    spec = {"overrides": _overrides(a, d, workers, kind), "data": str(data), "out": str(d / "out"),
            "project": str(ROOT), "threads": a.threads, "device": a.device, "trials": a.trials}
    (d / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TRAIN_V2_ENABLED="1", HF_HUB_OFFLINE="1",
               RAY_TMPDIR=str(tmp / "ray"), OMP_NUM_THREADS=str(a.threads), GIT_OPTIONAL_LOCKS="0",
               PYTHONUNBUFFERED="1")
    for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(k, None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", str(d / "spec.json"),
           "--result", str(d / "result.json")]
    print(f"  {label} ...", end="", flush=True)
    t_start, p0 = time.time(), time.perf_counter()
    with (d / "log.txt").open("w") as log:
        proc = subprocess.run(cmd, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=a.timeout)
    wall, t_end = time.perf_counter() - p0, time.time()
    if proc.returncode or not (d / "result.json").exists():
        tail = "\n".join((d / "log.txt").read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"\n{label}: the child exited with status {proc.returncode}; last lines of its log "
                         f"({d / 'log.txt'}):\n{tail}")
    r = json.loads((d / "result.json").read_text())
    r.update(label=label, wall_s=wall, start_s=r["t_entry"] - t_start, exit_s=t_end - r["t_exit"])
    r["steps_per_s"] = r["steps"] / r["loop_s"] if r["loop_s"] else None
    print(f" {wall:.1f} s", flush=True)
    return r


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def _sweep_table(a: argparse.Namespace, label: str, workers: int, sweeps: list[dict[str, Any]],
                 derived: dict[str, Any]) -> dict[str, Any]:
    """Print one sweep row's per-trial table and totals; returns them."""
    print()
    how = "the loop in the trial process" if workers == 1 else "a TorchTrainer per trial"
    print(f"Tune sweep: {a.trials} trials of train.workers={workers} ({how}; grid over fq.decay, fifo, "
          f"max_concurrent_trials 1, same schedule); per trial, from Ray's result and the trial's MLflow run")
    head = ("round", "trial", "fq.decay", "time_total s", "mlflow span s", "loop s", "steps/s", "pre-loop s",
            "post-loop s", "waited s", "total−loop s", "span−loop s", "span−loop−wait")
    print(" | ".join(f"{h:>13}" for h in head))
    per_trial: dict[str, list[float]] = {"time_total": [], "span": [], "span_wait": []}
    overlapped = False
    for rep, sweep in enumerate(sweeps):
        for t in sweep["trials"]:
            o_total = t["ray_time_total_s"] - t["loop_s"] if t["ray_time_total_s"] is not None else None
            o_span = t["mlflow_span_s"] - t["loop_s"]
            o_wait = o_span - t["waited_s"]
            t.update(overhead_time_total_s=o_total, overhead_span_s=o_span, overhead_span_minus_wait_s=o_wait)
            for k, v in (("time_total", o_total), ("span", o_span), ("span_wait", o_wait)):
                per_trial[k] += [v] if v is not None else []
            overlapped |= t["runs_overlapped"]
            cells = (rep + 1, t["trial_id"], t["values"].get("fq.decay"), t["ray_time_total_s"],
                     t["mlflow_span_s"], t["loop_s"], t["steps_per_s"], t["pre_loop_s"], t["post_loop_s"],
                     t["waited_s"], o_total, o_span, o_wait)
            print(" | ".join(f"{_fmt(c):>13}" for c in cells))
    sw: dict[str, Any] = {
        "process_wall_s": _median(sweeps, "wall_s"),
        "run_sweep_s": _median(sweeps, "run_s"),
        "sum_loop_s": _median(sweeps, "loop_s"),
        "ray_init_s": _median(sweeps, "ray_init_s"),
        "trials_overlapped": overlapped,
    }
    sw["run_sweep_minus_loops_s"] = sw["run_sweep_s"] - sw["sum_loop_s"]
    sw["process_wall_minus_loops_s"] = sw["process_wall_s"] - sw["sum_loop_s"]
    sw["per_trial_run_sweep_minus_loops_s"] = sw["run_sweep_minus_loops_s"] / a.trials
    for k, v in per_trial.items():
        sw[f"per_trial_median_{k}_overhead_s"] = statistics.median(v) if v else None
    sw["single_run_training_minus_loop_s"] = derived["in_process_overhead_s"]["ray ×1"]
    sw["plain_train_minus_loop_s"] = derived["in_process_overhead_s"]["plain"]
    print(f"sweep: process wall {sw['process_wall_s']:.2f} s (ray.init {sw['ray_init_s']:.2f} s), run_sweep "
          f"{sw['run_sweep_s']:.2f} s, Σ loop {sw['sum_loop_s']:.2f} s")
    print(f"run_sweep − Σ loop: {sw['run_sweep_minus_loops_s']:.2f} s = "
          f"{sw['per_trial_run_sweep_minus_loops_s']:.2f} s per trial; process wall − Σ loop: "
          f"{sw['process_wall_minus_loops_s']:.2f} s")
    print(f"per trial (median): time_total − loop {_fmt(sw['per_trial_median_time_total_overhead_s'])} s; "
          f"span − loop {_fmt(sw['per_trial_median_span_overhead_s'])} s; span − loop − waited "
          f"{_fmt(sw['per_trial_median_span_wait_overhead_s'])} s")
    print(f"for comparison, in one process: run_training − loop (ray ×1 row) "
          f"{sw['single_run_training_minus_loop_s']:.2f} s; train() − loop (plain row: data, models, final "
          f"FID/KID) {sw['plain_train_minus_loop_s']:.2f} s")
    if overlapped:
        print("WARNING: trials ran at the same time although tune.max_concurrent_trials=1 (a regression of "
              "sqgan.shells.tune.build_searcher?); a trial that waited for the other's workers has that wait in "
              "its time_total/span ('waited s'), so run_sweep − Σ loop is the fair total")
    return sw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32, help="images per step per worker")
    ap.add_argument("--resolution", type=int, default=32, choices=[32, 64])
    ap.add_argument("--log-every", type=int, default=10, help="train.log_every (each log is a Ray report)")
    ap.add_argument("--num-fake", type=int, default=64, help="metrics.num_fake of the final FID/KID")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="torch threads in every row (= ray.cpus_per_worker)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--workers", type=int, default=1, help="also a Ray row with this many workers when > 1")
    ap.add_argument("--trials", type=int, default=2, help="trials of the Tune sweep (0: no sweep)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of all rows (order alternates); medians shown")
    ap.add_argument("--data", type=Path, default=None, help="curated dataset (default: data/demo, else built in tmp)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per child process")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs, runs, MLflow DBs)")
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(a.child, a.spec, a.result)
        return

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
              if k not in ("child", "spec", "result")}
    out: dict[str, Any] = {"config": config}
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            msg = "skipped: --device cuda, but torch.cuda.is_available() is False on this machine"
            print(msg)
            if a.json:
                a.json.write_text(json.dumps({**out, "skipped": msg}, indent=2) + "\n")
            return
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if a.workers > torch.cuda.device_count():
            print(f"note: --workers {a.workers} needs {a.workers} GPUs, this machine has "
                  f"{torch.cuda.device_count()}: the ray ×{a.workers} row is skipped")
            a.workers = 1

    before = {name: (ROOT / name).exists() for name in REPO_OUTPUTS}
    tmp = Path(tempfile.mkdtemp(prefix="rayov-"))  # short: Ray's socket paths live under it
    done = False
    load_before = _load()
    print(f"temp folder {tmp}; {load_before}")
    try:
        data = a.data
        if data is None:
            data = ROOT / "data" / "demo"
            if not (data / "manifest.parquet").exists():
                from sqgan.data.demo import build_demo

                print(f"building the demo data in {tmp / 'demo'} ({data} is missing)")
                data = build_demo(tmp / "demo", resolution=a.resolution)
        data = data.resolve()
        rows = [("plain", "plain", 1), ("plain+mlflow", "plain-mlflow", 1), ("ray ×1", "ray", 1)]
        if a.workers > 1:
            rows.append((f"ray ×{a.workers}", "ray", a.workers))
        if a.trials > 0:
            rows.append((f"tune ×{a.trials} trials", "tune", 1))
            if a.workers > 1:  # trials that start a TorchTrainer (a worker group each)
                rows.append((f"tune ×{a.trials} trials, ×{a.workers} workers", "tune", a.workers))
        results: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in rows}
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "warm"], cwd=tmp, check=True)
        for rep in range(a.repeats):
            order = rows if rep % 2 == 0 else rows[::-1]
            print(f"round {rep + 1}/{a.repeats}")
            for label, kind, workers in order:
                safe = label.replace(" ", "_").replace("×", "x").replace("+", "_").replace(",", "")
                results[label].append(_run_child(a, tmp, f"r{rep}-{safe}", kind, workers, data))
        load_after = _load()
        done = True
    finally:
        if a.keep or not done:
            print(f"kept {tmp}" + ("" if done else " (a row failed: its log.txt is there)"))
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    created = [name for name, existed in before.items() if not existed and (ROOT / name).exists()]

    # ------------------------------------------------------------------------------ table: one training
    print()
    print(f"device={a.device} threads={a.threads} steps={a.steps} batch={a.batch} res={a.resolution} fq=on "
          f"log_every={a.log_every} eval_every=0 num_fake={a.num_fake} repeats={a.repeats} (medians)")
    print(f"before: {load_before}; after: {load_after}")
    cols = ("wall_s", "start_s", "import_s", "ray_init_s", "run_s", "loop_s", "steps_per_s", "shutdown_s", "exit_s")
    head = ("run", "wall s", "start s", "import s", "ray.init s", "run s", "loop s", "steps/s", "images/s",
            "shutdown s", "exit s")
    print(" | ".join(f"{h:>10}" if i else f"{h:<16}" for i, h in enumerate(head)))
    summary: dict[str, dict[str, Any]] = {}
    for label, kind, workers in rows:
        if kind == "tune":
            continue
        med = {c: _median(results[label], c) for c in cols}
        med["images_per_s"] = med["steps_per_s"] * a.batch * workers if med["steps_per_s"] else None
        summary[label] = med
        cells = [med[c] for c in cols[:7]] + [med["images_per_s"]] + [med[c] for c in cols[7:]]
        print(" | ".join([f"{label:<16}"] + [f"{_fmt(v):>10}" for v in cells]))
    p, m, r = summary["plain"], summary["plain+mlflow"], summary["ray ×1"]
    per_step = a.steps * (1 / r["steps_per_s"] - 1 / p["steps_per_s"])
    fixed = r["wall_s"] - p["wall_s"]
    derived = {
        "wall_ratio_ray_over_plain": r["wall_s"] / p["wall_s"],
        "wall_ray_minus_plain_s": fixed,
        "of_which_per_step_s": per_step,
        "of_which_fixed_s": fixed - per_step,
        "loop_steps_per_s_ratio_ray_over_plain": r["steps_per_s"] / p["steps_per_s"],
        "wall_ray_minus_plain_mlflow_s": r["wall_s"] - m["wall_s"],
        "wall_plain_mlflow_minus_plain_s": m["wall_s"] - p["wall_s"],
        "in_process_overhead_s": {k: summary[k]["run_s"] - summary[k]["loop_s"] for k in summary},
    }
    print(f"wall ratio ray ×1 / plain: {derived['wall_ratio_ray_over_plain']:.3f}x")
    print(f"wall ray ×1 − plain: {fixed:+.2f} s = per step {per_step:+.2f} s ({a.steps} × (1/{r['steps_per_s']:.2f} − "
          f"1/{p['steps_per_s']:.2f})) + fixed {fixed - per_step:+.2f} s (start-up, ray.init, trainer, teardown)")
    print(f"loop steps/s ray ×1 / plain: {derived['loop_steps_per_s_ratio_ray_over_plain']:.3f}x")
    print(f"wall plain+mlflow − plain: {derived['wall_plain_mlflow_minus_plain_s']:+.2f} s; ray ×1 − plain+mlflow: "
          f"{derived['wall_ray_minus_plain_mlflow_s']:+.2f} s (Ray's share without MLflow's)")
    print("in-process overhead (train()/run_training() wall − loop s): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in derived["in_process_overhead_s"].items()))
    if a.workers > 1:
        w = summary[f"ray ×{a.workers}"]
        derived["throughput_ratio_w_over_1"] = w["images_per_s"] / r["images_per_s"]
        print(f"throughput ray ×{a.workers} / ray ×1 (images/s): {derived['throughput_ratio_w_over_1']:.3f}x")
    out.update(results=results, summary=summary, derived=derived, load_before=load_before, load_after=load_after,
               repo_outputs_created=created)

    # ---------------------------------------------------------------------------------- table: the sweeps
    for label, kind, workers in rows:
        if kind == "tune":
            out["sweep" if workers == 1 else f"sweep_x{workers}_workers"] = _sweep_table(a, label, workers,
                                                                                        results[label], derived)
    if created:
        print(f"WARNING: {created} appeared in {ROOT} during the run")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
