"""`sqgan sample` (sqgan.commands.sample.run_sample) on a tiny trained StyleGAN2: the images, grid and sample.json it
writes, ψ's two ends, the centres cache beside the checkpoint, cluster-guided sampling, MLflow logging and the
refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sqgan.commands.sample import run_sample
from sqgan.config import default_params
from sqgan.io import DELETE_UNKNOWN, UnsafeOutput
from sqgan.sampling.generator import TruncatedGenerator
from sqgan.train.loop import train

TINY_SG2 = ["model.arch=stylegan2", "model.resolution=32", "model.z_dim=32", "model.w_dim=32",
            "model.channel_base=256", "model.channel_max=16", "model.mapping_layers=2", "sq.codebook_size=16",
            "fq.codebook_size=16", "train.batch_size=4", "train.log_every=1", "train.sample_every=2",
            "metrics.eval_every=0", "metrics.num_fake=4", "metrics.names=[fid]", "metrics.batch_size=16",
            "metrics.diversity_every=0"]
# small settings of the sample and cluster sections (the defaults fit 60k w and 5k images)
SMALL = ["sample.centres=8", "sample.fit_samples=512", "sample.batch_size=32", "cluster.k=3",
         "cluster.fit_samples=300", "cluster.steps=300", "cluster.hidden=64", "cluster.eval_per_cluster=50",
         "cluster.fid_images=60"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A 4-step StyleGAN2 run (checkpoints at steps 2 and 4) on 36 demo images, no MLflow, no Ray."""
    from sqgan.data.demo import build_demo

    tmp = tmp_path_factory.mktemp("sample")
    data = build_demo(tmp / "data" / "demo", resolution=32, stride=128, lfw_faces=20)
    # the optimiser and augmentation the cluster tests' margins were measured on (the defaults before 2026-12-06): a
    # 4-step G is any trained G here, but at the new defaults the guided share of one cluster fell to 0.70 (< 0.72)
    params = default_params(TINY_SG2 + ["train.steps=4", "train.checkpoint_every=2", f"data.root={tmp / 'data'}",
                                        "data.dataset=demo", "train.lr_g=0.0001", "train.lr_d=0.0004",
                                        "train.diffaugment=[color,translation,cutout]"])
    train(params, data, tmp / "run")
    return {"tmp": tmp, "data": data, "run": tmp / "run", "ckpt2": tmp / "run" / "checkpoints" / "step_000002.pt",
            "ckpt4": tmp / "run" / "checkpoints" / "step_000004.pt"}


def params_of(project: Path, *sets: str):
    return default_params(SMALL + [f"metrics.cache_dir={project / 'cache'}",
                                   f"mlflow.tracking_uri=sqlite:///{project / 'mlflow.db'}",
                                   f"mlflow.artifact_root={project / 'art'}", *sets])


def sample(project: Path, *sets: str, **kw):
    return run_sample(params_of(project, *sets), project_dir=project, **kw)


def images_of(out: Path) -> np.ndarray:
    files = sorted((out / "images").glob("*.png"))
    return np.stack([np.asarray(Image.open(f)) for f in files])


