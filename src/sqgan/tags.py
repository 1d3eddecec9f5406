"""Every MLflow tag name sqgan writes or reads, in one place (a foundation: any layer may name a tag).

A run's `sqgan.stage` says what made it; a sweep's parent carries `sqgan.tune.*`, each trial `sqgan.trial_*`;
reports, `sqgan reproduce` and `sqgan tune --resume` read them back, so a tag is renamed here or not at all.
"""

from __future__ import annotations

# MLflow's own
RUN_NAME = "mlflow.runName"
PARENT_RUN_ID = "mlflow.parentRunId"

# what made the run: train, trial, sweep, eval, sample, prior, import, report, data, pipeline
STAGE = "sqgan.stage"
STAGE_TRAIN, STAGE_TRIAL, STAGE_SWEEP, STAGE_EVAL, STAGE_PRIOR = "train", "trial", "sweep", "eval", "prior"
STAGE_IMPORT, STAGE_REPORT, STAGE_DATA, STAGE_PIPELINE = "import", "report", "data", "pipeline"

# provenance (every run sqgan starts: tracking.provenance_tags); `sqgan reproduce` checks them
GIT_SHA = "git_sha"
GIT_DIRTY = "git_dirty"  # which tracked files the -dirty is about
DATA_DIR = "data.dir"
DATA_MANIFEST_SHA256 = "data.manifest_sha256"
DATA_MD5 = "data.md5"  # of the data on disk, the way DVC hashes a folder
DATA_DVC_LOCK_MD5 = "data.dvc_lock_md5"
DATA_MATCHES_DVC_LOCK = "data.matches_dvc_lock"
COMMAND = "command"
VERSION = "version."  # + package name: its installed version

# a training run
RESUMED_FROM = "resumed_from"  # the checkpoint `sqgan train --resume` continued
METRIC_PROVENANCE = "sqgan.metric."  # + metric name: the JSON provenance of that metric's values
COLLAPSE_STEP = "sqgan.collapse_step"  # the first evaluation step at which G_ema was flagged as collapsed
RESTARTED_FROM_STEP = "sqgan.restarted_from_step"  # Ray Train restarted the run after a failure, from this step
RESUMES = "sqgan.resumes"  # how many times `--resume` continued the run
RESUMED_FROM_RUN = "sqgan.resumed_from_run"


def resume_status_before(n: int) -> str:
    """The run's status before its n-th resume."""
    return f"sqgan.resume.{n}.status_before"


def resume_from(n: int) -> str:
    """The checkpoint its n-th resume started from."""
    return f"sqgan.resume.{n}.from"


# a sweep's parent run
TUNE_AXES = "sqgan.tune.axes"
TUNE_METRIC = "sqgan.tune.metric"
TUNE_METRIC_KEY = "sqgan.tune.metric_key"
TUNE_INTERIM_KEY = "sqgan.tune.interim_key"
TUNE_MODE = "sqgan.tune.mode"
TUNE_STEPS = "sqgan.tune.steps"
TUNE_SEARCHER = "sqgan.tune.searcher"
TUNE_SCHEDULER = "sqgan.tune.scheduler"
TUNE_BEST_TRIAL = "sqgan.tune.best_trial"
TUNE_BEST_RUN_ID = "sqgan.tune.best_run_id"

# an experiment's parent run (a sweep that `sqgan experiment run` started)
EXPERIMENT = "sqgan.experiment"  # the experiment's name (experiments/<name>.yaml)
EXPERIMENT_SCALE = "sqgan.experiment.scale"  # demo | paper
EXPERIMENT_SHA256 = "sqgan.experiment.sha256"  # of the experiment file as it ran

# a sweep's trial (a run nested under the parent)
TRIAL_ID = "sqgan.trial_id"  # the Ray trial id
RAY_TRIAL_ID = "ray.trial_id"
RAY_RUN_PATH = "ray.run_path"
TRIAL_STATUS = "sqgan.trial_status"  # completed, error, killed, stopped by <scheduler>
TRIAL_STARTS = "sqgan.trial_starts"
TRIAL_NODE = "sqgan.trial_node"  # the Ray node id (hex) the trial's process runs on, the latest start's
TRIAL_NODES = "sqgan.trial_nodes"  # "IP (id…)" of each start's node, in order, comma-separated
TRIAL_VALUES = "sqgan.trial_values"
TRIAL_ERROR = "sqgan.trial_error"
STOPPED_AT_STEP = "sqgan.stopped_at_step"

# commands
EVAL_CHECKPOINT = "sqgan.eval.checkpoint"
EVAL_LAST_CHECKPOINT = "sqgan.eval.last_checkpoint"
EVALUATED_RUN = "sqgan.eval.of_run"  # an experiment's evaluation-only cell: the trained run it evaluated
SAMPLE_LAST_OUT = "sqgan.sample.last_out"
SAMPLE_LAST_CHECKPOINT = "sqgan.sample.last_checkpoint"
PRIOR_L_OT_FINAL = "sqgan.prior.l_ot_final"
IMPORT_SHA256 = "sqgan.import.sha256"
IMPORT_SOURCE = "sqgan.import.source"
IMPORT_KIMG = "sqgan.import.kimg"
IMPORT_HAS_D = "sqgan.import.has_D"
REPORT_OF = "sqgan.report.of"
REPORT_RUNS = "sqgan.report.runs"
REPRODUCES = "sqgan.reproduces"  # the run id a `sqgan reproduce` run trained again
REPRODUCE_EQUAL = "sqgan.reproduce.equal"
REPRODUCE_DIFFERING = "sqgan.reproduce.differing"
REPRODUCE_FORCED = "sqgan.reproduce.forced"
KFP_PIPELINE = "sqgan.kfp.pipeline"
KFP_RUN = "sqgan.kfp.run"
KFP_FAILED_TASK = "sqgan.kfp.failed_task"
DATA_TASK_STAGE = "sqgan.data.stage"  # a data task's stage name
