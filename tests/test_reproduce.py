"""`sqgan reproduce`: a recorded run trained again gives exactly its numbers; a changed checkout, dataset or package is
named item by item (recorded vs now) and refused before anything trains."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from conftest import ROOT, tiny_overrides
from typer.testing import CliRunner

from sqgan.cli import app
from sqgan.commands.reproduce import compare, final_metrics, refusal_message, reproduce, verify_provenance
from sqgan.config import default_params
from sqgan.shells import tracking

CLEAN_SHA = "c0ffee" * 6 + "c0de"  # the checkout every test here sees: the real one may be dirty while others edit it


@pytest.fixture(scope="module")
def fixed_git_sha():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tracking, "git_sha", lambda project_dir=".": CLEAN_SHA)
        yield CLEAN_SHA


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite MLflow store (created empty) and Ray storage for the module."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # creates the database
    return uri, tmp


def tiny_params(store, **extra):
    uri, tmp = store
    return default_params(tiny_overrides(**{
        "mlflow.tracking_uri": uri, "mlflow.artifact_root": str(tmp / "artifacts"), "mlflow.experiment": "repro",
        "ray.storage_path": str(tmp / "ray"), "train.steps": 10, "train.log_every": 5, "train.checkpoint_every": 10,
        "train.sample_every": 10, "metrics.eval_every": 5, "metrics.eval_num_fake": 20, **extra,
    }))


def record_only(params, data_dir, stage="train", metrics=None):
    """A finished MLflow run with the params and provenance tags `sqgan train` records (and `metrics` at step 10, as
    its training logged them), without training (for the checks that must refuse before anything trains)."""
    uri, run_id = tracking.start_run(params, data_dir, ROOT, tags={"sqgan.stage": stage})
    if metrics:
        tracking.MlflowLogger(uri, run_id).log_metrics(metrics, 10)
    time.sleep(0.01)
    tracking.end_run(uri, run_id)
    return run_id


@pytest.fixture(scope="module")
def recorded(ray_session, demo_dir, fixed_git_sha, store):
    """One tiny training through run_training (the Ray Train shell `sqgan train` calls), shared by the module."""
    from sqgan.shells.ray_train import run_training

    return run_training(tiny_params(store), demo_dir, store[1] / "run", project_dir=ROOT)


@pytest.mark.ray
def test_reproduce_trains_the_recorded_params_again_in_the_same_experiment_and_every_final_metric_is_equal(
        recorded, store, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, _ = store
    out = tmp_path / "again"
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["reproduce", recorded.run_id, "--out", str(out), "--tracking-uri", uri])
    seconds = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    report = json.loads((out / "reproduce.json").read_text())
    print(f"sqgan reproduce: {seconds:.1f} s")

    client = MlflowClient(tracking_uri=uri)
    old, new = client.get_run(recorded.run_id), client.get_run(report["run_id"])
    # Independently of the comparison code: MLflow's latest value of every metric but the timings.
    keys = {k for k in old.data.metrics if not k.startswith("time/")}
    assert keys == {k for k in new.data.metrics if not k.startswith("time/")}
    assert any(k.startswith("loss/") for k in keys)
    assert any(k.split("/")[-1].startswith(("fid", "kid")) for k in keys)  # a quality metric, final and interim
    for k in sorted(keys):
        assert new.data.metrics[k] == old.data.metrics[k], k  # bit for bit on CPU with the same seed
    assert report["equal"] is True and report["differing"] == [] and set(report["metrics"]) == keys
    assert report["reproduces"] == recorded.run_id and report["only_recorded"] == report["only_new"] == []
    steps = {m["recorded_step"] for m in report["metrics"].values()}
    assert steps == {5, 10}  # the interim evaluation's metrics at step 5, every other one at the final step 10
    assert report["metrics"]["loss/d"]["recorded_step"] == 10 and report["forced"] == []
    assert all(c["status"] == "same" for c in report["checks"] if c["counts"])
    assert f"all {len(keys)} metrics equal" in res.output and "loss/d" in res.output

    assert new.info.experiment_id == old.info.experiment_id and new.info.status == "FINISHED"
    assert new.data.params == old.data.params  # same store and experiment: not a single param changed
    assert new.data.tags["sqgan.reproduces"] == recorded.run_id
    assert new.data.tags["sqgan.reproduce.equal"] == "true" and new.data.tags["sqgan.reproduce.differing"] == "0"
    assert new.data.tags["git_sha"] == CLEAN_SHA and new.data.tags["data.md5"] == old.data.tags["data.md5"]
    assert "reproduce.json" in {f.path for f in client.list_artifacts(new.info.run_id)}
    assert (out / "checkpoints" / "step_000010.pt").is_file()

    again = CliRunner().invoke(app, ["reproduce", recorded.run_id, "--out", str(out), "--tracking-uri", uri])
    assert again.exit_code == 1 and f"--out {out} exists" in again.output and f"{out}-2" in again.output


def test_reproduce_refuses_a_changed_manifest_naming_recorded_and_now_and_trains_nothing(
        demo_dir, fixed_git_sha, store, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from sqgan.data.manifest import read_manifest, write_manifest
    from sqgan.io import sha256_file

    uri, _ = store
    data = tmp_path / "demo"
    shutil.copytree(demo_dir, data)
    params = tiny_params(store, **{"mlflow.experiment": "changed-data"})
    run_id = record_only(params, data)
    before = sha256_file(data / "manifest.parquet")
    rows = read_manifest(data)
    (data / rows.path[0]).unlink()  # one image and its row gone: rows and files must agree
    write_manifest(data, rows.iloc[1:].to_dict("records"))
    after = sha256_file(data / "manifest.parquet")
    assert before != after

    out = tmp_path / "again"
    res = CliRunner().invoke(app, ["reproduce", run_id, "--out", str(out), "--tracking-uri", uri])
    assert res.exit_code == 1
    assert f"data.manifest_sha256: recorded {before}, now {after}" in res.output
    assert "DIFFERS       data.md5: recorded" in res.output and "nothing was trained" in res.output
    assert "DIFFERS       git_sha" not in res.output and f"same          git_sha: {CLEAN_SHA}" in res.output
    assert "--force" in res.output and not out.exists()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("changed-data").experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]  # no new run either

    # --force goes on to train exactly the recorded params on the recorded data (training stubbed out here).
    calls = []

    def fake_training(p, data_dir, out_dir, **kw):
        calls.append((p, data_dir))
        raise RuntimeError("stub: training starts here")

    monkeypatch.setattr("sqgan.shells.ray_train.run_training", fake_training)
    with pytest.raises(RuntimeError, match="stub"):
        reproduce(run_id, out, force=True, tracking_uri=uri, project_dir=ROOT)
    assert calls == [(params, data)]


def test_reproduce_lists_each_differing_metric_tags_the_new_run_and_exits_1(
        demo_dir, fixed_git_sha, store, tmp_path, monkeypatch):
    """The comparison after a training whose numbers changed (a stub writes the new run's metrics)."""
    from mlflow.tracking import MlflowClient

    from sqgan.shells.ray_train import TrainRun

    uri, _ = store
    params = tiny_params(store, **{"mlflow.experiment": "changed-numbers"})
    logged = {"loss/d": 1.5, "fid40_train_randcnn": 8.0, "time/steps_per_s": 3.0}
    old = record_only(params, demo_dir, metrics=logged)
    time.sleep(0.01)  # what `sqgan eval` adds to the finished run later is not the training's: listed, not compared
    tracking.MlflowLogger(uri, old).log_metrics({"fid5000_train_randcnn": 7.0, "fid40_train_randcnn": 9.0}, 10)

    def training_with_other_numbers(p, data_dir, out_dir, **kw):
        _, run_id = tracking.open_run(p, data_dir, out_dir, ROOT, tags={"sqgan.stage": "train"})
        tracking.MlflowLogger(uri, run_id).log_metrics({**logged, "fid40_train_randcnn": 8.25, "loss/g": 0.5}, 10)
        tracking.end_run(uri, run_id)
        return TrainRun(run_id, uri, out_dir, {}, "")

    monkeypatch.setattr("sqgan.shells.ray_train.run_training", training_with_other_numbers)
    out = tmp_path / "again"
    res = CliRunner().invoke(app, ["reproduce", old, "--out", str(out), "--tracking-uri", uri])
    assert res.exit_code == 1
    assert "error: 2 metrics differ from the recorded run: fid40_train_randcnn, loss/g" in res.output
    assert "+0.25" in res.output and "only one run" in res.output
    report = json.loads((out / "reproduce.json").read_text())
    assert report["equal"] is False and report["only_new"] == ["loss/g"] and report["only_recorded"] == []
    assert report["added_after_training"] == ["fid5000_train_randcnn"]
    assert "not compared, logged into the recorded run after its training (sqgan eval, sqgan sample): " \
           "fid5000_train_randcnn" in res.output
    fid = report["metrics"]["fid40_train_randcnn"]
    assert (fid["recorded"], fid["new"], fid["difference"], fid["equal"]) == (8.0, 8.25, 0.25, False)
    assert report["metrics"]["loss/d"]["equal"] is True and "time/steps_per_s" not in report["metrics"]
    new = MlflowClient(tracking_uri=uri).get_run(report["run_id"])
    assert new.data.tags["sqgan.reproduces"] == old and new.data.tags["sqgan.reproduce.equal"] == "false"
    assert new.data.tags["sqgan.reproduce.differing"] == "2"


def test_verify_provenance_names_a_different_git_sha_and_cannot_verify_a_dirty_one(demo_dir, monkeypatch):
    monkeypatch.setattr(tracking, "git_sha", lambda project_dir=".": "b" * 40)
    tags = tracking.provenance_tags(demo_dir, ROOT)
    assert all(c.status == "same" for c in verify_provenance(tags, ROOT))

    tags["git_sha"] = "a" * 40
    checks = {c.item: c for c in verify_provenance(tags, ROOT)}
    git = checks["git_sha"]
    assert (git.status, git.recorded, git.now, git.counts) == ("differs", "a" * 40, "b" * 40, True)
    assert all(c.status == "same" for k, c in checks.items() if k != "git_sha")
    message = refusal_message("RUN", [git], tags)
    assert f"git_sha: recorded {'a' * 40}, now {'b' * 40}" in message and f"git switch --detach {'a' * 40}" in message

    tags["git_sha"], tags["git_dirty"] = "b" * 40 + "-dirty", "src/sqgan/x.py"  # the same commit plus code changes
    git = {c.item: c for c in verify_provenance(tags, ROOT)}["git_sha"]
    assert git.status == "unverifiable" and git.counts and "changes to src/sqgan/x.py" in git.note
    assert "git switch" not in refusal_message("RUN", [git], tags)  # it is this commit: switching does not help
    tags["git_dirty"] = "README.md,dvc.lock"  # dirty only outside the code (`make demo` rewrites dvc.lock): verifiable
    git = {c.item: c for c in verify_provenance(tags, ROOT)}["git_sha"]
    assert git.status == "same" and "only outside the code (README.md, dvc.lock)" in git.note
    tags["git_dirty"] = ""

    tags["git_sha"] = "b" * 40
    tags["version.torch"], tags["version.mlflow"] = "0.0.1", "0.0.2"
    checks = {c.item: c for c in verify_provenance(tags, ROOT)}
    assert checks["git_sha"].status == "same"
    torch_, mlflow_ = checks["version.torch"], checks["version.mlflow"]
    assert torch_.status == mlflow_.status == "differs" and torch_.recorded == "0.0.1"
    assert torch_.now == tracking.package_versions()["torch"]
    assert torch_.counts and not mlflow_.counts  # torch computes the numbers; mlflow only records them


def test_final_metrics_are_each_metric_at_its_last_step_and_timings_are_not_compared(store):
    from mlflow.entities import Metric

    uri, _ = store
    client = tracking.mlflow_client(uri)
    experiment = tracking.ensure_experiment(uri, "synthetic", store[1] / "artifacts")

    def run_with(points):
        run_id = client.create_run(experiment).info.run_id
        client.log_batch(run_id, metrics=[Metric(k, v, t, s) for k, v, s, t in points])
        return run_id

    # (key, value, step, timestamp): step 10 is logged before step 5 in the recorded run
    recorded = run_with([("loss/d", 2.0, 10, 1), ("loss/d", 1.0, 5, 2), ("interim/kid", 7.0, 5, 1),
                         ("time/steps_per_s", 100.0, 10, 1), ("only_recorded", 1.0, 10, 1), ("x", 1.0, 10, 1)])
    new = run_with([("loss/d", 1.0, 5, 1), ("loss/d", 2.5, 10, 2), ("interim/kid", 7.0, 5, 1),
                    ("time/steps_per_s", 200.0, 10, 1), ("only_new", 3.0, 10, 1), ("x", 1.0, 5, 1)])
    a, b = final_metrics(uri, recorded), final_metrics(uri, new)
    assert a == {"loss/d": (10, 2.0), "interim/kid": (5, 7.0), "only_recorded": (10, 1.0), "x": (10, 1.0)}
    c = compare(a, b)
    assert c.differing == ["loss/d", "only_new", "only_recorded", "x"] and not c.equal
    assert c.only_recorded == ["only_recorded"] and c.only_new == ["only_new"]
    row = {r.key: r for r in c.rows}["loss/d"]
    assert (row.recorded, row.new, row.difference) == (2.0, 2.5, 0.5)
    assert "10≠5" in c.table() and "only one run" in c.table()
    assert compare(a, a).equal and not compare({}, {}).equal  # nothing compared is not a reproduction


def test_reproduce_rejects_an_unknown_run_id_and_a_run_that_trained_nothing(demo_dir, store, tmp_path):
    uri, _ = store
    res = CliRunner().invoke(app, ["reproduce", "0" * 32, "--out", str(tmp_path / "x"), "--tracking-uri", uri])
    assert res.exit_code == 1 and f"run {'0' * 32} not found in {uri}" in res.output

    prior = record_only(tiny_params(store, **{"mlflow.experiment": "other"}), demo_dir, stage="prior")
    with pytest.raises(ValueError, match="not a training run: its sqgan.stage tag is 'prior'"):
        reproduce(prior, tmp_path / "x", tracking_uri=uri, project_dir=ROOT)

    missing = tmp_path / "none" / "mlflow.db"
    with pytest.raises(FileNotFoundError, match="no MLflow database"):
        reproduce(prior, tmp_path / "x", tracking_uri=f"sqlite:///{missing}", project_dir=ROOT)
    assert not missing.exists() and not (tmp_path / "x").exists()


def test_read_run_falls_back_to_the_flat_params_and_names_a_recorded_key_the_schema_no_longer_has(store):
    from mlflow.entities import Param

    from sqgan.commands.reproduce import read_run
    from sqgan.config import ConfigError

    uri, tmp = store
    params = tiny_params(store, **{"fq.layers": "[1, 2]", "train.steps": 7, "mlflow.experiment": "flat"})
    client = tracking.mlflow_client(uri)
    experiment = tracking.ensure_experiment(uri, "flat", tmp / "artifacts")

    def finished_run(yaml_text=None):
        run_id = client.create_run(experiment, tags={"sqgan.stage": "train"}).info.run_id
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.flat().items()])
        if yaml_text is not None:
            client.log_text(run_id, yaml_text, "params.yaml")
        client.set_terminated(run_id)
        return run_id

    recorded = read_run(finished_run(), uri)  # no params.yaml artifact: every flat value parsed back
    assert recorded.params_source == "flat params" and recorded.params == params and recorded.experiment == "flat"
    run_id = finished_run("fq:\n  codebook_sise: 8\n")
    with pytest.raises(ConfigError, match=f"(?s)params.yaml of run {run_id}: unknown key 'fq.codebook_sise'.*no longer "
                                          f"fit"):
        read_run(run_id, uri)
