"""Training components: `sqgan train`, `sqgan prior` and `sqgan eval`, each run inside the component's pod."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str, data: Input[Dataset],
          model: Output[Model], metrics: Output[Metrics], samples: Output[HTML]) -> str:
    """`sqgan train` (a Ray Train job on this pod's local Ray, or ray.address) on `data`; `model` is the run folder
    (checkpoints, samples, metrics.json). Returns the MLflow run id."""
    from sqgan.commands.kfp_tasks import log_numbers, train_task

    r = train_task(params.path, overrides, tracking_uri, parent_run_id, data.path, model.path, samples.path)
    model.metadata["mlflow_run_id"] = r["run_id"]
    log_numbers(metrics, r["metrics"])
    return r["run_id"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prior(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str, data: Input[Dataset],
          codebook: Output[Model], report: Output[Metrics]):
    """`sqgan prior`: SQ's codebook pre-trained on CLIP features of `data` (needs prior.clip_pretrained)."""
    from sqgan.commands.kfp_tasks import log_numbers, prior_task

    r = prior_task(params.path, overrides, tracking_uri, parent_run_id, data.path, codebook.path)
    log_numbers(report, r)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str, model: Input[Model],
             data: Input[Dataset], metrics: Output[Metrics], results: Output[Artifact]):
    """`sqgan eval` of the run folder `model` (FID, KID, IS, precision/recall, LPIPS; eval section), logged to its
    MLflow run with provenance; `results` is the eval JSON."""
    from sqgan.commands.kfp_tasks import eval_task, log_numbers

    log_numbers(metrics, eval_task(params.path, overrides, tracking_uri, parent_run_id, model.path, data.path,
                                   results.path))
