"""`sqgan eval` on a trained run (by folder, by MLflow run id, a bare checkpoint), the provenance training logs
with each metric, and the diversity diagnostics over training (D's features over the reals, CLIP of G's images)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from typer.testing import CliRunner

from sqgan.cli import app
from sqgan.config import default_params
from sqgan.metrics.names import is_quality_metric
from sqgan.shells.tracking import MlflowLogger, open_run
from sqgan.train.loop import Hooks, train

EVAL = ["eval.num_fake=30", "eval.lpips_pairs=5", "metrics.kid_subsets=4"]


def _env(tmp_path: Path) -> list[str]:
    return [f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"mlflow.artifact_root={tmp_path / 'art'}",
            f"metrics.cache_dir={tmp_path / 'cache'}"]


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def trained(demo_dir, tmp_path_factory):
    """A 10-step run tracked in MLflow (no Ray: the loop with the MLflow logger as hooks)."""
    tmp = tmp_path_factory.mktemp("eval")
    params = default_params(tiny_overrides(**{"train.steps": 10, "metrics.eval_every": 5,
                                              "metrics.eval_num_fake": 20}) + _env(tmp))
    out = tmp / "run"
    uri, run_id = open_run(params, demo_dir, out, project_dir=tmp)
    log = MlflowLogger(uri, run_id)
    result = train(params, demo_dir, out, hooks=Hooks(log.log_metrics, log.log_artifact, log.set_tags))
    return {"tmp": tmp, "out": out, "uri": uri, "run_id": run_id, "result": result, "data": demo_dir}


def test_training_logs_the_provenance_of_every_quality_metric(trained):
    from mlflow.tracking import MlflowClient

    run = MlflowClient(trained["uri"]).get_run(trained["run_id"])
    quality = [k for k in run.data.metrics if is_quality_metric(k)]
    assert {"fid40_train_randcnn", "kid40_train_randcnn_mean", "fid20_train_randcnn"} <= set(quality)
    for key in quality:
        prov = json.loads(run.data.tags[f"sqgan.metric.{key}"])
        assert prov["n_generated"] == int(key.split("_")[0].removeprefix("fid").removeprefix("kid"))
        assert prov["feature_network"] == "randcnn" and prov["reference_split"] == "train"
        assert prov["n_real"] == 134 and len(prov["weights_sha256"]) == 64
    saved = json.loads((trained["out"] / "metrics.json").read_text())
    assert set(saved["provenance"]) == {k for k in saved if is_quality_metric(k)}


def test_eval_of_a_run_folder_logs_to_its_run_and_a_second_eval_extracts_no_real_features(trained):
    from mlflow.tracking import MlflowClient

    runner = CliRunner()
    args = ["eval", "--checkpoint", str(trained["out"]), "--no-params-file", *_sets(EVAL + _env(trained["tmp"]))]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"run {trained['run_id']}" in r.output and "real features: extracted" in r.output
    saved = json.loads((trained["out"] / "eval.json").read_text())
    keys = {"fid30_train_randcnn", "kid30_train_randcnn_mean", "kid30_train_randcnn_std", "is30_randcnn_mean",
            "is30_randcnn_std", "precision30_train_randcnn", "recall30_train_randcnn", "lpips5_randalex"}
    assert keys <= set(saved) and set(saved["provenance"]) == keys and saved["step"] == 10
    run = MlflowClient(trained["uri"]).get_run(trained["run_id"])
    for k in keys:
        assert run.data.metrics[k] == pytest.approx(saved[k]) and f"sqgan.metric.{k}" in run.data.tags
    hist = MlflowClient(trained["uri"]).get_metric_history(trained["run_id"], "fid30_train_randcnn")
    assert [m.step for m in hist] == [10]

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "real features: cached" in again.output
    assert json.loads((trained["out"] / "eval.json").read_text())["fid30_train_randcnn"] == saved["fid30_train_randcnn"]
    hist = MlflowClient(trained["uri"]).get_metric_history(trained["run_id"], "fid30_train_randcnn")
    assert [m.step for m in hist] == [10]  # the same evaluation again adds no second point


def test_eval_by_run_id_downloads_its_checkpoint_and_agrees_with_the_folder(trained):
    out = trained["tmp"] / "by-id.json"
    r = CliRunner().invoke(app, ["eval", "--run", trained["run_id"], "--out", str(out), "--no-params-file",
                                 *_sets(EVAL + _env(trained["tmp"]) + ["eval.metrics=[fid,kid,nnmodes]"])])
    assert r.exit_code == 0, r.output
    by_id = json.loads(out.read_text())
    assert 1 <= by_id["nnmodes30_train_randcnn"] <= 30 and by_id["nnmodes30_train_randcnn"].is_integer()
    assert by_id["run_id"] == trained["run_id"] and "step_000010.pt" in by_id["checkpoint"]
    direct = json.loads((trained["out"] / "eval.json").read_text())
    assert by_id["fid30_train_randcnn"] == pytest.approx(direct["fid30_train_randcnn"], rel=1e-9)


def test_a_bare_checkpoint_gets_a_new_eval_run(trained, tmp_path):
    from mlflow.tracking import MlflowClient

    bare = tmp_path / "step_000010.pt"
    shutil.copy(trained["out"] / "checkpoints" / "step_000010.pt", bare)
    out = tmp_path / "bare.json"
    r = CliRunner().invoke(app, ["eval", "--checkpoint", str(bare), "--data", str(trained["data"]), "--out", str(out),
                                 "--no-params-file", *_sets(EVAL + _env(trained["tmp"]) + ["eval.metrics=[fid]"])])
    assert r.exit_code == 0, r.output
    run_id = json.loads(out.read_text())["run_id"]
    assert run_id != trained["run_id"]
    run = MlflowClient(trained["uri"]).get_run(run_id)
    assert run.data.tags["sqgan.stage"] == "eval" and "fid30_train_randcnn" in run.data.metrics
    assert run.info.status == "FINISHED"


def test_eval_fails_fast_on_bad_input(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    runner = CliRunner()
    base = ["--no-params-file", *_sets(EVAL + _env(trained["tmp"]))]
    t = time.monotonic()
    r = runner.invoke(app, ["eval", "--checkpoint", str(trained["out"]), *base, "--set", "metrics.features=inception"])
    assert r.exit_code == 1 and "metrics.inception_weights" in r.output and time.monotonic() - t < 20
    r = runner.invoke(app, ["eval", "--run", "0123456789abcdef", *base])
    assert r.exit_code == 1 and "no such run" in r.output
    r = runner.invoke(app, ["eval", *base])
    assert r.exit_code == 2 and "exactly one of --run" in r.output
    nowhere = tmp_path / "nowhere.db"
    r = runner.invoke(app, ["eval", "--run", "0123456789abcdef", *base, "--set",
                            f"mlflow.tracking_uri=sqlite:///{nowhere}"])
    assert r.exit_code == 1 and "no MLflow database" in r.output and not nowhere.exists()  # none created
    r = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "nothing"), *base])
    assert r.exit_code == 1 and "not found" in r.output
    r = runner.invoke(app, ["eval", "--checkpoint", str(trained["out"]), *base, "--set",
                            "metrics.reference_split=validation"])
    assert r.exit_code == 1 and "metrics.reference_split" in r.output


def test_diversity_diagnostics_cover_the_reals_and_clip_features_of_generated_images(demo_dir, tmp_path, monkeypatch):
    import open_clip
    from test_prior_stage import TINY_CLIP

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "sqgan-tiny-prior", TINY_CLIP)
    torch.manual_seed(0)
    weights = tmp_path / "clip.bin"
    torch.save(open_clip.CLIP(**TINY_CLIP).state_dict(), weights)
    params = default_params(tiny_overrides(**{
        "train.steps": 10, "metrics.eval_every": 0, "metrics.diversity_every": 5, "metrics.diversity_images": 24,
        "metrics.clip_similarity": "true", "prior.clip_model": "sqgan-tiny-prior",
        "prior.clip_pretrained": str(weights)}))
    logged: list[dict] = []
    train(params, demo_dir, tmp_path / "run", hooks=Hooks(log_metrics=lambda m, s: logged.append(m)))
    sims = [m["g/clip_similarity"] for m in logged if "g/clip_similarity" in m]
    feats = [m["d/feature_similarity"] for m in logged if "d/feature_similarity" in m]
    assert len(sims) == 2 and len(feats) == 2
    assert all(-1 <= s <= 1 for s in sims + feats) and all(s == s for s in sims)