# ---------------------------------------------------------------------------------------------------- outputs
def test_multimodal_sample_writes_images_grid_and_sample_json_in_the_run_folder(trained):
    r = sample(trained["tmp"], "sample.num=10", checkpoint=trained["run"])
    assert r.out == (trained["run"] / "sampled" / "multimodal-psi0.7").resolve()  # the run folder's latest checkpoint
    assert r.images == 10 and r.step == 4 and r.checkpoint == str(trained["ckpt4"])
    names = sorted(p.name for p in (r.out / "images").iterdir())
    assert names == [f"{i:06d}.png" for i in range(10)]
    imgs = images_of(r.out)
    assert imgs.shape == (10, 32, 32, 3) and imgs.dtype == np.uint8
    assert len({im.tobytes() for im in imgs}) == 10  # ten different z
    grid = Image.open(r.out / "grid.png")
    grid.load()
    assert grid.mode == "RGB" and grid.size == (4 * 34 + 2, 3 * 34 + 2)  # ⌈√10⌉ = 4 per row, 2 px gaps
    info = json.loads((r.out / "sample.json").read_text())
    assert info["step"] == 4 and info["images"] == 10 and info["sample"]["num"] == 10
    assert info["truncation"]["mode"] == "multimodal" and info["truncation"]["assign"] == "lpips"
    assert info["truncation"]["psi"] == 0.7 and info["truncation"]["lpips"]["name"] == "randalex"
    counts = info["assignment_counts"]
    assert len(counts) == 8 and sum(counts) == 10 and counts == r.assignment_counts
    assert {"load", "sampling", "total"} <= set(info["timings_s"])
    # the cache beside checkpoints/ (a DVC output of the train stage, left as it was)
    assert (trained["run"] / "sample-cache" / "step_000004.mmt-centres.pt").is_file()
    assert sorted(p.name for p in trained["ckpt4"].parent.iterdir()) == ["step_000002.pt", "step_000004.pt"]
    assert r.run_id is None and r.tracking_uri is None and "not logged" in r.mlflow
    assert not (trained["tmp"] / "mlflow.db").exists()  # no MLflow run, not even a database


def test_psi_one_is_no_truncation_bit_for_bit_and_psi_zero_global_gives_one_image(trained, tmp_path):
    from sqgan.metrics.evaluate import generate_uint8
    from sqgan.train.checkpoint import load_generator

    ck = trained["ckpt4"]
    none = sample(tmp_path, "sample.num=12", "sample.truncation=none", checkpoint=ck, out=tmp_path / "none")
    one = sample(tmp_path, "sample.num=12", "sample.psi=1", "sample.assign=l2", checkpoint=ck, out=tmp_path / "one")
    zero = sample(tmp_path, "sample.num=12", "sample.truncation=global", "sample.psi=0", checkpoint=ck,
                  out=tmp_path / "zero")
    a, b, c = images_of(none.out), images_of(one.out), images_of(zero.out)
    assert np.array_equal(a, b)
    assert len({im.tobytes() for im in a}) == 12
    assert all(np.array_equal(im, c[0]) for im in c) and not np.array_equal(c[0], a[0])
    # truncation=none draws exactly the images `sqgan eval` generates for sample.seed
    G, _, _ = load_generator(ck, torch.device("cpu"))
    evaluated = torch.cat(list(generate_uint8(G, 12, 32, 5, 0, torch.device("cpu")))).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(a, evaluated)


def test_truncated_generator_samples_as_truncation_sample_through_generate_uint8(trained):
    from sqgan.metrics.evaluate import generate_uint8
    from sqgan.metrics.features import LPIPSNet
    from sqgan.sampling import truncation as T
    from sqgan.sampling.cluster import seeded_latents
    from sqgan.train.checkpoint import load_generator

    G, _, _ = load_generator(trained["ckpt4"], torch.device("cpu"))
    centres = T.fit_centres(G, n=200, n_clusters=4, seed=1)
    lp = LPIPSNet("alex")
    tg = TruncatedGenerator(G, "multimodal", 0.5, "lpips", centres, lp)
    got = torch.cat(list(generate_uint8(tg, 9, tg.z_dim, 4, 3, torch.device("cpu"))))
    want = T.sample(G, seeded_latents(9, 32, 3), 0.5, "multimodal", "lpips", centres, lp)
    # the same arithmetic on separately laid-out tensors: float rounding may flip a pixel by one level, no more
    off = (got.int() - want.images.int()).abs()
    assert off.max() <= 1 and (off > 0).float().mean() < 1e-3, (off.max(), (off > 0).sum())
    plain = torch.cat(list(generate_uint8(G, 9, 32, 4, 3, torch.device("cpu"))))
    assert not torch.equal(got, plain)  # ψ = 0.5 did move the samples
    with pytest.raises(ValueError, match="needs an LPIPS net"):
        TruncatedGenerator(G, "multimodal", 0.5, "lpips", centres, None)


