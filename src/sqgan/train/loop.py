"""The training loop, plain torch: read it top to bottom.

`train(params, data_dir, out_dir)` runs steps [start, train.steps). Each step is
  1. D main:  D sees DiffAugment(real) and DiffAugment(G(z)) in one batch; L_D = L_adv + α_t · Σ L_Q
  2. G main:  L_G = L_adv(D(DiffAugment(G(z′))))
  3. G_ema ← lerp(G_ema, G, 1 − g_ema_decay)
Everything random in a step (batch indices, z, augmentation) comes from a generator seeded by
(train.seed, step, rank), so a run resumed from a checkpoint continues bit-identically.

The loop knows nothing of Ray or MLflow: a shell passes `Runtime` (rank, world size, device) and
`Hooks` (where metrics, artifacts and checkpoints go). Every `train.log_every` steps (and at each interim
evaluation, each checkpoint and the end) every rank calls `hooks.report` with the same step, so a shell can hand
the metrics to Ray Train and Tune.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from sqgan.config import Params
from sqgan.data.dataset import ManifestDataset
from sqgan.data.diffaugment import diff_augment
from sqgan.io import atomic_path, mark_output, write_json_atomic
from sqgan.losses.adversarial import d_loss as adversarial_d_loss
from sqgan.losses.adversarial import g_loss as adversarial_g_loss
from sqgan.metrics.codebook import perplexity, utilisation
from sqgan.models.dcgan import Discriminator, Generator

CHECKPOINT_FORMAT = 1
GRID_SIZE = 64  # fixed-z samples in each grid (8 × 8)


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


@dataclass
class Runtime:
    """Where this process sits in a (possibly distributed) run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Hooks:
    """What the shell does with the loop's outputs. log_* run on rank 0 only. `report(metrics, step, checkpoint)`
    runs on every rank at the same steps (log, interim evaluation, checkpoint, end), with the checkpoint path on
    rank 0 at checkpoint steps and None otherwise; interim and final FID/KID are in rank 0's metrics only."""

    log_metrics: Callable[[dict[str, float], int], None] = _noop
    log_artifact: Callable[[Path, str], None] = _noop
    report: Callable[[dict[str, float], int, Path | None], None] = _noop


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    checkpoint: Path | None


# --------------------------------------------------------------------------------- building
def build_generator(params: Params) -> Generator:
    m = params.model
    return Generator(z_dim=m.z_dim, resolution=m.resolution, channels=m.g_channels)


def build_discriminator(params: Params) -> Discriminator:
    m, fq = params.model, params.fq
    return Discriminator(
        resolution=m.resolution,
        channels=m.d_channels,
        fq_layers=fq.layers if fq.enabled else [],
        codebook_size=fq.codebook_size,
        decay=fq.decay,
        commitment=fq.commitment,
        eps=fq.eps,
        mode=fq.mode,
        init=fq.init,
    )


def alpha_at(step: int, alpha: float, warmup_steps: int) -> float:
    """α linearly from 0 to its value over `warmup_steps` (FQ-GAN anneals the FQ weight)."""
    if warmup_steps <= 0:
        return alpha
    return alpha * min(1.0, step / warmup_steps)


def ema_beta(step: int, decay: float) -> float:
    """G_ema decay at `step`: min(decay, (1 + step) / (10 + step)), averaging over ~10% of the steps so far
    early on (as the ramp-up of StyleGAN2-ADA's ema_rampup)."""
    return min(decay, (1.0 + step) / (10.0 + step))


# ------------------------------------------------------------------------- per-step randomness
def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
    return g


def batch_indices(step: int, n: int, batch: int, world_size: int, rank: int, seed: int) -> torch.Tensor:
    """This rank's image indices at `step`: consecutive slices of seeded per-epoch permutations of n images
    (every image once per epoch across all ranks); a pure function of its arguments."""
    per_step = batch * world_size
    start = step * per_step + rank * batch
    out = []
    pos = start
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))
        take = min(batch - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return torch.tensor(out, dtype=torch.long)


# ----------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state (weights_only=True); any file that is not one is a one-line ValueError."""
    path = Path(path)
    pick = "pass a step_NNNNNN.pt file from a run's checkpoints/ folder"
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; {pick}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; {pick}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes: an interrupted copy?); {pick}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types here; its advice (weights_only=False) is unsafe
        raise ValueError(f"checkpoint {path} is not a readable sqgan checkpoint ({type(e).__name__}); {pick}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an sqgan checkpoint (format {CHECKPOINT_FORMAT}); {pick}")
    return state


