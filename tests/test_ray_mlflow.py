"""`sqgan train` for real: a Ray Train TorchTrainer with 1 worker, leaving a complete run in MLflow."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, tiny_overrides

from sqgan.config import default_params
from sqgan.shells.tracking import MlflowLogger, dvc_dir_md5, open_run
from sqgan.train.loop import Hooks, train

pytestmark = pytest.mark.ray


def test_ray_train_run_logs_params_metrics_tags_grid_to_mlflow_and_resumes_exactly(ray_session, demo_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from sqgan.shells.ray_train import run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = default_params(tiny_overrides(**{
        "mlflow.tracking_uri": uri, "mlflow.artifact_root": str(tmp_path / "artifacts"),
        "mlflow.experiment": "ray-test", "ray.storage_path": str(tmp_path / "ray"),
        "fq.decay": 0.7, "train.steps": 12, "train.checkpoint_every": 6, "train.log_every": 4,
    }))
    run = run_training(params, demo_dir, tmp_path / "run", project_dir=ROOT)

    client = MlflowClient(tracking_uri=uri)
    r = client.get_run(run.run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["fq.decay"] == "0.7" and r.data.params["train.steps"] == "12"
    assert len(r.data.params) == len(params.flat())
    history = client.get_metric_history(run.run_id, "loss/d")
    assert [m.step for m in history] == [4, 8, 12]
    assert "fq/layer1/utilisation" in r.data.metrics and "fid40_train_randcnn" in r.data.metrics
    assert "fid" not in r.data.metrics
    tags = r.data.tags
    assert len(tags["git_sha"].removesuffix("-dirty")) == 40
    from sqgan.io import sha256_file

    assert tags["data.manifest_sha256"] == sha256_file(demo_dir / "manifest.parquet")
    assert tags["version.torch"].startswith("2.14.1") and tags["version.ray"] == "2.60.0"
    samples = {f.path for f in client.list_artifacts(run.run_id, "samples")}
    assert {"samples/step_000010.png", "samples/grid.png"} <= samples
    top = {f.path for f in client.list_artifacts(run.run_id)}
    assert {"params.yaml", "metrics.json", "checkpoints"} <= top
    fid = "fid40_train_randcnn"
    assert run.metrics["step"] == 12 and run.metrics[fid] == pytest.approx(r.data.metrics[fid])

    assert r.data.tags["data.md5"] == dvc_dir_md5(demo_dir)
    assert r.data.tags["data.matches_dvc_lock"] == "not in dvc.lock"
    assert json.loads((tmp_path / "run" / "tracking.json").read_text())["run_id"] == run.run_id

    # A driver killed after the step-6 checkpoint leaves its run RUNNING; resuming it continues that very run.
    killed = tmp_path / "killed"
    _, killed_id = open_run(params, demo_dir, killed, ROOT)
    logger = MlflowLogger(uri, killed_id)

    def die_after_6(metrics, step, path):
        if step == 6:
            raise KeyboardInterrupt

    threads = torch.get_num_threads()
    torch.set_num_threads(params.ray.cpus_per_worker)  # as inside a Ray worker, so the floats match bit for bit
    try:
        with pytest.raises(KeyboardInterrupt):
            train(params, demo_dir, killed, hooks=Hooks(log_metrics=logger.log_metrics, report=die_after_6))
    finally:
        torch.set_num_threads(threads)
    assert client.get_run(killed_id).info.status == "RUNNING"
    cont = run_training(params, demo_dir, killed, resume=killed / "checkpoints" / "step_000006.pt", project_dir=ROOT)
    assert cont.run_id == killed_id
    k = client.get_run(killed_id)
    assert k.info.status == "FINISHED" and k.data.tags["sqgan.resume.1.status_before"] == "RUNNING"
    assert [m.step for m in client.get_metric_history(killed_id, "loss/d")] == [4, 8, 12]  # one curve

    # Resuming from a checkpoint older than the last one Ray holds for that run (Ray kept step 12; the run is marked
    # KILLED, as after Ctrl-C) continues from exactly that checkpoint (issue 26: it used to restore Ray's latest).
    again_dir = tmp_path / "again"
    import shutil

    shutil.copytree(tmp_path / "run", again_dir)
    client.set_terminated(run.run_id, status="KILLED")
    (again_dir / "tracking.json").write_text(json.dumps({"tracking_uri": uri, "run_id": run.run_id}))
    before = (again_dir / "checkpoints" / "step_000006.pt").stat().st_mtime_ns
    redo = run_training(params, demo_dir, again_dir, resume=again_dir / "checkpoints" / "step_000006.pt",
                        project_dir=ROOT)
    r2 = client.get_run(run.run_id)
    assert redo.run_id == run.run_id and r2.info.status == "FINISHED"
    assert "sqgan.restarted_from_step" not in r2.data.tags and redo.metrics["step"] == 12
    assert (again_dir / "checkpoints" / "step_000006.pt").stat().st_mtime_ns == before  # not re-run
    a = torch.load(tmp_path / "run" / "checkpoints" / "step_000012.pt", weights_only=True)
    b = torch.load(again_dir / "checkpoints" / "step_000012.pt", weights_only=True)
    assert b["step"] == 12 and all(torch.equal(a["G"][k], b["G"][k]) for k in a["G"])
    assert [m.step for m in client.get_metric_history(run.run_id, "loss/d")] == [4, 8, 12]  # each step once

    # Resuming a finished run (here into another folder) starts a child run linked to it by id.
    ckpt = tmp_path / "run" / "checkpoints" / "step_000006.pt"
    again = run_training(params, demo_dir, tmp_path / "resumed", resume=ckpt, project_dir=ROOT)
    child = client.get_run(again.run_id)
    assert again.run_id != run.run_id and child.data.tags["mlflow.parentRunId"] == run.run_id
    assert child.data.tags["sqgan.resumed_from_run"] == run.run_id and child.data.tags["resumed_from"] == str(ckpt)
    assert client.get_metric_history(again.run_id, "loss/d")[0].step == 8  # continues, not restarts
    assert client.get_run(run.run_id).info.status == "FINISHED"
    a = torch.load(tmp_path / "run" / "checkpoints" / "step_000012.pt", weights_only=True)
    for folder in ("resumed", "killed"):  # both resumed runs end bit-identical to the uninterrupted one
        b = torch.load(tmp_path / folder / "checkpoints" / "step_000012.pt", weights_only=True)
        for part in ("G", "D", "G_ema"):
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (folder, part)


def test_two_ddp_workers_survive_a_killed_rank_and_track_a_one_worker_run_on_the_same_global_batch(
        ray_session, demo_dir, tmp_path, monkeypatch):
    """Two gloo ranks; rank 1 exits once at step 6 (the test fault switch) and ray.max_failures=1 restarts the group
    from the step-4 checkpoint. FQ all-reduces inside D's forward and its dictionaries are compared by hash at every
    checkpoint; rank 0 alone evaluates — nothing may deadlock. MLflow holds each step once."""
    import signal

    import torch
    from mlflow.tracking import MlflowClient

    from sqgan.shells.ray_train import run_training

    def _timeout(*_):
        raise TimeoutError("2-worker Ray Train run did not finish in 400 s (a collective waiting on one rank?)")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = {"mlflow.tracking_uri": uri, "mlflow.artifact_root": str(tmp_path / "artifacts"),
              "ray.storage_path": str(tmp_path / "ray"), "train.steps": 12, "train.checkpoint_every": 4,
              "train.log_every": 2, "train.diffaugment": "[]", "train.lr_g": 1e-4, "train.lr_d": 4e-4}
    params = default_params(tiny_overrides(**common, **{"train.workers": 2, "train.batch_size": 8,
                                                         "ray.max_failures": 1}))
    flag = tmp_path / "rank1-exited"
    monkeypatch.setenv("SQGAN_TEST_WORKER_FAULT", f"1:6:{flag}")
    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(400)
    try:
        run = run_training(params, demo_dir, tmp_path / "run", project_dir=ROOT)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    monkeypatch.delenv("SQGAN_TEST_WORKER_FAULT")
    assert flag.read_text() == "rank 1 exited at step 6\n"  # the fault happened
    client = MlflowClient(tracking_uri=uri)
    r = client.get_run(run.run_id)
    assert r.info.status == "FINISHED" and r.data.params["train.workers"] == "2"
    assert r.data.tags["sqgan.restarted_from_step"] == "4"  # from the last checkpoint, not from scratch
    two = client.get_metric_history(run.run_id, "loss/d")
    assert [m.step for m in two] == [2, 4, 6, 8, 10, 12]  # the replayed steps 5-6 are not logged twice
    assert "fid40_train_randcnn" in r.data.metrics and run.metrics["step"] == 12
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_000012.pt", weights_only=True)
    assert state["step"] == 12 and bool(state["D"]["quantizers.2.initialised"])
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == \
        ["step_000004.pt", "step_000008.pt", "step_000012.pt"]

    # One worker on the same global batch (16 = 2 × 8): the same images each step, other z and BN statistics.
    single = default_params(tiny_overrides(**common, **{"train.workers": 1, "train.batch_size": 16}))
    one_run = run_training(single, demo_dir, tmp_path / "one", project_dir=ROOT)
    one = client.get_metric_history(one_run.run_id, "loss/d")
    diffs = [abs(a.value - b.value) for a, b in zip(two, one, strict=True)]
    assert max(diffs[:4]) < LOSS_TOLERANCE, diffs  # steps 2–8; later the two z streams drive the runs apart


# Measured on this machine: the 2-worker and 1-worker loss/d window means (≈ 2.0) differ by at most 0.0055 over the
# first 12 steps (without DiffAugment; z and BatchNorm statistics still differ by rank); 0.02 leaves ~4× room. Since
# the generator uses z (issue 25: before, its mapping made it ignore z, so the z streams hardly mattered) the runs
# part faster: 0.0003, 0.0005, 0.0005, 0.0023 over steps 2–8, then 0.008 and 0.028, so steps 2–8 are compared. At
# the defaults of 2026-12-06 (twice those learning rates) they part by step 6 (0.019, then 0.072 at step 8), so the
# test keeps lr_g 1e-4 / lr_d 4e-4: what it checks is the DDP arithmetic, not the rates.
LOSS_TOLERANCE = 0.02


def test_stylegan2_with_sq_trains_under_ray_and_logs_sq_usage_to_mlflow(ray_session, demo_dir, tmp_path):
    """What `sqgan train --set model.arch=stylegan2 --set sq.enabled=true` runs, at a tiny size."""
    from mlflow.tracking import MlflowClient

    from sqgan.shells.ray_train import run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = default_params(tiny_overrides(**{
        "mlflow.tracking_uri": uri, "mlflow.artifact_root": str(tmp_path / "artifacts"),
        "mlflow.experiment": "sg2", "ray.storage_path": str(tmp_path / "ray"),
        "model.arch": "stylegan2", "sq.enabled": "true", "model.channel_base": 256, "model.channel_max": 16,
        "model.mapping_layers": 2, "train.steps": 6, "train.log_every": 3, "train.checkpoint_every": 6,
        "train.sample_every": 6, "train.r1_every": 2, "metrics.diversity_every": 3,
    }))
    run = run_training(params, demo_dir, tmp_path / "run", project_dir=ROOT)
    client = MlflowClient(tracking_uri=uri)
    r = client.get_run(run.run_id)
    assert r.info.status == "FINISHED" and r.data.params["model.arch"] == "stylegan2"
    usage = client.get_metric_history(run.run_id, "sq/utilisation")
    assert [m.step for m in usage] == [3, 6] and all(0 < m.value <= 1 for m in usage)
    assert 1 <= r.data.metrics["sq/perplexity"] <= 16  # sq.codebook_size 16
    for key in ("loss/sq", "loss/qcr", "loss/r1", "d/feature_similarity", "fq/layer1/utilisation",
                "fid40_train_randcnn"):
        assert key in r.data.metrics, key
    assert -1 <= r.data.metrics["d/feature_similarity"] <= 1