def test_centres_are_cached_beside_the_checkpoint_and_refitted_for_another_generator(trained, tmp_path):
    ck = tmp_path / "bare" / "step_000002.pt"
    ck.parent.mkdir()
    shutil.copy(trained["ckpt2"], ck)
    first = sample(tmp_path, "sample.num=6", "sample.assign=l2", checkpoint=ck)
    assert first.centres_fitted and (ck.parent / "step_000002.mmt-centres.pt").is_file()
    assert first.out == (tmp_path / "runs" / "sample" / "step_000002" / "multimodal-l2-psi0.7").resolve()
    before = images_of(first.out)
    mtime = (ck.parent / "step_000002.mmt-centres.pt").stat().st_mtime_ns
    again = sample(tmp_path, "sample.num=6", "sample.assign=l2", checkpoint=ck)  # into its own earlier output
    assert not again.centres_fitted and again.out == first.out
    assert np.array_equal(images_of(again.out), before)
    assert (ck.parent / "step_000002.mmt-centres.pt").stat().st_mtime_ns == mtime
    shutil.copy(trained["ckpt4"], ck)  # another generator under the same name: its cache is stale
    other = sample(tmp_path, "sample.num=6", "sample.assign=l2", checkpoint=ck)
    assert other.centres_fitted and not np.array_equal(images_of(other.out), before)


# ---------------------------------------------------------------------------------------------------- clusters
@pytest.fixture(scope="module")
def clustered(trained):
    """Cluster-guided sampling of the run's latest checkpoint: once for cluster 0 (fits and evaluates the sampler),
    then (from the cache) for the cluster its evaluation found best separated from chance."""
    first = sample(trained["tmp"], "sample.num=8", "sample.truncation=none", "sample.cluster=0",
                   checkpoint=trained["ckpt4"])
    report = json.loads(first.cluster.report_path.read_text())
    acc = report["accuracy"]
    j = int(np.argmax(np.subtract(acc["per_cluster"], acc["unconditional_per_cluster"])))
    r = sample(trained["tmp"], "sample.num=128", "sample.truncation=none", f"sample.cluster={j}",
               checkpoint=trained["ckpt4"])
    return {"first": first, "j": j, "result": r, "report": report}


def test_cluster_guided_images_fall_in_their_cluster_far_above_chance(clustered, trained):
    first, r, j = clustered["first"], clustered["result"], clustered["j"]
    assert first.cluster.fitted and first.cluster.evaluated
    assert not r.cluster.fitted and not r.cluster.evaluated  # the sampler and its report came from the cache
    assert r.cluster.sampler_path == trained["run"] / "sample-cache" / "step_000004.cluster-k3.pt"
    chance = r.cluster.chance_of_cluster
    share = r.cluster.hits / r.images  # of the 128 written images, those whose nearest centroid is j
    assert share >= max(chance + 0.3, 1.8 * chance), (share, chance)  # unguided z would give ~chance
    assert r.cluster.accuracy > r.cluster.chance + 0.15  # over all clusters, at the fitted eval_per_cluster
    assert len(list((r.out / "images").iterdir())) == 128
    assert Image.open(r.out / "grid.png").size == (8 * 34 + 2,) * 2  # the first 64 only
    info = json.loads((r.out / "sample.json").read_text())
    c = info["cluster"]
    assert r.out.name == f"none-cluster{j}" and c["cluster"] == j and c["k"] == 3
    assert c["accuracy"] == pytest.approx(clustered["report"]["accuracy"]["overall"])
    assert c["chance"] == pytest.approx(1 / 3)
    assert c["fid_cost"]["cost"] == pytest.approx(c["fid_cost"]["fid_sampler"] - c["fid_cost"]["fid_unconditional"])
    assert c["reference"]["kind"] == "real" and c["reference_n"] == 32  # the demo's train split
    assert c["feature_network"]["name"] == "randcnn" and c["hits_in_written_images"] == r.cluster.hits


