"""`sqgan tune` on a real multi-node Ray cluster on this machine (Ray's own `cluster_utils.Cluster`: a head with no
CPUs and worker nodes named by custom resources, each its own raylet and processes): trials land on both nodes,
checkpoints and Ray's sweep state live in the shared `ray.storage_path`, a worker node lost mid-trial costs only the
steps since that trial's last checkpoint, and a killed driver resumes on the same cluster."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides

from sqgan.tags import RESTARTED_FROM_STEP, TRIAL_ERROR, TRIAL_ID, TRIAL_NODE, TRIAL_NODES, TRIAL_STARTS, TRIAL_STATUS

SQGAN = [sys.executable, "-m", "sqgan.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_V2_ENABLED": "1"}


@pytest.fixture
def cluster():
    """A head with 0 CPUs (nothing runs there) and two 1-CPU worker nodes; GCS declares a silent node dead within
    ~3 s (Ray's default is ~30 s)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": {
        "health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    for name in ("node_a", "node_b"):
        c.add_node(num_cpus=1, resources={name: 1})
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()


def _sets(tmp_path: Path, address: str, **extra: object) -> list[str]:
    base = {
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "mlflow.artifact_root": str(tmp_path / "art"),
        "ray.storage_path": str(tmp_path / "ray"), "ray.address": address, "ray.cpus_per_worker": 1,
        "tune.fixed": "{}", "tune.scheduler": "fifo", "tune.max_concurrent_trials": 2, "tune.max_failures": 1,
        "tune.space": "{fq: {decay: {grid: [0.6, 0.7, 0.8]}}}",
        "train.steps": 48, "train.log_every": 4, "train.checkpoint_every": 8, "train.sample_every": 24,
        "metrics.eval_every": 0,
    }
    base.update(extra)
    args: list[str] = []
    for s in tiny_overrides(**base):
        args += ["--set", s]
    return args


def _trials(client, parent_id: str) -> dict[str, object]:
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags[TRIAL_ID]: r for r in runs}


def _wait(what: str, check, proc: subprocess.Popen, log: Path, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        assert proc.poll() is None, f"the sweep ended before {what}:\n" + log.read_text()[-4000:]
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}:\n" + log.read_text()[-4000:])


