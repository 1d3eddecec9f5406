"""The sweep component: `sqgan tune` as a KubeRay RayJob (its own Ray cluster of GPU workers), awaited with a
timeout; returns the trial table and the best params for a final train task."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str, data: Input[Dataset],
         storage_path: str, image: str, namespace: str, timeout_s: float, poll_s: float, worker_gpus: int,
         max_workers: int, trials: Output[Markdown], trials_csv: Output[Dataset], best_params: Output[Artifact]) -> str:
    """Submit the RayJob in `image` (the pipelines pass IMAGE; every pod fetches `data` from its URI; the trials
    checkpoint to `storage_path`, s3:// or gs://), wait at most `timeout_s`, then read the sweep's results from its
    MLflow run. Returns that run's id."""
    from sqgan.commands.kfp_tasks import sweep_task

    return sweep_task(params.path, overrides, tracking_uri, parent_run_id, data.path, data.uri, image, namespace,
                      storage_path, timeout_s, poll_s, worker_gpus, max_workers, trials.path, trials_csv.path,
                      best_params.path)