def test_without_its_dataset_the_fid_cost_is_reevaluated_against_generated_images_without_refitting(
        trained, clustered, tmp_path, monkeypatch):
    import sqgan.commands.sample as S

    ck = tmp_path / "bare" / "step_000004.pt"
    ck.parent.mkdir()
    shutil.copy(trained["ckpt4"], ck)
    for cache in (clustered["result"].cluster.sampler_path, clustered["result"].cluster.report_path):
        shutil.copy(cache, ck.parent / cache.name)
    monkeypatch.setattr(S, "_dataset_of", lambda *a: tmp_path / "gone")
    r = sample(tmp_path, "sample.num=2", "sample.truncation=none", "sample.cluster=0", checkpoint=ck)
    assert not r.cluster.fitted and r.cluster.evaluated  # same sampler, another reference
    assert r.cluster.reference["kind"] == "generated" and r.cluster.reference["n"] == 60
    report = json.loads(r.cluster.report_path.read_text())
    assert report["reference_n"] == 60 and report["accuracy"] == clustered["report"]["accuracy"]
    assert report["fid_cost"]["cost"] != pytest.approx(clustered["report"]["fid_cost"]["cost"])


def test_a_cluster_beyond_k_is_refused_naming_cluster_k(trained, tmp_path):
    with pytest.raises(ValueError, match=r"cluster\.k = 3"):
        sample(tmp_path, "sample.cluster=3", checkpoint=trained["ckpt4"])
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------- mlflow
def test_a_tracked_run_gets_the_artifacts_and_cluster_metrics_and_a_run_id_samples_its_checkpoint(
        trained, clustered, tmp_path):
    from mlflow.tracking import MlflowClient

    from sqgan.shells.tracking import MlflowLogger, open_run

    run_dir = tmp_path / "tracked"
    shutil.copytree(trained["run"] / "checkpoints", run_dir / "checkpoints")
    shutil.copytree(trained["run"] / "sample-cache", run_dir / "sample-cache",
                    ignore=shutil.ignore_patterns("*.mmt-centres.pt"))  # with the cluster caches: same weights
    params = params_of(tmp_path, *TINY_SG2)
    uri, run_id = open_run(params, trained["data"], run_dir, project_dir=tmp_path)  # writes tracking.json
    j = clustered["j"]
    r = sample(tmp_path, "sample.num=5", "sample.truncation=none", f"sample.cluster={j}", checkpoint=run_dir)
    assert (r.run_id, r.tracking_uri) == (run_id, uri) and not r.cluster.fitted and not r.cluster.evaluated
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(run_id, f"samples/none-cluster{j}")}
    assert logged == {f"samples/none-cluster{j}/grid.png", f"samples/none-cluster{j}/sample.json"}
    metrics = client.get_run(run_id).data.metrics
    assert metrics["cluster/accuracy"] == pytest.approx(r.cluster.accuracy)
    assert metrics["cluster/chance"] == pytest.approx(1 / 3)
    assert metrics["cluster/fid_cost"] == pytest.approx(r.cluster.fid_cost)
    assert [m.step for m in client.get_metric_history(run_id, "cluster/accuracy")] == [4]
    prov = json.loads(client.get_run(run_id).data.tags["sqgan.metric.cluster/fid_cost"])
    assert prov["feature_network"]["name"] == "randcnn" and prov["evaluation"]["reference"]["kind"] == "real"

    # --run: the checkpoint the run logged is downloaded; caches and output go under runs/sample/<run id>/
    MlflowLogger(uri, run_id).log_artifact(run_dir / "checkpoints" / "step_000004.pt", "checkpoints")
    by_id = sample(tmp_path, "sample.num=5", "sample.truncation=global", "sample.psi=0.5", run_id=run_id)
    assert by_id.out == (tmp_path / "runs" / "sample" / run_id / "global-psi0.5").resolve()
    assert by_id.run_id == run_id and by_id.step == 4 and "step_000004.pt" in by_id.checkpoint
    assert {a.path for a in client.list_artifacts(run_id, "samples/global-psi0.5")} == \
        {"samples/global-psi0.5/grid.png", "samples/global-psi0.5/sample.json"}
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1  # no new run


