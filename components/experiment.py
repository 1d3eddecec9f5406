"""The experiment component: `sqgan experiment run NAME --scale SCALE` in its pod, the table as its outputs."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def experiment(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str, name: str, scale: str,
               experiment_yaml: str, experiments_dir: str, sweep: Output[Artifact], table: Output[Markdown],
               table_csv: Output[Dataset]) -> str:
    """Every cell × seed of the experiment as one Ray Tune sweep (this pod's local Ray, or ray.address), nested under
    the pipeline's parent run; `table` is ours beside the paper's numbers. Returns the experiment's parent run id."""
    from sqgan.commands.kfp_tasks import experiment_task

    r = experiment_task(params.path, overrides, tracking_uri, parent_run_id, name, scale, experiment_yaml,
                        experiments_dir, sweep.path, table.path, table_csv.path)
    sweep.metadata["mlflow_run_id"] = r["experiment_run_id"]
    return r["experiment_run_id"]
