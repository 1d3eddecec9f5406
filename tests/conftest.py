"""Shared fixtures: offline env, one Ray session for the whole run, a small demo dataset."""

from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub call fails fast instead of hanging
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

ROOT = Path(__file__).resolve().parents[1]
WRITTEN_BY_RUNS = (".cache", "mlflow.db", "mlartifacts", "ray_results", "runs", "data/demo")


@pytest.fixture(scope="session", autouse=True)
def repo_stays_clean():
    """Tests write caches, runs and MLflow stores under tmp_path only, never into the checkout."""
    before = {name: (ROOT / name).exists() for name in WRITTEN_BY_RUNS}
    yield
    created = [name for name, existed in before.items() if not existed and (ROOT / name).exists()]
    assert not created, f"tests wrote {created} into the repository; give them a tmp_path"


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The demo dataset at 32 px (149 images: 49 IHC crops + 100 LFW faces)."""
    from sqgan.data.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("data") / "demo", resolution=32)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every Ray test (each TorchTrainer.fit costs ~25 s and ~2.5 GB here), started as `sqgan train`
    starts its own (`start_local_ray`: its dashboard on a free port, whose address every task and actor gets): Ray
    Train V2's placement-group cleaner asks it whether a controller is alive; without it, the workers' CPUs of a
    trial that ASHA stopped are never freed and later trials time out waiting for workers."""
    import ray

    from sqgan.shells.ray_train import start_local_ray

    start_local_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now (bound to port 0, then released)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(**extra: object) -> list[str]:
    """--set items for a few-second run on the demo data."""
    base = {
        "train.steps": 20,
        "train.batch_size": 16,
        "train.log_every": 5,
        "train.sample_every": 10,
        "train.checkpoint_every": 10,
        "model.g_channels": 16,
        "model.d_channels": 16,
        "model.z_dim": 32,
        "model.w_dim": 32,
        "fq.codebook_size": 16,
        "sq.codebook_size": 16,
        "metrics.num_fake": 40,
        "metrics.batch_size": 40,
        "metrics.kid_max_subset_size": 20,
        "metrics.kid_subsets": 5,
        "ray.cpus_per_worker": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A zip archive holding `members` (name → bytes), for the download/extract/prepare tests."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    seen_ranges: list[str | None] = []

    def do_GET(self):  # noqa: N802
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        self.seen_ranges.append(rng)
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.end_headers()
                return
            chunk = body[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            chunk = body
            self.send_response(200)
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        self.wfile.write(chunk)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    _RangeHandler.files, _RangeHandler.seen_ranges = {}, []
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _RangeHandler
    httpd.shutdown()
    httpd.server_close()


def ddp_steps_digest(rank: int, port: int, data: str, out: str, params, steps: int) -> None:
    """One rank of a 2-process gloo group: `steps` training steps on this rank's own batches of `data`, then the
    sha256 of G's, D's (and MixDL's heads') parameters written to out/rank{rank}.txt, for the test to compare. (Buffers
    such as w_avg follow each rank's own z between broadcasts, so they are left out.)"""
    import hashlib

    import torch.distributed as dist

    from sqgan.data.dataset import ManifestDataset
    from sqgan.train.loop import Runtime, setup, train_step, unwrap

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rt = Runtime(rank=rank, world_size=2)
        state = setup(params, rt)
        dataset = ManifestDataset(data, params.model.resolution, split="train")
        for _ in range(steps):
            train_step(state, params, dataset, rt)
        digest = hashlib.sha256()
        for module in (unwrap(state.G), unwrap(state.D), *([state.heads] if state.heads is not None else [])):
            for t in module.parameters():
                digest.update(t.detach().cpu().numpy().tobytes())
        Path(out, f"rank{rank}.txt").write_text(digest.hexdigest())
    finally:
        dist.destroy_process_group()


def kill_after_first_trial(cmd: list[str], cwd: Path, sweep_dir: Path, uri: str, timeout: float = 240) -> list:
    """Start a sweep driver (`sqgan tune` / `sqgan experiment run`) in its own process group, wait until one trial's
    run is FINISHED in MLflow, then SIGKILL the driver and its local Ray. Returns the finished runs (its log:
    cwd/driver.log)."""
    import json
    import signal
    import subprocess
    import time

    from mlflow.tracking import MlflowClient

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    client = MlflowClient(tracking_uri=uri)
    finished: list = []
    with (cwd / "driver.log").open("w") as log:
        driver = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while time.time() < deadline and driver.poll() is None:
                time.sleep(2)
                info = sweep_dir / "sweep.json"
                if not info.exists():
                    continue
                parent = client.get_run(json.loads(info.read_text())["parent_run_id"])
                runs = client.search_runs([parent.info.experiment_id],
                                          f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
                finished = [r for r in runs if r.info.status == "FINISHED"]
                if finished:
                    break
            assert finished, (cwd / "driver.log").read_text()[-3000:]
            assert driver.poll() is None, "the sweep ended before it could be killed"
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and its local Ray, by the process group we started
            driver.wait(30)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    return finished
