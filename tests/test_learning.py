"""A GAN that learns (issue 25): the ground-truth modes data and its classifier, the collapse watch, divergence that
stops a run with the checkpoint to resume, the fixes that made the generator use its input, and the small mode
benchmark (slow: the demo config, DCGAN + FQ + SQ, on 8 modes)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from sqgan.config import default_params
from sqgan.data.dataset import ManifestDataset
from sqgan.data.modes import build_modes, classify_modes, mode_coverage, mode_names, render_mode
from sqgan.metrics.collapse import collapse_stats, mean_pairwise_rms
from sqgan.models.factory import MappingMLP, build_discriminator, build_generator, lazy_ratios, r1_gamma
from sqgan.tags import COLLAPSE_STEP
from sqgan.train.checkpoint import load_checkpoint
from sqgan.train.loop import CollapseWatch, Hooks, Runtime, TrainingDiverged, setup, train


@pytest.fixture(scope="module")
def modes_dir(tmp_path_factory):
    return build_modes(tmp_path_factory.mktemp("modes") / "modes", resolution=32, shapes=4, colours=4, per_mode=16)


# ------------------------------------------------------------------------------------------- modes data
def test_the_classifier_reads_back_every_image_of_the_modes_data(modes_dir):
    ds = ManifestDataset(modes_dir, 32)
    reading = classify_modes(ds.images)
    assert (reading.mode == ds.manifest["mode"].to_numpy()).all()
    assert reading.clean.all()
    cov = mode_coverage(ds.images)
    assert (cov.covered, cov.clean, cov.histogram, cov.missing) == (16, 1.0, [16] * 16, [])
    assert cov.kl == pytest.approx(0.0, abs=1e-12)


def test_mode_coverage_of_one_mode_noise_and_a_blank_canvas():
    rng = np.random.default_rng(0)
    one = np.stack([render_mode(5, 32, rng) for _ in range(40)])
    cov = mode_coverage(one)
    assert cov.covered == 1 and cov.histogram[5] == 40
    assert len(cov.missing) == 15 and mode_names()[5] not in cov.missing and cov.missing[:2] == mode_names()[:2]
    assert cov.kl == pytest.approx(math.log(16))  # all mass on one of 16 modes
    noise = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    assert mode_coverage(noise).clean == 0.0
    assert mode_coverage(np.zeros((8, 32, 32, 3), np.uint8)).clean == 0.0
    # two shapes in one image is not a clean mode
    two = np.maximum(render_mode(0, 32, rng), np.roll(render_mode(4, 32, rng), 14, axis=1))
    assert not classify_modes(two[None]).clean[0]


def test_modes_data_is_seeded_and_refuses_a_size_it_cannot_draw(tmp_path):
    a = build_modes(tmp_path / "a", per_mode=2, shapes=2, colours=2, seed=3)
    b = build_modes(tmp_path / "b", per_mode=2, shapes=2, colours=2, seed=3)
    assert (a / "manifest.parquet").read_bytes() == (b / "manifest.parquet").read_bytes()
    with pytest.raises(ValueError, match="resolution must be ≥ 16"):
        build_modes(tmp_path / "c", resolution=8)
    with pytest.raises(ValueError, match="shapes must be in 1..4"):
        build_modes(tmp_path / "d", shapes=5)


# --------------------------------------------------------------------------------------- collapse watch
def test_collapse_stats_of_the_reals_themselves_are_those_of_a_covering_generator(demo_dir):
    reals = ManifestDataset(demo_dir, 32).images
    st = collapse_stats(reals[:64], reals)
    assert st.pixel == pytest.approx(1.0, abs=0.15) and st.nn_count == 64 and st.nn_distinct == 1.0
    one = reals[7:8].expand(64, -1, -1, -1)
    st = collapse_stats(one, reals)
    assert st.pixel == pytest.approx(0.0, abs=1e-6) and st.nn_count == 1
    with pytest.raises(ValueError, match="at least 2 images"):
        mean_pairwise_rms(reals[:1])


class _Planted(torch.nn.Module):
    """A 'generator' for the watch: `ignore_z` draws one image for every z (a collapsed G); otherwise it returns the
    real image that z picks (the identity of the reals)."""

    def __init__(self, reals: torch.Tensor, ignore_z: bool) -> None:
        super().__init__()
        self.reals, self.ignore_z = reals.float() / 127.5 - 1, ignore_z

    def forward(self, z, noise_mode="random"):
        if self.ignore_z:
            return SimpleNamespace(images=self.reals[:1].expand(len(z), -1, -1, -1) + 0.001 * z[:, :1, None, None])
        idx = (z[:, 0].abs() * 1e4).long() % len(self.reals)
        return SimpleNamespace(images=self.reals[idx])


def test_the_collapse_watch_fires_on_a_generator_that_ignores_z_and_not_on_the_reals(demo_dir):
    params = default_params()
    ds = ManifestDataset(demo_dir, 32)
    z = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    tags: dict = {}
    hooks = Hooks(set_tags=tags.update)
    from sqgan.train.loop import watch_collapse

    healthy, collapsed = _Planted(ds.images, ignore_z=False), _Planted(ds.images, ignore_z=True)
    watch = CollapseWatch(params, ds, z)
    m = watch_collapse(watch, healthy, 100, hooks)
    assert m["diversity/collapsed"] == 0.0 and m["diversity/pixel"] > 0.7 and watch.first is None and not tags
    m = watch_collapse(watch, collapsed, 250, hooks)  # it had learned: a collapse
    assert m["diversity/collapsed"] == 1.0 and m["diversity/pixel"] < 0.01 and m["diversity/nn_distinct"] == 1 / 64
    assert watch.first == 250 and tags == {COLLAPSE_STEP: "250"}
    watch_collapse(watch, collapsed, 500, hooks, final=True)
    assert watch.first == 250 and tags == {COLLAPSE_STEP: "250"}  # the first step, tagged once
    off = CollapseWatch(default_params(["metrics.collapse_pixel=0", "metrics.collapse_nn=0"]), ds, z)
    assert off(collapsed, 250)[0]["diversity/collapsed"] == 0.0


def test_the_collapse_watch_tells_not_yet_learned_from_collapsed(demo_dir):
    """Low before G_ema ever learned is 'not yet' (logged, not flagged) — unless it is still low at the end: then the
    run never learned, flagged at its first evaluation."""
    from sqgan.train.loop import watch_collapse

    ds = ManifestDataset(demo_dir, 32)
    z = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    healthy, collapsed = _Planted(ds.images, ignore_z=False), _Planted(ds.images, ignore_z=True)
    tags: dict = {}
    hooks = Hooks(set_tags=tags.update)
    late = CollapseWatch(default_params(), ds, z)  # the demo's course: low at 250, learned from 500
    assert watch_collapse(late, collapsed, 250, hooks)["diversity/collapsed"] == 1.0
    watch_collapse(late, healthy, 500, hooks)
    watch_collapse(late, healthy, 1000, hooks, final=True)
    assert late.first is None and not tags
    never = CollapseWatch(default_params(), ds, z)
    for step in (250, 500):
        watch_collapse(never, collapsed, step, hooks)
    assert never.first is None and not tags
    watch_collapse(never, collapsed, 1000, hooks, final=True)
    assert never.first == 250 and tags == {COLLAPSE_STEP: "250"}
    again = CollapseWatch(default_params(), ds, z)  # learned, fell, recovered, fell again: the first fall is tagged
    tags.clear()
    for step, g in ((100, healthy), (200, collapsed), (300, healthy), (400, collapsed)):
        watch_collapse(again, g, step, hooks)
    assert again.first == 200 and tags == {COLLAPSE_STEP: "200"}


def test_a_run_that_cannot_learn_says_so_in_its_metrics_and_summary(demo_dir, tmp_path):
    """lr_g tiny: G stays at its init (near-constant images); the final watch flags it, metrics.json and the
    summary line say so with the figure."""
    from sqgan.commands.summary import learning_verdict

    tags: dict = {}
    p = default_params(tiny_overrides(**{"train.lr_g": 1e-9, "metrics.eval_every": 10}))
    result = train(p, demo_dir, tmp_path / "run", hooks=Hooks(set_tags=tags.update))
    assert result.metrics["diversity/collapsed"] == 1.0 and tags[COLLAPSE_STEP] == "10"
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["diversity/collapse_step"] == 10.0
    line = learning_verdict(m)
    assert line.startswith("NOT LEARNED") and f"{m['diversity/pixel']:.3f}×" in line and "step 10" in line


# ------------------------------------------------------------------------------------------ divergence
def test_a_nan_at_step_k_stops_the_run_naming_the_last_checkpoint_which_resumes_at_a_lower_lr(
        demo_dir, tmp_path, monkeypatch):
    from sqgan.losses.gan import GANLoss

    k = 3  # the 4th step (0-based 3) makes the NaN: checkpoints 1..3 were written, step 4's must not be
    original = GANLoss.d_main

    def poisoned(self, real, gen, step, *labels):
        phase = original(self, real, gen, step, *labels)
        if step == k:
            phase.loss = phase.loss * float("nan")
        return phase

    monkeypatch.setattr(GANLoss, "d_main", poisoned)
    p = default_params(tiny_overrides(**{"train.steps": 8, "train.log_every": 1, "train.checkpoint_every": 1}))
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"step 4: non-finite loss \(.*=nan.*\); the last finite "
                                               r"checkpoint is .*step_000003\.pt.*--resume .*step_000003\.pt "
                                               r"--set train\.lr_g=2e-05 --set train\.lr_d=8e-05"):
        train(p, demo_dir, run)
    assert sorted(x.name for x in (run / "checkpoints").iterdir()) == [f"step_00000{i}.pt" for i in (1, 2, 3)]
    last = load_checkpoint(run / "checkpoints" / "step_000003.pt")
    assert all(torch.isfinite(v).all() for v in last["G"].values() if v.is_floating_point())
    monkeypatch.setattr(GANLoss, "d_main", original)
    lower = default_params(tiny_overrides(**{"train.steps": 8, "train.log_every": 1, "train.checkpoint_every": 1,
                                             "train.lr_g": 2e-5, "train.lr_d": 8e-5}))
    done = train(lower, demo_dir, tmp_path / "resumed", resume=run / "checkpoints" / "step_000003.pt")
    final = load_checkpoint(done.checkpoint)
    assert final["step"] == 8
    assert final["opt_g"]["param_groups"][0]["lr"] == 2e-5 and final["opt_d"]["param_groups"][0]["lr"] == 8e-5


def test_divergence_without_nan_stops_at_train_max_abs_logit(demo_dir, tmp_path):
    p = default_params(tiny_overrides(**{"train.max_abs_logit": 1e-6, "train.log_every": 5}))
    with pytest.raises(TrainingDiverged, match=r"step 5: diverged \(\|value\| > train.max_abs_logit = 1e-06\).*"
                                               r"no checkpoint was written before it"):
        train(p, demo_dir, tmp_path / "run")
    train(default_params(tiny_overrides(**{"train.max_abs_logit": 0, "train.steps": 5})), demo_dir,
          tmp_path / "off")  # 0 = never


# -------------------------------------------------------------------------------- the fixes, one by one
def test_the_dcgan_mapping_starts_as_the_identity_of_normalised_z_and_keeps_its_spread():
    z = torch.randn(2048, 64, generator=torch.Generator().manual_seed(0))
    m = MappingMLP(64, 64, layers=2)
    zn = z * z.square().mean(1, keepdim=True).add(1e-8).rsqrt()
    assert torch.allclose(m(z), zn)
    wide = MappingMLP(64, 128, layers=2)(z).detach()  # w_dim ≠ z_dim: a variance-preserving projection
    assert wide.std(0).mean() == pytest.approx(1.0, abs=0.05) and wide.mean(0).abs().mean() < 0.05


def test_the_dcgan_sq_generator_output_depends_on_z_at_init():
    """The cause of the demo's collapse: before the fix its mapping gave DCGAN a w 7× fainter than z."""
    G = build_generator(default_params(["sq.enabled=true", "model.arch=dcgan"]))
    z = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    w, _, _ = G.eval().map(z)
    assert w.std(0).mean() > 0.3  # codes of unit sub-vectors: ≈ 0.5 per coordinate


