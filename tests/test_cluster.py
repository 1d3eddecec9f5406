"""The scale-out configs: ray_cluster.yaml passes Ray's own cluster-launcher validation (offline, no cloud API) and
the KubeRay manifests in k8s/ run the same image, pins and environment as it does."""

from __future__ import annotations

import copy
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
JOB_ENV = ("MLFLOW_TRACKING_URI", "SQGAN_STORAGE_PATH", "RAY_TRAIN_V2_ENABLED")
SHARED_STORAGE = re.compile(r"^(s3|gs)://[^/]+/")  # a head-local folder is refused once ray.address is set


def load_cluster_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def validated(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before it touches the cloud: merge the provider defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def container_checkout() -> str:
    """Where ray_cluster.yaml mounts the repository inside the Ray containers (the one file_mounts target whose
    source is the checkout); every other config must use the same place."""
    targets = [dst for dst, src in load_cluster_config()["file_mounts"].items() if src in (".", "./")]
    assert len(targets) == 1, f"ray_cluster.yaml should mount the checkout once, got {targets}"
    return targets[0]


def load_manifest(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / name).read_text()) if d is not None]
    assert len(docs) == 1, f"k8s/{name} should hold exactly one object"
    return docs[0]


def pinned(package: str) -> str:
    """`package==version` as constraints.txt pins it."""
    match = re.search(rf"^{re.escape(package)}==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.M)
    assert match, f"constraints.txt does not pin {package}"
    return f"{package}=={match.group(1)}"


def pip_installs(commands: list[str]) -> list[str]:
    """Every `pip install …` among shell commands joined with && / ; / newlines."""
    parts = (p.strip() for c in commands for p in re.split(r"&&|;|\n", c))
    return [p for p in parts if re.search(r"\bpip install\b", p)]


def cluster_pod_specs(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    return [("raycluster.yaml", load_manifest("raycluster.yaml")["spec"]),
            ("rayjob.yaml", load_manifest("rayjob.yaml")["spec"]["rayClusterSpec"])]


def all_containers(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for group, pod in cluster_pod_specs(cluster_spec):
        for container in pod.get("initContainers", []) + pod["containers"]:
            yield f"{group}/{container['name']}", container


# ------------------------------------------------------------------------------------- ray_cluster.yaml
def test_ray_cluster_config_passes_ray_validation() -> None:
    prepared = validated(load_cluster_config())
    assert prepared["provider"]["type"] in ("aws", "gcp")
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_ray_cluster_image_matches_installed_ray_and_python() -> None:
    docker = load_cluster_config()["docker"]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-{py}-(gpu|cu\d+)", docker["image"]), (
        f"{docker['image']} must be Ray {ray.__version__} on Python {py} (the pins were frozen with both), GPU build"
    )
    assert pinned("ray") == f"ray=={ray.__version__}"
    assert "head_image" not in docker and "worker_image" not in docker


def test_setup_commands_install_pinned_torch_then_sqgan_with_constraints() -> None:
    config = load_cluster_config()
    setup = config["setup_commands"]
    installs = pip_installs(setup + config.get("head_setup_commands", []) + config.get("worker_setup_commands", []))
    assert installs
    for cmd in installs:
        assert "-c constraints.txt" in cmd, f"unconstrained install: {cmd}"
    torch_install = next(c for c in installs if pinned("torch") + " " in c + " ")
    assert pinned("torchvision") in torch_install and pinned("torch") == "torch==2.14.1"
    repo = container_checkout()
    sqgan_install = next(c for c in installs if f"-e {repo}" in c)
    assert installs.index(torch_install) < installs.index(sqgan_install), "torch must come first, pinned"
    assert any(f"cd {repo}" in c and "sqgan data demo --out data/demo" in c for c in setup)


def test_ray_cluster_has_a_gpu_worker_type_and_a_cpu_head() -> None:
    config = load_cluster_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU", 0) >= 1
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no node type offers a GPU"
    for name, node_type in gpu_types.items():
        assert name != config["head_node_type"]
        assert node_type["resources"]["CPU"] >= 2, name
        # sqgan sizes trials from the GPUs Ray sees at the start, so one GPU node must be up before a sweep
        assert 1 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name


def test_ray_cluster_containers_get_the_job_environment() -> None:
    config = load_cluster_config()
    env = dict(opt.removeprefix("--env ").split("=", 1) for opt in config["docker"]["run_options"]
               if opt.startswith("--env "))
    assert set(JOB_ENV) <= set(env)
    assert env["RAY_TRAIN_V2_ENABLED"] == "1"
    assert SHARED_STORAGE.match(env["SQGAN_STORAGE_PATH"]), env["SQGAN_STORAGE_PATH"]
    assert env["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))


def test_ray_cluster_starts_ray_without_auth_and_with_the_autoscaler() -> None:
    config = load_cluster_config()
    head, worker = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    assert head[0] == "ray stop" and worker[0] == "ray stop"
    assert re.search(r"RAY_AUTH_MODE=disabled ray start --head --port=6379\b", head[-1])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head[-1]
    assert "--dashboard-host=0.0.0.0" in head[-1]
    assert re.search(r"RAY_AUTH_MODE=disabled ray start --address=\$RAY_HEAD_IP:6379\b", worker[-1])


def _set_resources_to_a_string(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "1"


def _misspell_setup_commands(c: dict[str, Any]) -> None:
    c["setup_comands"] = c.pop("setup_commands")


def _drop_node_config(c: dict[str, Any]) -> None:
    del c["available_node_types"]["gpu_worker"]["node_config"]


def _unknown_head_type(c: dict[str, Any]) -> None:
    c["head_node_type"] = "no_such_type"


def _min_workers_above_max(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu_worker"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize(
    ("break_it", "error"),
    [
        (_set_resources_to_a_string, jsonschema.ValidationError),
        (_misspell_setup_commands, jsonschema.ValidationError),
        (_drop_node_config, jsonschema.ValidationError),
        (_unknown_head_type, ValueError),
        (_min_workers_above_max, ValueError),
    ],
)
def test_ray_validation_rejects_a_broken_copy(break_it: Any, error: type[Exception]) -> None:
    config = load_cluster_config()
    break_it(config)
    with pytest.raises(error):
        validated(config)


def test_ray_validation_needs_the_defaults_merged_first() -> None:
    """validate_config alone refuses a hand-written config (no cluster_synced_files): `ray up` merges first."""
    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        validate_config(load_cluster_config())


# ------------------------------------------------------------------------------------------------ k8s/
def test_k8s_manifests_are_kuberay_v1_objects() -> None:
    for name, kind in (("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")):
        obj = load_manifest(name)
        assert (obj["apiVersion"], obj["kind"]) == ("ray.io/v1", kind), name
        assert obj["metadata"]["name"]


def test_rayjob_creates_the_same_cluster_as_raycluster() -> None:
    assert load_manifest("rayjob.yaml")["spec"]["rayClusterSpec"] == load_manifest("raycluster.yaml")["spec"]


@pytest.mark.parametrize(("name", "spec"), cluster_specs(), ids=["raycluster.yaml", "rayjob.yaml"])
def test_k8s_pods_run_the_ray_cluster_yaml_image(name: str, spec: dict[str, Any]) -> None:
    image = load_cluster_config()["docker"]["image"]
    assert spec["rayVersion"] == ray.__version__, name
    for where, container in all_containers(spec):
        assert container["image"] == image, f"{name} {where}"


@pytest.mark.parametrize(("name", "spec"), cluster_specs(), ids=["raycluster.yaml", "rayjob.yaml"])
def test_every_k8s_container_gets_mlflow_and_storage_env(name: str, spec: dict[str, Any]) -> None:
    containers = list(all_containers(spec))
    assert {w.split("/")[0] for w, _ in containers} >= {"head"} and len(spec["workerGroupSpecs"]) >= 1
    for where, container in containers:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert set(JOB_ENV) <= set(env), f"{name} {where} lacks {set(JOB_ENV) - set(env)}"
        assert env["RAY_TRAIN_V2_ENABLED"] == "1", f"{name} {where}"
        assert SHARED_STORAGE.match(env["SQGAN_STORAGE_PATH"]), f"{name} {where}: {env['SQGAN_STORAGE_PATH']}"
        assert env["MLFLOW_TRACKING_URI"].startswith(("http://", "https://")), f"{name} {where}"


@pytest.mark.parametrize(("name", "spec"), cluster_specs(), ids=["raycluster.yaml", "rayjob.yaml"])
def test_a_k8s_worker_group_requests_a_gpu(name: str, spec: dict[str, Any]) -> None:
    def gpus(group: dict[str, Any]) -> int:
        limits = [c.get("resources", {}).get("limits", {}) for c in group["template"]["spec"]["containers"]]
        return sum(int(lim.get("nvidia.com/gpu", 0)) for lim in limits)

    gpu_groups = [g for g in spec["workerGroupSpecs"] if gpus(g) >= 1]
    assert gpu_groups, f"{name}: no worker group requests nvidia.com/gpu"
    assert all(1 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in gpu_groups), name
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}) for c in head), name


@pytest.mark.parametrize(("name", "spec"), cluster_specs(), ids=["raycluster.yaml", "rayjob.yaml"])
def test_k8s_pods_install_sqgan_with_the_pins(name: str, spec: dict[str, Any]) -> None:
    repo = container_checkout()
    for group, pod in cluster_pod_specs(spec):
        inits = pod.get("initContainers", [])
        assert inits, f"{name} {group}: nothing installs sqgan"
        script = "\n".join(a for c in inits for a in c.get("command", []) + c.get("args", []))
        installs = pip_installs([script])
        assert installs and all("-c constraints.txt" in c for c in installs), f"{name} {group}"
        assert any(pinned("torch") + " " in c + " " and pinned("torchvision") in c for c in installs), group
        assert any(f"-e {repo}" in c for c in installs), f"{name} {group}"
        assert "sqgan data demo --out data/demo" in script, f"{name} {group}"
        mounted = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert repo in mounted, f"{name} {group}: the ray container does not see the checkout"


def test_rayjob_entrypoint_runs_sqgan_tune_with_storage_and_mlflow_from_the_head_env() -> None:
    spec = load_manifest("rayjob.yaml")["spec"]
    entrypoint = spec["entrypoint"]
    # KubeRay pastes the entrypoint into the submitter pod's `bash -c`: one single-quoted argument keeps `&&` and
    # $VARS away from that shell, so they are expanded on the head, where the env is set.
    assert entrypoint.startswith("bash -c '") and entrypoint.endswith("'") and entrypoint.count("'") == 2
    tokens = list(shlex.shlex(entrypoint, posix=True, punctuation_chars=True))
    assert tokens[:2] == ["bash", "-c"] and len(tokens) == 3, tokens
    script = tokens[2]
    repo = container_checkout()
    assert f"cd {repo} &&" in script
    tune = script[script.index("sqgan tune"):]
    for arg in ("--set ray.address=auto", "--set ray.storage_path=$SQGAN_STORAGE_PATH",
                "--set mlflow.tracking_uri=$MLFLOW_TRACKING_URI", f"--out {repo}/runs/sweep"):
        assert arg in tune, arg
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
