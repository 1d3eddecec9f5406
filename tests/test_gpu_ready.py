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
    assert len(quantizers) >= 2  # FQ's and SQ's
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


def test_a_mirrored_conditional_run_trains(tmp_path):
    """data.mirror through the loop: an epoch of 2N samples, a flipped sample's class read through batch_labels."""
    from sqgan.data.demo import build_demo

    data = build_demo(tmp_path / "data" / "demo", resolution=32, stride=128, lfw_faces=30, labels=True)
    p = default_params(tiny_overrides(**{"data.mirror": "true", "model.conditional": "true", "model.num_classes": 2,
                                         "train.steps": 12, "train.checkpoint_every": 12, "metrics.eval_every": 0,
                                         "metrics.diversity_every": 0, "metrics.names": "[fid]",
                                         "train.batch_size": 32}))
    result = train(p, data, tmp_path / "run")
    assert result.metrics and all(np.isfinite(v) for v in result.metrics.values())


def test_the_gpu_benchmark_runs_quick_on_cpu_and_writes_every_row(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    got = {(row["method"], row["precision"]) for row in report["rows"]}
    assert got == {(m, p) for m in ("plain", "fq+sq", "fq+sq+qcr/4") for p in ("float32", "bf16")}
    assert all(row["sec_per_kimg"] > 0 and np.isfinite(row["sec_per_kimg"]) for row in report["rows"])
    assert report["metric_pipeline"]["images_per_s"] > 0 and report["device"] == "cpu"
    assert "train.compile" in report["not_measured"]["compile"]
    table = (tmp_path / "gpu.md").read_text()
    assert table.count("| fq+sq+qcr/4 |") == 2 and "sec/kimg" in table