@pytest.mark.parametrize("arch", [["model.arch=stylegan2", "model.channel_base=256", "model.channel_max=16"],
                                  ["model.arch=dcgan", "model.d_channels=8", "model.mbstd_num_channels=1"]])
def test_minibatch_stddev_keeps_reals_and_fakes_apart(arch):
    p = default_params([*arch, "fq.enabled=false"])
    D = build_discriminator(p).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    real, fake = x[:4], x[4:] * 3
    together = D(torch.cat([real, fake]), parts=(4, 4)).logits
    assert torch.allclose(together, torch.cat([D(real).logits, D(fake).logits]), atol=1e-5)
    assert not torch.allclose(D(torch.cat([real, fake])).logits, together, atol=1e-5)  # mixed groups differ


def test_style_mixing_z_does_not_move_w_avg():
    p = default_params(["model.arch=stylegan2", "model.channel_base=256", "model.channel_max=16",
                        "sq.enabled=false"])
    G = build_generator(p).train()
    z, mix = torch.randn(4, 128), torch.randn(4, 128) * 5
    G(z, mix_z=mix, mix_cutoff=torch.full((4,), 2))
    expect = torch.zeros(128).lerp(G.mapping(z).mean(0), 1 - G.mapping.w_avg_beta)
    assert torch.allclose(G.mapping.w_avg, expect, atol=1e-6)