# ---------------------------------------------------------------------------------------------------- refusals
def test_bad_inputs_are_refused_with_the_fix_named(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        sample(tmp_path, checkpoint=tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="exactly one of --run"):
        sample(tmp_path)
    with pytest.raises(ValueError, match="exactly one of --run"):
        sample(tmp_path, checkpoint=trained["ckpt4"], run_id="0123456789abcdef")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UnsafeOutput, match="no sqgan stage wrote"):
        sample(tmp_path, "sample.num=2", "sample.truncation=none", checkpoint=trained["ckpt4"], out=foreign)
    assert (foreign / "notes.txt").read_text() == "mine"  # untouched
    with pytest.raises(UnsafeOutput, match=r"no sqgan stage wrote it \(notes.txt\).*--delete-unknown"):
        sample(tmp_path, "sample.num=2", "sample.truncation=none", checkpoint=trained["ckpt4"], out=foreign,
               force=True)  # --force replaces only what a sqgan stage wrote
    forced = sample(tmp_path, "sample.num=2", "sample.truncation=none", checkpoint=trained["ckpt4"], out=foreign,
                    force=DELETE_UNKNOWN)
    assert forced.images == 2 and not (foreign / "notes.txt").exists()
    with pytest.raises(UnsafeOutput, match="input"):  # the run folder holds the checkpoint: never written to
        sample(tmp_path, "sample.num=2", "sample.truncation=none", checkpoint=trained["ckpt4"],
               out=trained["run"] / "checkpoints")


def test_truncation_of_a_generator_without_mapping_names_sample_truncation_none(trained, tmp_path):
    params = default_params(["model.arch=dcgan", "model.z_dim=32", "model.w_dim=32", "model.g_channels=16",
                             "model.d_channels=16", "sq.enabled=false", "fq.codebook_size=16", "train.steps=1",
                             "train.batch_size=4", "train.log_every=1", "metrics.eval_every=0", "metrics.num_fake=4",
                             "metrics.names=[fid]", "metrics.diversity_every=0"])
    train(params, trained["data"], tmp_path / "dcgan")
    for mode in ("multimodal", "global"):
        with pytest.raises(ValueError, match="sample.truncation=none"):
            sample(tmp_path, f"sample.truncation={mode}", checkpoint=tmp_path / "dcgan")
    r = sample(tmp_path, "sample.num=3", "sample.truncation=none", checkpoint=tmp_path / "dcgan")
    assert r.images == 3 and images_of(r.out).shape == (3, 32, 32, 3)