ARCH_KEYS = ("model.", "fq.enabled", "fq.codebook_size", "fq.layers")


def check_resume(state: dict[str, Any], params: Params, path: Path) -> int:
    """The step to resume from, after checking that the checkpoint fits `params`: same architecture (anything
    else may change) and a step within train.steps."""
    from sqgan.config import flatten

    old, new = flatten(state["params"]), params.flat()
    diff = [k for k in new if k.startswith(ARCH_KEYS) and old.get(k) != new[k]]
    if diff:
        pairs = ", ".join(f"{k}: {old.get(k)!r} → {new[k]!r}" for k in diff)
        raise ValueError(f"cannot resume from {path}: architecture params differ ({pairs}); resume with the "
                         f"checkpoint's values or start a new run")
    step = int(state["step"])
    if step > params.train.steps:
        raise ValueError(f"cannot resume from {path}: it is at step {step}, past train.steps={params.train.steps}; "
                         f"--set train.steps={step} or more")
    return step


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") else module


# ----------------------------------------------------------------------------------- samples
@torch.no_grad()
def sample_grid(g_ema: nn.Module, z: torch.Tensor, path: Path) -> Path:
    g_ema.eval()
    images = g_ema(z).cpu()
    grid = make_grid(images, nrow=int(math.sqrt(len(z))), normalize=True, value_range=(-1, 1))
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="png")
    return path


@torch.no_grad()
def generate_uint8(g_ema: nn.Module, n: int, z_dim: int, batch: int, seed: int, device: torch.device):
    from sqgan.metrics.fid import to_uint8

    g_ema.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, n, batch):
        z = torch.randn(min(batch, n - start), z_dim, generator=gen, device=device)
        yield to_uint8(g_ema(z)).cpu()


INTERIM = "interim/"  # prefix of the metrics of an interim evaluation (metrics.eval_num_fake images, not num_fake)


def evaluate(params: Params, g_ema: nn.Module, dataset: ManifestDataset, device: torch.device,
             num_fake: int | None = None):
    """FID/KID of G_ema against the training images, with the feature network named in the metric."""
    from sqgan.metrics.fid import build_feature_net, fid_kid

    mp = params.metrics
    net, name = build_feature_net(mp.inception_weights, mp.randcnn_seed)
    net = net.to(device)
    reals = (dataset.images[i : i + mp.batch_size].to(device) for i in range(0, len(dataset), mp.batch_size))
    fakes = generate_uint8(g_ema, num_fake or mp.num_fake, params.model.z_dim, mp.batch_size, params.train.seed + 2,
                           device)
    metrics, provenance = fid_kid(reals, fakes, net, name, mp.kid_subset_size, mp.kid_subsets, params.train.seed)
    provenance.update({"reference": f"{dataset.root.name} train split", "generator": "G_ema",
                       "resize": f"generated at {params.model.resolution}px; reals resized to it (Lanczos)"})
    return metrics, provenance


