"""Kubeflow: the pipelines compile and the committed YAML is current; the demo train pipeline and a data pipeline run
end to end under kfp.local (subprocesses, this venv) into one MLflow parent run; the sweep's RayJob manifest, its
wait loop and the sweep task are checked against a fake Kubernetes API; missing or empty inputs are named."""

# No `from __future__ import annotations` here: KFP reads the test components' annotations as types.

import base64
import io
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, tiny_overrides
from kfp import dsl, local
from kfp.dsl import Dataset, Output
from PIL import Image

from components import IMAGE
from sqgan.config import default_params

PARAMS_YAML = (ROOT / "params.yaml").read_text()
# kfp.local warns that the components' image is not plain Python; the subprocess runner runs them in this venv.
pytestmark = pytest.mark.filterwarnings("ignore:.*non-Python base image:RuntimeWarning")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _runs(uri: str) -> list[Any]:
    c = _client(uri)
    return [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]


@pytest.fixture
def kfp_local(tmp_path, monkeypatch):
    """kfp.local with this venv's Python; the tasks' relative paths (mlartifacts, ray_results, caches) land in
    tmp_path, never in the checkout."""
    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-root"))
    return tmp_path


# ------------------------------------------------------------------------------------------------ compile
def test_every_pipeline_compiles_and_the_committed_yaml_is_current():
    from pipelines.compile import COMPILED, stale
    from pipelines.sqgan import DATASETS, KINDS, compiled_name

    diffs = stale()
    assert not diffs, "pipelines/compiled/ is out of date; run `make pipelines`:\n" + "\n".join(diffs)
    assert sorted(p.name for p in COMPILED.glob("*.yaml")) == sorted([*(compiled_name(k, d) for k in KINDS
                                                                       for d in DATASETS), "experiment.yaml"])


def _spec(name: str) -> dict[str, Any]:
    from pipelines.compile import COMPILED

    return yaml.safe_load((COMPILED / name).read_text())


