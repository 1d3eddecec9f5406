"""The sqgan pipelines, one compiled file per dataset (KFP fixes a pipeline's graph when it compiles):

- `data_pipeline(dataset)`: download → prepare one dataset (the demo: build it offline);
- `train_pipeline(dataset)`: data → train → eval (the metrics);
- `sweep_pipeline(dataset)`: data → `sqgan tune` as a KubeRay RayJob (trial table, best params) → a final train on
  the best params → eval;
- `experiment_pipeline()`: `sqgan experiment run NAME --scale SCALE` (name, scale and the file's text are run-time
  parameters: one compiled file for every experiment) → its table beside the paper's numbers.

Every pipeline takes `params_yaml` (the text of a params.yaml: the same file drives DVC, the CLI, Ray Tune and KFP)
and `overrides` (`--set` items), made into one params artifact that every task reads, and `tracking_uri` and
`parent_run_id` for MLflow: the first task opens the parent run (or takes the one passed in), every task's run
nests under it, and the last task finishes it.
"""


from collections.abc import Callable
from typing import Any

from kfp import dsl

from components import IMAGE
from components.data import PREPARE, demo_data, download
from components.experiment import experiment
from components.sweep import tune
from components.tracking import finish_pipeline_run, load_params, open_pipeline_run
from components.train import evaluate, train

DATASETS = ("demo", *PREPARE)  # demo, ffhq2k5, brecahad, dogface, metfaces, fewshot100, cifar…
KINDS = ("data", "train", "sweep")


class Run:
    """The first two tasks of every pipeline: the params artifact and the MLflow parent run."""

    def __init__(self, name: str, params_yaml: Any, overrides: Any, tracking_uri: Any, parent_run_id: Any) -> None:
        self.name, self.overrides, self.tracking_uri, self.given_parent = name, overrides, tracking_uri, parent_run_id
        loaded = load_params(params_yaml=params_yaml, overrides=overrides)
        self.params = loaded.outputs["params"]
        opened = open_pipeline_run(params=self.params, overrides=overrides, tracking_uri=tracking_uri,
                                   parent_run_id=parent_run_id, pipeline=name,
                                   kfp_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        opened.set_caching_options(False)  # a new parent run per pipeline run, never a cached one
        self.parent = opened.output

    def common(self, params: Any = None, overrides: Any = None) -> dict[str, Any]:
        return {"params": params if params is not None else self.params,
                "overrides": overrides if overrides is not None else self.overrides,
                "tracking_uri": self.tracking_uri, "parent_run_id": self.parent}

    def finish(self, after: Any) -> None:
        done = finish_pipeline_run(params=self.params, overrides=self.overrides, tracking_uri=self.tracking_uri,
                                   run_id=self.parent, given_parent=self.given_parent).after(after)
        done.set_caching_options(False)


def data_step(run: Run, dataset: str) -> Any:
    """The task that leaves the curated `dataset` in its output "data"."""
    if dataset == "demo":
        return demo_data(**run.common()).set_display_name("demo data")
    raw = download(dataset=dataset, **run.common()).set_display_name(f"download {dataset}")
    return PREPARE[dataset](raw=raw.outputs["raw"], **run.common()).set_display_name(dataset)


def data_pipeline(dataset: str) -> Callable[..., Any]:
    name = f"sqgan-data-{dataset}"

    @dsl.pipeline(name=name, description=f"sqgan: the {dataset} dataset, curated (download → prepare)")
    def pipeline(params_yaml: str, overrides: list = [], tracking_uri: str = "", parent_run_id: str = ""):  # noqa: B006
        run = Run(name, params_yaml, overrides, tracking_uri, parent_run_id)
        run.finish(data_step(run, dataset))

    return pipeline


def train_pipeline(dataset: str) -> Callable[..., Any]:
    name = f"sqgan-train-{dataset}"

    @dsl.pipeline(name=name, description=f"sqgan: the {dataset} dataset → train → eval, in one MLflow parent run")
    def pipeline(params_yaml: str, overrides: list = [], tracking_uri: str = "", parent_run_id: str = ""):  # noqa: B006
        run = Run(name, params_yaml, overrides, tracking_uri, parent_run_id)
        data = data_step(run, dataset).outputs["data"]
        trained = train(data=data, **run.common())
        scored = evaluate(model=trained.outputs["model"], data=data, **run.common())
        run.finish(scored)

    return pipeline


def sweep_pipeline(dataset: str) -> Callable[..., Any]:
    name = f"sqgan-sweep-{dataset}"

    @dsl.pipeline(name=name, description=f"sqgan: the {dataset} dataset → `sqgan tune` as a KubeRay RayJob → train "
                                         f"the best params → eval")
    def pipeline(params_yaml: str, storage_path: str, tracking_uri: str, overrides: list = [],  # noqa: B006
                 parent_run_id: str = "", namespace: str = "default", timeout_s: float = 86400.0,
                 poll_s: float = 30.0, worker_gpus: int = 1, max_workers: int = 4,
                 final_overrides: list = []):  # noqa: B006
        run = Run(name, params_yaml, overrides, tracking_uri, parent_run_id)
        data = data_step(run, dataset).outputs["data"]
        swept = tune(data=data, storage_path=storage_path, image=IMAGE, namespace=namespace, timeout_s=timeout_s,
                     poll_s=poll_s, worker_gpus=worker_gpus, max_workers=max_workers, **run.common())
        best = run.common(params=swept.outputs["best_params"], overrides=final_overrides)
        trained = train(data=data, **best).set_display_name("train the best params")
        scored = evaluate(model=trained.outputs["model"], data=data, **best)
        run.finish(scored)

    return pipeline


FACTORIES = {"data": data_pipeline, "train": train_pipeline, "sweep": sweep_pipeline}
EXPERIMENT_FILE = "experiment.yaml"  # the compiled experiment pipeline (not one per dataset)


def experiment_pipeline() -> Callable[..., Any]:
    name = "sqgan-experiment"

    @dsl.pipeline(name=name, description="sqgan: a seed paper's table (experiments/NAME.yaml) → every cell × seed as "
                                         "one sweep → the table beside the paper's numbers, in one MLflow parent run")
    def pipeline(params_yaml: str, name: str, scale: str = "demo", experiment_yaml: str = "",
                 experiments_dir: str = "/home/ray/sqgan/experiments", overrides: list = [],  # noqa: B006
                 tracking_uri: str = "", parent_run_id: str = ""):
        run = Run("sqgan-experiment", params_yaml, overrides, tracking_uri, parent_run_id)
        ran = experiment(name=name, scale=scale, experiment_yaml=experiment_yaml, experiments_dir=experiments_dir,
                         **run.common())
        ran.set_caching_options(False)  # a table of the runs it trains now, never a cached one
        run.finish(ran)

    return pipeline


def compiled_name(kind: str, dataset: str) -> str:
    return f"{kind}_{dataset}.yaml"
