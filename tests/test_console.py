"""What a Ray run shows on the terminal (issue 20): Ray's INFO chatter goes to its log files, the driver draws the
run's one progress bar from MLflow, and `sqgan train` hands Ray Train only the reports it keeps."""

from __future__ import annotations

import logging
import time

from sqgan.config import default_params
from sqgan.shells.ray_train import quiet_console, reported_to_ray
from sqgan.shells.tracking import MlflowLogger, RunProgress, open_run


def test_quiet_console_keeps_ray_info_lines_in_the_log_file_and_off_the_terminal(tmp_path, capsys):
    import sys

    root, ray_logger = logging.getLogger(), logging.getLogger("ray")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO)
    log_file = logging.FileHandler(tmp_path / "train.log")
    added = [(root, console), (root, log_file), (ray_logger, logging.StreamHandler(sys.stderr))]
    level = root.level
    root.setLevel(logging.INFO)
    for logger, handler in added:
        logger.addHandler(handler)
    try:
        quiet_console()
        report = logging.getLogger("/site-packages/ray/train/v2/_internal/execution/context.py")  # Train's name
        report.info("Reporting training result 3: TrainingReport(checkpoint=None, metrics={...})")
        logging.getLogger("ray.train._internal.storage").info("Checkpoint successfully created at: ...")
        report.warning("a warning still shows")
    finally:
        for logger, handler in added:
            logger.removeHandler(handler)
        root.setLevel(level)
        log_file.close()
    err = capsys.readouterr().err
    assert "Reporting training result" not in err and "Checkpoint successfully" not in err
    assert "a warning still shows" in err
    assert "Reporting training result 3" in (tmp_path / "train.log").read_text()  # kept in the file


def test_sqgan_train_reports_to_ray_at_checkpoints_evaluations_and_the_end_only():
    p = default_params(["train.steps=100", "train.log_every=5", "train.checkpoint_every=40",
                        "metrics.eval_every=30"])
    assert [s for s in range(1, 101) if reported_to_ray(p, s)] == [30, 40, 60, 80, 90, 100]
    p0 = p.override({"metrics.eval_every": 0})
    assert [s for s in range(1, 101) if reported_to_ray(p0, s)] == [40, 80, 100]


def test_the_driver_draws_the_runs_bar_from_what_mlflow_holds(tmp_path, demo_dir, capsys):
    params = default_params([f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                             f"mlflow.artifact_root={tmp_path / 'artifacts'}", "train.steps=40"])
    uri, run_id = open_run(params, demo_dir, tmp_path / "run", tmp_path)
    logger = MlflowLogger(uri, run_id)
    logger.client.log_metric(run_id, "loss/d", 1.5, timestamp=int(time.time() * 1000) - 3_600_000, step=30)
    with RunProgress(uri, run_id, total=40, initial=10, interval=60) as progress:
        progress.refresh()
        assert progress.bar is None  # nothing logged by this training yet (the step-30 point is an hour old, from
        # the run's earlier life before a resume): no bar while Ray starts
        logger.log_metrics({"loss/d": 1.25, "loss/g": 0.5}, 20)
        progress.refresh()
        assert progress.bar.n == 20 and progress.bar.postfix == "d=1.250, g=0.500"
        logger.log_metrics({"loss/d": 1.0, "loss/g": 0.75}, 30)
        logger.log_metrics({"loss/d": 2.0}, 10)  # a restarted run's replay never moves the bar back
        progress.refresh()
        assert progress.bar.n == 30 and progress.bar.postfix == "d=1.000, g=0.750"
        logger.log_metrics({"loss/d": 0.9, "loss/g": 0.7}, 40)
    assert progress.bar.n == 40  # brought up to date on exit
    err = capsys.readouterr().err
    assert "train:" in err and "40/40" in err


def test_a_run_that_logged_nothing_leaves_no_bar(tmp_path, demo_dir, capsys):
    params = default_params([f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                             f"mlflow.artifact_root={tmp_path / 'artifacts'}"])
    uri, run_id = open_run(params, demo_dir, tmp_path / "run", tmp_path)
    with RunProgress(uri, run_id, total=40, interval=60) as progress:
        pass
    assert progress.bar is None and "train:" not in capsys.readouterr().err