@pytest.mark.slow
def test_a_sweep_spreads_over_two_nodes_survives_a_lost_node_and_a_killed_driver(demo_dir, tmp_path, cluster):
    from mlflow.tracking import MlflowClient

    # a trial needs 2 CPUs on one node, which no node has: refused before any trial, naming the nodes
    r = subprocess.run([*SQGAN, "tune", "--no-params-file", "--data", str(demo_dir), "--out", str(tmp_path / "no"),
                        *_sets(tmp_path, cluster.address, **{"ray.cpus_per_worker": 2})],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert (f"ray.cpus_per_worker=2: a worker's CPUs must sit on one node, but no node of the Ray cluster at "
            f"{cluster.address} has 2") in r.stderr, r.stderr[-2000:]
    assert "0 CPU" in r.stderr and "1 CPU" in r.stderr and "--set ray.cpus_per_worker=1" in r.stderr
    assert not (tmp_path / "no").exists()

    sweep = tmp_path / "sweep"
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen([*SQGAN, "tune", "--no-params-file", "--data", str(demo_dir), "--out", str(sweep),
                                   *_sets(tmp_path, cluster.address)],
                                  cwd=tmp_path, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        parent_id = _wait("sweep.json", lambda: (sweep / "sweep.json").exists() and
                          json.loads((sweep / "sweep.json").read_text())["parent_run_id"], driver, log)
        experiment = Path(json.loads((sweep / "sweep.json").read_text())["experiment_path"])
        assert experiment.parent == tmp_path / "ray"  # the local folder is taken: every node sees it

        def checkpointed_trial():  # a trial whose first checkpoint Ray holds, and the node it runs on
            for folder in experiment.glob("run_trial_*"):
                if any(folder.glob("checkpoint_*")):
                    trial_id = re.search(r"run_trial_([0-9a-f]{5}_\d{5})_", folder.name).group(1)
                    run = _trials(client, parent_id).get(trial_id)
                    if run is not None and run.info.status == "RUNNING":
                        return trial_id, run.data.tags[TRIAL_NODE]
            return None

        victim, node_id = _wait("a trial's first checkpoint", checkpointed_trial, driver, log)
        node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
        survivor = next(n for n in cluster.worker_nodes if n.node_id != node_id).node_id
        cluster.remove_node(node, allow_graceful=False)  # its raylet and every process of that node, SIGKILL

        def restarted():  # the victim runs again, on the other node, from its checkpoint
            run = _trials(client, parent_id)[victim]
            return RESTARTED_FROM_STEP in run.data.tags and run.data.tags[TRIAL_NODE] == survivor and run

        _wait("the lost trial's restart", restarted, driver, log)
        done = _wait("a finished trial", lambda: {t: x.data.tags[TRIAL_STARTS] for t, x in
                                                  _trials(client, parent_id).items() if x.info.status == "FINISHED"},
                     driver, log)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver (the cluster lives on)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)

    r = subprocess.run([*SQGAN, "tune", "--resume", str(sweep)], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, log.read_text()[-3000:] + r.stdout[-3000:] + r.stderr[-3000:]

    runs = _trials(client, parent_id)
    assert len(runs) == 3 and len(list((sweep / "trials").iterdir())) == 3
    assert all(x.info.status == "FINISHED" and x.data.tags[TRIAL_STATUS] == "completed" for x in runs.values())
    for trial_id, starts in done.items():  # finished before the driver died: not re-run
        assert runs[trial_id].data.tags[TRIAL_STARTS] == starts
    lost = runs[victim].data.tags
    assert int(lost[RESTARTED_FROM_STEP]) >= 8 and int(lost[RESTARTED_FROM_STEP]) % 8 == 0
    nodes = lost[TRIAL_NODES].split(", ")
    assert nodes[0].endswith(f"({node_id[:8]})") and f"({survivor[:8]})" in nodes[1]
    ran_on = {n for x in runs.values() for n in x.data.tags[TRIAL_NODES].split(", ")}
    assert {n[-9:-1] for n in ran_on} == {node_id[:8], survivor[:8]}  # trials on both nodes
    for x in runs.values():  # every step logged once, resumed or restarted or not
        assert [m.step for m in client.get_metric_history(x.info.run_id, "loss/d")] == list(range(4, 49, 4))
    assert TRIAL_ERROR not in lost


@pytest.mark.slow
def test_a_node_lost_without_retries_fails_its_trial_naming_the_node_and_the_sweep_goes_on(demo_dir, tmp_path,
                                                                                           cluster):
    from mlflow.tracking import MlflowClient

    sweep = tmp_path / "sweep"
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen([*SQGAN, "tune", "--no-params-file", "--data", str(demo_dir), "--out", str(sweep),
                                   *_sets(tmp_path, cluster.address, **{
                                       "tune.max_failures": 0, "tune.space": "{fq: {decay: {grid: [0.6, 0.7]}}}"})],
                                  cwd=tmp_path, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        parent_id = _wait("sweep.json", lambda: (sweep / "sweep.json").exists() and
                          json.loads((sweep / "sweep.json").read_text())["parent_run_id"], driver, log)
        running = _wait("a running trial", lambda: [x for x in _trials(client, parent_id).values()
                                                    if x.info.status == "RUNNING"], driver, log)
        victim, node_id = running[0].data.tags[TRIAL_ID], running[0].data.tags[TRIAL_NODE]
        cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == node_id), allow_graceful=False)
        driver.wait(240)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, log.read_text()[-3000:]
    runs = _trials(client, parent_id)
    lost = runs[victim]
    assert lost.info.status == "FAILED" and lost.data.tags[TRIAL_STATUS] == "error", lost.data.tags
    assert re.match(rf"its Ray node \S+ \({node_id[:8]}\) was lost: \w+", lost.data.tags[TRIAL_ERROR]), \
        lost.data.tags[TRIAL_ERROR]
    other = next(x for t, x in runs.items() if t != victim)  # the sweep went on
    assert other.info.status == "FINISHED" and other.data.tags[TRIAL_STATUS] == "completed"
    assert f"| {victim} | error |" in (sweep / "trials.md").read_text()


@pytest.mark.ray
def test_beside_a_second_ray_a_training_starts_its_own_and_a_dead_controller_gives_its_cpus_back(
        ray_session, demo_dir, tmp_path):
    """Another Ray up on this machine (`ray start`, a notebook's): `sqgan train` starts a Ray of its own rather than
    joining it, and Train V2's placement-group cleaner asks *this* Ray whether a controller lives — so a controller
    that dies (a stopped trial's, a killed one's) gives its workers' CPUs back. Before: the cleaner asked the newest
    Ray on the machine, and the CPUs stayed taken."""
    import threading

    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from sqgan.config import default_params
    from sqgan.shells.ray_train import run_training

    other = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        sets = tiny_overrides(**{"mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                 "mlflow.artifact_root": str(tmp_path / "art"),
                                 "ray.storage_path": str(tmp_path / "ray"), "ray.cpus_per_worker": 1})
        args = [x for s in sets for x in ("--set", s)]
        r = subprocess.run([*SQGAN, "train", "--no-params-file", "--data", str(demo_dir), "--out", str(tmp_path / "a"),
                            *args, "--set", "train.steps=4", "--set", "ray.num_cpus=1"],
                           cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "Started a local Ray instance" in r.stderr and "Connecting to existing Ray" not in r.stderr

        params = default_params([*sets, "train.steps=2000"])
        failed: list[BaseException] = []

        def train() -> None:
            try:
                run_training(params, demo_dir, tmp_path / "b", project_dir=tmp_path)
            except BaseException as e:  # noqa: BLE001 — the killed controller ends it; what matters is the CPUs
                failed.append(e)

        thread = threading.Thread(target=train, daemon=True)
        thread.start()
        gcs = ray_session.get_runtime_context().gcs_address

        def actors(name: str) -> list:
            return [a for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], detail=True)
                    if a.class_name == name]

        # the training runs (its first checkpoint written: the worker group started and its placement group was
        # handed to the cleaner) and the cleaner is up — before that, a dying controller takes the cleaner's start
        # with it (Ray's own window of a few seconds, not this test's subject)
        deadline = time.time() + 180
        while time.time() < deadline and not (any((tmp_path / "b" / "checkpoints").glob("*.pt"))
                                              and actors("PlacementGroupCleaner")):
            assert thread.is_alive(), failed
            time.sleep(0.5)
        controller = actors("TrainController")
        assert controller and ray_session.available_resources().get("CPU", 0) == 1, failed
        os.kill(controller[0].pid, signal.SIGKILL)
        deadline = time.time() + 30
        while ray_session.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert ray_session.available_resources().get("CPU", 0) == 2  # the cleaner removed the workers' group
        thread.join(60)
        assert failed  # the run ended with its controller, not silently
    finally:
        other.shutdown()
