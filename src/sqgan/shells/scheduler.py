"""ASHA that writes down its own decisions: when it stops a trial before train.steps, the trial's nested MLflow run
is tagged `stopped by asha` at once. So when a sweep is interrupted, a trial the scheduler stopped is told apart
from one the interruption killed (Ray marks both TERMINATED once its loop has cleaned up)."""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from sqgan.shells.tracking import mlflow_client, trial_runs
from sqgan.tags import STOPPED_AT_STEP, TRIAL_STATUS

STOPPED_BY_ASHA = "stopped by asha"


class RecordingASHA(AsyncHyperBandScheduler):
    """ASHAScheduler whose STOP before `max_t` tags the trial's run (found by its Ray trial id under the parent)."""

    def __init__(self, *, tracking_uri: str, parent_run_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        step = result.get(self._time_attr)
        if action == TrialScheduler.STOP and step is not None and step < self._max_t:
            record_stop(self.tracking_uri, self.parent_run_id, trial.trial_id, int(step))
        return action


def record_stop(tracking_uri: str, parent_run_id: str, trial_id: str, step: int) -> None:
    """Tag the nested run of `trial_id` as stopped by the scheduler at `step`."""
    client = mlflow_client(tracking_uri)
    parent = client.get_run(parent_run_id)
    for run in trial_runs(client, parent, trial_id):
        client.set_tag(run.info.run_id, TRIAL_STATUS, STOPPED_BY_ASHA)
        client.set_tag(run.info.run_id, STOPPED_AT_STEP, str(step))
