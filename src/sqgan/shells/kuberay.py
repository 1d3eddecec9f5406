"""A sweep as a KubeRay RayJob: the manifest the Kubeflow sweep component submits, and the wait for its end.

The RayJob creates its own Ray cluster from the sqgan image (a CPU head that runs the `sqgan tune` driver, a group
of GPU workers for the trials' Ray Train workers), fetches the curated dataset into every pod from its storage URI
(`sqgan data fetch`), runs `sqgan tune` on the resolved params with the cluster's settings (`ray.address=auto`,
shared `ray.storage_path`, the MLflow server and the pipeline's parent run), and deletes the cluster after the job.

Everything here is plain data and a polling loop over the Kubernetes custom-objects API (`kubernetes` client's
`CustomObjectsApi`, or any object with its `create/get/delete_namespaced_custom_object` methods), so it is tested
without a cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
RAY_VERSION = "2.60.0"
# Every path the pods use lies under one emptyDir volume, mounted at RayJobSpec.data_mount in every pod (the kubelet
# creates the mount point, so it depends on no image's layout and on nothing of this machine):
#   <mount>/dataset      the curated dataset, put there by each pod's init container (`sqgan data fetch`)
#   <mount>/params.yaml  the sweep's params, written from $SQGAN_PARAMS_YAML by the entrypoint (head pod)
#   <mount>/sweep        the sweep folder on the head pod (trials.csv/.md, plots, best_params.yaml; also in MLflow)
DATA_MOUNT = "/sqgan-data"


def pod_path(spec: RayJobSpec, name: str) -> str:
    """`name` (dataset, params.yaml, sweep) under the pods' data volume."""
    return f"{spec.data_mount.rstrip('/')}/{name}"

JOB_FAILED = ("FAILED", "STOPPED")
DEPLOYMENT_FAILED = ("Failed", "ValidationFailed")

# Single-quoted for `bash -c`: KubeRay pastes the entrypoint into the submitter pod's shell command, which would
# otherwise expand the variables there, where they are unset. The driver runs on the head pod, whose env has them.
ENTRYPOINT = (
    "bash -c 'printf \"%s\\n\" \"$SQGAN_PARAMS_YAML\" > {params} && "
    "sqgan tune --params {params} --data {data} --out {out} --set ray.address=auto "
    "--set ray.storage_path=$SQGAN_STORAGE_PATH --set mlflow.tracking_uri=$MLFLOW_TRACKING_URI "
    "--set mlflow.parent_run_id=$SQGAN_PARENT_RUN_ID{gpu}'"
)


@dataclass(frozen=True)
class RayJobSpec:
    """What a sweep's RayJob needs; the defaults match k8s/rayjob.yaml (one 4-CPU head, 1..4 single-GPU workers)."""

    name: str
    image: str
    params_yaml: str  # the sweep's resolved params (a params file)
    data_uri: str  # the curated dataset: s3://, gs://, minio:// (Kubeflow's artifact store) or a shared path
    tracking_uri: str  # an MLflow server the pods reach
    parent_run_id: str  # the pipeline's parent run: the sweep's parent run nests under it
    storage_path: str  # shared storage for Ray Tune/Train state and checkpoints
    namespace: str = "default"
    head_cpu: int = 4
    head_memory: str = "16Gi"
    worker_cpu: int = 3
    worker_memory: str = "12Gi"
    worker_gpus: int = 1  # per worker pod; 0 runs the trials on CPU workers
    min_workers: int = 1
    max_workers: int = 4
    ttl_seconds: int = 900  # the finished cluster stays this long (time to copy the sweep folder off the head)
    data_mount: str = DATA_MOUNT  # the pods' emptyDir for the dataset, the params file and the sweep folder
    credentials_secret: str = "sqgan-storage-credentials"  # optional Secret with the storage credentials
    service_account: str | None = None  # IRSA / Workload Identity instead of the Secret


