"""The pipeline's params artifact and its MLflow parent run (opened first, finished last)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def load_params(params_yaml: str, overrides: list, params: Output[Artifact]):
    """The params-YAML artifact every task reads: the text of a params.yaml, checked with the overrides."""
    from sqgan.commands.kfp_tasks import write_params

    params.metadata.update(write_params(params_yaml, overrides, params.path))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def open_pipeline_run(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str,
                      pipeline: str, kfp_run: str) -> str:
    """The MLflow run the tasks nest under: `parent_run_id` when given, else a new one. Returns its id."""
    from sqgan.commands.kfp_tasks import open_pipeline_run as run

    return run(params.path, overrides, tracking_uri, parent_run_id, pipeline, kfp_run)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finish_pipeline_run(params: Input[Artifact], overrides: list, tracking_uri: str, run_id: str,
                        given_parent: str) -> str:
    """Mark the pipeline's parent run FINISHED (one the user passed in is left as it is)."""
    from sqgan.commands.kfp_tasks import finish_pipeline_run as finish

    return finish(params.path, overrides, tracking_uri, run_id, given_parent)
