"""The demo chain under DVC: `dvc repro` builds it; a second `dvc repro` reproduces nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_dvc_repro_twice_second_reproduces_nothing(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(ROOT / "dvc.yaml", proj)
    shutil.copy(ROOT / ".gitignore", proj)
    shutil.copytree(ROOT / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(steps=4, batch_size=8, log_every=2, sample_every=2, checkpoint_every=2)
    params["model"].update(g_channels=8, d_channels=8)
    params["metrics"].update(num_fake=20, kid_max_subset_size=10, kid_subsets=2)
    params["data"]["demo"].update(lfw_faces=10)
    params["ray"].update(cpus_per_worker=1, num_cpus=1)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "RAY_AUTH_MODE": "disabled",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("RAY_ADDRESS", None)
    dvc = os.path.join(bin_dir, "dvc")
    assert _run(["git", "init", "-q"], proj, env).returncode == 0
    assert _run([dvc, "init", "-q"], proj, env).returncode == 0

    first = _run([dvc, "repro", "train"], proj, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Running stage 'demo_data'" in first.stdout and "Running stage 'train'" in first.stdout
    metrics = yaml.safe_load((proj / "runs/demo/metrics.json").read_text())
    assert metrics["step"] == 4 and "fid20_train_randcnn" in metrics
    assert (proj / "runs/demo/grid.png").stat().st_size > 0
    assert len(list((proj / "data/demo/images").iterdir())) == 49 + 10

    second = _run([dvc, "repro", "train"], proj, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Running stage" not in second.stdout
    assert "didn't change, skipping" in second.stdout
    status = _run([dvc, "status", "train"], proj, env)
    assert "up to date" in status.stdout

    # the data hash sqgan tags runs with is the one DVC records for the folder
    from sqgan.shells.tracking import dvc_dir_md5

    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    locked = next(o["md5"] for o in lock["stages"]["demo_data"]["outs"] if o["path"] == "data/demo")
    assert dvc_dir_md5(proj / "data/demo") == locked

    # the README's `dvc exp run` example, run as written (it names the train stage, so the real-dataset
    # stages, which have no source here, are not run)
    example = re.search(r"dvc (exp run train -S (\S+))", (ROOT / "README.md").read_text())
    assert example, "README shows no `dvc exp run train -S …` example"
    assert _run(["git", "add", "-A"], proj, env).returncode == 0
    assert _run(["git", "commit", "-qm", "base"], proj, env).returncode == 0
    exp = _run([dvc, *example.group(1).split()], proj, env)
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    key, value = example.group(2).split("=")
    section, name = key.split(".")
    assert yaml.safe_load((proj / "params.yaml").read_text())[section][name] == yaml.safe_load(value)
    assert yaml.safe_load((proj / "runs/demo/metrics.json").read_text())["step"] == 4

    # a real-dataset stage runs once its source is given by path (here: one BreCaHAD-sized slide)
    import numpy as np
    from PIL import Image

    slides = tmp_path / "slides"
    slides.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1024, 1360, 3), dtype=np.uint8)).save(slides / "a.tif")
    params["data"]["brecahad"]["path"] = str(slides)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    real = _run([dvc, "repro", "brecahad"], proj, env)
    assert real.returncode == 0, real.stderr[-3000:]
    assert len(list((proj / "data/brecahad/images").iterdir())) == 12
    shown = _run([dvc, "metrics", "show"], proj, env)
    assert "brecahad.json" in shown.stdout and "crops" in shown.stdout