def check_spec(spec: RayJobSpec) -> None:
    """What would only fail inside the cluster, refused before anything is submitted."""
    if "://" not in spec.storage_path or spec.storage_path.startswith("file://"):
        raise ValueError(f"storage_path {spec.storage_path!r}: a RayJob's trials run on other pods, which need shared "
                         f"storage for checkpoints; pass s3://BUCKET/sqgan or gs://BUCKET/sqgan")
    if not spec.tracking_uri.startswith(("http://", "https://", "databricks")):
        raise ValueError(f"tracking_uri {spec.tracking_uri!r}: the RayJob's pods log to MLflow over the network and "
                         f"cannot reach this task's {spec.tracking_uri.split(':', 1)[0]} store; pass the MLflow "
                         f"server's URL (tracking_uri=http://mlflow.mlflow.svc:5000)")
    if not spec.parent_run_id:
        raise ValueError("parent_run_id is empty: the sweep's results are found in MLflow under the pipeline's parent "
                         "run; run the pipeline's open_pipeline_run task first")
    if not spec.data_uri:
        raise ValueError("data_uri is empty: pass the URI of the curated dataset (the data task's output)")
    mount = spec.data_mount.rstrip("/")
    if not mount.startswith("/") or mount in ("", "/dev", "/dev/shm", "/proc", "/sys", "/etc", "/tmp"):
        raise ValueError(f"data_mount {spec.data_mount!r}: the pods' data volume needs an absolute mount point of its "
                         f"own (Kubernetes mounts volumes at absolute paths), e.g. {DATA_MOUNT}")
    if not 0 < spec.min_workers <= spec.max_workers:
        raise ValueError(f"min_workers {spec.min_workers}, max_workers {spec.max_workers}: need 0 < min <= max")


def rayjob_manifest(spec: RayJobSpec) -> dict[str, Any]:
    """The RayJob custom object for `spec` (apiVersion ray.io/v1)."""
    check_spec(spec)
    env = [
        {"name": "SQGAN_PARAMS_YAML", "value": spec.params_yaml},
        {"name": "SQGAN_DATA_URI", "value": spec.data_uri},
        {"name": "MLFLOW_TRACKING_URI", "value": spec.tracking_uri},
        {"name": "SQGAN_PARENT_RUN_ID", "value": spec.parent_run_id},
        {"name": "SQGAN_STORAGE_PATH", "value": spec.storage_path},
        {"name": "RAY_TRAIN_V2_ENABLED", "value": "1"},
        {"name": "RAY_AUTH_MODE", "value": "disabled"},
    ]
    env_from = [{"secretRef": {"name": spec.credentials_secret, "optional": True}}]
    mounts = [{"name": "sqgan-data", "mountPath": spec.data_mount.rstrip("/")},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [{"name": "sqgan-data", "emptyDir": {}}, {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    fetch = {
        "name": "fetch-data",
        "image": spec.image,
        "command": ["sqgan", "data", "fetch", "--uri", spec.data_uri, "--out", pod_path(spec, "dataset")],
        "env": env,
        "envFrom": env_from,
        "volumeMounts": mounts[:1],
    }

    def pod(container: dict[str, Any]) -> dict[str, Any]:
        spec_ = {"initContainers": [fetch], "containers": [container], "volumes": volumes}
        if spec.service_account:
            spec_["serviceAccountName"] = spec.service_account
        return {"spec": spec_}

    def resources(cpu: int, memory: str, gpus: int = 0) -> dict[str, Any]:
        r: dict[str, Any] = {"cpu": str(cpu), "memory": memory}
        if gpus:
            r["nvidia.com/gpu"] = gpus
        return {"requests": r, "limits": dict(r)}

    head = {
        "name": "ray-head",
        "image": spec.image,
        "env": env,
        "envFrom": env_from,
        "ports": [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}],
        "resources": resources(spec.head_cpu, spec.head_memory),
        "volumeMounts": mounts,
    }
    worker = {"name": "ray-worker", "image": spec.image, "env": env, "envFrom": env_from,
              "resources": resources(spec.worker_cpu, spec.worker_memory, spec.worker_gpus), "volumeMounts": mounts}
    worker_pod = pod(worker)
    if spec.worker_gpus:
        worker_pod["spec"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    entrypoint = ENTRYPOINT.format(params=pod_path(spec, "params.yaml"), data=pod_path(spec, "dataset"),
                                   out=pod_path(spec, "sweep"),
                                   gpu=" --set tune.use_gpu=true" if spec.worker_gpus else "")
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": {"app.kubernetes.io/name": "sqgan"}},
        "spec": {
            "entrypoint": entrypoint,
            "runtimeEnvYAML": 'env_vars:\n  RAY_TRAIN_V2_ENABLED: "1"\n',
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": spec.ttl_seconds,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
                "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0"}, "template": pod(head)},
                "workerGroupSpecs": [{
                    "groupName": "gpu" if spec.worker_gpus else "cpu",
                    "replicas": spec.min_workers,
                    "minReplicas": spec.min_workers,
                    "maxReplicas": spec.max_workers,
                    "rayStartParams": {},
                    "template": worker_pod,
                }],
            },
        },
    }


