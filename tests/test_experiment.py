"""`sqgan experiment`: every shipped file validates and resolves at both scales; bad files fail before any data or Ray
work naming the file, the cell and the key; a small experiment runs end to end under Ray and MLflow and its table
equals the runs' metrics, from MLflow alone too; a killed driver resumes training only the missing cells."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, kill_after_first_trial
from typer.testing import CliRunner

from sqgan.cli import app
from sqgan.commands.experiment import (
    evaluate_cells,
    evaluation_cells,
    experiment_files,
    load_experiment,
    resolve_cells,
    same_runs,
    sweep_params,
    table_rows,
)
from sqgan.config import ConfigError, default_params
from sqgan.shells.tune import cell_params, check_sweep

runner = CliRunner()
SHIPPED = experiment_files(ROOT / "experiments")
TINY_SCALE = {"model": {"g_channels": 16, "d_channels": 16, "z_dim": 32, "w_dim": 32},
              "fq": {"codebook_size": 16}, "sq": {"codebook_size": 16},
              "train": {"steps": 6, "batch_size": 16, "log_every": 2, "sample_every": 6, "checkpoint_every": 6},
              "metrics": {"num_fake": 40, "batch_size": 40, "eval_every": 0, "diversity_every": 0}}


def tiny_experiment(folder: Path, name: str = "tiny", **changes: object) -> Path:
    """Two rows (FQ off / on) × one column on the demo data, two seeds, a made-up paper number."""
    exp = {
        "name": name, "title": "tiny: FQ off and on", "kind": "table", "source": "a test fixture",
        "aggregate": "each seed's final value, mean ± std over seeds",
        "params": {"model": {"arch": "dcgan"}, "sq": {"enabled": False}},
        "rows": {"plain": {"fq": {"enabled": False}}, "FQ": {"fq": {"enabled": True}}},
        "columns": {"demo": {}},
        "metrics": ["fid", {"name": "rate", "key": "time/steps_per_s", "mode": "max"}],
        "paper": [{"row": "FQ", "column": "demo", "metric": "fid", "value": 1.5, "std": 0.1,
                   "stat": "made up", "source": "the test's own"}],
        "scales": {"demo": {"seeds": [0, 1], "params": TINY_SCALE}, "paper": {"seeds": [0]}},
    }
    exp.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False, allow_unicode=True))
    return path


def infra(tmp_path: Path, demo_dir: Path) -> list[str]:
    sets = {"mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "mlflow.artifact_root": str(tmp_path / "art"),
            "ray.storage_path": str(tmp_path / "ray"), "ray.cpus_per_worker": 1, "data.root": str(demo_dir.parent),
            "data.dataset": demo_dir.name}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


# ------------------------------------------------------------------------------------------ files
def test_the_shipped_experiments_cover_the_seed_tables():
    assert {"fqgan-cifar", "fqgan-overhead", "fqgan-hparams", "mixdl-10shot", "mixdl-pplu", "mixdl-nnmodes",
            "sqgan-datasets", "selfdistilled-elbow"} <= set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_experiment_validates_and_its_cells_resolve_at_both_scales(name):
    path = SHIPPED[name]
    exp = load_experiment(path)
    for scale in ("demo", "paper"):
        sp = sweep_params(default_params(), exp, path, scale)
        check_sweep(sp)  # the sweep's space, each cell with each seed, the ranked metric
        base, cells = resolve_cells(default_params(), exp, path, scale)
        assert set(cells) == set(exp.cells())
        for cell in sp.tune.cells:
            p, _ = cell_params(sp, {"cell": cell, "train.seed": exp.scales[scale].seeds[0]})
            row, column = exp.cells()[cell]
            for key, value in {**_flat(exp.rows[row]), **_flat(exp.columns[column])}.items():
                if key not in _flat(exp.scales[scale].params) and key != "data.dataset":
                    assert _get(p, key) == value, (cell, key)  # the row's and column's values reach the trial
            if scale == "demo":  # offline stand-ins: no real-dataset stage at demo scale
                assert p.data.dataset in ("demo", *exp.scales["demo"].build), (cell, p.data.dataset)
    assert runner.invoke(app, ["experiment", "show", name, "--dir", str(ROOT / "experiments")]).exit_code == 0


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _get(p, key):
    node = p
    for part in key.split("."):
        node = getattr(node, part)
    return node


def test_cells_with_the_same_params_train_once_and_show_twice():
    path = SHIPPED["fqgan-cifar"]
    exp = load_experiment(path)
    base, cells = resolve_cells(default_params(), exp, path, "demo")
    assert same_runs(base, cells) == {"BigGAN @ CIFAR-100": "BigGAN @ CIFAR-10",
                                      "FQ-BigGAN @ CIFAR-100": "FQ-BigGAN @ CIFAR-10"}
    assert len(sweep_params(default_params(), exp, path, "demo").tune.cells) == 2
    base, cells = resolve_cells(default_params(), exp, path, "paper")
    assert same_runs(base, cells) == {}  # the paper's columns differ: data and num_classes


def test_cells_that_differ_only_in_evaluation_params_train_once():
    """The elbow study's rows differ in sample.centres alone: one training, the other rows evaluate it; a cell that
    changes a training param (here model.z_dim) is trained."""
    path = SHIPPED["selfdistilled-elbow"]
    exp = load_experiment(path)
    for scale in ("demo", "paper"):
        base, cells = resolve_cells(default_params(), exp, path, scale)
        assert evaluation_cells(base, cells) == {"N=32 @ self-filtered": "N=16 @ self-filtered",
                                                 "N=64 @ self-filtered": "N=16 @ self-filtered",
                                                 "N=128 @ self-filtered": "N=16 @ self-filtered"}
        assert list(sweep_params(default_params(), exp, path, scale).tune.cells) == ["N=16 @ self-filtered"]
    base = default_params()
    cells = {"a": {"sample.psi": 0.5}, "b": {"sample.psi": 0.7, "metrics.truncation": "global"},
             "c": {"sample.psi": 0.5, "model.z_dim": 64}, "d": {"sample.psi": 0.5}}
    assert evaluation_cells(base, cells) == {"b": "a"}  # d is a's twin (same_runs), c trains
    from sqgan.commands.experiment import show_experiment

    shown = show_experiment("selfdistilled-elbow", ROOT / "experiments")
    assert "demo scale: 4 cells × 1 seeds = 1 trainings and 3 evaluations of trained cells" in shown
    assert same_runs(base, cells) == {"d": "a"}


@pytest.mark.parametrize(("change", "words"), [
    ({"rows": {"plain": {"fq": {"enabled": False}}, "FQ": {"fq": {"decy": 0.5}}}},
     ["tiny.yaml: cell 'FQ @ demo' (demo scale)", "fq.decy", "did you mean 'fq.decay'"]),
    ({"columns": {"demo": {"fq": {"decay": 1.5}}}}, ["cell 'plain @ demo'", "fq.decay", "less than 1"]),
    ({"columns": {"demo": {"fq": {"codebook_size": 24}}}},  # the demo scale sets 16: the paper scale fails
     ["cell 'plain @ demo' (paper scale)", "fq.codebook_size", "power of two"]),
    ({"paper": [{"row": "FQ", "column": "demo", "metric": "fid", "value": 1.5, "stat": "best"}]},
     ["tiny.yaml: paper.0.source", "Field required"]),
    ({"paper": [{"row": "FQ+", "column": "demo", "metric": "fid", "value": 1.5, "stat": "best", "source": "T1"}]},
     ["paper[0].row: 'FQ+' is not one of plain, FQ"]),
    ({"paper": []}, ["no paper numbers; list them (each with its source), or say why in paper_numbers"]),
    ({"scales": {"demo": {"seeds": [0]}}}, ["needs both demo and paper, missing paper"]),
])
def test_a_bad_experiment_file_exits_2_naming_the_file_cell_and_key_before_any_data_or_ray(tmp_path, change, words):
    path = tiny_experiment(tmp_path, **change)
    data_root = tmp_path / "data"
    r = runner.invoke(app, ["experiment", "run", str(path), "--out", str(tmp_path / "exp"), "--no-params-file",
                            "--set", f"data.root={data_root}", "--set", "data.dataset=demo",
                            "--set", f"ray.storage_path={tmp_path / 'ray'}",
                            "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert r.exit_code == 2, r.output
    for w in words:
        assert w in r.output, r.output
    assert not data_root.exists() and not (tmp_path / "ray").exists()  # no dataset built, no Ray started


def test_the_paper_scale_on_a_machine_without_gpus_is_refused_before_any_data_or_ray(tmp_path):
    import torch

    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    r = runner.invoke(app, ["experiment", "run", "fqgan-cifar", "--scale", "paper", "--dir", str(ROOT / "experiments"),
                            "--out", str(tmp_path / "exp"), "--no-params-file", "--set", f"data.root={tmp_path / 'd'}",
                            "--set", f"ray.storage_path={tmp_path / 'ray'}"])
    assert r.exit_code == 1 and "trains on GPUs (train.use_gpu true) and this machine has none" in r.output, r.output
    assert "ray.address=ray://HEAD:10001" in r.output
    assert not (tmp_path / "d").exists() and not (tmp_path / "ray").exists()


def test_an_unknown_experiment_name_lists_the_known_ones():
    r = runner.invoke(app, ["experiment", "show", "fqgan-cifra", "--dir", str(ROOT / "experiments")])
    assert r.exit_code == 1 and "unknown experiment 'fqgan-cifra'" in r.output
    assert "fqgan-cifar, fqgan-hparams" in r.output


def test_a_sweep_cell_and_an_axis_on_one_key_are_refused():
    p = default_params(["tune.cells={a: {fq: {decay: 0.5}}}", "tune.space={fq: {decay: {grid: [0.8]}}}"])
    with pytest.raises(ConfigError, match=r"tune.cells.a.fq.decay: tune.space sweeps fq.decay too"):
        check_sweep(p)
    p = default_params(["tune.cells={a: {fq: {decy: 0.5}}}"])
    with pytest.raises(ConfigError, match=r"tune.cells.a.fq.decy.*did you mean 'fq.decay'"):
        check_sweep(p)
    p = default_params(["tune.cells={a: {fq: {enabled: false}}, b: {fq: {codebook_size: 32}}}",
                        "tune.space={fq: {codebook_size: {grid: [16, 24]}}}"])
    with pytest.raises(ConfigError, match=r"power of two"):
        check_sweep(p)


def test_a_trial_takes_its_cells_values_then_its_axes_and_the_plan_crosses_cells_with_axes():
    from sqgan.shells.tune_report import planned_trials

    p = default_params(["tune.cells={plain: {fq: {enabled: false}}, small: {fq: {codebook_size: 8}, sq: {enabled: "
                        "false}}}", "tune.space={train: {seed: {grid: [0, 1]}}}"])
    trial, values = cell_params(p, {"cell": "small", "train.seed": 1})
    assert (trial.fq.enabled, trial.fq.codebook_size, trial.sq.enabled, trial.train.seed) == (True, 8, False, 1)
    assert values == {"fq.codebook_size": 8, "sq.enabled": False, "train.seed": 1}
    trial, _ = cell_params(p, {"cell": "plain", "train.seed": 0})
    assert (trial.fq.enabled, trial.fq.codebook_size) == (False, p.fq.codebook_size)
    assert sorted((t["cell"], t["train.seed"]) for t in planned_trials(p)) == \
        [("plain", 0), ("plain", 1), ("small", 0), ("small", 1)]


def test_the_table_averages_seeds_reports_the_paper_and_the_slowdown_against_a_row():
    exp = load_experiment(tiny_experiment(Path(os.environ.get("TMPDIR", "/tmp")), name="tinyrows",
                                          metrics=["fid", {"name": "slow", "key": "time/steps_per_s",
                                                           "relative_to": "plain"},
                                                   {"name": "fidx", "key": "fid", "factor": 100}]))
    keys = {"cells": {"plain @ demo": ["plain", "demo"], "FQ @ demo": ["FQ", "demo"]},
            "metrics": {"fid": "fid40_train_randcnn", "slow": "time/steps_per_s", "fidx": "fid40_train_randcnn"}}
    per_cell = {"plain @ demo": [{"seed": 0, "fid40_train_randcnn": 2.0, "time/steps_per_s": 10.0},
                                 {"seed": 1, "fid40_train_randcnn": 4.0, "time/steps_per_s": 10.0}],
                "FQ @ demo": [{"seed": 0, "fid40_train_randcnn": 1.0, "time/steps_per_s": 8.0}]}
    rows = {(r["row"], r["metric"]): r for r in table_rows(exp, keys, per_cell)}
    assert rows["plain", "fid"]["mean"] == 3.0 and rows["plain", "fid"]["std"] == pytest.approx(math.sqrt(2))
    assert rows["FQ", "fid"]["n"] == 1 and rows["FQ", "fid"]["diff"] == pytest.approx(1.0 - 1.5)
    assert rows["FQ", "slow"]["mean"] == pytest.approx(25.0)  # 10 / 8 steps per second: 25 % slower
    assert rows["plain", "slow"]["mean"] == pytest.approx(0.0) and math.isnan(rows["plain", "fid"]["paper"])
    assert rows["plain", "fidx"]["mean"] == pytest.approx(300.0)  # in the paper's units
    same = table_rows(exp, {**keys, "same_as": {"FQ @ demo": "plain @ demo"}}, per_cell)
    assert [r["mean"] for r in same if r["metric"] == "fid"] == [3.0, 3.0]  # trained once, shown in both


# ------------------------------------------------------------------------------------ end to end
def _children(client, parent_id):
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.ray
def test_a_small_experiment_runs_under_ray_and_mlflow_and_its_table_equals_the_runs_metrics(demo_dir, tmp_path):
    """2 cells × 2 seeds through `sqgan experiment run` (its own local Ray), then `table` from MLflow alone."""
    from mlflow.tracking import MlflowClient

    path = tiny_experiment(tmp_path)
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "sqgan.cli", "experiment", "run", str(path), "--out", str(out), "--no-params-file",
           *infra(tmp_path, demo_dir)]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "DEMO SCALE" in r.stdout and "| FQ |" in r.stdout
    parent_id = json.loads((out / "sweep.json").read_text())["parent_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(parent_id)
    assert parent.data.tags["sqgan.experiment"] == "tiny" and parent.data.tags["sqgan.experiment.scale"] == "demo"
    runs = _children(client, parent_id)
    assert len(runs) == 4
    by_cell: dict[str, list] = {}
    for run in runs:
        values = json.loads(run.data.tags["sqgan.trial_values"])
        by_cell.setdefault(values["cell"], []).append(run)
        assert run.data.params["fq.enabled"] == ("True" if values["cell"] == "FQ @ demo" else "False")
        assert run.data.params["train.seed"] == str(values["train.seed"])
    assert sorted(by_cell) == ["FQ @ demo", "plain @ demo"] and all(len(v) == 2 for v in by_cell.values())
    table = {(row["row"], row["metric"]): row for row in csv.DictReader((out / "table" / "table.csv").open())}
    for cell, cell_runs in by_cell.items():
        row = cell.split(" @ ")[0]
        for metric, key in (("fid", "fid40_train_randcnn"), ("rate", "time/steps_per_s")):
            values = [x.data.metrics[key] for x in cell_runs]
            mean = sum(values) / 2
            assert float(table[row, metric]["mean"]) == pytest.approx(mean, rel=1e-12)
            assert float(table[row, metric]["std"]) == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2),
                                                                     rel=1e-9)
            assert table[row, metric]["n"] == "2"
    assert float(table["FQ", "fid"]["diff"]) == pytest.approx(float(table["FQ", "fid"]["mean"]) - 1.5)
    trials = list(csv.DictReader((out / "trials.csv").open()))  # the sweep's own table names each trial's cell
    assert sorted((t["cell"], t["train.seed"]) for t in trials) == \
        [("FQ @ demo", "0"), ("FQ @ demo", "1"), ("plain @ demo", "0"), ("plain @ demo", "1")]
    logged = {f.path for f in client.list_artifacts(parent_id, "experiment")}
    assert {"experiment/table.md", "experiment/table.csv", "experiment/table.tex", "experiment/table.json"} <= logged

    # From MLflow alone: the run folders and the sweep folder gone, the same table.
    first = (out / "table" / "table.csv").read_text()
    import shutil

    shutil.rmtree(out)
    again = tmp_path / "again"
    r2 = runner.invoke(app, ["experiment", "table", "tiny", "--out", str(again), "--no-params-file",
                             "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert r2.exit_code == 0, r2.output
    assert (again / "table.csv").read_text() == first
    assert "NOT comparable to the paper" in (again / "table.md").read_text()
    assert json.loads((again / "table.json").read_text())["FQ"]["demo"]["fid"]["paper"] == 1.5


@pytest.mark.ray
def test_an_evaluation_only_cell_evaluates_the_trained_cells_g_with_its_own_values(demo_dir, tmp_path):
    """Rows N=2 and N=8 KMeans centres of multimodal truncation: one training (N=2), then `sqgan eval` of its
    checkpoint with N=8 in a run nested under the experiment, tagged as that cell; more centres fit the same w
    closer (lower inertia), the table shows each run's values, and a second pass adds nothing."""
    from mlflow.tracking import MlflowClient

    scale = {**TINY_SCALE, "sample": {"fit_samples": 300}}
    path = tiny_experiment(
        tmp_path, name="elbow", params={"model": {"arch": "dcgan"}, "sq": {"enabled": True}, "fq": {"enabled": False},
                                        "metrics": {"truncation": "multimodal"},
                                        "sample": {"psi": 0.5, "assign": "l2"}},
        rows={"N=2": {"sample": {"centres": 2}}, "N=8": {"sample": {"centres": 8}}},
        metrics=["fid", {"name": "inertia", "key": "truncation/kmeans_inertia", "mode": "min"}],
        paper=[], paper_numbers="a test fixture",
        scales={"demo": {"seeds": [0], "params": scale}, "paper": {"seeds": [0]}})
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "sqgan.cli", "experiment", "run", str(path), "--out", str(out), "--no-params-file",
           *infra(tmp_path, demo_dir)]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "cell 'N=8 @ demo' seed 0: evaluated" in r.stdout
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    parent_id = json.loads((out / "sweep.json").read_text())["parent_run_id"]
    runs = {json.loads(x.data.tags["sqgan.trial_values"])["cell"]: x for x in _children(client, parent_id)}
    assert sorted(runs) == ["N=2 @ demo", "N=8 @ demo"]
    trained, evaluated = runs["N=2 @ demo"], runs["N=8 @ demo"]
    assert evaluated.data.tags["sqgan.eval.of_run"] == trained.info.run_id
    assert evaluated.data.tags["sqgan.stage"] == "eval" and "sqgan.eval.of_run" not in trained.data.tags
    assert (trained.data.params["sample.centres"], evaluated.data.params["sample.centres"]) == ("2", "8")
    inertia = "truncation/kmeans_inertia"
    assert 0 < evaluated.data.metrics[inertia] < trained.data.metrics[inertia]
    provenance = json.loads(evaluated.data.tags["sqgan.metric.fid40_train_randcnn"])
    assert provenance["truncation"]["centres"] == 8 and provenance["truncation"]["psi"] == 0.5
    table = {(row["row"], row["metric"]): row for row in csv.DictReader((out / "table" / "table.csv").open())}
    for row, run in (("N=2", trained), ("N=8", evaluated)):
        assert float(table[row, "inertia"]["mean"]) == pytest.approx(run.data.metrics[inertia], rel=1e-12)
        assert float(table[row, "fid"]["mean"]) == pytest.approx(run.data.metrics["fid40_train_randcnn"], rel=1e-12)
        assert table[row, "fid"]["n"] == "1"
    params = default_params(["mlflow.tracking_uri=" + uri, f"data.root={demo_dir.parent}",
                             f"data.dataset={demo_dir.name}"])
    assert evaluate_cells(params, uri, parent_id, tmp_path) == []  # what --resume runs: nothing is missing
    assert len(_children(client, parent_id)) == 2


