"""GPU readiness, tested on CPU (issue 24). Mixed precision: `train.amp` bf16 runs G and D under torch.autocast on
the run's device (so on CPU here), the quantizers' statistics and codebooks stay float32, a short run stays near its
float32 twin; fp16 is for GPUs only (a GradScaler per optimiser) and is refused on CPU before Ray, naming bf16. Data:
the uint8 images gathered on the training device when they fit (the "meta" device stands in for a GPU), and
`data.mirror` (stylegan2-ada's x-flips: 2N samples)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from PIL import Image

from sqgan.config import ConfigError, default_params
from sqgan.data.dataset import ManifestDataset
from sqgan.data.manifest import write_manifest
from sqgan.losses.gan import Phase, amp_dtype
from sqgan.train.loop import Hooks, Runtime, _apply, setup, train, train_step

SG2 = {"model.arch": "stylegan2", "model.resolution": 32, "model.channel_base": 256, "model.channel_max": 16,
       "model.mapping_layers": 2}


class _Data:
    def __init__(self, n: int = 16, side: int = 32) -> None:
        self.images = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.labels = None

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx]


@pytest.mark.parametrize("arch", [{"model.arch": "dcgan"}, SG2], ids=["dcgan", "stylegan2"])
def test_bf16_steps_with_fq_and_sq_are_finite_run_in_bf16_and_keep_the_quantizers_float32(arch):
    p = default_params(tiny_overrides(**arch, **{"train.amp": "bf16", "fq.enabled": "true", "sq.enabled": "true",
                                                  "train.batch_size": 8, "sq.lambda_qcr": 1.0, "sq.qcr_every": 1}))
    state = setup(p, Runtime())
    seen: list[torch.dtype | None] = []  # the autocast dtype each G and D pass ran under (None: autocast off)

    def watch(m, i, o):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

    state.D.register_forward_hook(watch)
    state.G.register_forward_hook(watch)
    for _ in range(3):
        phases = train_step(state, p, _Data(), Runtime())
        for ph in phases:
            assert all(torch.isfinite(v).all() for v in ph.stats.values()), ph.stats
    assert seen and set(seen) == {torch.bfloat16}  # every G and D pass of the steps ran under bf16 autocast
    quantizers = [m for m in (*state.D.modules(), *state.G.modules()) if hasattr(m, "ema_sum")]
    assert len(quantizers) >= 2  # FQ after each quantized D block (SQ's codebook is a G parameter: checked below)
    for q in quantizers:
        assert {b.dtype for b in (q.codebook, q.ema_sum, q.ema_count)} == {torch.float32}
    assert {p_.dtype for p_ in (*state.G.parameters(), *state.D.parameters())} == {torch.float32}


def test_a_short_bf16_run_stays_near_its_float32_twin(demo_dir, tmp_path):
    """The same seed and params, 30 steps of DCGAN + FQ + SQ: the stated tolerance is 5 % on the first logged D loss
    (the two runs part as bf16 rounding compounds) and 50 % on the final FID of 40 samples."""
    base = {"train.steps": 30, "train.log_every": 5, "train.checkpoint_every": 30, "metrics.eval_every": 0,
            "metrics.diversity_every": 0, "metrics.names": "[fid]"}
    logged: dict[str, dict[int, float]] = {"off": {}, "bf16": {}}
    results = {}
    for amp in ("off", "bf16"):
        hooks = Hooks(log_metrics=lambda m, step, amp=amp: logged[amp].update({step: m["loss/d"]})
                      if "loss/d" in m else None)
        results[amp] = train(default_params(tiny_overrides(**base, **{"train.amp": amp})), demo_dir,
                             tmp_path / amp, hooks=hooks)
    assert logged["off"][5] == pytest.approx(logged["bf16"][5], rel=0.05)
    assert logged["off"][5] != logged["bf16"][5]  # bf16 did run
    fid = next(k for k in results["off"].metrics if k.startswith("fid"))
    assert results["bf16"].metrics[fid] == pytest.approx(results["off"].metrics[fid], rel=0.5)


def test_fp16_is_refused_on_cpu_naming_bf16_and_the_old_bool_spellings_still_read():
    with pytest.raises(ValueError, match="train.amp=bf16"):
        amp_dtype(default_params(["train.amp=fp16"]), torch.device("cpu"))
    assert amp_dtype(default_params(["train.amp=fp16"]), torch.device("cuda")) == torch.float16
    assert amp_dtype(default_params(["train.amp=off"]), torch.device("cpu")) is None
    assert default_params(["train.amp=true"]).train.amp == "bf16"  # the field was a bool: true meant bf16
    assert default_params(["train.amp=false"]).train.amp == "off"
    with pytest.raises(ConfigError, match="train.amp"):
        default_params(["train.amp=fp8"])


def test_fp16_on_a_cpu_machine_is_refused_before_ray_starts(tmp_path):
    from sqgan.shells.ray_train import check_environment

    p = default_params(tiny_overrides(**{"train.amp": "fp16", "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'm.db'}",
                                         "ray.storage_path": str(tmp_path / "ray")}))
    with pytest.raises(RuntimeError, match="fp16 needs GPUs .* --set train.amp=bf16"):
        check_environment(p, tmp_path)


def test_the_loss_scaler_scales_the_backward_and_unscales_the_step():
    """_apply with a GradScaler (what fp16 runs use; torch's CPU scaler here): the same update as without it, and a
    step whose gradient is not finite is skipped and halves the scale."""
    w0 = torch.tensor([1.0, -2.0])
    plain, scaled = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_a, opt_b = torch.optim.SGD([plain], lr=0.1), torch.optim.SGD([scaled], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _apply(Phase((plain ** 2).sum(), {}), opt_a)
    _apply(Phase((scaled ** 2).sum(), {}), opt_b, scaler=scaler)
    assert torch.allclose(plain, scaled) and not torch.equal(scaled.detach(), w0)
    before = scaled.detach().clone()
    _apply(Phase((scaled * float("inf")).sum(), {}), opt_b, scaler=scaler)
    assert torch.equal(scaled.detach(), before) and scaler.get_scale() == 512.0


def _labelled(tmp_path, n: int = 3, side: int = 8):
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / f"images/{i}.png")
        rows.append({"path": f"images/{i}.png", "width": side, "height": side, "source": "t", "source_id": str(i),
                     "split": "train", "label": i % 2})
    write_manifest(root, rows)
    return root


def test_mirror_doubles_the_samples_with_left_right_flips_that_keep_their_class(tmp_path):
    root = _labelled(tmp_path)
    plain, mirrored = ManifestDataset(root, 8), ManifestDataset(root, 8, mirror=True)
    assert (len(plain), len(mirrored)) == (3, 6)
    idx = torch.tensor([0, 1, 2, 3, 4, 5])
    x = mirrored.batch(idx)
    assert torch.equal(x[:3], plain.batch(idx[:3]))
    assert torch.equal(x[3:], plain.batch(idx[:3]).flip(-1))  # N + i is image i flipped left-right
    assert not torch.equal(x[3:], x[:3])
    assert mirrored.batch_labels(idx).tolist() == [0, 1, 0, 0, 1, 0]
    assert torch.equal(mirrored[4], plain[1].flip(-1))
    assert mirrored.images.shape[0] == 3  # what metrics compare with: the images as they are


def test_the_images_are_gathered_on_the_training_device_when_they_fit(tmp_path):
    """"meta" stands in for a GPU: a batch comes out on the device the images were copied to, indices from the host;
    over the bound, or on a CPU, nothing moves."""
    root = _labelled(tmp_path)
    ds = ManifestDataset(root, 8, mirror=True)
    assert not ds.to_device(torch.device("cpu"), 2**30)
    assert not ds.to_device(torch.device("meta"), ds.images.numel() - 1)  # 1 byte too few
    assert ds.batch(torch.tensor([0, 4])).device.type == "cpu"
    assert ds.to_device(torch.device("meta"), ds.images.numel())
    assert ds.batch(torch.tensor([0, 4])).device.type == "meta"
    assert ds.batch_labels(torch.tensor([1, 5])).device.type == "meta"
    assert ds.images.device.type == "cpu"  # the host copy stays for metrics and the collapse watch


def test_a_mirrored_conditional_run_trains(tmp_path, monkeypatch):
    """data.mirror through the loop: an epoch of 2N samples (the loop draws flipped indices N … 2N−1), a flipped
    sample's class read through batch_labels."""
    from sqgan.data.demo import build_demo

    drawn: list[tuple[int, int]] = []  # (largest index of a training batch, N images)
    plain_batch = ManifestDataset.batch

    def spy(self, idx):
        drawn.append((int(idx.max()), self.images.shape[0]))
        return plain_batch(self, idx)

    monkeypatch.setattr(ManifestDataset, "batch", spy)

    data = build_demo(tmp_path / "data" / "demo", resolution=32, stride=128, lfw_faces=30, labels=True)
    p = default_params(tiny_overrides(**{"data.mirror": "true", "model.conditional": "true", "model.num_classes": 2,
                                         "train.steps": 12, "train.checkpoint_every": 12, "metrics.eval_every": 0,
                                         "metrics.diversity_every": 0, "metrics.names": "[fid]",
                                         "train.batch_size": 32}))
    result = train(p, data, tmp_path / "run")
    assert result.metrics and all(np.isfinite(v) for v in result.metrics.values())
    assert drawn and max(i for i, _ in drawn) >= drawn[0][1]  # flipped samples were trained on


def _compiled_twins(arch: dict, **extra) -> tuple:
    """The same params eager and with train.compile (identical initial weights: the seed draws them before any
    compile), one training step each on the same data; returns (params, eager state, compiled state, their phases)."""
    # learning rates of 1e-9: Adam's first step moves a weight by ±lr wherever its gradient is nonzero (near-zero
    # gradients that differ in rounding would part the twins by 2·lr), so each phase of both sees the same weights
    over = {**arch, "fq.enabled": "true", "sq.enabled": "true", "train.batch_size": 8, "train.r1_every": 1,
            "train.r1_gamma": 1.0, "train.lr_g": 1e-9, "train.lr_d": 1e-9, **extra}
    eager_p = default_params(tiny_overrides(**over))
    compiled_p = default_params(tiny_overrides(**over, **{"train.compile": "true"}))
    eager, compiled = setup(eager_p, Runtime()), setup(compiled_p, Runtime())
    phases = []
    for state, p in ((eager, eager_p), (compiled, compiled_p)):
        torch.manual_seed(1)  # FQ's batch init draws its first codewords from the global generator
        phases.append(train_step(state, p, _Data(side=p.model.resolution), Runtime()))
    return eager_p, eager, compiled, phases


@pytest.mark.parametrize("arch", [{"model.arch": "dcgan"}, {**SG2, "train.pl_weight": 2.0, "train.pl_every": 1}],
                         ids=["dcgan", "stylegan2"])
def test_a_compiled_step_equals_an_eager_step(arch):
    """train.compile: G's synthesis and D's blocks compiled in place (dynamo made graphs of them); one step with
    FQ + SQ, R1 (and StyleGAN2's path-length term: both double backwards, run eager) gives the eager step's losses
    and weights to float32 rounding."""
    import torch._dynamo.utils as dynamo_utils

    graphs_before = dynamo_utils.counters["stats"]["unique_graphs"]
    _, eager, compiled, (eager_phases, compiled_phases) = _compiled_twins(arch)
    assert dynamo_utils.counters["stats"]["unique_graphs"] > graphs_before  # something was compiled and ran
    assert compiled.G.synthesis._compiled_call_impl is not None and eager.G.synthesis._compiled_call_impl is None
    assert all(b._compiled_call_impl is not None for b in compiled.D.trunk.blocks)
    assert compiled.G_ema.synthesis._compiled_call_impl is None  # G_ema (sampling, evaluation) stays eager
    names = [sorted(ph.stats) for ph in eager_phases]
    assert names == [sorted(ph.stats) for ph in compiled_phases] and ["loss/r1"] in names
    if arch.get("model.arch") == "stylegan2":
        assert ["g/pl_mean", "loss/pl"] in names
    for a, b in zip(eager_phases, compiled_phases, strict=True):
        for k in a.stats:
            assert torch.allclose(a.stats[k], b.stats[k], rtol=1e-4, atol=1e-5), (k, a.stats[k], b.stats[k])
    for net in ("G", "D"):  # the gradients each network's last phase left
        ea, co = dict(getattr(eager, net).named_parameters()), dict(getattr(compiled, net).named_parameters())
        assert ea.keys() == co.keys()
        graded = [k for k in ea if ea[k].grad is not None]
        assert graded and graded == [k for k in co if co[k].grad is not None]
        for k in graded:
            g_e, g_c = ea[k].grad, co[k].grad
            assert torch.allclose(g_e, g_c, rtol=1e-3, atol=1e-4 * float(g_e.abs().max()) + 1e-9), (net, k)


def test_checkpoints_of_compiled_networks_load_into_eager_ones_and_back(tmp_path):
    """nn.Module.compile works in place: a compiled run's checkpoint has the eager keys (no `_orig_mod.`), resumes
    into an eager run, and an eager checkpoint resumes into a compiled one; each gives the same images."""
    from sqgan.train.checkpoint import save_checkpoint
    from sqgan.train.loop import checkpoint_state

    p, eager, compiled, _ = _compiled_twins({"model.arch": "dcgan"})
    z = torch.randn(4, p.model.z_dim, generator=torch.Generator().manual_seed(1))
    for src, dst_compile in ((compiled, "false"), (eager, "true")):
        path = save_checkpoint(tmp_path / f"from_{dst_compile}.pt", checkpoint_state(src, p))
        saved = torch.load(path, weights_only=True)
        assert not any("_orig_mod" in k for net in ("G", "D", "G_ema") for k in saved[net])
        p2 = default_params(tiny_overrides(**{"model.arch": "dcgan", "fq.enabled": "true", "sq.enabled": "true",
                                              "train.batch_size": 8, "train.compile": dst_compile}))
        dst = setup(p2, Runtime(), resume=path)
        assert (dst.G.synthesis._compiled_call_impl is not None) == (dst_compile == "true")
        with torch.no_grad():
            for net in ("G", "G_ema"):
                want = getattr(src, net).eval()(z, noise_mode="const").images
                got = getattr(dst, net).eval()(z, noise_mode="const").images
                assert torch.allclose(want, got, atol=1e-5), net


def test_compile_on_a_torch_that_cannot_compile_is_one_clear_error_before_ray(tmp_path, monkeypatch):
    """train.compile's preflight compiles a one-line function in a fresh interpreter: with no working C++ compiler
    (CXX naming none) that is a RuntimeError naming train.compile=false, not a stack trace from the first step."""
    from sqgan.shells.ray_train import check_environment

    p = default_params(tiny_overrides(**{"train.compile": "true", "mlflow.tracking_uri":
                                         f"sqlite:///{tmp_path / 'm.db'}", "ray.storage_path": str(tmp_path / "ray")}))
    check_environment(p, tmp_path)  # this machine compiles
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(RuntimeError, match=r"train.compile: this torch cannot compile here \(.*C\+\+ compiler.*"
                                           r"--set train.compile=false"):
        check_environment(p, tmp_path)
    off = {"mlflow.tracking_uri": f"sqlite:///{tmp_path / 'm.db'}", "ray.storage_path": str(tmp_path / "ray")}
    check_environment(default_params(tiny_overrides(**off)), tmp_path)  # compile off: no probe, no error


def test_a_sweep_that_compiles_in_some_trial_is_preflighted_too(demo_dir, tmp_path, monkeypatch):
    """A grid or a cell that switches train.compile on is probed before Ray even when the base params train eagerly."""
    from sqgan.shells.tune import _preflight, compiles_in_a_trial

    infra = {"mlflow.tracking_uri": f"sqlite:///{tmp_path / 'm.db'}", "ray.storage_path": str(tmp_path / "ray")}
    grid = default_params(tiny_overrides(**infra, **{"tune.space": "{train: {compile: {grid: [false, true]}}}"}))
    cells = default_params(tiny_overrides(**infra, **{"tune.cells": "{a: {train: {compile: 'true'}}, b: {}}"}))
    eager = default_params(tiny_overrides(**infra, **{"tune.space": "{train: {compile: {grid: [false]}}}",
                                                      "tune.cells": "{a: {fq: {enabled: true}}}"}))
    assert compiles_in_a_trial(grid) and compiles_in_a_trial(cells) and not compiles_in_a_trial(eager)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    for p in (grid, cells):
        with pytest.raises(RuntimeError, match="train.compile: this torch cannot compile here"):
            _preflight(p, demo_dir, tmp_path)
    _preflight(eager, demo_dir, tmp_path)  # no trial compiles: no probe


def test_the_gpu_benchmark_runs_quick_on_cpu_and_writes_every_row(tmp_path):
    """--quick with the float32 and bf16 rows: the bf16+compile rows (the same setup() with train.compile, whose
    compiled step the tests above check) cost ~2.5 minutes of cold compiling on 2 CPUs, so CI leaves them to `make
    bench`; the default precisions are still all three."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert gpu.PRECISIONS["bf16+compile"] == ["train.amp=bf16", "train.compile=true"]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick", "--out", str(tmp_path),
                        "--precision", "float32", "--precision", "bf16"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    got = {(row["method"], row["precision"]) for row in report["rows"]}
    assert got == {(m, p) for m in ("plain", "fq+sq", "fq+sq+qcr/4") for p in ("float32", "bf16")}
    assert all(row["sec_per_kimg"] > 0 and np.isfinite(row["sec_per_kimg"]) for row in report["rows"])
    assert not any(row["compile"] for row in report["rows"])
    assert report["metric_pipeline"]["images_per_s"] > 0 and report["device"] == "cpu"
    assert "needs 2 GPUs" in report["not_measured"]["ray_1_vs_2_gpus"]
    table = (tmp_path / "gpu.md").read_text()
    assert table.count("| fq+sq+qcr/4 |") == 2 and "× float32" in table