def test_r1_gamma_uses_the_total_batch_and_adam_is_corrected_for_lazy_regularisation():
    p = default_params(["model.arch=stylegan2", "model.resolution=64", "train.batch_size=16", "train.workers=2",
                        "train.r1_every=16", "train.pl_weight=2", "train.pl_every=4", "model.channel_base=256",
                        "model.channel_max=16"])
    assert r1_gamma(p) == pytest.approx(0.0002 * 64**2 / 32)
    assert lazy_ratios(p) == (pytest.approx(4 / 5), pytest.approx(16 / 17))
    state = setup(p, Runtime())
    g, d = state.opt_g.param_groups[0], state.opt_d.param_groups[0]
    assert d["lr"] == pytest.approx(p.train.lr_d * 16 / 17) and d["betas"][1] == pytest.approx(0.999 ** (16 / 17))
    assert g["lr"] == pytest.approx(p.train.lr_g * 4 / 5)
    assert lazy_ratios(default_params()) == (1.0, 1.0)  # DCGAN: no lazy term, Adam as set


# ------------------------------------------------------------------------------ the small mode benchmark
SMALL_MODES = {"shapes": 2, "colours": 4, "per_mode": 64}  # 8 modes at 32²: discs and plusses in 4 colours


@pytest.mark.slow
def test_the_small_mode_benchmark_is_covered_by_the_demo_config(tmp_path):
    """DCGAN + FQ + SQ at the shipped optimiser and augmentation settings (the demo's) covers 8 known modes, on one
    thread (the arithmetic measured; 638 s). Measured (same function and params, scratch runner): seed 0 (this
    test's) 8/8, KL 0.18, 84 % clean; seed 2 8/8, KL 0.14; seed 1 6/8, KL 0.36 — one seed in three misses, so a
    change that only moves the random streams may flip
    this: re-measure over seeds before blaming it. It failed for the settings before (lr 1e-4/4e-4 with cutout: 5/8,
    KL 0.59) and for FQ in feed mode (6/8, KL 0.36)."""
    from sqgan.train.learning import train_and_measure

    data = build_modes(tmp_path / "modes", resolution=32, **SMALL_MODES)
    p = default_params(["fq.enabled=true", "sq.enabled=true", "metrics.eval_every=0", "metrics.names=[fid]",
                        "metrics.num_fake=64", "metrics.diversity_every=0", "train.checkpoint_every=100000",
                        "model.arch=dcgan", "model.g_channels=32", "model.d_channels=32", "train.steps=3000"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = train_and_measure(p, data, tmp_path / "run", num=512)
    finally:
        torch.set_num_threads(threads)
    assert got.covered >= 7 and got.kl <= 0.3 and got.clean >= 0.8, got


# ------------------------------------------------------------------------------------------------ sweeps
def test_a_sweep_ranks_only_trials_that_did_not_collapse(tmp_path):
    """Three trials in MLflow: the best FID is a collapsed one; the table puts it after the healthy ones, says so
    in its `collapsed` column, and the best trial is the best healthy one."""
    from mlflow.tracking import MlflowClient

    from sqgan.shells.tune_report import best_trial, trial_table

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("sweep", artifact_location=str(tmp_path / "art"))
    key = "kid500_train_randcnn_mean"
    parent = client.create_run(exp, tags={"sqgan.stage": "sweep", "sqgan.tune.axes": json.dumps(["fq.decay"]),
                                          "sqgan.tune.metric": "kid", "sqgan.tune.metric_key": key,
                                          "sqgan.tune.mode": "min", "sqgan.tune.steps": "60"})
    trials = {"a": (0.10, 1.0, "20"), "b": (0.30, 0.0, None), "c": (0.20, 0.0, None), "d": (0.05, 0.0, "20")}
    for name, (kid, collapsed, tag) in trials.items():
        tags = {"mlflow.parentRunId": parent.info.run_id, "sqgan.trial_id": name, "sqgan.trial_status": "completed"}
        if tag:
            tags[COLLAPSE_STEP] = tag
        run = client.create_run(exp, tags=tags)
        client.log_param(run.info.run_id, "fq.decay", "0.9")
        client.log_metric(run.info.run_id, key, kid, step=60)
        client.log_metric(run.info.run_id, "loss/d", 1.0, step=60)
        client.log_metric(run.info.run_id, "diversity/collapsed", collapsed, step=60)  # d recovered by the end
        client.set_terminated(run.info.run_id)
    rows, _, _ = trial_table(uri, parent.info.run_id)
    assert [(r["trial"], r["collapsed"]) for r in rows] == [("d", "-"), ("c", "-"), ("b", "-"), ("a", "20")]
    assert best_trial(rows, key)["trial"] == "d"
    only_collapsed = [r for r in rows if r["trial"] == "a"]
    assert best_trial(only_collapsed, key)["trial"] == "a"  # every trial collapsed: the best of them, flagged
    assert best_trial([{**rows[0], key: math.nan}], key) is None


def test_tune_sees_a_collapsed_trial_as_the_worst_until_it_recovers(monkeypatch):
    """Both trial paths rank through one TuneMetric: a TorchTrainer's callback passes on only the reports that hold
    the metric; a 1-worker trial hands Tune every report, the metric where it was measured."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from sqgan.shells.tune import TuneMetric, _report_callback

    seen: list[dict] = []
    monkeypatch.setattr(TuneReportCallback, "__init__", lambda self: None)  # outside a Tune session
    monkeypatch.setattr(TuneReportCallback, "after_report", lambda self, ctx, metrics, ckpt: seen.append(metrics[0]))
    reports = ({"kid200_train_randcnn_mean": 0.3, "diversity/collapsed": 0.0},
               {"kid200_train_randcnn_mean": 0.1, "diversity/collapsed": 1.0},
               {"loss/d": 1.0},  # no evaluation in this report: not passed on by the callback
               {"kid200_train_randcnn_mean": 0.1, "step": 60},  # a report between evaluations keeps the verdict
               {"kid500_train_randcnn_mean": 0.2, "diversity/collapsed": 0.0})
    ranking = TuneMetric(default_params(), "kid")
    assert (ranking.final_key, ranking.interim) == ("kid500_train_randcnn_mean", "kid200_train_randcnn_mean")
    cb = _report_callback(ranking)
    for m in reports:
        cb.after_report(None, [m], None)
    assert [s["kid"] for s in seen] == [0.3, math.inf, math.inf, 0.2]
    in_trial = TuneMetric(default_params(), "kid")  # what train_in_trial hands tune.report
    assert [in_trial.translate(m).get("kid") for m in reports] == [0.3, math.inf, None, math.inf, 0.2]
    cb = _report_callback(TuneMetric(default_params(["tune.mode=max"]), "g/score"))  # any logged metric, max
    cb.after_report(None, [{"g/score": 3.0, "diversity/collapsed": 1.0}], None)
    assert seen[-1]["g/score"] == -math.inf


def test_minibatch_stddev_is_off_for_dcgan_unless_asked_and_refused_for_sngan():
    plain = build_discriminator(default_params(["model.arch=dcgan", "fq.enabled=false"]))
    assert plain.trunk.mbstd is None and not getattr(plain.trunk, "batch_statistics", False)
    assert plain.trunk.fc.in_features == 256 * 16  # the DCGAN discriminator as it always was
    with pytest.raises(ValueError, match="SNGAN discriminator has no minibatch-stddev"):
        build_discriminator(default_params(["model.arch=sngan", "model.mbstd_num_channels=1", "fq.enabled=false"]))