# ------------------------------------------------------------------------------------- train
def train(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    resume: str | Path | None = None,
    runtime: Runtime | None = None,
    hooks: Hooks | None = None,
) -> TrainResult:
    """Train steps [start, train.steps) into `out_dir` (resuming from the checkpoint `resume`)."""
    rt, hooks = runtime or Runtime(), hooks or Hooks()
    tp, device = params.train, rt.device
    out_dir = Path(out_dir)
    ckpt_dir, sample_dir = out_dir / "checkpoints", out_dir / "samples"
    if rt.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        sample_dir.mkdir(parents=True, exist_ok=True)
        mark_output(out_dir, "train")

    dataset = ManifestDataset(data_dir, params.model.resolution, split="train")
    torch.manual_seed(tp.seed)  # same initial weights on every rank
    G, D = build_generator(params).to(device), build_discriminator(params).to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=tp.lr_g, betas=(tp.beta1, tp.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=tp.lr_d, betas=(tp.beta1, tp.beta2))

    start = 0
    last_metrics: dict[str, float] = {}
    if resume is not None:
        state = load_checkpoint(resume)
        start = check_resume(state, params, Path(resume))
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        G_ema.load_state_dict(state["G_ema"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        _set_rng_state(state["rng"])
        last_metrics = dict(state.get("metrics", {}))  # kept when no step is left to run

    if rt.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        G = nn.parallel.DistributedDataParallel(G, device_ids=ids)
        D = nn.parallel.DistributedDataParallel(D, device_ids=ids)

    fixed_z = torch.randn(GRID_SIZE, params.model.z_dim, generator=torch.Generator().manual_seed(tp.seed + 1))
    fixed_z = fixed_z.to(device)
    quantized_layers = sorted(int(k) for k in _unwrap(D).quantizers)
    window: dict[str, float] = {}
    window_counts: dict[int, torch.Tensor] = {}
    window_n = 0
    ckpt_path: Path | None = None

    def checkpoint(step: int) -> Path | None:
        if not rt.is_main:
            return None
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "G": _unwrap(G).state_dict(),
            "D": _unwrap(D).state_dict(),
            "G_ema": G_ema.state_dict(),
            "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict(),
            "rng": _rng_state(),
            "params": params.model_dump(mode="json"),
            "metrics": {k: v for k, v in last_metrics.items() if not k.startswith("time/")},  # same bytes each run
        }
        return save_checkpoint(ckpt_dir / f"step_{step:06d}.pt", state)

    progress = tqdm(total=tp.steps, initial=start, desc="train", unit="step", disable=not rt.is_main,
                    mininterval=5.0)
    t0 = time.perf_counter()
    for step in range(start, tp.steps):
        G.train()
        D.train()
        gen = step_generator(tp.seed, step, rt.rank, device)
        idx = batch_indices(step, len(dataset), tp.batch_size, rt.world_size, rt.rank, tp.seed)
        real = dataset.batch(idx).to(device)
        alpha = alpha_at(step, params.fq.alpha, params.fq.alpha_warmup_steps)
        feed = step >= params.fq.feed_warmup_steps

        # 1. D main: real and fake in one forward, so the FQ dictionary sees both (as the official code)
        z = torch.randn(tp.batch_size, params.model.z_dim, generator=gen, device=device)
        with torch.no_grad():
            fake = G(z)
        d_in = diff_augment(torch.cat([real, fake]), tp.diffaugment, gen)
        d_out = D(d_in, feed=feed)
        real_logits, fake_logits = d_out.logits.split(tp.batch_size)
        loss_adv_d = adversarial_d_loss(real_logits, fake_logits, tp.loss)
        loss_d = loss_adv_d + alpha * d_out.fq_loss
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        # 2. G main
        z = torch.randn(tp.batch_size, params.model.z_dim, generator=gen, device=device)
        g_out = D(diff_augment(G(z), tp.diffaugment, gen), feed=feed)
        loss_g = adversarial_g_loss(g_out.logits, tp.loss)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        # 3. G_ema, its decay ramped up over the first steps so a short run's G_ema is not its init
        beta = ema_beta(step, tp.g_ema_decay)
        with torch.no_grad():
            for p_ema, p in zip(G_ema.parameters(), _unwrap(G).parameters(), strict=True):
                p_ema.lerp_(p, 1.0 - beta)
            for b_ema, b in zip(G_ema.buffers(), _unwrap(G).buffers(), strict=True):
                b_ema.copy_(b)

        # bookkeeping: window means of losses, FQ usage over the window (D-step assignments, all ranks)
        values = {"loss/d": loss_d.item(), "loss/d_adv": loss_adv_d.item(), "loss/g": loss_g.item(),
                  "loss/fq": d_out.fq_loss.item(), "d/real_logit": real_logits.mean().item(),
                  "d/fake_logit": fake_logits.mean().item()}
        for k, v in values.items():
            window[k] = window.get(k, 0.0) + v
        for i, q in d_out.fq.items():
            window_counts[i] = window_counts.get(i, 0) + q.counts.detach().cpu()
        window_n += 1
        done = step + 1
        progress.update(1)
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"non-finite loss at step {done}: {values}; lower the learning rates")

        report: dict[str, float] | None = None
        if done % tp.log_every == 0 or done == tp.steps:
            metrics = {k: v / window_n for k, v in window.items()}
            metrics["fq/alpha"] = alpha
            for i in quantized_layers:
                counts = window_counts[i]
                metrics[f"fq/layer{i}/utilisation"] = float(utilisation(counts))
                metrics[f"fq/layer{i}/perplexity"] = float(perplexity(counts))
            metrics["time/steps_per_s"] = window_n / max(time.perf_counter() - t0, 1e-9)
            last_metrics = metrics
            if rt.is_main:
                hooks.log_metrics(metrics, done)
                progress.set_postfix(d=f"{metrics['loss/d']:.3f}", g=f"{metrics['loss/g']:.3f}")
            window, window_counts, window_n, t0 = {}, {}, 0, time.perf_counter()
            report = dict(last_metrics)

        if rt.is_main and (done % tp.sample_every == 0 or done == tp.steps):
            grid = sample_grid(G_ema, fixed_z, sample_dir / f"step_{done:06d}.png")
            hooks.log_artifact(grid, "samples")

        eval_every = params.metrics.eval_every
        if eval_every and done % eval_every == 0 and done != tp.steps:  # the end has the full evaluation
            report = dict(last_metrics) if report is None else report
            if rt.is_main:  # fewer images than the final evaluation, so named interim/… (a fixed seed, like it)
                interim, _ = evaluate(params, G_ema, dataset, device, num_fake=params.metrics.eval_num_fake)
                interim = {INTERIM + k: v for k, v in interim.items()}
                hooks.log_metrics(interim, done)
                report.update(interim)

        path: Path | None = None
        if done % tp.checkpoint_every == 0 and done != tp.steps:
            check_dictionaries_agree(D, rt, done)
            ckpt_path = path = checkpoint(done)
            report = dict(last_metrics) if report is None else report
        if report is not None and done != tp.steps:
            hooks.report(report, done, path)
    progress.close()

    final = dict(last_metrics)
    check_dictionaries_agree(D, rt, tp.steps)
    if rt.is_main:
        ckpt_path = checkpoint(tp.steps)
        grid = sample_grid(G_ema, fixed_z, out_dir / "grid.png")
        hooks.log_artifact(grid, "samples")
        quality, provenance = evaluate(params, G_ema, dataset, device)
        final.update(quality)
        hooks.log_metrics(quality, tp.steps)
        summary = {k: v for k, v in final.items() if not k.startswith("time/")}  # keep the file reproducible
        write_json_atomic(out_dir / "metrics.json", {"step": tp.steps, **summary, "provenance": provenance})
        hooks.log_artifact(out_dir / "metrics.json", "")
        hooks.log_artifact(ckpt_path, "checkpoints")
    hooks.report(final, tp.steps, ckpt_path if rt.is_main else None)
    return TrainResult(step=tp.steps, metrics=final, checkpoint=ckpt_path)


