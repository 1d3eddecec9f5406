"""Nothing lost, nothing hung: each case a new user hit in the trial, reproduced through the CLI."""

from __future__ import annotations

import re
import shlex
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from sqgan.cli import app

runner = CliRunner()
ROOT_PARAMS = __import__("conftest").ROOT / "params.yaml"


def _images(folder, n=3, size=8, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return sorted(p.name for p in folder.iterdir())


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ outputs vs inputs
def test_curate_with_out_equal_to_src_is_refused_and_keeps_the_originals(tmp_path):
    src = tmp_path / "photos"
    _images(src)
    before = _tree(src)
    r = runner.invoke(app, ["data", "curate", "--src", str(src), "--out", str(src)])
    assert r.exit_code == 1 and "is the input" in r.output
    assert _tree(src) == before


@pytest.mark.parametrize("out_rel", [".", "photos/curated"])
def test_curate_with_out_containing_or_inside_src_is_refused(tmp_path, out_rel):
    src = tmp_path / "photos"
    _images(src)
    before = _tree(tmp_path)
    r = runner.invoke(app, ["data", "curate", "--src", str(src), "--out", str(tmp_path / out_rel)])
    assert r.exit_code == 1 and re.search(r"(contains|lies inside) the input", r.output), r.output
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("stage", ["curate", "demo", "brecahad", "subset"])
def test_a_stage_never_replaces_a_folder_it_did_not_write(tmp_path, demo_dir, stage):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("\\chapter{years of work}")
    src = {"curate": ["--src", str(demo_dir / "images")], "demo": [],
           "brecahad": ["--src", str(demo_dir / "images"), "--crop", "16", "--stride", "16"],
           "subset": ["--src", str(demo_dir), "--n", "3"]}[stage]
    r = runner.invoke(app, ["data", stage, *src, "--out", str(out)])
    assert r.exit_code == 1, r.output
    assert "no sqgan stage wrote" in r.output and "--out" in r.output
    assert (out / "thesis.tex").read_text() == "\\chapter{years of work}"
    # the advice names a folder that does not exist yet: following it as written is safe
    suggested = re.search(r"e\.g\. --out (\S+)", r.output).group(1)
    assert not (tmp_path / suggested).exists() and suggested.endswith("mine-2")
    # --force replaces only what a sqgan stage wrote: over a foreign folder it names the files and the second switch
    r = runner.invoke(app, ["data", stage, *src, "--out", str(out), "--force"])
    assert r.exit_code == 1 and "thesis.tex" in r.output and "--delete-unknown" in r.output, r.output
    assert (out / "thesis.tex").exists()
    assert runner.invoke(app, ["data", stage, *src, "--out", str(out), "--delete-unknown"]).exit_code == 2
    assert runner.invoke(app, ["data", stage, *src, "--out", str(out), "--force", "--delete-unknown"]).exit_code == 0
    assert not (out / "thesis.tex").exists()
    # a second run of the same stage replaces its own output, and so does --force
    assert runner.invoke(app, ["data", stage, *src, "--out", str(out), "--force"]).exit_code == 0
    assert runner.invoke(app, ["data", stage, *src, "--out", str(out)]).exit_code == 0


def test_one_stage_does_not_replace_another_stages_output(tmp_path, demo_dir):
    out = tmp_path / "sub"
    assert runner.invoke(app, ["data", "subset", "--src", str(demo_dir), "--n", "3", "--out", str(out)]).exit_code == 0
    r = runner.invoke(app, ["data", "curate", "--src", str(demo_dir / "images"), "--out", str(out)])
    assert r.exit_code == 1 and "output of the 'subset' stage" in r.output
    assert len(pd.read_parquet(out / "manifest.parquet")) == 3


def test_missing_manifest_advice_is_safe_to_follow_as_written(tmp_path):
    """`sqgan train --data FOLDER` once advised `sqgan data demo --out FOLDER`, which wiped the images."""
    folder = tmp_path / "my_faces"
    _images(folder)
    before = _tree(folder)
    for cmd in (["train", "--data", str(folder)], ["data", "ffhq2k5", "--src", str(folder), "--out",
                                                   str(tmp_path / "ffhq"), "--features", "pixels"]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 1 and "is not a curated dataset" in r.output, r.output
        advice = re.search(r"`(sqgan data [^`]+)`", r.output).group(1)
        assert str(folder) in advice and "--out" in advice
    follow = runner.invoke(app, shlex.split(advice)[1:])
    assert follow.exit_code == 0, follow.output
    assert _tree(folder) == before
    assert len(pd.read_parquet(tmp_path / "my_faces-curated" / "manifest.parquet")) == 3


# ------------------------------------------------------------------------------ curate correctness
def test_no_two_inputs_land_on_one_output_file(tmp_path):
    src = tmp_path / "raw"
    rng = np.random.default_rng(1)
    names = ["cat.png", "cat.jpg", "a/b.png", "a__b.png", "CAT.PNG", "cat~2.png", "x.jpg.png", "x.jpg", "a/b"]
    for i, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (6, 6 + i, 3), dtype=np.uint8)  # every image different
        Image.fromarray(arr).save(src / name, format="JPEG" if name.endswith(".jpg") else "PNG")
    r = runner.invoke(app, ["data", "curate", "--src", str(src), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out" / "images").rglob("*")
                   if p.is_file())
    assert len(df) == len(names) == len(files) and sorted(df["path"]) == files
    assert sorted(df["source_id"]) == sorted(names)
    # names keep the relative path (README); clashes, case-insensitive, get ~2, ~3 in sorted source order
    assert dict(zip(df["source_id"], df["path"], strict=True)) == {
        "CAT.PNG": "images/CAT.png", "cat.jpg": "images/cat~2.png", "cat.png": "images/cat~3.png",
        "cat~2.png": "images/cat~2~2.png", "a/b": "images/a/b.png", "a/b.png": "images/a/b~2.png",
        "a__b.png": "images/a__b.png", "x.jpg": "images/x.png", "x.jpg.png": "images/x.jpg.png"}
    for row in df.itertuples():  # each row's file is the image of its own source
        with Image.open(tmp_path / "out" / row.path) as im:
            assert im.size == (row.width, row.height)
        assert row.width == 6 + names.index(row.source_id)


def test_dedupe_compares_shape_not_only_bytes(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    same_bytes = np.arange(18, dtype=np.uint8)
    Image.fromarray(same_bytes.reshape(2, 3, 3)).save(src / "wide.png")  # 2×3 RGB
    Image.fromarray(same_bytes.reshape(3, 2, 3)).save(src / "tall.png")  # 3×2 RGB, the same 18 bytes
    Image.fromarray(same_bytes.reshape(2, 3, 3)).save(src / "wide_copy.png")
    from sqgan.data.curate import curate

    counts = curate(src, tmp_path / "out")
    assert counts["kept"] == 2 and counts["duplicate"] == 1


def test_min_images_is_a_minimum_not_a_strict_bound(tmp_path):
    from sqgan.data.curate import NothingUsable, curate

    src = tmp_path / "raw"
    _images(src, n=1)
    assert curate(src, tmp_path / "one", min_images=1)["kept"] == 1
    with pytest.raises(NothingUsable, match=r"only 1 usable image\(s\) of 1 files \(need 2\)"):
        curate(src, tmp_path / "two", min_images=2)


# ------------------------------------------------------------------------------ params honoured
def test_data_commands_honour_params_and_set(tmp_path, demo_dir):
    out = tmp_path / "crops"
    r = runner.invoke(app, ["data", "brecahad", "--src", str(demo_dir / "images"), "--out", str(out),
                            "--set", "data.brecahad.crop=16", "--set", "data.brecahad.stride=16"])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(out / "manifest.parquet")
    assert set(df["width"]) == {16} and len(df) == 149 * 4  # 32² images → 2×2 crops of 16
    from conftest import ROOT

    f = tmp_path / "p.yaml"
    f.write_text((ROOT / "params.yaml").read_text().replace("    n: 10\n", "    n: 4\n"))
    r = runner.invoke(app, ["data", "subset", "--src", str(demo_dir), "--out", str(tmp_path / "s"), "--params", str(f)])
    assert r.exit_code == 0, r.output
    assert len(pd.read_parquet(tmp_path / "s" / "manifest.parquet")) == 4


def test_unknown_stage_is_an_error(tmp_path):
    r = runner.invoke(app, ["data", "prepare", "cifar"])
    assert r.exit_code == 2 and "unknown dataset 'cifar'" in r.output
    from sqgan.data.stages import get_stage

    with pytest.raises(ValueError, match="unknown stage 'cifar'"):
        get_stage("cifar")


# ------------------------------------------------------------------------------ fail fast, before Ray
def _no_ray(monkeypatch):
    import sqgan.shells.ray_train as rt

    def boom(*a, **k):
        raise AssertionError("Ray must not start for a run that cannot work")

    monkeypatch.setattr(rt, "init_ray", boom)


def test_workers_that_do_not_fit_fail_in_seconds_naming_the_fix(demo_dir, tmp_path, monkeypatch):
    """`--set train.workers=2` with 2 CPUs per worker on a 2-CPU machine once retried forever."""
    _no_ray(monkeypatch)
    t0 = time.monotonic()
    r = runner.invoke(app, ["train", "--data", str(demo_dir), "--out", str(tmp_path / "run"), "--set",
                            "train.workers=2", "--set", "ray.cpus_per_worker=2", "--set", "ray.num_cpus=2"])
    assert time.monotonic() - t0 < 20
    assert r.exit_code == 1
    # ("ray.num_cpus=2", or "the running Ray" when an earlier test started one with 2 CPUs)
    assert re.search(r"needs 4 CPUs, but (ray.num_cpus=2|the running Ray) has 2; --set ray.cpus_per_worker=1$",
                     r.output.strip()), r.output
    r = runner.invoke(app, ["train", "--data", str(demo_dir), "--out", str(tmp_path / "run"), "--set",
                            "train.workers=3", "--set", "ray.cpus_per_worker=1", "--set", "ray.num_cpus=2"])
    assert r.exit_code == 1 and "--set train.workers=2" in r.output
    r = runner.invoke(app, ["train", "--data", str(demo_dir), "--out", str(tmp_path / "run"), "--set",
                            "train.use_gpu=true", "--set", "ray.cpus_per_worker=1", "--set", "ray.num_cpus=2"])
    import torch

    if torch.cuda.device_count() == 0:
        assert r.exit_code == 1 and "needs 1 GPUs" in r.output


def test_resources_that_fit_are_accepted():
    from sqgan.config import default_params
    from sqgan.shells.ray_train import check_resources

    p = default_params(["train.workers=2", "ray.cpus_per_worker=1"])
    assert check_resources(p, {"CPU": 2.0, "GPU": 0.0}, "x") is False
    assert check_resources(p, {"CPU": 2.0, "GPU": 2.0}, "x") is True  # auto: a GPU per worker is there
    with pytest.raises(RuntimeError, match="needs 2 CPUs, but x has 1"):
        check_resources(p, {"CPU": 1.0}, "x")


def test_unreachable_tracking_server_fails_in_seconds_naming_the_uri(demo_dir, tmp_path, monkeypatch):
    import socket

    _no_ray(monkeypatch)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    uri = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    r = runner.invoke(app, ["train", "--data", str(demo_dir), "--out", str(tmp_path / "run"), "--set",
                            f"mlflow.tracking_uri={uri}", "--set", "ray.cpus_per_worker=1"])
    assert time.monotonic() - t0 < 20
    assert r.exit_code == 1 and f"mlflow.tracking_uri {uri}: no answer" in r.output and "make ui" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_ray_failure_policy_is_bounded(demo_dir, tmp_path, monkeypatch):
    import sqgan.shells.ray_train as rt

    seen = {}

    class FakeTrainer:
        def __init__(self, *a, run_config, scaling_config, **k):
            seen["failure"], seen["scaling"] = run_config.failure_config, scaling_config

        def fit(self):
            raise RuntimeError("stop here")

    monkeypatch.setattr(rt, "init_ray", lambda p: None)
    monkeypatch.setattr("ray.train.torch.TorchTrainer", FakeTrainer)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    from sqgan.config import default_params

    p = default_params([f"mlflow.tracking_uri={uri}", f"mlflow.artifact_root={tmp_path / 'a'}",
                        "ray.cpus_per_worker=1", "ray.max_failures=2"])
    with pytest.raises(RuntimeError, match="stop here"):
        rt.run_training(p, demo_dir, tmp_path / "run", project_dir=tmp_path)
    assert seen["failure"].max_failures == 2 and seen["failure"].controller_failure_limit == 1
    from sqgan.config import ConfigError

    with pytest.raises(ConfigError, match="ray.max_failures"):
        default_params(["ray.max_failures=-1"])
    with pytest.raises(ConfigError, match="ray.controller_failure_limit"):
        default_params(["ray.controller_failure_limit=-1"])


@pytest.mark.parametrize(("content", "expect"), [
    (b"", "is empty (0 bytes"),
    (b"hello, not a checkpoint\n", "is not a readable sqgan checkpoint"),
])
def test_bad_checkpoint_is_one_line_before_ray(demo_dir, tmp_path, monkeypatch, content, expect):
    _no_ray(monkeypatch)
    ckpt = tmp_path / "step_000010.pt"
    ckpt.write_bytes(content)
    r = runner.invoke(app, ["train", "--data", str(demo_dir), "--out", str(tmp_path / "run"), "--resume", str(ckpt),
                            "--set", "ray.cpus_per_worker=1"])
    assert r.exit_code == 1 and expect in r.output, r.output
    assert "Aborted" not in r.output and "weights_only=False" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_resume_past_train_steps_fails_before_ray(demo_dir, tmp_path, monkeypatch):
    from conftest import tiny_overrides

    from sqgan.config import default_params
    from sqgan.train.loop import train

    train(default_params(tiny_overrides(**{"train.steps": 10})), demo_dir, tmp_path / "r")
    _no_ray(monkeypatch)
    sets = [x for kv in tiny_overrides(**{"train.steps": 5}) for x in ("--set", kv)]
    r = runner.invoke(app, ["train", "--data", str(demo_dir), "--out", str(tmp_path / "r2"), "--resume",
                            str(tmp_path / "r" / "checkpoints" / "step_000010.pt"), *sets])
    assert r.exit_code == 1 and "at step 10, past train.steps=5; --set train.steps=10 or more" in r.output


def test_train_refuses_an_out_it_did_not_write(demo_dir, tmp_path, monkeypatch):
    _no_ray(monkeypatch)
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep me")
    r = runner.invoke(app, ["train", "--data", str(demo_dir), "--out", str(out), "--set", "ray.cpus_per_worker=1"])
    assert r.exit_code == 1 and "no sqgan stage wrote" in r.output
    r = runner.invoke(app, ["train", "--data", str(demo_dir), "--out", str(demo_dir), "--set", "ray.cpus_per_worker=1"])
    assert r.exit_code == 1 and "is the input" in r.output
    assert (out / "todo.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------ provenance
@pytest.mark.parametrize(("raised", "status"), [(KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")])
def test_a_run_whose_driver_stops_is_marked_killed_or_failed(demo_dir, tmp_path, raised, status):
    from mlflow.tracking import MlflowClient

    from sqgan.config import default_params
    from sqgan.shells.ray_train import fit_tracked
    from sqgan.shells.tracking import open_run

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    p = default_params([f"mlflow.tracking_uri={uri}", f"mlflow.artifact_root={tmp_path / 'a'}"])
    _, run_id = open_run(p, demo_dir, tmp_path / "run", tmp_path)

    class Dies:
        def fit(self):
            raise raised("stopped")

    with pytest.raises(raised):
        fit_tracked(Dies(), uri, run_id)
    assert MlflowClient(uri).get_run(run_id).info.status == status


def test_data_hash_tag_is_of_the_data_on_disk_and_compared_with_dvc_lock(demo_dir, tmp_path):
    import shutil

    import yaml

    from sqgan.shells.tracking import dvc_dir_md5, provenance_tags

    data = tmp_path / "data" / "demo"
    shutil.copytree(demo_dir, data)
    lock = {"schema": "2.0", "stages": {"demo_data": {"outs": [{"path": "data/demo", "md5": dvc_dir_md5(data)}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    tags = provenance_tags(data, tmp_path)
    assert tags["data.matches_dvc_lock"] == "true" and tags["data.md5"] == tags["data.dvc_lock_md5"]
    img = next((data / "images").iterdir())
    img.write_bytes(img.read_bytes() + b"\0")  # the data on disk drifts from what dvc.lock recorded
    tags = provenance_tags(data, tmp_path)
    assert tags["data.matches_dvc_lock"] == "false" and tags["data.md5"] != tags["data.dvc_lock_md5"]


def test_run_outputs_are_ignored_by_git_so_training_leaves_the_tree_clean():
    """After one training in a fresh clone every run was tagged `<sha>-dirty`: training rewrote tracked files."""
    import subprocess

    from conftest import ROOT

    tracked = subprocess.run(["git", "ls-files", "runs", "mlflow.db", "mlartifacts", "ray_results", ".cache"],
                             cwd=ROOT, capture_output=True, text=True).stdout
    assert tracked == ""
    for path in ("runs/demo/grid.png", "runs/demo/metrics.json", "runs/x/checkpoints/step_000010.pt",
                 ".cache/features/a.npy", "mlflow.db"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


def test_download_never_overwrites_a_different_file_of_the_same_name(server, tmp_path):
    import hashlib

    base, h = server
    h.files["/report.pdf"] = b"the archive's bytes"
    (tmp_path / "report.pdf").write_bytes(b"my own report")
    sha = hashlib.sha256(b"the archive's bytes").hexdigest()
    args = ["data", "download", "--url", f"{base}/report.pdf", "--sha256", sha, "--out", str(tmp_path)]
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "nothing was changed" in r.output and h.seen_ranges == []
    assert (tmp_path / "report.pdf").read_bytes() == b"my own report"
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    assert (tmp_path / "report.pdf").read_bytes() == b"the archive's bytes"
    assert runner.invoke(app, args).exit_code == 0  # the verified copy is kept and reused


def test_data_hash_equals_dvc_datas_own_tree_hash(tmp_path):
    """An independent reference: DVC's own library hashes the same folder to the same `.dir` md5."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    from sqgan.shells.tracking import dvc_dir_md5

    (tmp_path / "d" / "images" / "z").mkdir(parents=True)
    (tmp_path / "d" / "images" / "z" / "b.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "d" / "images" / "a.png").write_bytes(b"\0\1\2")
    (tmp_path / "d" / ".sqgan-stage.json").write_text('{"stage": "demo"}\n')
    _, _, tree = build(HashFileDB(MemoryFileSystem(), "memory://odb"), str(tmp_path / "d"), LocalFileSystem(), "md5")
    assert dvc_dir_md5(tmp_path / "d") == tree.hash_info.value


def test_manifest_rows_and_files_must_agree(tmp_path):
    from sqgan.data.manifest import write_manifest

    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "images" / name)
    row = {"width": 2, "height": 2, "source": "t", "source_id": "a", "split": "train"}
    with pytest.raises(ValueError, match=r"files \['images/b.png'\] are not in the manifest"):
        write_manifest(tmp_path, [{**row, "path": "images/a.png"}])
    with pytest.raises(ValueError, match="more than once"):
        write_manifest(tmp_path, [{**row, "path": "images/a.png"}, {**row, "path": "images/a.png"},
                                  {**row, "path": "images/b.png"}])
    with pytest.raises(FileNotFoundError):
        write_manifest(tmp_path, [{**row, "path": "images/a.png"}, {**row, "path": "images/b.png"},
                                  {**row, "path": "images/gone.png"}])
    assert not (tmp_path / "manifest.parquet").exists()
    write_manifest(tmp_path, [{**row, "path": "images/a.png"}, {**row, "path": "images/b.png"}])
    assert len(pd.read_parquet(tmp_path / "manifest.parquet")) == 2


# ------------------------------------------------------------------------------ from the new-user trial
def test_rerun_refuses_an_earlier_output_to_which_files_were_added(tmp_path):
    src, out = tmp_path / "src", tmp_path / "cur"
    _images(src)
    args = ["data", "curate", "--src", str(src), "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, args).exit_code == 0  # untouched: a re-run replaces it
    (out / "mywork").mkdir()
    (out / "mywork" / "analysis.ipynb").write_text("{}")
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "files were added to or removed from it" in r.output
    assert (out / "mywork" / "analysis.ipynb").exists()
    r = runner.invoke(app, [*args, "--force"])  # the notebook is not the stage's: --force alone keeps it
    assert r.exit_code == 1 and "mywork/analysis.ipynb" in r.output and (out / "mywork" / "analysis.ipynb").exists()
    assert runner.invoke(app, [*args, "--force", "--delete-unknown"]).exit_code == 0 and not (out / "mywork").exists()


def test_the_current_folder_is_never_an_output_even_with_force(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("keep")
    monkeypatch.chdir(home)
    for out in (".", str(home), ".."):
        r = runner.invoke(app, ["data", "demo", "--out", out, "--force", "--params", str(ROOT_PARAMS)])
        assert r.exit_code == 1 and "is or contains the current folder" in r.output, (out, r.output)
        assert "--out ..-2" not in r.output
    assert (home / "thesis.tex").read_text() == "keep"


def test_a_symlinked_out_replaces_its_target_and_leaves_no_stray_link(tmp_path):
    real = tmp_path / "real"
    link = tmp_path / "link"
    args = ["data", "demo", "--params", str(ROOT_PARAMS), "--set", "data.demo.lfw_faces=2"]
    assert runner.invoke(app, [*args, "--out", str(real)]).exit_code == 0
    link.symlink_to(real)
    assert runner.invoke(app, [*args, "--out", str(link), "--set", "data.demo.lfw_faces=3"]).exit_code == 0
    assert link.is_symlink() and len(pd.read_parquet(real / "manifest.parquet")) == 49 + 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_outputs_are_readable_as_the_umask_allows(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        from sqgan.data.demo import build_demo

        out = build_demo(tmp_path / "d", 32, lfw_faces=1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "manifest.parquet").stat().st_mode) == 0o644


def test_sigterm_during_a_stage_leaves_no_temporary_folder(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    src = tmp_path / "src"
    _images(src, n=40)
    script = (
        "import time, sqgan.data.curate as c\n"
        "real = c.load_rgb\n"
        "c.load_rgb = lambda p: (time.sleep(0.25), real(p))[1]\n"
        "from sqgan.cli import app\n"
        f"app(['data', 'curate', '--src', {str(src)!r}, '--out', {str(tmp_path / 'out')!r}, '--params', "
        f"{str(ROOT_PARAMS)!r}])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None, "the stage never started"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_fresh_training_over_an_earlier_runs_checkpoints_is_refused(demo_dir, tmp_path, monkeypatch):
    from conftest import tiny_overrides

    from sqgan.config import default_params
    from sqgan.train.loop import train

    train(default_params(tiny_overrides(**{"train.steps": 10})), demo_dir, tmp_path / "run")
    _no_ray(monkeypatch)
    r = runner.invoke(app, ["train", "--data", str(demo_dir), "--out", str(tmp_path / "run"), "--set",
                            "ray.cpus_per_worker=1"])
    assert r.exit_code == 1 and "holds the checkpoints of an earlier run (up to step_000010.pt)" in r.output
    assert "--resume" in r.output and (tmp_path / "run" / "checkpoints" / "step_000010.pt").exists()


def test_unreachable_ray_address_fails_in_seconds():
    from sqgan.shells.ray_train import check_ray_address

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ray.address 127.0.0.1:9: nothing answered"):
        check_ray_address("127.0.0.1:9", timeout=2)
    assert time.monotonic() - t0 < 10
    with pytest.raises(RuntimeError, match="expected host:port"):
        check_ray_address("not-an-address")
    check_ray_address("auto")  # left to Ray


def test_gpu_advice_never_repeats_the_current_setting():
    from sqgan.config import default_params
    from sqgan.shells.ray_train import check_resources

    with pytest.raises(RuntimeError) as e:
        check_resources(default_params(["train.use_gpu=true", "ray.cpus_per_worker=1"]), {"CPU": 2.0, "GPU": 0.0}, "x")
    fix = str(e.value).split(";", 1)[1]
    assert "train.use_gpu=auto" in fix and "train.workers=" not in fix


def test_subset_into_its_own_source_is_refused_as_the_input_even_with_force(tmp_path, demo_dir):
    import shutil

    shutil.copytree(demo_dir, tmp_path / "demo")
    r = runner.invoke(app, ["data", "prepare", "subset", "--out", str(tmp_path / "demo"), "--force", "--params",
                            str(ROOT_PARAMS), "--set", f"data.root={tmp_path}"])
    assert r.exit_code == 1 and "is the input" in r.output


def test_download_extract_into_a_taken_folder_is_refused_before_downloading(server, tmp_path):
    import hashlib

    from conftest import zip_bytes

    base, h = server
    h.files["/imgs.zip"] = blob = zip_bytes({"a.txt": b"a"})
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "mine.txt").write_text("keep")
    r = runner.invoke(app, ["data", "download", "--url", f"{base}/imgs.zip", "--out", str(tmp_path), "--extract",
                            "--sha256", hashlib.sha256(blob).hexdigest()])
    assert r.exit_code == 1 and "no sqgan stage wrote" in r.output
    assert h.seen_ranges == [] and not (tmp_path / "imgs.zip").exists()
