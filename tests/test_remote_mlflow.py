"""`sqgan train` against a real `mlflow server` over HTTP: params, metrics and artifacts end up in the server's
stores (its sqlite backend, its --artifacts-destination), and an unreachable server fails fast, before Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import ROOT, free_port, tiny_overrides

from sqgan.config import default_params

MLFLOW = Path(sys.executable).with_name("mlflow")
SERVER_START_TIMEOUT = 120.0  # ~8 s on an idle 2-core box, ~30 s at load average 14


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's own process group (it was started in a new session), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=15)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts under a tmp folder); yields
    (tracking URI, artifacts destination)."""
    home = tmp_path_factory.mktemp("mlflow-server")
    artifacts = home / "server-artifacts"
    artifacts.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = home / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    cmd = [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{home / 'server.db'}", "--artifacts-destination", str(artifacts)]
    with open(log, "wb") as out:
        # cwd=home: anything the server writes relative to its working folder stays out of the repository
        proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode} before answering:\n{log.read_text()}")
            try:
                if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server at {uri} did not answer /health in {SERVER_START_TIMEOUT:g} s:\n"
                            f"{log.read_text()}")
            time.sleep(0.5)
        yield uri, artifacts
    finally:
        _stop(proc)


def test_unreachable_tracking_server_fails_in_seconds_before_ray_starts(demo_dir: Path, tmp_path: Path) -> None:
    import ray

    from sqgan.shells.ray_train import run_training

    uri = f"http://127.0.0.1:{free_port()}"
    params = default_params(tiny_overrides(**{"mlflow.tracking_uri": uri, "ray.storage_path": str(tmp_path / "ray")}))
    ray_was_running = ray.is_initialized()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=uri.replace(".", r"\.")):
        run_training(params, demo_dir, tmp_path / "run", project_dir=ROOT)
    assert time.monotonic() - start < 60  # not a speed target: MLflow's own retries would take minutes
    assert ray.is_initialized() == ray_was_running  # preflight failed before init_ray
    assert not (tmp_path / "run" / "tracking.json").exists()


def test_sqgan_train_with_an_unreachable_tracking_server_exits_1_naming_the_uri(demo_dir: Path, tmp_path: Path) -> None:
    import ray
    from typer.testing import CliRunner

    from sqgan.cli import app

    uri = f"http://127.0.0.1:{free_port()}"
    ray_was_running = ray.is_initialized()
    start = time.monotonic()
    result = CliRunner().invoke(app, ["train", "--data", str(demo_dir), "--out", str(tmp_path / "run"),
                                      "--no-params-file", "--set", f"mlflow.tracking_uri={uri}",
                                      "--set", f"ray.storage_path={tmp_path / 'ray'}"])
    assert result.exit_code == 1, result.output
    assert uri in result.output and "Traceback" not in result.output
    assert time.monotonic() - start < 60  # not a speed target: MLflow's own retries would take minutes
    assert ray.is_initialized() == ray_was_running


@pytest.mark.ray
def test_ray_training_logs_params_metrics_and_artifacts_to_a_remote_tracking_server(
    mlflow_server: tuple[str, Path],
    ray_session: object,
    demo_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.tracking import MlflowClient

    from sqgan.shells.ray_train import run_training

    uri, server_artifacts = mlflow_server
    # The URI comes from the driver's environment only: the Ray workers must get it from their config.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = default_params(tiny_overrides(**{
        "ray.storage_path": str(tmp_path / "ray"), "mlflow.experiment": "remote-test", "fq.decay": 0.7,
        "train.steps": 12, "train.log_every": 4, "train.sample_every": 6, "train.checkpoint_every": 6,
    }))
    assert not params.mlflow.tracking_uri
    run = run_training(params, demo_dir, tmp_path / "run", project_dir=ROOT)
    assert run.tracking_uri == uri

    client = MlflowClient(tracking_uri=uri)
    r = client.get_run(run.run_id)
    assert r.info.status == "FINISHED"
    assert r.info.artifact_uri.startswith("mlflow-artifacts:"), r.info.artifact_uri  # proxied by the server
    assert client.get_experiment(r.info.experiment_id).name == "remote-test"
    assert r.data.params["fq.decay"] == "0.7" and r.data.params["train.steps"] == "12"
    assert [m.step for m in client.get_metric_history(run.run_id, "loss/d")] == [4, 8, 12]
    assert "fid40_train_randcnn" in r.data.metrics

    top = {f.path for f in client.list_artifacts(run.run_id)}
    assert {"samples", "metrics.json", "params.yaml", "checkpoints"} <= top
    samples = {f.path for f in client.list_artifacts(run.run_id, "samples")}
    assert {"samples/step_000006.png", "samples/step_000012.png", "samples/grid.png"} <= samples
    checkpoints = {f.path for f in client.list_artifacts(run.run_id, "checkpoints")}
    assert "checkpoints/step_000012.pt" in checkpoints

    # The files lie in the server's --artifacts-destination, in a folder of this run.
    stored = {p.relative_to(server_artifacts).as_posix() for p in server_artifacts.rglob("*") if p.is_file()}
    for name in ("params.yaml", "metrics.json", "samples/grid.png", "checkpoints/step_000012.pt"):
        assert any(s.endswith(f"{run.run_id}/artifacts/{name}") for s in stored), (name, sorted(stored))
    assert not (tmp_path / "mlartifacts").exists() and not (tmp_path / "run" / "mlartifacts").exists()