def test_the_dvc_experiment_stage_names_every_shipped_file_at_both_scales():
    matrix = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["experiment"]["matrix"]
    assert sorted(matrix["name"]) == sorted(SHIPPED) and matrix["scale"] == ["demo", "paper"]


@pytest.mark.ray
def test_dvc_repro_of_an_experiment_stage_writes_its_table_as_dvc_metrics_and_a_second_repro_skips(demo_dir, tmp_path):
    """The experiment stage of dvc.yaml (its matrix cut to one tiny file): `dvc repro experiment@tiny-demo` runs it,
    `dvc metrics show` reads the table (the same numbers as table.csv), and a second repro reproduces nothing."""
    import shutil

    proj = tmp_path / "proj"
    proj.mkdir()
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stage = dvc_yaml["stages"]["experiment"]
    stage["matrix"] = {"name": ["tiny"], "scale": ["demo"]}
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"experiment": stage}}, sort_keys=False))
    shutil.copy(ROOT / ".gitignore", proj)
    shutil.copytree(ROOT / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (proj / "experiments").mkdir()
    tiny_experiment(proj / "experiments")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(root=str(demo_dir.parent), dataset=demo_dir.name)
    params["mlflow"].update(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(tmp_path / "art"))
    params["ray"].update(storage_path=str(tmp_path / "ray"), cpus_per_worker=1)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("RAY_ADDRESS", None)
    dvc = os.path.join(bin_dir, "dvc")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=proj, env=env, capture_output=True, text=True, timeout=600)

    assert run("git", "init", "-q").returncode == 0 and run(dvc, "init", "-q").returncode == 0
    first = run(dvc, "repro", "experiment@tiny-demo")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Running stage 'experiment@tiny-demo'" in first.stdout
    shown = run(dvc, "metrics", "show", "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    metrics = next(iter(json.loads(shown.stdout).values()))["data"]["runs/experiments/tiny-demo/table/table.json"]
    table = {(r["row"], r["metric"]): r for r in
             csv.DictReader((proj / "runs/experiments/tiny-demo/table/table.csv").open())}
    for row in ("plain", "FQ"):
        got = metrics["data"][row]["demo"]["fid"]
        assert got["mean"] == pytest.approx(float(table[row, "fid"]["mean"])) and got["n"] == 2
    assert metrics["data"]["FQ"]["demo"]["fid"]["paper"] == 1.5 and metrics["data"]["scale"] == "demo"
    second = run(dvc, "repro", "experiment@tiny-demo")
    assert second.returncode == 0 and "Running stage" not in second.stdout, second.stdout[-2000:]


@pytest.mark.ray
def test_a_killed_experiment_driver_resumes_training_only_the_missing_cells(demo_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    path = tiny_experiment(tmp_path, scales={"demo": {"seeds": [0], "params": TINY_SCALE}, "paper": {"seeds": [0]}})
    out = tmp_path / "exp"
    base = [sys.executable, "-m", "sqgan.cli", "experiment", "run", str(path), "--out", str(out), "--no-params-file",
            *infra(tmp_path, demo_dir), "--set", "tune.max_concurrent_trials=1", "--set", "ray.num_cpus=2"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    finished = kill_after_first_trial(base, tmp_path, out, uri)
    client = MlflowClient(tracking_uri=uri)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([*base, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pid = json.loads((out / "sweep.json").read_text())["parent_run_id"]
    runs = _children(client, pid)
    assert len(runs) == 2 and all(x.data.tags["sqgan.trial_status"] == "completed" for x in runs)
    again = next(x for x in runs if x.info.run_id == finished[0].info.run_id)
    assert again.data.tags["sqgan.trial_starts"] == "1"  # the finished cell was not trained again
    rows = list(csv.DictReader((out / "table" / "table.csv").open()))
    assert all(row["n"] == "1" for row in rows)


def test_a_figure_plots_the_interim_metric_mean_over_seeds_per_cell(tmp_path):
    from types import SimpleNamespace

    from sqgan.commands.experiment import _curves

    exp = load_experiment(SHIPPED["fqgan-hparams"])
    histories = {"r0": [(20, 4.0), (40, 2.0)], "r1": [(20, 6.0), (40, 3.0)], "r2": [(20, 1.0)]}

    class Client:
        def get_metric_history(self, run_id, key):
            assert key == "fid50_train_randcnn"  # the interim evaluation's name only, never the final one
            return [SimpleNamespace(step=s, value=v) for s, v in histories[run_id]]

    keys = {"cells": {"a": ["K=2", "λ=0.7"], "b": ["K=16", "λ=0.7"], "c": ["K=16", "λ=0.9"]},
            "metrics": {"fid": "fid100_train_randcnn"}, "curve_key": "fid50_train_randcnn", "same_as": {"c": "b"}}
    per_cell = {"a": [{"run_id": "r0"}, {"run_id": "r1"}], "b": [{"run_id": "r2"}]}
    files = _curves(Client(), exp, keys, per_cell, tmp_path)
    assert [f.name for f in files] == ["curves.png", "curves.csv"]
    rows = list(csv.reader((tmp_path / "curves.csv").open()))
    assert rows == [["cell", "step", "fid50_train_randcnn", "n"], ["a", "20", "5.0", "2"], ["a", "40", "2.5", "2"],
                    ["b", "20", "1.0", "1"], ["c", "20", "1.0", "1"]]


@pytest.mark.ray
def test_the_kubeflow_experiment_task_nests_the_experiment_under_the_pipeline_run(demo_dir, tmp_path, monkeypatch):
    """What the experiment component runs: the file's text passed in, the sweep in the task's own Ray, the experiment's
    parent run nested under the pipeline's, the table as the task's outputs."""
    import shutil

    from mlflow.tracking import MlflowClient

    from sqgan.commands.kfp_tasks import experiment_task, open_pipeline_run, write_params

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params_file = tmp_path / "params.yaml"
    shutil.copytree(demo_dir, tmp_path / "data" / "demo")
    overrides = [f"mlflow.artifact_root={tmp_path / 'art'}", f"ray.storage_path={tmp_path / 'ray'}",
                 "ray.cpus_per_worker=1", f"data.root={tmp_path / 'data'}", "data.dataset=demo"]
    write_params((ROOT / "params.yaml").read_text(), overrides, params_file)
    pipeline_run = open_pipeline_run(params_file, overrides, uri, "", "sqgan-experiment", "kfp-run-1")
    # the FQ row trains on a dataset of its own, built by the scale's recipe: each trial gets its cell's folder
    build = {"demo10": {"stage": "subset", "params": {"data": {"subset": {"source": "demo", "n": 10}}}}}
    text = tiny_experiment(tmp_path / "..", name="kfptiny",
                           rows={"plain": {"fq": {"enabled": False}},
                                 "FQ": {"fq": {"enabled": True}, "data": {"dataset": "demo10"},
                                        "train": {"batch_size": 8}}},
                           scales={"demo": {"seeds": [0], "params": {**TINY_SCALE, "train": {
                               k: v for k, v in TINY_SCALE["train"].items() if k != "batch_size"}}, "build": build},
                                   "paper": {"seeds": [0]}}).read_text()
    r = experiment_task(params_file, overrides, uri, pipeline_run, "kfptiny", "demo", text, tmp_path / "nowhere",
                        tmp_path / "sweep", tmp_path / "table.md", tmp_path / "table.csv")
    client = MlflowClient(tracking_uri=uri)
    exp_run = client.get_run(r["experiment_run_id"])
    assert exp_run.data.tags["mlflow.parentRunId"] == pipeline_run and r["cells"] == 2
    assert exp_run.data.tags["sqgan.experiment"] == "kfptiny"
    trials = {json.loads(x.data.tags["sqgan.trial_values"])["cell"]: x
              for x in _children(client, r["experiment_run_id"])}
    assert sorted(trials) == ["FQ @ demo", "plain @ demo"]
    assert Path(trials["FQ @ demo"].data.tags["data.dir"]) == (tmp_path / "data" / "demo10").resolve()
    assert Path(trials["plain @ demo"].data.tags["data.dir"]) == (tmp_path / "data" / "demo").resolve()
    assert (tmp_path / "data" / "demo10" / "manifest.parquet").is_file()
    assert "| FQ |" in (tmp_path / "table.md").read_text()
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert {row["row"] for row in rows} == {"plain", "FQ"} and all(row["n"] == "1" for row in rows)
