"""Self-filtering (sqgan.data.selffilter): planted noise images among faces are the ones a jointly trained
G + encoder reconstruct worst, and the output folder holds exactly what the module docstring lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sqgan.config import ConfigError
from sqgan.data.manifest import read_manifest, write_manifest
from sqgan.io import UnsafeOutput, sha256_file

N_FACES, N_NOISE = 24, 3
N = N_FACES + N_NOISE
TINY = dict(batch_size=8, resolution=32, lr=0.002, lambda_w=0.1, lambda_l1=0.1, lambda_lpips=0.1, z_dim=32,
            w_dim=32, mapping_layers=2, channel_base=256, channel_max=64, lpips_backbone="alex", lpips_weights=None)


def _faces_and_noise(root: Path) -> Path:
    """24 LFW faces (25×25 grayscale → RGB) and 3 uniform-noise RGB images (32×32), as a curated dataset."""
    from skimage import data as skdata

    (root / "images").mkdir(parents=True)
    rows = []
    for i, face in enumerate(skdata.lfw_subset()[:N_FACES]):
        gray = np.clip(np.rint(face * 255.0), 0, 255).astype(np.uint8)
        rel = f"images/face_{i:02d}.png"
        Image.fromarray(np.stack([gray] * 3, axis=-1)).save(root / rel)
        rows.append({"path": rel, "width": 25, "height": 25, "source": "lfw", "source_id": str(i),
                     "split": "test" if i % 8 == 0 else "train"})
    rng = np.random.default_rng(0)
    for i in range(N_NOISE):
        rel = f"images/noise_{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / rel)
        rows.append({"path": rel, "width": 32, "height": 32, "source": "noise", "source_id": str(i),
                     "split": "train"})
    write_manifest(root, rows)
    return root


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return _faces_and_noise(tmp_path_factory.mktemp("selffilter") / "faces")


@pytest.fixture(scope="module")
def filtered(source, tmp_path_factory) -> tuple[Path, dict, dict[str, str], dict[str, str]]:
    """(out, returned counts, source hashes before, after) of a 40-step run quarantining 3 of 27."""
    from sqgan.data.selffilter import self_filter

    before = _hashes(source)
    out = tmp_path_factory.mktemp("selffilter") / "filtered"
    counts = self_filter(source, out, fraction=N_NOISE / N, steps=40, seed=0, **TINY)
    return out, counts, before, _hashes(source)


def _one_step_run(source: Path, out: Path, seed: int) -> pd.DataFrame:
    from sqgan.data.selffilter import self_filter

    self_filter(source, out, fraction=0.0, steps=1, seed=seed, **TINY)
    return pd.read_csv(out / "scores.csv")


@pytest.fixture(scope="module")
def untrained(source, tmp_path_factory) -> Path:
    """A one-step run keeping everything (fraction 0), seed 0."""
    out = tmp_path_factory.mktemp("selffilter") / "one-step"
    _one_step_run(source, out, seed=0)
    return out


def test_planted_noise_images_are_the_three_worst_scored_and_the_quarantined(filtered):
    out, counts, _, _ = filtered
    assert counts["seen"] == N and counts["quarantined"] == N_NOISE and counts["kept"] == N_FACES
    scores = pd.read_csv(out / "scores.csv").sort_values("rank")
    worst = scores.head(N_NOISE)
    assert sorted(worst["path"]) == [f"images/noise_{i}.png" for i in range(N_NOISE)]
    assert list(worst["rank"]) == [1, 2, 3] and not worst["kept"].any() and scores.iloc[N_NOISE:]["kept"].all()
    assert worst["score"].min() > scores.iloc[N_NOISE:]["score"].max()
    q = pd.read_csv(out / "quarantine.csv")
    assert sorted(q["path"]) == sorted(worst["path"])
    assert sorted((out / "quarantine" / "images").iterdir()) == [out / "quarantine" / p for p in sorted(q["path"])]
    assert counts["threshold"] == pytest.approx(worst["score"].min())


def test_output_manifest_quarantine_plot_and_report_agree_and_the_source_is_untouched(filtered, source):
    from sqgan.data.dataset import ManifestDataset
    from sqgan.data.manifest import read_manifest

    out, counts, before, after = filtered
    assert before == after  # the source's files: same names, same bytes
    manifest = read_manifest(out)
    scores = pd.read_csv(out / "scores.csv")
    kept = scores[scores["kept"]]
    assert sorted(manifest["path"]) == sorted(kept["path"])
    assert manifest["selffilter_score"].to_numpy() == pytest.approx(kept.sort_values("path")["score"].to_numpy())
    src_rows = read_manifest(source).set_index("path")
    assert list(manifest["split"]) == list(src_rows.loc[manifest["path"], "split"])  # rows carried over, all splits
    assert (manifest["split"] == "test").sum() == 3
    for rel in manifest["path"]:  # kept images: the source's bytes at the same path
        assert sha256_file(out / rel) == before[rel]
    data = ManifestDataset(out, 32, split=None)
    assert len(data) == N_FACES and float(data[0].min()) >= -1.0 and float(data[0].max()) <= 1.0

    q = pd.read_csv(out / "quarantine.csv")
    assert list(q.columns) == ["path", "reason", "score"]
    assert q["score"].min() >= kept["score"].max()
    assert all(r.startswith("self-filter: reconstruction error") and "threshold" in r for r in q["reason"])
    for rel in q["path"]:
        assert sha256_file(out / "quarantine" / rel) == before[rel]

    with Image.open(out / "scores.png") as im:
        im.load()
        assert im.width >= 400 and im.height >= 250

    report = json.loads((out / "selffilter.json").read_text())
    assert report["seen"] == report["kept"] + report["quarantined"] == N
    assert report["kept"] == counts["kept"] and report["steps"] == 40 and report["lpips"] == "randalex"
    assert report["threshold"] == pytest.approx(q["score"].min())
    assert set(report["final_losses"]) >= {"d_adv", "r1", "g_adv", "l1", "lpips", "w"}  # R1 at steps 0, 16, 32
    assert all(np.isfinite(v) for v in report["final_losses"].values())


def test_training_lowers_the_faces_reconstruction_error(filtered, untrained):
    trained = pd.read_csv(filtered[0] / "scores.csv")
    barely = pd.read_csv(untrained / "scores.csv")
    faces = lambda df: df[df["path"].str.contains("face")]  # noqa: E731
    assert faces(trained)["l1"].mean() < 0.8 * faces(barely)["l1"].mean()


def test_fraction_zero_keeps_every_image_and_a_seed_fixes_the_scores(untrained, source, tmp_path):
    a = pd.read_csv(untrained / "scores.csv")
    assert a["kept"].all() and len(a) == N
    assert pd.read_csv(untrained / "quarantine.csv").empty
    assert json.loads((untrained / "selffilter.json").read_text())["threshold"] is None
    assert sorted(p.name for p in (untrained / "images").iterdir()) == sorted(Path(p).name for p in a["path"])
    _one_step_run(source, tmp_path / "again", seed=0)
    assert (untrained / "scores.csv").read_bytes() == (tmp_path / "again" / "scores.csv").read_bytes()
    other = _one_step_run(source, tmp_path / "seed1", seed=1)
    assert not np.allclose(a["score"], other["score"])


@pytest.mark.parametrize("case, match", [
    ("no manifest", r"manifest\.parquet not found.*curate"),
    ("one image", r"at least 2 images"),
    ("fraction leaves none", r"data\.selffilter\.fraction 0\.99 of 27 images would quarantine 27"),
    ("fraction 1", r"data\.selffilter\.fraction must be in \[0, 1\)"),
    ("both lambdas 0", r"lambda_l1 and data\.selffilter\.lambda_lpips are both 0"),
])
def test_bad_inputs_are_refused_by_name_before_anything_is_written(case, match, source, tmp_path):
    from sqgan.data.selffilter import self_filter

    src, args = source, {**TINY, "fraction": 0.1, "steps": 1, "seed": 0}
    if case == "no manifest":
        src = tmp_path / "raw"
        (src / "images").mkdir(parents=True)
    elif case == "one image":
        src = tmp_path / "one"
        (src / "images").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(src / "images" / "a.png")
        write_manifest(src, [{"path": "images/a.png", "width": 32, "height": 32, "source": "x", "source_id": "a",
                              "split": "train"}])
    elif case == "fraction leaves none":
        args["fraction"] = 0.99
    elif case == "fraction 1":
        args["fraction"] = 1.0
    else:
        args["lambda_l1"] = args["lambda_lpips"] = 0.0
    with pytest.raises(ValueError, match=match):
        self_filter(src, tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_an_existing_folder_no_selffilter_wrote_is_refused_without_force(source, tmp_path):
    from sqgan.data.selffilter import self_filter

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UnsafeOutput, match="no sqgan stage wrote"):
        self_filter(source, out, fraction=0.1, steps=1, seed=0, **TINY)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(UnsafeOutput, match="is the input"):
        self_filter(source, source, fraction=0.1, steps=1, seed=0, **TINY)


def test_the_cli_runs_the_stage_from_params_and_a_sweep_trial_filters_its_own_copy(source, tmp_path):
    """`sqgan data selffilter` maps its options onto data.selffilter.* (one stage table); a sweep trial that sets
    data.selffilter.* trains on its own filtered copy of the sweep's dataset, one that does not on the dataset."""
    from typer.testing import CliRunner

    from sqgan.cli import app
    from sqgan.config import default_params
    from sqgan.shells.tune import check_sweep, trial_data

    small = ["data.selffilter.resolution=32", "data.selffilter.channel_base=256", "data.selffilter.channel_max=64",
             "data.selffilter.batch_size=8", "model.z_dim=32", "model.w_dim=32", "model.mapping_layers=2"]
    args = ["data", "selffilter", "--src", str(source), "--out", str(tmp_path / "cli"), "--fraction", str(N_NOISE / N),
            "--steps", "40", "--no-params-file"] + [x for s in small for x in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"kept {N_FACES}" in result.output and f"quarantined {N_NOISE}" in result.output
    quarantined = set(pd.read_csv(tmp_path / "cli" / "quarantine.csv")["path"])
    assert quarantined == {f"images/noise_{i}.png" for i in range(N_NOISE)}

    params = default_params(small + ["data.selffilter.steps=2", "data.selffilter.fraction=0.25"])
    assert trial_data(params, {"fq.decay": 0.8}, source, tmp_path / "t1") == source
    out = trial_data(params, {"data.selffilter.fraction": 0.25}, source, tmp_path / "t2")
    assert out == tmp_path / "t2" / "data" and len(read_manifest(out)) == N - round(0.25 * N)
    check_sweep(default_params(["tune.space={data: {selffilter: {fraction: {grid: [0.0, 0.1]}}}}"]))
    with pytest.raises(ConfigError, match=r"tune.space.data.selffilter.fraction"):
        check_sweep(default_params(["tune.space={data: {selffilter: {fraction: {grid: [0.1, 1.0]}}}}"]))