def check_dictionaries_agree(D: nn.Module, rt: Runtime, step: int) -> None:
    """Under DDP, fail loudly unless every rank holds the same FQ dictionaries (compared by hash)."""
    if rt.world_size <= 1:
        return
    import torch.distributed as dist

    from sqgan.quant.fq import dictionary_digest

    mine = dictionary_digest(_unwrap(D))
    digests: list[Any] = [None] * rt.world_size
    dist.all_gather_object(digests, mine)
    if len(set(digests)) != 1:
        listing = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests))
        raise RuntimeError(f"FQ dictionaries diverged across DDP ranks at step {step} ({listing}); the EMA statistics "
                           f"must be all-reduced before each update (sqgan.quant.fq.FeatureQuantizer.ema_update)")


def reported_metrics(params: Params) -> set[str]:
    """Every metric name a run with `params` logs (what a sweep may rank trials on)."""
    names = {"loss/d", "loss/d_adv", "loss/g", "loss/fq", "d/real_logit", "d/fake_logit", "fq/alpha",
             "time/steps_per_s"}
    if params.fq.enabled:
        for i in params.fq.layers:
            names |= {f"fq/layer{i}/utilisation", f"fq/layer{i}/perplexity"}
    from sqgan.metrics.fid import feature_net_name

    net = feature_net_name(params.metrics.inception_weights)
    quality = {f"fid_{net}", f"kid_{net}_mean", f"kid_{net}_std"}
    names |= quality
    if params.metrics.eval_every and params.metrics.eval_every < params.train.steps:
        names |= {INTERIM + q for q in quality}
    return names
