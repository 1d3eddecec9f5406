"""`sqgan tune`: the search space checked before Ray, a real sweep with one MLflow view and a report readable back
from MLflow alone, a driver killed by SIGKILL and resumed, and the sweep-facing pieces of the Ray shell."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, kill_after_first_trial, tiny_overrides
from typer.testing import CliRunner

from sqgan.cli import app
from sqgan.config import ConfigError, default_params, load_params
from sqgan.shells.tune import check_sweep

runner = CliRunner()


def sweep_overrides(tmp_path: Path, **extra: object) -> list[str]:
    """A 2 × 2 grid of 8-step trials on the demo data, everything written under tmp_path."""
    base = {
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "mlflow.artifact_root": str(tmp_path / "artifacts"),
        "ray.storage_path": str(tmp_path / "ray"),
        "tune.fixed": "{}",
        "tune.space": "{fq: {codebook_size: {grid: [16, 32]}, decay: {grid: [0.7, 0.9]}}}",
        "train.steps": 8, "train.log_every": 2, "train.checkpoint_every": 4, "train.sample_every": 4,
        "metrics.eval_every": 4, "metrics.eval_num_fake": 20, "tune.max_concurrent_trials": 2,
    }
    base.update(extra)
    return tiny_overrides(**base)


# ----------------------------------------------------------------------------- before any trial
@pytest.mark.parametrize(("sets", "words"), [
    (["tune.space.fq.decy={grid: [0.5]}"], "unknown key 'fq.decy'; did you mean 'fq.decay'"),
    (["tune.space.fq.decay={grid: []}"], "'fq.decay': the grid is empty"),
    (["tune.space.fq.codebook_size={grid: [16, 24]}"], "tune.space.fq.codebook_size: fq.codebook_size must be a "
                                                        "power of two"),
    (["tune.space.fq.codebook_size={randint: [16, 64]}"], "randint [16, 64] includes 17"),
    (["tune.space.fq.decay={uniform: [0.5, 1.0]}"], "tune.space.fq.decay: fq.decay must be float in [0.0, 1.0)"),
    (["tune.space.fq.decay={uniform: [0.9, 0.1]}"], "'fq.decay': uniform takes [low, high]"),
    (["tune.space.tune.num_samples={grid: [1, 2]}"], "cannot sweep its own settings"),
    (["tune.metric=loss/dd"], "tune.metric 'loss/dd' is not a metric the run reports"),
    (["tune.fixed.metrics.eval_every=0"], "asha prunes on kid, but the trials evaluate it only at the end"),
    (["tune.grace_period=60"], "tune.grace_period=60 is not below the trials' train.steps=60"),
    (["tune.searcher=bayes"], "tune.searcher must be one of 'grid', 'random', 'optuna'"),
])
def test_a_bad_search_space_exits_2_naming_the_key_before_any_trial_starts(demo_dir, tmp_path, sets, words):
    args = ["tune", "--no-params-file", "--data", str(demo_dir), "--out", str(tmp_path / "sweep")]
    for s in [*sweep_overrides(tmp_path, **{"tune.fixed": "{train: {steps: 60}, metrics: {eval_every: 20}}"}),
              *sets]:
        args += ["--set", s]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert words in r.output, r.output
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "ray").exists()  # nothing started


def test_params_override_applies_dotted_values_and_names_a_bad_key():
    p = default_params()
    q = p.override({"fq.decay": 0.5, "train.lr_d": 1e-3})
    assert (q.fq.decay, q.train.lr_d, p.fq.decay) == (0.5, 1e-3, 0.9)
    with pytest.raises(ConfigError, match=r"trial x: fq.codebook_size must be a power of two"):
        p.override({"fq.codebook_size": 48}, source="trial x")
    with pytest.raises(ConfigError, match=r"unknown key 'fq.alpah'; did you mean 'fq.alpha'"):
        p.override({"fq.alpah": 1.0})


def test_search_space_nests_like_params_and_maps_to_ray_distributions():
    from ray.tune.search.sample import Categorical, Float, Integer

    from sqgan.shells.tune import probe_values, ray_space

    p = default_params(["tune.space.fq.alpha=null", "tune.space.train.lr_d={loguniform: [1e-4, 1e-3]}",
                        "tune.space.train.batch_size={qrandint: [8, 32, 8]}", "tune.space.fq.commitment={randint: "
                        "[0, 2]}"])
    axes = p.tune.axes()
    assert list(axes) == ["fq.codebook_size", "fq.decay", "fq.commitment", "sq.codebook_size", "train.lr_d",
                          "train.batch_size"]
    space = ray_space(p)
    assert space["fq.decay"] == {"grid_search": [0.8, 0.9]}
    assert isinstance(space["train.lr_d"], Float) and space["train.lr_d"].lower == 1e-4
    assert isinstance(space["fq.commitment"], Integer) and space["fq.commitment"].upper == 3  # both ends included
    assert probe_values("qrandint", [8, 32, 8]) == [8, 16, 24, 32]
    drawn = ray_space(default_params(["tune.searcher=random"]))
    assert isinstance(drawn["fq.codebook_size"], Categorical)  # random/optuna draw grid axes like choices
    assert p.flat()["tune.space"] == p.tune.space  # one MLflow param / one `config show` line per free-form key


def test_trials_at_once_are_capped_by_the_cpus_and_enforced_by_every_searcher():
    from sqgan.shells.tune import build_searcher, sweep_concurrency, trial_base

    p = default_params(["tune.max_concurrent_trials=4", "tune.cpus_per_worker=2"])
    assert sweep_concurrency(p, trial_base(p), {"CPU": 5.0}) == 2  # 2-CPU trials on 5 CPUs
    assert sweep_concurrency(p, trial_base(p), {"CPU": 1.0}) == 1  # never 0 (check_resources refuses first)
    assert sweep_concurrency(p, trial_base(p), {"CPU": 64.0}) == 4
    # Ray ignores TuneConfig.max_concurrent_trials for the basic generator: the limit must be inside it.
    assert build_searcher(p, "kid", 2).max_concurrent == 2
    assert build_searcher(default_params(["tune.searcher=random"]), "kid", 3).max_concurrent == 3


def test_a_one_worker_trial_holds_its_loops_cpus_and_a_multi_worker_trial_only_starts_its_workers():
    from sqgan.shells.tune import TRIAL_DRIVER, SweepSpec, TrialResources, trial_base

    def spec(p, use_gpu=False):
        return SweepSpec(base=trial_base(p).model_dump(mode="json"), data_dir="", sweep_dir="", project_dir="",
                         tracking_uri="", parent_run_id="", storage="", name="", use_gpu=use_gpu, metric="kid")

    p = default_params(["tune.cpus_per_worker=2"])
    assert TrialResources(spec(p))({}).bundles == [{"CPU": 2.0}]  # the loop runs in the trial: it holds the CPUs
    assert TrialResources(spec(p, use_gpu=True))({"fq.decay": 0.5}).bundles == [{"CPU": 2.0, "GPU": 1.0}]
    assert TrialResources(spec(p))({"ray.cpus_per_worker": 1}).bundles == [{"CPU": 1.0}]  # a swept value
    # a TorchTrainer's workers hold the CPUs; the trial's process only waits for them
    driver = [{"memory": float(TRIAL_DRIVER["memory"])}]  # Ray drops the zero CPU from the bundle
    assert TrialResources(spec(p))({"train.workers": 2}).bundles == driver
    two = default_params(["tune.workers=2", "tune.cpus_per_worker=1"])
    assert TrialResources(spec(two))({}).bundles == driver


def test_the_optuna_searcher_draws_trials_from_the_search_space():
    from sqgan.shells.tune import build_searcher, ray_space

    p = default_params(["tune.searcher=optuna", "tune.space.fq.alpha={loguniform: [0.1, 10]}"])
    searcher = build_searcher(p, "kid", 2)
    assert searcher.set_search_properties("kid", "min", ray_space(p))
    drawn = [searcher.suggest(f"t{i}") for i in range(6)]
    for config in drawn:
        assert config["fq.codebook_size"] in (16, 64) and config["fq.decay"] in (0.8, 0.9)
        assert 0.1 <= config["fq.alpha"] <= 10
        p.override(config)  # every draw is valid params
    assert len({c["fq.alpha"] for c in drawn}) == 6
    # a workers: 1 trial reports every log step; only the reports with the metric reach Optuna's trial
    searcher.on_trial_result("t0", {"loss/d": 1.0, "step": 2, "training_iteration": 1})
    searcher.on_trial_result("t0", {"kid": 0.25, "step": 4, "training_iteration": 2})
    assert searcher._ot_trials["t0"].storage.get_trial(searcher._ot_trials["t0"]._trial_id).intermediate_values \
        == {2: 0.25}


def test_a_multi_node_ray_takes_a_local_storage_folder_only_when_every_node_sees_it(monkeypatch, tmp_path):
    from sqgan.shells import ray_train
    from sqgan.shells.ray_train import resolve_storage

    probed: list[Path] = []
    missing: list[str] = ["10.0.0.2 (5f3a9c1e)"]
    monkeypatch.setattr(ray_train, "check_ray_address", lambda address: None)
    monkeypatch.setattr(ray_train, "init_ray", lambda params: None)
    monkeypatch.setattr(ray_train, "nodes_missing_folder", lambda folder: probed.append(folder) or missing)
    local = default_params(["ray.address=10.0.0.1:6379", f"ray.storage_path={tmp_path / 'ray'}"])
    with pytest.raises(RuntimeError, match=r"ray.storage_path .* node\(s\) 10.0.0.2 \(5f3a9c1e\) of the Ray cluster at "
                                           r"10.0.0.1:6379 cannot see .* use shared storage: --set "
                                           r"ray.storage_path=s3://BUCKET/sqgan"):
        resolve_storage(local)
    assert probed == [tmp_path / "ray"]
    missing.clear()  # every node read the probe file back: all on this machine, or sharing its disk
    assert resolve_storage(local) == str(tmp_path / "ray")
    assert resolve_storage(default_params(["ray.address=10.0.0.1:6379", "ray.storage_path=s3://b/sqgan"])) == \
        "s3://b/sqgan"
    missing.append("never asked")
    monkeypatch.setattr(ray_train, "filesystem_type", lambda path: "nfs4")  # a network file system: no probe
    assert resolve_storage(local) == str(tmp_path / "ray") and len(probed) == 2
    assert resolve_storage(default_params([f"ray.storage_path={tmp_path / 'r'}"])) == str(tmp_path / "r")


def test_on_a_cluster_a_worker_must_fit_on_one_node_and_trials_at_once_count_node_by_node():
    from sqgan.shells.ray_train import check_resources
    from sqgan.shells.tune import sweep_concurrency, trial_base

    nodes = {"10.0.0.1 (aaaaaaaa)": {"CPU": 0.0}, "10.0.0.2 (bbbbbbbb)": {"CPU": 3.0},
             "10.0.0.3 (cccccccc)": {"CPU": 3.0, "GPU": 1.0}}
    where = "the Ray cluster at 10.0.0.1:6379"
    p = default_params(["ray.cpus_per_worker=4"])
    with pytest.raises(RuntimeError, match=r"ray.cpus_per_worker=4: a worker's CPUs must sit on one node, but no node "
                                           r"of the Ray cluster at 10.0.0.1:6379 has 4 \(its nodes: 10.0.0.1 "
                                           r"\(aaaaaaaa\): 0 CPU, 10.0.0.2 \(bbbbbbbb\): 3 CPU, 10.0.0.3 "
                                           r"\(cccccccc\): 3 CPU, 1 GPU\); --set ray.cpus_per_worker=3"):
        check_resources(p, {"CPU": 6.0}, where, nodes)
    p = default_params(["ray.cpus_per_worker=2", "train.workers=3"])  # 6 CPUs in all, but 2 + 2 on two nodes
    with pytest.raises(RuntimeError, match=r"train.workers=3 with ray.cpus_per_worker=2: the nodes of .* hold 2 such "
                                           r"workers .*; --set train.workers=2"):
        check_resources(p, {"CPU": 6.0}, where, nodes)
    assert check_resources(default_params(["ray.cpus_per_worker=3", "train.workers=2"]), {"CPU": 6.0}, where,
                           nodes) is False
    p = default_params(["ray.cpus_per_worker=2", "tune.max_concurrent_trials=8"])
    assert sweep_concurrency(p, trial_base(p), {"CPU": 6.0}, nodes) == 2  # 3 // 2 per node, not 6 // 2
    assert sweep_concurrency(p, trial_base(p), {"CPU": 6.0}) == 3


def test_reported_metrics_name_the_interim_evaluation_only_when_it_runs():
    from sqgan.train.loop import reported_metrics

    with_interim = reported_metrics(default_params(["train.steps=100", "metrics.eval_every=20"]))
    assert {"kid200_train_randcnn_mean", "kid500_train_randcnn_mean", "fq/layer2/perplexity"} <= with_interim
    assert "kid200_train_randcnn_mean" not in reported_metrics(default_params(["metrics.eval_every=0"]))
    assert "fid200_train_randcnn" not in reported_metrics(default_params(["train.steps=100", "metrics.eval_every=100"]))
    assert "fq/layer1/utilisation" not in reported_metrics(default_params(["fq.enabled=false"]))


# ------------------------------------------------------------------------------- a real sweep
def _children(client, parent_id):
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.ray
def test_a_sweep_logs_one_parent_and_a_nested_run_per_trial_and_its_report_reads_back_from_mlflow(
        ray_session, demo_dir, tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from sqgan.shells.tune import run_sweep

    params = default_params(sweep_overrides(tmp_path))
    sweep = run_sweep(params, demo_dir, tmp_path / "sweep", project_dir=ROOT)
    deadline = time.time() + 90  # trials ASHA stopped give their workers' CPUs back (no leaked placement groups;
    # Ray's PlacementGroupCleaner can take tens of seconds on a loaded 2-core machine, a leak lasts forever)
    while ray_session.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(1)
    assert ray_session.available_resources().get("CPU", 0) == 2
    client = MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    parent = client.get_run(sweep.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["tune.searcher"] == "grid" and parent.data.tags["sqgan.tune.scheduler"] == "asha"
    assert json.loads(parent.data.tags["sqgan.tune.axes"]) == ["fq.codebook_size", "fq.decay"]
    assert len(parent.data.tags["git_sha"].removesuffix("-dirty")) == 40

    runs = _children(client, sweep.parent_run_id)
    assert len(runs) == 4  # one nested run per trial, no more
    assert sorted((r.data.params["fq.codebook_size"], r.data.params["fq.decay"]) for r in runs) == \
        [("16", "0.7"), ("16", "0.9"), ("32", "0.7"), ("32", "0.9")]
    trial_dirs = sorted(p.name for p in (tmp_path / "sweep" / "trials").iterdir())
    assert sorted(r.data.tags["ray.trial_id"] for r in runs) == trial_dirs
    statuses = sorted(r.data.tags["sqgan.trial_status"] for r in runs)
    assert set(statuses) <= {"completed", "stopped by asha"}, [r.data.tags.get("sqgan.trial_error") for r in runs]
    completed = [r for r in runs if r.data.tags["sqgan.trial_status"] == "completed"]
    assert completed, "ASHA keeps at least the best trial to the end"
    for r in runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss/d")]
        assert steps == list(range(2, int(r.data.tags["sqgan.stopped_at_step"]) + 1, 2))  # each step once
        assert [m.step for m in client.get_metric_history(r.info.run_id, "kid20_train_randcnn_mean")][:1] == [4]
    for r in completed:
        assert r.info.status == "FINISHED" and "kid40_train_randcnn_mean" in r.data.metrics
        arts = {f.path for f in client.list_artifacts(r.info.run_id, "samples")} | \
            {f.path for f in client.list_artifacts(r.info.run_id, "checkpoints")}
        assert {"samples/grid.png", "checkpoints/step_000008.pt"} <= arts, (  # what happened, should it fail
            arts, {f.path for f in client.list_artifacts(r.info.run_id)},
            {k: v for k, v in r.data.tags.items() if k.startswith(("sqgan.", "ray."))})
    for r in runs:
        if r not in completed:
            assert r.info.status == "KILLED" and r.data.tags["sqgan.trial_status"] == "stopped by asha"

    out = tmp_path / "sweep"
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 4 and [r["trial"] for r in rows] == [r["trial"] for r in sweep.table]
    final, interim = "kid40_train_randcnn_mean", "kid20_train_randcnn_mean"  # separate columns, never one mixed
    done = [r for r in rows if r[final] != "nan"]
    assert rows[: len(done)] == done and [float(r[final]) for r in done] == sorted(float(r[final]) for r in done)
    stopped = [float(r[interim]) for r in rows[len(done):]]
    assert stopped == sorted(stopped)
    by_run = {r.info.run_id: r for r in runs}
    for row in rows:
        run = by_run[row["run_id"]]
        for key in (final, interim):
            assert row[key] == "nan" if key not in run.data.metrics else \
                float(row[key]) == pytest.approx(run.data.metrics[key])
        assert row["step"] == run.data.tags["sqgan.stopped_at_step"] and row["status"] == \
            run.data.tags["sqgan.trial_status"]
    for png in ("metric_vs_axes.png", "curves.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 300
    best = next(r for r in rows if r["status"] == "completed")
    best_params = load_params(out / "best_params.yaml")  # `sqgan train --params best_params.yaml` takes it as is
    assert (best_params.fq.codebook_size, best_params.fq.decay) == (int(best["fq.codebook_size"]),
                                                                     float(best["fq.decay"]))
    assert runner.invoke(app, ["config", "validate", "--params", str(out / "best_params.yaml")]).exit_code == 0
    logged = {f.path for f in client.list_artifacts(sweep.parent_run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/trials.md", "sweep/curves.png", "sweep/best_params.yaml"} <= logged

    # The table is readable back from MLflow alone.
    again = tmp_path / "again"
    r = runner.invoke(app, ["tune", "--no-params-file", "--set", f"mlflow.tracking_uri={params.mlflow.tracking_uri}",
                            "--report", sweep.parent_run_id, "--out", str(again)])
    assert r.exit_code == 0, r.output
    assert (again / "trials.csv").read_text() == (out / "trials.csv").read_text()
    assert (again / "best_params.yaml").read_text() == (out / "best_params.yaml").read_text()
    r = runner.invoke(app, ["tune", "--no-params-file", "--set", f"mlflow.tracking_uri={params.mlflow.tracking_uri}",
                            "--report", runs[0].info.run_id, "--out", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "is not a sweep's parent run" in r.output


@pytest.mark.ray
def test_a_one_worker_trial_trains_in_its_process_as_sqgan_train_does_and_a_two_worker_trial_logs_alike(
        ray_session, demo_dir, tmp_path, monkeypatch):
    """train.workers 1 and 2 in one sweep, one trial at a time. The 1-worker trial runs the loop in the trial's own
    process (no Ray Train run of its own), exits once at step 6 (the fault switch) and Tune restarts it from its
    step-4 checkpoint: each step logged once, tagged restarted_from_step 4, and its final checkpoint is bit-identical
    to `sqgan train`'s with the same params. The 2-worker trial starts a TorchTrainer and logs the same metrics,
    artifacts and tags."""
    import torch
    from mlflow.tracking import MlflowClient

    from sqgan.shells.ray_train import run_training
    from sqgan.shells.tune import run_sweep

    params = default_params(sweep_overrides(tmp_path, **{
        "tune.scheduler": "fifo", "tune.max_concurrent_trials": 1, "tune.max_failures": 1,
        "tune.space": "{train: {workers: {grid: [1, 2]}}}", "train.steps": 12, "train.checkpoint_every": 4,
        "train.log_every": 2, "metrics.eval_every": 0, "ray.num_cpus": 2}))
    flag = tmp_path / "trial-exited"
    monkeypatch.setenv("SQGAN_TEST_WORKER_FAULT", f"0:6:{flag}")
    sweep = run_sweep(params, demo_dir, tmp_path / "sweep", project_dir=ROOT)
    monkeypatch.delenv("SQGAN_TEST_WORKER_FAULT")
    assert flag.read_text() == "rank 0 exited at step 6\n"  # the fault happened (in the 1-worker trial, first)

    client = MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    runs = {r.data.params["train.workers"]: r for r in _children(client, sweep.parent_run_id)}
    one, two = runs["1"], runs["2"]
    for r in (one, two):
        assert r.info.status == "FINISHED" and r.data.tags["sqgan.trial_status"] == "completed", r.data.tags
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss/d")] == [2, 4, 6, 8, 10, 12]
    assert one.data.tags["sqgan.restarted_from_step"] == "4" and one.data.tags["sqgan.trial_starts"] == "2"
    assert "sqgan.restarted_from_step" not in two.data.tags

    # Ray's storage: the sweep's experiment, and a Ray Train run for the 2-worker trial only
    experiment = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["experiment_path"]
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(
        [Path(experiment).name, f"{Path(experiment).name}-{two.data.tags['sqgan.trial_id']}"])
    assert one.data.tags["ray.run_path"].startswith(experiment + "/") and Path(one.data.tags["ray.run_path"]).is_dir()
    # what Tune received: the restarted trial went on from its step-4 checkpoint (steps 2, 4 were not trained again)
    reported = [json.loads(line)["step"] for line in (Path(one.data.tags["ray.run_path"]) / "result.json").open()]
    assert reported == [2, 4, 6, 8, 10, 12], reported

    # one MLflow layout for both paths
    assert set(one.data.metrics) == set(two.data.metrics)
    assert set(one.data.tags) - {"sqgan.restarted_from_step"} == set(two.data.tags)

    def artifacts(run_id: str, path: str | None = None) -> set[str]:
        found = set()
        for f in client.list_artifacts(run_id, path):
            found |= artifacts(run_id, f.path) if f.is_dir else {f.path}
        return found

    assert artifacts(one.info.run_id) == artifacts(two.info.run_id)
    assert "checkpoints/step_000012.pt" in artifacts(one.info.run_id)

    # bit-identical to `sqgan train` with the trial's params, the restart notwithstanding
    run_training(params, demo_dir, tmp_path / "train", project_dir=ROOT)
    a = torch.load(tmp_path / "train" / "checkpoints" / "step_000012.pt", weights_only=True)
    b = torch.load(tmp_path / "sweep" / "trials" / one.data.tags["sqgan.trial_id"] / "checkpoints" /
                   "step_000012.pt", weights_only=True)
    for part in ("G", "D", "G_ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.ray
def test_a_sweep_driver_killed_after_a_trial_finished_resumes_without_rerunning_it(demo_dir, tmp_path):
    """SIGKILL of `sqgan tune` (its own local Ray dies with it); `sqgan tune --resume` completes the rest."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = sweep_overrides(tmp_path, **{"tune.scheduler": "fifo", "tune.max_concurrent_trials": 1,
                                        "tune.space": "{fq: {decay: {grid: [0.6, 0.7, 0.8]}}}", "train.steps": 6,
                                        "metrics.eval_every": 0, "ray.num_cpus": 2})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sqgan = [sys.executable, "-m", "sqgan.cli"]
    cmd = [*sqgan, "tune", "--no-params-file", "--data", str(demo_dir), "--out", str(tmp_path / "sweep")]
    for s in sets:
        cmd += ["--set", s]
    client = MlflowClient(tracking_uri=uri)
    finished = kill_after_first_trial(cmd, tmp_path, tmp_path / "sweep", uri)
    parent_id = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["parent_run_id"]
    assert client.get_run(parent_id).info.status == "RUNNING"  # what a killed driver leaves

    r = subprocess.run([*sqgan, "tune", "--resume", str(tmp_path / "sweep")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = _children(client, parent_id)
    assert len(runs) == 3 and len(list((tmp_path / "sweep" / "trials").iterdir())) == 3  # no duplicates
    assert all(x.info.status == "FINISHED" and x.data.tags["sqgan.trial_status"] == "completed" for x in runs)
    first = next(x for x in runs if x.info.run_id == finished[0].info.run_id)
    assert first.data.tags["sqgan.trial_starts"] == "1"  # the finished trial was not trained again
    for x in runs:
        assert [m.step for m in client.get_metric_history(x.info.run_id, "loss/d")] == [2, 4, 6]
    assert client.get_run(parent_id).info.status == "FINISHED"
    rows = list(csv.DictReader((tmp_path / "sweep" / "trials.csv").open()))
    assert sorted(row["fq.decay"] for row in rows) == ["0.6", "0.7", "0.8"]
    assert yaml.safe_load((tmp_path / "sweep" / "best_params.yaml").read_text())["train"]["steps"] == 6


def test_the_interim_name_of_lpips_and_pplu_counts_pairs_and_paths_not_images():
    """ASHA prunes on the interim evaluation's name of tune.metric: for LPIPS (N = pairs) and PPL uniformity (N =
    paths) it is not the final name with eval_num_fake put in."""
    from sqgan.train.loop import interim_key, reported_metrics

    p = default_params(["metrics.names=[fid, lpips, pplu]", "metrics.num_fake=500", "metrics.eval_num_fake=200"])
    assert interim_key(p, "fid500_train_randcnn") == "fid200_train_randcnn"
    assert interim_key(p, "lpips250_randalex") == "lpips100_randalex"
    assert interim_key(p, "pplu50_randalex_std") == "pplu20_randalex_std"
    assert {"lpips100_randalex", "pplu20_randalex_std", "lpips250_randalex"} <= set(reported_metrics(p))
    sweep = default_params(["metrics.names=[fid, lpips, pplu]", "tune.metric=lpips250_randalex", "tune.mode=max",
                            "tune.scheduler=asha", "tune.space={fq: {decay: {grid: [0.9, 0.99]}}}"])
    assert check_sweep(sweep).metrics.names == ["fid", "lpips", "pplu"]  # before: "evaluates it only at the end"