def kubernetes_api() -> Any:
    """The custom-objects API of the cluster this runs in (a Kubeflow task's service account), else ~/.kube/config."""
    # on demand: only a real cluster needs the Kubernetes client
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as e:
            raise RuntimeError(f"no Kubernetes API to submit the RayJob to: not inside a cluster and no usable "
                               f"kubeconfig ({e}); run the sweep component in Kubeflow, or set KUBECONFIG") from None
    return client.CustomObjectsApi()


def submit(api: Any, manifest: dict[str, Any]) -> None:
    meta = manifest["metadata"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, manifest)
    except Exception as e:  # noqa: BLE001 - kubernetes' ApiException carries the server's reason
        raise RuntimeError(f"RayJob {meta['namespace']}/{meta['name']} was not created: {_reason(e)}; is the KubeRay "
                           f"operator installed (kubectl get crd rayjobs.ray.io) and may this service account create "
                           f"rayjobs in namespace {meta['namespace']}?") from None


def delete(api: Any, name: str, namespace: str) -> None:
    api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _reason(e: Exception) -> str:
    status, reason = getattr(e, "status", None), getattr(e, "reason", None)
    return f"HTTP {status} {reason}" if status else f"{type(e).__name__}: {e}"


class RayJobFailed(RuntimeError):
    """The RayJob ended without success; the message carries KubeRay's reason and message."""


def wait_for_rayjob(
    api: Any,
    name: str,
    namespace: str,
    timeout_s: float,
    poll_s: float = 15.0,
    *,
    delete_on_timeout: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Poll the RayJob until its job SUCCEEDED (returns its status), FAILED/STOPPED or its deployment failed
    (RayJobFailed with KubeRay's message), or `timeout_s` passed (TimeoutError; the RayJob, and so its cluster,
    is deleted first unless `delete_on_timeout` is False)."""
    deadline = clock() + timeout_s
    seen = None
    where = f"RayJob {namespace}/{name}"
    logs = f"kubectl logs -n {namespace} -l job-name={name}"
    while True:
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as e:  # noqa: BLE001 - deleted under us, or the API is gone
            raise RayJobFailed(f"{where} could not be read: {_reason(e)} (deleted meanwhile?)") from None
        status = obj.get("status") or {}
        job, deployment = status.get("jobStatus", ""), status.get("jobDeploymentStatus", "")
        if (job, deployment) != seen:
            seen = (job, deployment)
            log(f"{where}: job {job or '-'}, deployment {deployment or '-'}")
        if job == "SUCCEEDED":
            return status
        if job in JOB_FAILED or deployment in DEPLOYMENT_FAILED:
            detail = ": ".join(str(x) for x in (status.get("reason"), status.get("message")) if x) or "no message"
            raise RayJobFailed(f"{where} ended {job or deployment}: {detail}; the driver's log: {logs}")
        left = deadline - clock()
        if left <= 0:
            if delete_on_timeout:
                try:
                    delete(api, name, namespace)
                    gone = "deleted it (and its Ray cluster)"
                except Exception as e:  # noqa: BLE001
                    gone = f"could not delete it ({_reason(e)}): kubectl delete rayjob -n {namespace} {name}"
            else:
                gone = "left it running"
            raise TimeoutError(f"{where} still {job or deployment or 'pending'} after timeout_s={timeout_s:g} s; "
                               f"{gone}. Raise timeout_s; the trials that finished are in MLflow under the "
                               f"pipeline's parent run")
        sleep(min(poll_s, left))