def _tasks(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["root"]["dag"]["tasks"]


def test_compiled_sweep_pipeline_wires_data_tune_best_params_train_eval_in_one_image():
    spec = _spec("sweep_brecahad.yaml")
    tasks = _tasks(spec)
    assert set(tasks) == {"load-params", "open-pipeline-run", "download", "brecahad", "tune", "train", "evaluate",
                          "finish-pipeline-run"}
    after = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    assert after["brecahad"] >= {"download"} and after["tune"] >= {"brecahad", "open-pipeline-run"}
    assert after["train"] >= {"tune", "brecahad"} and after["finish-pipeline-run"] >= {"evaluate"}
    train_params = tasks["train"]["inputs"]["artifacts"]["params"]["taskOutputArtifact"]
    assert train_params == {"outputArtifactKey": "best_params", "producerTask": "tune"}  # the final train: best params
    assert tasks["tune"]["inputs"]["parameters"]["image"]["runtimeValue"]["constant"] == IMAGE
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {IMAGE}  # one image, named in components/__init__.py
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert {"params_yaml", "overrides", "tracking_uri", "parent_run_id", "storage_path", "timeout_s"} <= set(inputs)
    for name, t in tasks.items():  # every stage task reads the one params artifact and the MLflow parent
        if name not in ("load-params",):
            assert "params" in t["inputs"]["artifacts"], name
        if name not in ("load-params", "open-pipeline-run", "finish-pipeline-run"):
            parent = t["inputs"]["parameters"]["parent_run_id"]["taskOutputParameter"]
            assert parent["producerTask"] == "open-pipeline-run", name


def test_components_are_thin_calls_of_sqgan_kfp_tasks():
    """No stage logic in a component: each body imports from sqgan.commands.kfp_tasks and calls it."""
    import inspect

    import components.data
    import components.experiment
    import components.sweep
    import components.tracking
    import components.train

    modules = (components.data, components.experiment, components.sweep, components.tracking, components.train)
    comps = [obj for mod in modules for obj in vars(mod).values()
             if hasattr(obj, "python_func") and obj.python_func.__module__ == mod.__name__]
    assert len(comps) == 20  # load/open/finish, demo, download, curate, 7 datasets, subset, selffilter, train, prior,
    #                          eval, tune, experiment
    for c in comps:
        body = inspect.getsource(c.python_func).split('"""')[-1]
        code = [ln.strip() for ln in body.splitlines() if ln.strip()]
        assert code[0].startswith("from sqgan.commands.kfp_tasks import"), c.name
        assert len(code) <= 5 and not any(ln.split()[0] in ("for", "if", "while", "with", "try:") for ln in code), \
            (c.name, code)


# ------------------------------------------------------------------------------------------------ local runs
@pytest.mark.ray
@pytest.mark.slow
def test_demo_train_pipeline_runs_locally_into_one_mlflow_parent(kfp_local):
    from pipelines.sqgan import train_pipeline

    uri = f"sqlite:///{kfp_local / 'mlflow.db'}"
    overrides = tiny_overrides() + ["data.demo.lfw_faces=40", "model.resolution=32", "ray.num_cpus=2",
                                    "eval.num_fake=100", "eval.lpips_pairs=20"]
    train_pipeline("demo")(params_yaml=PARAMS_YAML, overrides=overrides, tracking_uri=uri)

    runs = {r.data.tags.get("sqgan.stage"): r for r in _runs(uri)}
    assert set(runs) == {"pipeline", "data", "train"}
    parent = runs["pipeline"]
    assert parent.info.status == "FINISHED" and parent.data.tags["sqgan.kfp.pipeline"] == "sqgan-train-demo"
    for stage in ("data", "train"):
        assert runs[stage].data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
        assert runs[stage].info.status == "FINISHED", stage
    assert runs["data"].data.metrics["images"] == 89  # 49 IHC crops + 40 faces
    train = runs["train"]
    assert train.data.params["train.steps"] == "20"  # the overrides reached the task
    assert train.data.params["mlflow.parent_run_id"] == parent.info.run_id
    evaluated = train.data.metrics  # eval logged into the training run, with provenance
    assert {"fid100_train_randcnn", "kid100_train_randcnn_mean", "lpips20_randalex"} <= set(evaluated)
    assert "sqgan.metric.fid100_train_randcnn" in train.data.tags
    root = next((kfp_local / "kfp-root").iterdir())
    assert (root / "train" / "model" / "checkpoints" / "step_000020.pt").is_file()
    page = (root / "train" / "samples").read_text()
    png = base64.b64decode(page.split("base64,")[1].split('"')[0])
    assert Image.open(io.BytesIO(png)).size[0] > 32  # the sample grid, embedded for the Kubeflow UI
    import json

    out = json.loads((root / "evaluate" / "executor_output.json").read_text())
    shown = out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert shown["fid100_train_randcnn"] == pytest.approx(evaluated["fid100_train_randcnn"])


def _metfaces_zip(path: Path) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(6):
            img = io.BytesIO()
            Image.fromarray(np.full((40, 30, 3), i * 40, np.uint8)).save(img, format="PNG")
            z.writestr(f"metfaces/images/{i:05d}.png", img.getvalue())
        z.writestr("metfaces/images/broken.png", b"")
    path.write_bytes(buf.getvalue())
    return path


def test_data_pipeline_downloads_then_prepares_and_logs_a_nested_data_run(kfp_local):
    from pipelines.sqgan import data_pipeline

    uri = f"sqlite:///{kfp_local / 'mlflow.db'}"
    archive = _metfaces_zip(kfp_local / "metfaces.zip")
    data_pipeline("metfaces")(params_yaml=PARAMS_YAML, overrides=[f"data.metfaces.path={archive}"], tracking_uri=uri)
    root = next((kfp_local / "kfp-root").iterdir())
    raw = root / "download" / "raw"
    assert sorted(p.name for p in (raw / "metfaces" / "images").iterdir())[:2] == ["00000.png", "00001.png"]
    assert archive.is_file()  # the user's archive is read, never moved
    manifest = pd.read_parquet(root / "metfaces" / "data" / "manifest.parquet")
    assert len(manifest) == 6
    runs = {r.data.tags.get("sqgan.stage"): r for r in _runs(uri)}
    assert runs["data"].data.metrics["kept"] == 6 and runs["data"].data.metrics["quarantined"] == 1
    assert runs["data"].data.tags["mlflow.parentRunId"] == runs["pipeline"].info.run_id
    assert runs["pipeline"].info.status == "FINISHED"


def test_download_copies_a_local_folder_and_leaves_it_whole(tmp_path):
    from sqgan.data.prepare import download_raw

    src = tmp_path / "pet"
    (src / "images").mkdir(parents=True)
    (src / "images" / "a.jpg").write_bytes(b"jpeg")
    (src / "annotations").mkdir()
    params = default_params([f"data.dogface.path={src}"])
    download_raw("dogface", params.data.dogface, tmp_path / "raw")
    assert (tmp_path / "raw" / "images" / "a.jpg").read_bytes() == b"jpeg"
    assert (tmp_path / "raw" / "annotations").is_dir()
    assert (src / "images" / "a.jpg").read_bytes() == b"jpeg"  # the user's folder is copied, never moved
    from sqgan.io import UnsafeOutput

    with pytest.raises(UnsafeOutput):  # and never written into
        download_raw("dogface", params.data.dogface, src / "raw")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def _never_written(data: Output[Dataset]):
    print("this task writes no data")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def _empty_folder(data: Output[Dataset]):
    import os

    os.makedirs(data.path)


@pytest.mark.parametrize(("producer", "says"), [(_never_written, "does not exist"), (_empty_folder, "is empty")])
def test_a_component_given_a_missing_or_empty_input_fails_naming_it(kfp_local, capfd, producer, says):
    from components.tracking import load_params
    from components.train import train

    uri = f"sqlite:///{kfp_local / 'mlflow.db'}"

    @dsl.pipeline(name="broken-input")
    def broken(params_yaml: str):
        loaded = load_params(params_yaml=params_yaml, overrides=[])
        train(params=loaded.outputs["params"], overrides=[], tracking_uri=uri, parent_run_id="",
              data=producer().outputs["data"])

    with pytest.raises(RuntimeError):
        broken(params_yaml=PARAMS_YAML)
    log = capfd.readouterr()
    assert "input artifact 'data': " in log.out + log.err
    assert says in log.out + log.err
    assert not (kfp_local / "ray_results").exists()  # refused before Ray started


def test_bad_override_fails_the_first_task_naming_the_key(kfp_local, capfd):
    from pipelines.sqgan import data_pipeline

    with pytest.raises(RuntimeError):
        data_pipeline("demo")(params_yaml=PARAMS_YAML, overrides=["fq.codebook_sise=16"],
                              tracking_uri=f"sqlite:///{kfp_local / 'mlflow.db'}")
    log = capfd.readouterr()
    assert "fq.codebook_sise" in log.out + log.err
    assert not (kfp_local / "mlflow.db").exists()  # nothing was opened


# ------------------------------------------------------------------------------------------------ RayJob
def _spec_args(**kw: Any) -> dict[str, Any]:
    args = {"name": "sqgan-sweep-test", "image": "registry.local/sqgan:1", "params_yaml": "fq:\n  codebook_size: 16\n",
            "data_uri": "s3://bucket/artifacts/brecahad", "tracking_uri": "http://mlflow.mlflow.svc:5000",
            "parent_run_id": "abc123", "storage_path": "s3://bucket/sqgan", "namespace": "team"}
    args.update(kw)
    return args


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_rayjob_manifest_runs_sqgan_tune_in_the_image_with_the_tracking_env():
    import shlex

    from sqgan.shells.kuberay import DATA_MOUNT, RayJobSpec, rayjob_manifest

    assert rayjob_manifest(RayJobSpec(**_spec_args()))["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["volumeMounts"][0]["mountPath"] == DATA_MOUNT
    m = rayjob_manifest(RayJobSpec(**_spec_args(data_mount="/mnt/data/")))  # every pod path follows the mount
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayJob"
    assert m["metadata"] == {"name": "sqgan-sweep-test", "namespace": "team", "labels": {"app.kubernetes.io/name":
                                                                                           "sqgan"}}
    spec = m["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["bash", "-c"] and len(words) == 3  # one single-quoted script: no expansion in the submitter
    script = words[2]
    assert 'printf "%s\\n" "$SQGAN_PARAMS_YAML" > /mnt/data/params.yaml' in script
    tune = shlex.split(script.split("&&")[1])
    assert tune[:2] == ["sqgan", "tune"]
    flags = dict(zip(tune[2::2], tune[3::2], strict=False))
    assert (flags["--params"], flags["--data"], flags["--out"]) == \
        ("/mnt/data/params.yaml", "/mnt/data/dataset", "/mnt/data/sweep")
    sets = [tune[i + 1] for i, w in enumerate(tune) if w == "--set"]
    assert sets == ["ray.address=auto", "ray.storage_path=$SQGAN_STORAGE_PATH",
                    "mlflow.tracking_uri=$MLFLOW_TRACKING_URI", "mlflow.parent_run_id=$SQGAN_PARENT_RUN_ID",
                    "tune.use_gpu=true"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    pods = [cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]]
    for pod in pods:
        for c in pod["containers"] + pod["initContainers"]:
            assert c["image"] == "registry.local/sqgan:1"
            env = _env(c)
            assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow.svc:5000"
            assert env["SQGAN_PARENT_RUN_ID"] == "abc123" and env["SQGAN_STORAGE_PATH"] == "s3://bucket/sqgan"
            assert yaml.safe_load(env["SQGAN_PARAMS_YAML"]) == {"fq": {"codebook_size": 16}}
        fetch = pod["initContainers"][0]
        assert fetch["command"] == ["sqgan", "data", "fetch", "--uri", "s3://bucket/artifacts/brecahad", "--out",
                                    "/mnt/data/dataset"]
        for c in pod["containers"] + pod["initContainers"]:  # the data volume where the init container put the data
            assert {"name": "sqgan-data", "mountPath": "/mnt/data"} in c["volumeMounts"]
    worker = cluster["workerGroupSpecs"][0]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (worker["minReplicas"], worker["maxReplicas"]) == (1, 4)
    cpu = rayjob_manifest(RayJobSpec(**_spec_args(worker_gpus=0)))
    assert "tune.use_gpu" not in cpu["spec"]["entrypoint"]
    assert "nvidia.com/gpu" not in str(cpu["spec"]["rayClusterSpec"]["workerGroupSpecs"])


def test_rayjob_manifest_builds_the_cluster_of_k8s_rayjob_yaml():
    """The sweep component's RayJob and the hand-applied k8s/rayjob.yaml give the same head, workers and limits."""
    from sqgan.shells.kuberay import RayJobSpec, rayjob_manifest

    ours = rayjob_manifest(RayJobSpec(**_spec_args()))["spec"]["rayClusterSpec"]
    theirs = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    for key in ("rayVersion", "enableInTreeAutoscaling", "autoscalerOptions"):
        assert ours[key] == theirs[key], key
    assert ours["headGroupSpec"]["rayStartParams"] == theirs["headGroupSpec"]["rayStartParams"]
    head = (ours["headGroupSpec"]["template"]["spec"]["containers"][0],
            theirs["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert head[0]["resources"] == head[1]["resources"] and head[0]["ports"] == head[1]["ports"]
    ow, tw = ours["workerGroupSpecs"][0], theirs["workerGroupSpecs"][0]
    for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams"):
        assert ow[key] == tw[key], key
    assert ow["template"]["spec"]["tolerations"] == tw["template"]["spec"]["tolerations"]
    assert ow["template"]["spec"]["containers"][0]["resources"] == tw["template"]["spec"]["containers"][0]["resources"]


def test_rbac_lets_the_sweep_task_create_read_and_delete_rayjobs():
    role, binding = yaml.safe_load_all((ROOT / "k8s" / "kfp-rayjob-rbac.yaml").read_text())
    rule = role["rules"][0]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert {"create", "get", "delete"} <= set(rule["verbs"])  # what sqgan.shells.kuberay calls
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"] == binding["subjects"][0]["namespace"]


@pytest.mark.parametrize(("change", "named"), [
    ({"tracking_uri": "sqlite:///mlflow.db"}, "tracking_uri 'sqlite:///mlflow.db'"),
    ({"storage_path": "ray_results"}, "storage_path 'ray_results'"),
    ({"storage_path": "file:///tmp/x"}, "storage_path 'file:///tmp/x'"),
    ({"parent_run_id": ""}, "parent_run_id is empty"),
    ({"data_uri": ""}, "data_uri is empty"),
    ({"max_workers": 0, "min_workers": 0}, "min_workers 0"),
    ({"data_mount": "data"}, "data_mount 'data': the pods' data volume needs an absolute mount point"),
    ({"data_mount": "/"}, "data_mount '/'"),
    ({"data_mount": "/dev/shm"}, "data_mount '/dev/shm'"),
])
def test_rayjob_that_could_not_work_is_refused_before_submission(change, named):
    from sqgan.shells.kuberay import RayJobSpec, rayjob_manifest

    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        rayjob_manifest(RayJobSpec(**_spec_args(**change)))


class FakeRayJobs:
    """The custom-objects API of a cluster whose RayJob reports `statuses` in turn (the last one repeats)."""

    def __init__(self, statuses: list[dict[str, Any]], on_create=None) -> None:
        self.statuses, self.on_create = list(statuses), on_create
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.gets = 0

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("ray.io", "v1", "rayjobs") and namespace == body["metadata"]["namespace"]
        self.created.append(body)
        if self.on_create:
            self.on_create(body)
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert name == self.created[-1]["metadata"]["name"] if self.created else True
        self.gets += 1
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {"metadata": {"name": name}, "status": status}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def test_wait_returns_when_the_job_goes_from_running_to_succeeded():
    from sqgan.shells.kuberay import wait_for_rayjob

    api = FakeRayJobs([{}, {"jobDeploymentStatus": "Initializing"},
                       {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"},
                       {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"},
                       {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}])
    clock, said = Clock(), []
    status = wait_for_rayjob(api, "j", "ns", timeout_s=600, poll_s=10, sleep=clock.sleep, clock=clock, log=said.append)
    assert status["jobStatus"] == "SUCCEEDED"
    assert api.gets == 5 and clock.sleeps == [10, 10, 10, 10]
    assert said == ["RayJob ns/j: job -, deployment -", "RayJob ns/j: job -, deployment Initializing",
                    "RayJob ns/j: job RUNNING, deployment Running", "RayJob ns/j: job SUCCEEDED, deployment Complete"]
    assert api.deleted == []


def test_wait_raises_the_jobs_message_when_it_failed():
    from sqgan.shells.kuberay import RayJobFailed, wait_for_rayjob

    api = FakeRayJobs([{"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"},
                       {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed", "reason": "AppFailed",
                        "message": "Job entrypoint command failed with exit code 2"}])
    clock = Clock()
    with pytest.raises(RayJobFailed, match=r"RayJob ns/j ended FAILED: AppFailed: Job entrypoint command failed with "
                                           r"exit code 2; the driver's log: kubectl logs -n ns -l job-name=j"):
        wait_for_rayjob(api, "j", "ns", timeout_s=600, poll_s=5, sleep=clock.sleep, clock=clock, log=lambda _: None)
    deployment = FakeRayJobs([{"jobDeploymentStatus": "Failed", "message": "RayCluster pods not ready"}])
    with pytest.raises(RayJobFailed, match="ended Failed: RayCluster pods not ready"):
        wait_for_rayjob(deployment, "j", "ns", timeout_s=600, sleep=clock.sleep, clock=clock, log=lambda _: None)


def test_wait_times_out_and_deletes_the_rayjob():
    from sqgan.shells.kuberay import wait_for_rayjob

    api = FakeRayJobs([{"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}])
    clock = Clock()
    with pytest.raises(TimeoutError, match=r"still RUNNING after timeout_s=25 s; deleted it"):
        wait_for_rayjob(api, "j", "ns", timeout_s=25, poll_s=10, sleep=clock.sleep, clock=clock, log=lambda _: None)
    assert clock.sleeps == [10, 10, 5] and api.deleted == ["j"]


def test_sweep_task_submits_waits_and_returns_the_best_params_for_the_final_train(tmp_path, demo_dir, monkeypatch):
    """The fake cluster does what the RayJob's `sqgan tune` does to MLflow (a sweep run under the pipeline's
    parent, with its sweep/ files), reading only what the manifest carries."""
    from sqgan.commands.kfp_tasks import open_pipeline_run, sweep_task, write_params
    from sqgan.shells.tracking import start_run

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params_file = tmp_path / "params.yaml"
    write_params(PARAMS_YAML, [], params_file)
    parent = open_pipeline_run(params_file, [], uri, "", "sqgan-sweep-demo", "kfp-run-1")

    def run_the_sweep(body: dict[str, Any]) -> None:
        head = body["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        env = _env(head)
        sweep_params = default_params([f"mlflow.tracking_uri={env['MLFLOW_TRACKING_URI']}",
                                       f"mlflow.parent_run_id={env['SQGAN_PARENT_RUN_ID']}"])
        assert yaml.safe_load(env["SQGAN_PARAMS_YAML"])["fq"]["codebook_size"] == 8  # the override got there
        _, run_id = start_run(sweep_params, demo_dir, tags={"sqgan.stage": "sweep"})
        best = yaml.safe_load(env["SQGAN_PARAMS_YAML"])
        best["fq"]["codebook_size"] = 32  # the sweep's winner
        best["ray"]["address"] = "auto"  # as the RayJob ran it
        folder = tmp_path / "sweep-out"
        folder.mkdir()
        (folder / "best_params.yaml").write_text("# best trial\n" + yaml.safe_dump(best))
        (folder / "trials.md").write_text("| trial | kid |\n|---|---|\n| t0 | 0.1 |\n")
        (folder / "trials.csv").write_text("trial,kid\nt0,0.1\n")
        for f in folder.iterdir():
            _client(env["MLFLOW_TRACKING_URI"]).log_artifact(run_id, str(f), "sweep")
        time.sleep(0.01)  # another task's run under the same parent, started later: not the sweep's
        start_run(sweep_params, demo_dir, tags={"sqgan.stage": "data"})

    api = FakeRayJobs([{"jobStatus": "RUNNING"}, {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}],
                      on_create=run_the_sweep)
    # The manifest check wants a server URL; the fake cluster logs to this sqlite file, so let it pass as one.
    monkeypatch.setattr("sqgan.shells.kuberay.check_spec", lambda spec: None)
    out = tmp_path / "out"
    sweep_id = sweep_task(params_file, ["fq.codebook_size=8"], uri, parent, demo_dir, "s3://b/demo", "img:1", "ns",
                          "s3://b/sqgan", 60, 0.01, 1, 2, out / "trials.md", out / "trials.csv",
                          out / "best_params.yaml", api=api)
    assert api.created[0]["metadata"]["namespace"] == "ns" and api.gets == 2
    sweep = _client(uri).get_run(sweep_id)
    assert sweep.data.tags["mlflow.parentRunId"] == parent
    assert (out / "trials.csv").read_text() == "trial,kid\nt0,0.1\n"
    best = yaml.safe_load((out / "best_params.yaml").read_text())
    assert best["fq"]["codebook_size"] == 32
    assert best["ray"]["address"] is None  # the final train runs where the pipeline runs, not on `auto`
    assert best["mlflow"]["tracking_uri"] == uri and best["mlflow"]["parent_run_id"] == parent


def test_sweep_task_failure_marks_the_pipeline_run_failed(tmp_path, demo_dir, monkeypatch):
    from sqgan.commands.kfp_tasks import open_pipeline_run, sweep_task, write_params
    from sqgan.shells.kuberay import RayJobFailed

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_params(PARAMS_YAML, [], tmp_path / "params.yaml")
    parent = open_pipeline_run(tmp_path / "params.yaml", [], uri, "", "p", "r")
    monkeypatch.setattr("sqgan.shells.kuberay.check_spec", lambda spec: None)
    api = FakeRayJobs([{"jobStatus": "FAILED", "message": "trial OOM"}])
    with pytest.raises(RayJobFailed, match="trial OOM"):
        sweep_task(tmp_path / "params.yaml", [], uri, parent, demo_dir, "s3://b/d", "img:1", "ns", "s3://b/s", 60,
                   0.01, 1, 2, tmp_path / "t.md", tmp_path / "t.csv", tmp_path / "b.yaml", api=api)
    run = _client(uri).get_run(parent)
    assert run.info.status == "FAILED" and run.data.tags["sqgan.kfp.failed_task"] == "sweep"
    assert not (tmp_path / "b.yaml").exists()


# ------------------------------------------------------------------------------------------------ fetch
def test_fetch_copies_a_curated_dataset_from_a_path_or_file_uri(tmp_path, demo_dir):
    from sqgan.data.fetch import fetch_dataset

    a = fetch_dataset(str(demo_dir), tmp_path / "a")
    b = fetch_dataset(demo_dir.as_uri(), tmp_path / "b")
    assert a == b and a["images"] == len(pd.read_parquet(demo_dir / "manifest.parquet"))
    names = sorted(p.relative_to(demo_dir).as_posix() for p in demo_dir.rglob("*") if p.is_file())
    assert sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*") if p.is_file()
                  and p.name != ".sqgan-stage.json") == [n for n in names if n != ".sqgan-stage.json"]


def test_fetch_refuses_what_is_not_a_curated_dataset(tmp_path, monkeypatch):
    from sqgan.data.fetch import fetch_dataset

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no manifest.parquet inside"):
        fetch_dataset(str(tmp_path / "imgs"), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nothing there"):
        fetch_dataset(str(tmp_path / "nope"), tmp_path / "out")
    for var in ("SQGAN_S3_ENDPOINT", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="set SQGAN_S3_ENDPOINT"):
        fetch_dataset("minio://mlpipeline/v2/artifacts/x", tmp_path / "out")
    with pytest.raises(ValueError, match="scheme ftp:// is not one this reads"):
        fetch_dataset("ftp://host/data", tmp_path / "out")
    assert not (tmp_path / "out").exists()