# ---------------------------------------------------------------------------------------------------- evaluation
def test_eval_measures_truncated_samples_and_records_the_truncation(trained, tmp_path):
    """metrics.truncation: ψ = 1 measures what untruncated sampling measures; ψ = 0 (every sample the mean w) another
    FID and zero LPIPS diversity; the truncation is in each metric's provenance, and absent without it."""
    from sqgan.commands.eval import run_eval

    def evaluate(*sets):
        p = params_of(tmp_path, "eval.metrics=[fid, lpips]", "eval.num_fake=32", "eval.lpips_pairs=16", *sets)
        return run_eval(p, checkpoint=trained["ckpt4"], data_dir=trained["data"], out=tmp_path / "eval.json",
                        project_dir=tmp_path, progress=False)

    plain = evaluate()
    same = evaluate("metrics.truncation=global", "sample.psi=1.0")
    mean = evaluate("metrics.truncation=global", "sample.psi=0.0")
    multi = evaluate("metrics.truncation=multimodal", "sample.psi=0.5", "sample.assign=l2")
    fid = next(k for k in plain.metrics if k.startswith("fid"))
    lpips = next(k for k in plain.metrics if k.startswith("lpips"))
    assert same.metrics[fid] == plain.metrics[fid]
    assert mean.metrics[fid] != plain.metrics[fid] and mean.metrics[lpips] < 1e-6 < plain.metrics[lpips]
    assert multi.metrics[fid] not in (plain.metrics[fid], mean.metrics[fid])
    assert "truncation" not in plain.provenance[fid]
    assert mean.provenance[fid]["truncation"] == {"mode": "global", "psi": 0.0}
    inertia = multi.provenance[lpips]["truncation"].pop("inertia")
    assert multi.provenance[lpips]["truncation"] == {"mode": "multimodal", "psi": 0.5, "assign": "l2", "centres": 8,
                                                     "fit_samples": 512, "seed": 0}
    assert multi.metrics["truncation/kmeans_inertia"] == inertia > 0  # logged beside FID: the elbow study's y
    assert "truncation/kmeans_inertia" not in mean.metrics and "truncation/kmeans_inertia" not in plain.metrics
    logged = json.loads((tmp_path / "eval.json").read_text())["provenance"][fid]["truncation"]
    assert logged["mode"] == "multimodal"


def test_training_logs_the_kmeans_inertia_of_its_multimodal_centres(trained, tmp_path):
    """The elbow study's y: Σ squared distance of the fit_samples mapped w to their nearest of sample.centres centres,
    for G_ema as it was evaluated (refitted here from the checkpoint: the same number)."""
    from sqgan.models.factory import build_generator
    from sqgan.sampling.truncation import fit_centres
    from sqgan.train.checkpoint import load_checkpoint

    params = default_params(TINY_SG2 + ["train.steps=2", "train.checkpoint_every=2", "metrics.num_fake=16",
                                        "metrics.names=[fid]", "metrics.truncation=multimodal", "sample.assign=l2",
                                        "sample.centres=4", "sample.fit_samples=128"])
    result = train(params, trained["data"], tmp_path / "run")
    G = build_generator(params)
    G.load_state_dict(load_checkpoint(result.checkpoint)["G_ema"])
    again = fit_centres(G.eval(), 128, 4, 0)
    assert result.metrics["truncation/kmeans_inertia"] == pytest.approx(again.inertia, rel=1e-4)
    assert fit_centres(G, 128, 16, 0).inertia < again.inertia


def test_training_evaluates_truncated_samples_when_asked(trained, tmp_path):
    params = default_params(TINY_SG2 + ["train.steps=2", "train.checkpoint_every=2", "metrics.num_fake=16",
                                        "metrics.names=[fid, lpips, nnmodes, pplu]", "metrics.truncation=global",
                                        "sample.psi=0.0"])
    result = train(params, trained["data"], tmp_path / "run")
    lpips = next(k for k in result.metrics if k.startswith("lpips"))
    assert result.metrics[lpips] < 1e-6  # every image is the one of the mean w
    assert result.metrics["nnmodes16_train_randcnn"] == 1.0  # … so one training image is the nearest of all 16
    assert result.metrics["pplu1_randalex_end"] > 0  # the path is G's own, untruncated, and says so:
    provenance = json.loads((tmp_path / "run" / "metrics.json").read_text())["provenance"]
    assert provenance.pop("pplu1_randalex_mean")["truncation"] == {"mode": "none"}
    assert all(p["truncation"] == {"mode": "global", "psi": 0.0} for k, p in provenance.items() if "pplu" not in k)
