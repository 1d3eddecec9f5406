"""The training loop, plain torch: read it top to bottom.

`train(params, data_dir, out_dir)` runs steps [start, train.steps). `setup` builds (or resumes) the state, each
`train_step` runs the phases of `losses.gan.GANLoss` in stylegan2-ada's order, each followed by its optimiser step:
  1. D main (+ α_t · Σ L_FQ), then D's lazy regularisers when due: R1, QCR (SQ)
  2. G main (+ λ_sq (L_sq + L_uf)), then G's lazy path-length term when due
  3. G_ema ← lerp(G_ema, G, 1 − β_t); ADA's p adjusted from D's signs on reals
`Window` averages the statistics between logs (on the device: no host sync per step) and `finish` checkpoints,
renders the grid and evaluates. Everything random in a step (batch indices, z, noise, augmentation) comes from a
generator seeded by (train.seed, step, rank), so a run resumed from a checkpoint continues bit-identically.

The loop knows nothing of Ray or MLflow: a shell passes `Runtime` (rank, world size, device) and
`Hooks` (where metrics, artifacts and checkpoints go). Every `train.log_every` steps (and at each interim
evaluation, each checkpoint and the end) every rank calls `hooks.report` with the same step, so a shell can hand
the metrics to Ray Train and Tune.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from sqgan.config import Params, flatten
from sqgan.data.ada import AdaController, ada_augment
from sqgan.data.clip import load_clip
from sqgan.data.dataset import ManifestDataset, check_class_labels
from sqgan.data.diffaugment import diff_augment
from sqgan.data.embeddings import ClipFeatures
from sqgan.io import atomic_path, mark_output, write_json_atomic
from sqgan.losses.gan import GANLoss, Phase, alpha_at, amp_dtype, unwrap
from sqgan.losses.mixdl import MixDLHeads
from sqgan.metrics.codebook import perplexity, utilisation
from sqgan.metrics.collapse import collapse_stats, mean_pairwise_rms
from sqgan.metrics.diversity import mean_pairwise_cosine
from sqgan.metrics.evaluate import Evaluator, Reference, keys_of, to_uint8
from sqgan.metrics.features import feature_net_name
from sqgan.metrics.names import count_tag, parse_metric_key
from sqgan.models.factory import (
    build_discriminator,
    build_generator,
    lazy_ratios,
    mapping_layers,
    mbstd_channels,
    num_classes,
    r1_gamma,
)
from sqgan.quant.codebook_prior import load_prior, restore_codebook
from sqgan.quant.digest import dictionary_digest
from sqgan.sampling.generator import eval_generator, record_truncation
from sqgan.tags import COLLAPSE_STEP, METRIC_PROVENANCE
from sqgan.train.checkpoint import (
    CHECKPOINT_FORMAT,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)

__all__ = ["alpha_at", "build_discriminator", "build_generator", "train"]

GRID_SIZE = 64  # fixed-z samples in each grid (8 × 8)
GRID_CLASSES = 16  # a conditional grid's rows: one per class, up to this many (evenly spaced over the classes)


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _tqdm_bar(total: int, initial: int) -> Any:
    return tqdm(total=total, initial=initial, desc="train", unit="step", mininterval=5.0)


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
    set_tags: Callable[[dict[str, Any]], None] = _noop
    report: Callable[[dict[str, float], int, Path | None], None] = _noop
    # the terminal (rank 0): progress(total, initial) makes the one progress bar (update(n), set_postfix(**kw),
    # close()), None for none (a shell that draws its own); say(line) prints a line beside it (the collapse watch's
    # warnings, one line per evaluation)
    progress: Callable[[int, int], Any] | None = _tqdm_bar
    say: Callable[[str], None] = tqdm.write


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    checkpoint: Path | None


# --------------------------------------------------------------------------------- schedules
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


class BestCheckpoint:
    """The checkpoint saved at the interim evaluation with the lowest FID/KID so far (the first of metrics.names that
    is fid or kid), which pruning keeps."""

    def __init__(self, params: Params) -> None:
        interim = quality_keys(params, params.metrics.eval_num_fake) if params.metrics.eval_every else []
        self.key = next((k for k in interim if (p := parse_metric_key(k)) is not None
                         and p.metric in ("fid", "kid") and p.stat in (None, "mean")), None)
        self.value, self.path = math.inf, None

    def offer(self, metrics: dict[str, float], path: Path) -> None:
        value = metrics.get(self.key, math.nan) if self.key else math.nan
        if value < self.value:  # nan never is
            self.value, self.path = value, path


ARCH_KEYS = ("model.", "fq.enabled", "fq.codebook_size", "fq.layers", "sq.enabled", "sq.code_dim",
             "sq.codebook_size", "mixdl.enabled", "mixdl.proj_dim", "mixdl.patch_sides", "mixdl.patch_activation")
ARCH_EXEMPT = ("model.style_mixing",)  # model.* keys that are not architecture


def check_resume(state: dict[str, Any], params: Params, path: Path) -> int:
    """The step to resume from, after checking that the checkpoint fits `params`: same architecture (anything
    else may change) and a step within train.steps."""
    old, new = flatten(state["params"]), params.flat()
    old = Params().flat() | old  # a key the checkpoint predates had its schema default then
    diff = [k for k in new if k.startswith(ARCH_KEYS) and k not in ARCH_EXEMPT and old.get(k) != new[k]]
    if diff:
        pairs = ", ".join(f"{k}: {old.get(k)!r} → {new[k]!r}" for k in diff)
        raise ValueError(f"cannot resume from {path}: architecture params differ ({pairs}); resume with the "
                         f"checkpoint's values or start a new run")
    step = int(state["step"])
    if step > params.train.steps:
        raise ValueError(f"cannot resume from {path}: it is at step {step}, past train.steps={params.train.steps}; "
                         f"--set train.steps={step} or more")
    return step


_unwrap = unwrap

# what a fine-tuned run may add to (or drop from) the networks it starts from: FQ's and SQ's dictionaries
FRESH_PREFIXES = ("quantizer.", "quantizers.")


def absolute_init_from(params: Params) -> Params:
    """train.init_from as an absolute path, so Ray's workers (whose working folder may differ) find it."""
    if not params.train.init_from:
        return params
    train = params.train.model_copy(update={"init_from": str(Path(params.train.init_from).resolve())})
    return params.model_copy(update={"train": train})


def _resolved_model(p: Params) -> dict[str, Any]:
    """p's model.* with the keys whose unset value means a per-backbone default filled in as the factory fills them
    (an import sets them explicitly: 8 mapping layers and 1 mbstd channel equal unset for StyleGAN2)."""
    flat = {k: v for k, v in p.flat().items() if k.startswith("model.")}
    return flat | {"model.mapping_layers": mapping_layers(p), "model.mbstd_num_channels": mbstd_channels(p)}


def init_source(params: Params) -> tuple[Path, dict[str, Any]]:
    """train.init_from's checkpoint and state, checked: an sqgan checkpoint with the same model.* params."""
    path = latest_checkpoint(params.train.init_from or "", "train.init_from")
    state = load_checkpoint(path)
    raw = Params().model_dump(mode="json")
    raw["model"] = raw["model"] | dict(state["params"].get("model") or {})
    try:
        old = _resolved_model(Params.model_validate(raw))
    except ValueError as e:
        raise ValueError(f"train.init_from {path}: its model params do not fit this sqgan version ({e})") from None
    new = _resolved_model(params)
    diff = [k for k in new if k not in ARCH_EXEMPT and old.get(k) != new[k]]
    if diff:
        pairs = ", ".join(f"{k}: {old.get(k)!r} (there) vs {new[k]!r}" for k in diff)
        raise ValueError(f"train.init_from {params.train.init_from}: its networks were built with other model params "
                         f"({pairs}); set them as it has them (its params.yaml)")
    return path, state


def init_weights(params: Params, G: nn.Module | None, D: nn.Module | None, G_ema: nn.Module | None) -> None:
    """Start G, D and G_ema from train.init_from's (fine-tuning). Only FQ's and SQ's dictionaries may be missing
    there (they start fresh) or extra (dropped); a checkpoint without D (an import of G only) leaves D as built."""
    path, state = init_source(params)
    for name, module in (("G", G), ("D", D), ("G_ema", G_ema)):
        if module is None or state.get(name) is None:
            continue
        got = module.load_state_dict(state[name], strict=False)
        wrong = [k for k in (*got.missing_keys, *got.unexpected_keys) if not k.startswith(FRESH_PREFIXES)]
        if wrong:
            raise ValueError(f"train.init_from {path}: its {name} does not fit this run's ({', '.join(wrong[:4])}); "
                             f"only FQ's and SQ's dictionaries may differ")


# ----------------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class FixedLatents:
    """The fixed z (and classes) of a run's grids and collapse watch. Unconditional: 64 z, an 8 × 8 grid. Conditional:
    one row per class (all K up to GRID_CLASSES, else that many evenly spaced), the same 8 z in every row, so a
    column shows what the class changes."""

    z: torch.Tensor  # [n, z_dim]
    c: torch.Tensor | None  # [n] classes, None unconditional
    nrow: int  # images per grid row

    @classmethod
    def make(cls, params: Params, device: torch.device) -> FixedLatents:
        gen = torch.Generator().manual_seed(params.train.seed + 1)
        k = num_classes(params)
        if not k:
            z = torch.randn(GRID_SIZE, params.model.z_dim, generator=gen)
            return cls(z.to(device), None, int(math.sqrt(GRID_SIZE)))
        cols = int(math.sqrt(GRID_SIZE))
        rows = torch.linspace(0, k - 1, min(k, GRID_CLASSES)).round().long()
        z = torch.randn(cols, params.model.z_dim, generator=gen).repeat(len(rows), 1)
        return cls(z.to(device), rows.repeat_interleave(cols).to(device), cols)

    def __len__(self) -> int:
        return len(self.z)

    def part(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """The arguments of G for samples start … stop−1: (z,) or, conditional, (z, c)."""
        return (self.z[start:stop],) if self.c is None else (self.z[start:stop], self.c[start:stop])


@torch.no_grad()
def sample_grid(g_ema: nn.Module, fixed: FixedLatents, path: Path) -> Path:
    g_ema.eval()
    images = g_ema(*fixed.part(0, len(fixed)), noise_mode="const").images.cpu()
    grid = make_grid(images, nrow=fixed.nrow, normalize=True, value_range=(-1, 1))
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="png")
    return path


def make_evaluator(params: Params, data_dir: str | Path, dataset: ManifestDataset, device: torch.device):
    """The run's evaluator: its reference split (the training images themselves when that is `train`) and its
    feature network are built on first use, and the real features are extracted once per run."""
    mp = params.metrics
    images, labels = (dataset.images, dataset.labels) if mp.reference_split == "train" else (None, None)
    return Evaluator(mp, lambda: Reference.load(data_dir, mp.reference_split, params.model.resolution, images,
                                                labels), device)


def evaluate(params: Params, evaluator: Any, g_ema: nn.Module, num_fake: int, hooks: Hooks, step: int,
             extra: dict[str, float] | None = None):
    """Training's evaluation (interim: eval_num_fake images, final: num_fake): metrics.names on G_ema (truncated when
    metrics.truncation is set), each value logged with its provenance as the tag `sqgan.metric.<name>`; `extra`
    (the collapse watch's) is logged in the same call."""
    g, truncation = eval_generator(params, g_ema)
    ev = evaluator(g, params.model.z_dim, num_fake, params.metrics.names, lpips_pairs=num_fake // 2)
    record_truncation(ev, truncation)
    hooks.log_metrics({**ev.metrics, **(extra or {})}, step)
    hooks.set_tags({f"{METRIC_PROVENANCE}{k}": json.dumps(v, sort_keys=True) for k, v in ev.provenance.items()})
    return ev


def evaluation_line(step: int, metrics: dict[str, float]) -> str:
    """The one line an interim evaluation prints: its quality metrics (KID's mean, not its std)."""
    shown = {k: v for k, v in metrics.items() if (key := parse_metric_key(k)) is not None and key.stat != "std"}
    return f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items()))


# ------------------------------------------------------------------------------------- train
@dataclass
class TrainState:
    """Everything a step changes, and so everything a checkpoint holds."""

    G: nn.Module  # DDP-wrapped under world_size > 1
    D: nn.Module
    G_ema: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    loss: GANLoss
    ada: Any  # sqgan.data.ada.AdaController | None
    heads: nn.Module | None = None  # D's MixDL heads (mixdl.enabled), trained by opt_d
    scalers: dict[str, torch.amp.GradScaler] | None = None  # train.amp fp16: one loss scaler per optimiser (g, d)
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # the last logged window (kept across a resume)


class Augmenter:
    """What D sees: ADA (when ada.enabled, at the controller's p) then DiffAugment, all drawn from the step's
    generator."""

    def __init__(self, params: Params, ada: Any) -> None:
        self.policies, self.ada = list(params.train.diffaugment), ada

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.ada is not None and self.ada.p > 0:
            x = ada_augment(x, self.ada.p, gen)
        return diff_augment(x, self.policies, gen) if self.policies else x


def set_optimiser_settings(params: Params, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer) -> None:
    """Learning rates and betas from params, corrected for lazy regularisation (lr·k/(k+1), betas^(k/(k+1)))."""
    tp = params.train
    for opt, lr, ratio in zip((opt_g, opt_d), (tp.lr_g, tp.lr_d), lazy_ratios(params), strict=True):
        for group in opt.param_groups:
            group["lr"], group["betas"] = lr * ratio, (tp.beta1**ratio, tp.beta2**ratio)


def compile_networks(G: nn.Module, D: nn.Module) -> list[str]:
    """train.compile: torch.compile, in place (nn.Module.compile, so state_dict keys and checkpoints are those of the
    eager networks), of G's synthesis and of each block and the head of D's trunk; G's mapping network and every
    quantizer stay eager (small, with data-dependent EMA updates). Returns the compiled modules' names."""
    named = [("G.synthesis", G.synthesis)]
    trunk = D.trunk
    named += [(f"D.trunk.blocks.{i}", b) for i, b in enumerate(trunk.blocks)]
    if isinstance(getattr(trunk, "head", None), nn.Module):
        named.append(("D.trunk.head", trunk.head))
    # one graph per block and per input shape (the main batch, QCR's): more than dynamo's default 8 recompiles of one
    # block class's forward
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for _, m in named:
        m.compile(dynamic=False)  # shapes vary by phase (batch, R1, QCR): one graph each, not symbolic sizes
    return [n for n, _ in named]


def setup(params: Params, rt: Runtime, resume: str | Path | None = None) -> TrainState:
    """Build G, D, G_ema, the optimisers, the loss and ADA; load the checkpoint `resume` when given; wrap in DDP."""
    tp, device = params.train, rt.device
    torch.manual_seed(tp.seed)  # same initial weights on every rank
    G, D = build_generator(params).to(device), build_discriminator(params).to(device)
    if tp.init_from and resume is None:
        init_weights(params, G, D, None)
    if params.sq.enabled and params.sq.prior and resume is None:
        restore_codebook(G.quantizer, load_prior(params.sq.prior))
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    if tp.init_from and resume is None:
        init_weights(params, None, None, G_ema)
    heads = None
    if params.mixdl.enabled:  # after G_ema's copy and every other init: a run without MixDL draws as before

        heads = MixDLHeads(D, params).to(device)
    d_params = list(D.parameters()) + (list(heads.parameters()) if heads is not None else [])
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(d_params)
    set_optimiser_settings(params, opt_g, opt_d)
    ada = None
    if params.ada.enabled:
        a = params.ada
        ada = AdaController(target=a.target, interval=a.interval, batch_size=tp.batch_size * rt.world_size * tp.d_steps,
                            speed_img=a.speed_kimg * 1000, p=a.p_init)
    if tp.compile:  # after G_ema's copy: G_ema (sampling, evaluation) stays eager
        compile_networks(G, D)
    state = TrainState(G, D, G_ema, opt_g, opt_d, None, ada, heads)  # type: ignore[arg-type]
    if amp_dtype(params, device) == torch.float16:  # bf16 has float32's range: no loss scaling
        state.scalers = {"g": torch.amp.GradScaler(device.type), "d": torch.amp.GradScaler(device.type)}
    pl_mean = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        state.step = check_resume(ckpt, params, Path(resume))
        G.load_state_dict(ckpt["G"])
        D.load_state_dict(ckpt["D"])
        G_ema.load_state_dict(ckpt["G_ema"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        # Adam's moments come from the checkpoint, its settings from params: a resume with lower learning rates
        # (the advice after a divergence) must train at them, not at the ones load_state_dict brought back
        set_optimiser_settings(params, opt_g, opt_d)
        if heads is not None:
            heads.load_state_dict(ckpt["mixdl_heads"])
        if ada is not None and ckpt.get("ada") is not None:
            ada.load_state_dict(ckpt["ada"])
        if state.scalers is not None and ckpt.get("scalers") is not None:
            for k, scaler in state.scalers.items():
                scaler.load_state_dict(ckpt["scalers"][k])
        pl_mean = ckpt.get("pl_mean")
        _set_rng_state(ckpt["rng"])
        state.metrics = dict(ckpt.get("metrics", {}))  # kept when no step is left to run
    if rt.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        state.G = nn.parallel.DistributedDataParallel(G, device_ids=ids)
        state.D = nn.parallel.DistributedDataParallel(D, device_ids=ids)
    state.loss = GANLoss(params, state.G, state.D, Augmenter(params, ada), device, G.num_ws, heads)
    if pl_mean is not None:
        state.loss.pl_mean = pl_mean.to(device)
    return state


def checkpoint_state(state: TrainState, params: Params) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "step": state.step,
        "G": _unwrap(state.G).state_dict(),
        "D": _unwrap(state.D).state_dict(),
        "G_ema": state.G_ema.state_dict(),
        "opt_g": state.opt_g.state_dict(),
        "opt_d": state.opt_d.state_dict(),
        "ada": state.ada.state_dict() if state.ada is not None else None,
        "mixdl_heads": state.heads.state_dict() if state.heads is not None else None,
        "scalers": {k: v.state_dict() for k, v in state.scalers.items()} if state.scalers is not None else None,
        "pl_mean": state.loss.pl_mean.detach().cpu(),
        "rng": _rng_state(),
        "params": params.model_dump(mode="json"),
        "metrics": {k: v for k, v in state.metrics.items() if not k.startswith("time/")},  # same bytes each run
    }


def _apply(phase: Phase | None, opt: torch.optim.Optimizer, world_size: int = 1,
           scaler: torch.amp.GradScaler | None = None) -> Phase | None:
    """Backward and step of one phase; with `scaler` (train.amp fp16) the loss is scaled, the step skipped when a
    gradient is not finite, and the scale adapted."""
    if phase is not None:
        opt.zero_grad(set_to_none=True)
        (phase.loss if scaler is None else scaler.scale(phase.loss)).backward()
        if world_size > 1 and phase.sync:
            all_reduce_grads(phase.sync, world_size)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    return phase


def all_reduce_grads(modules: tuple[nn.Module, ...], world_size: int) -> None:
    """Average the gradients of `modules` over the ranks, as DDP would (for phases that bypass DDP's forward: MixDL).
    A parameter without a gradient on this rank takes part with zeros, so every rank makes the same calls."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def train_step(state: TrainState, params: Params, dataset: ManifestDataset, rt: Runtime) -> list[Phase]:
    """One optimisation step at `state.step` (then advanced): the phases that ran, for the window."""
    tp, device, step = params.train, rt.device, state.step
    state.G.train()
    state.D.train()
    gen = step_generator(tp.seed, step, rt.rank, device)
    loss = state.loss
    ws = rt.world_size
    sg, sd = (state.scalers["g"], state.scalers["d"]) if state.scalers is not None else (None, None)
    d_mains = []
    for j in range(tp.d_steps):  # BigGAN's num_D_steps: each D step on its own reals (the batches of sub-step
        # step·d_steps + j, so every image still comes once per epoch), its fakes drawn from the step's generator
        idx = batch_indices(step * tp.d_steps + j, len(dataset), tp.batch_size, rt.world_size, rt.rank, tp.seed)
        real = dataset.batch(idx).to(device)  # gathered on the device when the images live there (no copy)
        labels = dataset.batch_labels(idx).to(device) if params.model.conditional else None  # the same images
        d_mains.append(_apply(loss.d_main(real, gen, step, labels), state.opt_d, ws, sd))
    with torch.compiler.set_stance("force_eager"):  # R1's gradient penalty is a double backward: eager (compile)
        d_r1 = _apply(loss.d_r1(real, gen, step, labels), state.opt_d, scaler=sd)
    d_regs = [d_r1, _apply(loss.d_qcr(real, gen, step), state.opt_d, scaler=sd)]
    g_main = _apply(loss.g_main(gen, step), state.opt_g, ws, sg)
    with torch.compiler.set_stance("force_eager"):  # the path-length term too
        g_reg = _apply(loss.g_pl(gen, step), state.opt_g, scaler=sg)

    # G_ema, its decay ramped up over the first steps so a short run's G_ema is not its init
    beta = ema_beta(step, tp.g_ema_decay)
    G = _unwrap(state.G)
    with torch.no_grad():
        for p_ema, p in zip(state.G_ema.parameters(), G.parameters(), strict=True):
            p_ema.lerp_(p, 1.0 - beta)
        for b_ema, b in zip(state.G_ema.buffers(), G.buffers(), strict=True):
            b_ema.copy_(b)
    if state.ada is not None:
        for ph in d_mains:
            state.ada.accumulate(ph.real_logits)  # type: ignore[union-attr]
        state.ada.update()
    state.step = step + 1
    return [ph for ph in (*d_mains, *d_regs, g_main, g_reg) if ph is not None]


class Window:
    """Means of the step statistics and codebook counts since the last log, kept on the device (one host sync
    per log, not per step). D main's FQ assignments and G main's SQ assignments are counted."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, phases: list[Phase]) -> None:
        for ph in phases:
            for k, v in ph.stats.items():
                self.sums[k] = self.sums[k] + v.float() if k in self.sums else v.float().clone()
                self.n[k] = self.n.get(k, 0) + 1
            for name, q in ph.quant.items():
                c = q.counts.detach()
                self.counts[name] = self.counts[name] + c if name in self.counts else c.clone()
        self.steps += 1

    def finite(self) -> bool:
        return bool(torch.stack([v for v in self.sums.values()]).isfinite().all()) if self.sums else True

    def flush(self, rt: Runtime) -> dict[str, float]:
        """The window's metrics (SQ counts summed over ranks; FQ's are already, by the all-reduced EMA)."""
        if rt.world_size > 1 and "sq" in self.counts:
            dist.all_reduce(self.counts["sq"])
        keys = list(self.sums)
        values = torch.stack([self.sums[k] / self.n[k] for k in keys]).cpu().tolist() if keys else []
        metrics = dict(zip(keys, values, strict=True))
        for name, c in sorted(self.counts.items()):
            metrics[f"{name}/utilisation"] = float(utilisation(c))
            metrics[f"{name}/perplexity"] = float(perplexity(c))
        metrics["time/steps_per_s"] = self.steps / max(time.perf_counter() - self.t0, 1e-9)
        self.__init__()
        return metrics


@torch.no_grad()
def feature_similarity(D: nn.Module, reals: torch.Tensor, batch: int, labels: torch.Tensor | None = None) -> float:
    """Mean pairwise cosine similarity of D's penultimate features over `reals` (uint8; seed 000 A.4: lower = D
    tells the images apart more; a conditional D is given their `labels`). D in eval mode, dictionaries untouched."""
    D = _unwrap(D)
    was = D.training
    D.eval()
    device = next(D.parameters()).device
    try:
        feats = [D(reals[i : i + batch].to(device).float() / 127.5 - 1.0, update=False,
                   c=None if labels is None else labels[i : i + batch].to(device)).features.float().flatten(1)
                 for i in range(0, len(reals), batch)]
        return float(mean_pairwise_cosine(torch.cat(feats)))
    finally:
        D.train(was)


class Diversity:
    """The diversity diagnostics every metrics.diversity_every steps: `d/feature_similarity` over the first
    metrics.diversity_images real images (every rank), and with metrics.clip_similarity `g/clip_similarity`, the
    mean pairwise cosine of CLIP features of as many G_ema images from fixed z (rank 0)."""

    def __init__(self, params: Params, dataset: ManifestDataset, rt: Runtime) -> None:
        mp = params.metrics
        self.reals = dataset.images[: mp.diversity_images]
        self.labels = dataset.labels[: mp.diversity_images] if params.model.conditional else None
        self.batch, self.rt = mp.batch_size, rt
        self.clip = None
        if mp.clip_similarity and mp.diversity_every and rt.is_main:
            model, preprocess = load_clip(params.prior.clip_model, params.prior.clip_pretrained)
            self.clip = ClipFeatures(model, preprocess, "generated")
            gen = torch.Generator().manual_seed(params.train.seed + 3)
            self.z = torch.randn(mp.diversity_images, params.model.z_dim, generator=gen).to(rt.device)
            k = num_classes(params)  # conditional: classes in turn
            self.c = torch.arange(mp.diversity_images, device=rt.device) % k if k else None

    def __call__(self, state: TrainState) -> dict[str, float]:
        out = {"d/feature_similarity": feature_similarity(state.D, self.reals, self.batch, self.labels)}
        if self.clip is not None:
            state.G_ema.eval()
            with torch.no_grad():
                images = torch.cat([to_uint8(state.G_ema(self.z[i : i + self.batch],
                                                         None if self.c is None else self.c[i : i + self.batch],
                                                         noise_mode="const").images).cpu()
                                    for i in range(0, len(self.z), self.batch)])
            pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
            out["g/clip_similarity"] = float(mean_pairwise_cosine(torch.from_numpy(self.clip(pil))))
        return out


class TrainingDiverged(FloatingPointError):
    """The losses went non-finite or past train.max_abs_logit: the message names the step and the checkpoint to
    resume from."""


ADVERSARIAL_KEYS = ("d/real_logit", "d/fake_logit", "loss/d_adv", "loss/g_adv", "mixdl/d_patch", "mixdl/g_patch")


def check_divergence(metrics: dict[str, float], step: int, params: Params, last: Path | None) -> None:
    """Raise TrainingDiverged when a loss of the window is non-finite or an adversarial value is past the bound."""
    bad = {k: v for k, v in metrics.items() if k.startswith(("loss/", "d/", "mixdl/")) and not math.isfinite(v)}
    bound = params.train.max_abs_logit
    if not bad and bound > 0:
        bad = {k: v for k, v in metrics.items() if k in ADVERSARIAL_KEYS and abs(v) > bound}
        what = f"diverged (|value| > train.max_abs_logit = {bound:g})"
    else:
        what = "non-finite loss"
    if not bad:
        return
    values = ", ".join(f"{k}={v:.4g}" for k, v in sorted(bad.items()))
    tp = params.train
    lower = f"--set train.lr_g={tp.lr_g / 10:g} --set train.lr_d={tp.lr_d / 10:g}"
    if last is None:
        where = f"no checkpoint was written before it: train again with lower learning rates ({lower})"
    else:
        where = f"the last finite checkpoint is {last}: continue from it with lower learning rates: " \
                f"sqgan train --resume {last} {lower}"
    raise TrainingDiverged(f"step {step}: {what} ({values}); {where}")


class CollapseWatch:
    """At each evaluation: the pixel diversity of G_ema's fixed-z samples relative to the reals' and the share of
    distinct nearest reals (sqgan.metrics.collapse), and whether they are below metrics.collapse_pixel /
    collapse_nn (`diversity/collapsed`, every evaluation).

    A run is *flagged* (warning line, the `sqgan.collapse_step` tag, `first`) when it falls below after an evaluation
    above both — a collapse — or is still below at the final evaluation without ever having been above — it never
    learned; then `first` is its first evaluation. A low reading before G_ema first learned is "not yet",
    not a collapse: the demo's G_ema is below both at step 250 and well above from step 500 (issue 25)."""

    MAX_REALS = 1000  # reals compared against (evenly spaced over the split): a few seconds at any dataset size

    def __init__(self, params: Params, dataset: ManifestDataset, fixed: FixedLatents | torch.Tensor) -> None:
        images = dataset.images
        if len(images) > self.MAX_REALS:
            images = images[torch.linspace(0, len(images) - 1, self.MAX_REALS).long()]
        if isinstance(fixed, torch.Tensor):  # unconditional z alone
            fixed = FixedLatents(fixed, None, int(math.sqrt(len(fixed))))
        self.reals, self.fixed, self.mp = images, fixed, params.metrics
        self.real_diversity = mean_pairwise_rms(images) if len(images) >= 2 else 0.0
        self.first: int | None = None  # the step flagged
        self.learned = False  # an evaluation above both thresholds was seen
        self.low_since: int | None = None  # the first step below them (all of them below while not learned)

    @torch.no_grad()
    def __call__(self, g_ema: nn.Module, step: int, final: bool = False) -> tuple[dict[str, float], str | None]:
        """(metrics, a warning when this evaluation is flagged)."""
        if self.real_diversity <= 0:  # one real image (or identical ones): nothing to measure spread against
            return {}, None
        g_ema.eval()
        fake = torch.cat([g_ema(*self.fixed.part(i, i + 64), noise_mode="const").images.cpu()
                          for i in range(0, len(self.fixed), 64)])
        st = collapse_stats(fake, self.reals, self.real_diversity)
        collapsed = st.pixel < self.mp.collapse_pixel or st.nn_distinct < self.mp.collapse_nn
        metrics = {**st.as_metrics(), "diversity/collapsed": float(collapsed)}
        if not collapsed:
            self.learned = True
            return metrics, None
        if self.low_since is None:
            self.low_since = step
        if not (self.learned or final):
            return metrics, None  # not learned yet: flagged only if still so at the end
        if self.first is None:
            self.first = step if self.learned else self.low_since
        what = "collapsed" if self.learned else f"never learned (below since step {self.low_since})"
        return metrics, (f"warning: step {step}: G_ema {what}: its {len(fake)} fixed-z samples are "
                         f"{st.pixel:.3f}× as varied as the reals in pixels (metrics.collapse_pixel = "
                         f"{self.mp.collapse_pixel:g}) and have {st.nn_count} distinct nearest reals "
                         f"(share {st.nn_distinct:.3f}, metrics.collapse_nn = {self.mp.collapse_nn:g})")


def watch_collapse(watch: CollapseWatch, g_ema: nn.Module, step: int, hooks: Hooks,
                   final: bool = False) -> dict[str, float]:
    """Run the collapse watch, log its warning and tag the step it first flagged on the run (rank 0)."""
    first = watch.first
    metrics, warning = watch(g_ema, step, final)
    if warning is not None:
        hooks.say(warning)
        if first is None:
            hooks.set_tags({COLLAPSE_STEP: str(watch.first)})
    return metrics


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

    dataset = ManifestDataset(data_dir, params.model.resolution, split="train", mirror=params.data.mirror)
    check_class_labels(data_dir, dataset.labels, num_classes(params))
    dataset.to_device(device, int(params.train.data_on_device_gib * 2**30))
    state = setup(params, rt, resume)
    fixed_z = FixedLatents.make(params, device)
    diversity = Diversity(params, dataset, rt)
    evaluator = make_evaluator(params, data_dir, dataset, device) if rt.is_main else None
    watch = CollapseWatch(params, dataset, fixed_z) if rt.is_main else None
    window = Window()
    last = {"checkpoint": Path(resume) if resume is not None else None}  # the last checkpoint known finite

    best = BestCheckpoint(params)

    def checkpoint(evaluated: dict[str, float] | None = None) -> Path | None:
        check_dictionaries_agree(state.D, rt, state.step, state.G)
        if not rt.is_main:
            return None
        last["checkpoint"] = save_checkpoint(ckpt_dir / f"step_{state.step:06d}.pt", checkpoint_state(state, params))
        best.offer(evaluated or {}, last["checkpoint"])
        prune_checkpoints(ckpt_dir, tp.keep_checkpoints, keep=best.path)
        return last["checkpoint"]

    progress = hooks.progress(tp.steps, state.step) if rt.is_main and hooks.progress is not None else None
    while state.step < tp.steps:
        window.add(train_step(state, params, dataset, rt))
        done = state.step
        if progress is not None:
            progress.update(1)

        report: dict[str, float] | None = None
        if done % tp.log_every == 0 or done == tp.steps:
            metrics = window.flush(rt)
            check_divergence(metrics, done, params, last["checkpoint"])
            metrics["fq/alpha"] = alpha_at(done - 1, params.fq.alpha, params.fq.alpha_warmup_steps)
            if state.ada is not None:
                metrics.update({"ada/p": float(state.ada.p), "ada/rt": float(state.ada.rt)})
            every = params.metrics.diversity_every
            if every and (done % every == 0 or done == tp.steps):
                metrics.update(diversity(state))
            state.metrics = metrics
            if rt.is_main:
                hooks.log_metrics(metrics, done)
            if progress is not None:
                progress.set_postfix(d=f"{metrics['loss/d']:.3f}", g=f"{metrics['loss/g']:.3f}")
            report = dict(metrics)

        if rt.is_main and (done % tp.sample_every == 0 or done == tp.steps):
            grid = sample_grid(state.G_ema, fixed_z, sample_dir / f"step_{done:06d}.png")
            hooks.log_artifact(grid, "samples")

        eval_every = params.metrics.eval_every
        if eval_every and done % eval_every == 0 and done != tp.steps:  # the end has the full evaluation
            report = dict(state.metrics) if report is None else report
            if rt.is_main:  # eval_num_fake images: their own names (fid200_…), a fixed seed like the final one
                diversity_now = watch_collapse(watch, state.G_ema, done, hooks)
                evaluated = evaluate(params, evaluator, state.G_ema, params.metrics.eval_num_fake, hooks, done,
                                     diversity_now).metrics
                hooks.say(evaluation_line(done, evaluated))
                report.update(evaluated)
                report.update(diversity_now)

        path: Path | None = None
        if done % tp.checkpoint_every == 0 and done != tp.steps:
            if not window.finite():
                check_divergence({"loss/window": math.nan}, done, params, last["checkpoint"])
            path = checkpoint(report if eval_every and done % eval_every == 0 else None)
            report = dict(state.metrics) if report is None else report
        if report is not None and done != tp.steps:
            hooks.report(report, done, path)
    if progress is not None:
        progress.close()
    return finish(params, state, evaluator, out_dir, fixed_z, rt, hooks, checkpoint, watch)


def finish(params: Params, state: TrainState, evaluator: Any, out_dir: Path, fixed_z: FixedLatents,
           rt: Runtime, hooks: Hooks, checkpoint: Callable[[], Path | None],
           watch: CollapseWatch | None = None) -> TrainResult:
    """The last checkpoint, the grid, the full evaluation, the collapse watch and metrics.json (rank 0), and the
    final report."""
    tp = params.train
    final = dict(state.metrics)
    ckpt_path = checkpoint()
    if rt.is_main:
        grid = sample_grid(state.G_ema, fixed_z, out_dir / "grid.png")
        hooks.log_artifact(grid, "samples")
        diversity_now = ({} if watch is None else
                         watch_collapse(watch, state.G_ema, tp.steps, hooks, final=True))
        ev = evaluate(params, evaluator, state.G_ema, params.metrics.num_fake, hooks, tp.steps, diversity_now)
        final.update(ev.metrics)
        final.update(diversity_now)
        if watch is not None and watch.first is not None:
            final["diversity/collapse_step"] = float(watch.first)
        summary = {k: v for k, v in final.items() if not k.startswith("time/")}  # keep the file reproducible
        write_json_atomic(out_dir / "metrics.json", {"step": tp.steps, **summary, "provenance": ev.provenance})
        hooks.log_artifact(out_dir / "metrics.json", "")
        hooks.log_artifact(ckpt_path, "checkpoints")
    hooks.report(final, tp.steps, ckpt_path if rt.is_main else None)
    return TrainResult(step=tp.steps, metrics=final, checkpoint=ckpt_path)


def check_dictionaries_agree(D: nn.Module, rt: Runtime, step: int, G: nn.Module | None = None) -> None:
    """Under DDP, fail loudly unless every rank holds the same FQ dictionaries and SQ codebook (compared by hash)."""
    if rt.world_size <= 1:
        return


    mine = dictionary_digest(_unwrap(D), *([_unwrap(G)] if G is not None else []))
    digests: list[Any] = [None] * rt.world_size
    dist.all_gather_object(digests, mine)
    if len(set(digests)) != 1:
        listing = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests))
        raise RuntimeError(f"FQ dictionaries / SQ codebook diverged across DDP ranks at step {step} ({listing}); the "
                           f"EMA statistics must be all-reduced before each update "
                           f"(sqgan.quant.fq.FeatureQuantizer.ema_update), SQ's gradients by DDP")


def reported_metrics(params: Params) -> set[str]:
    """Every metric name a run with `params` logs (what a sweep may rank trials on)."""
    names = {"loss/d", "loss/g", "loss/fq", "fq/alpha", "time/steps_per_s"}
    x = params.mixdl
    if not x.enabled or x.every > 1:  # plain steps happen
        names |= {"loss/d_adv", "loss/g_adv", "d/real_logit", "d/fake_logit"}
    if x.enabled:
        names |= {"mixdl/d", "mixdl/d_kl", "mixdl/d_patch", "mixdl/d_real_patch", "mixdl/d_fake_patch", "mixdl/g",
                  "mixdl/g_kl", "mixdl/g_patch"}
    if params.fq.enabled:
        for i in params.fq.layers:
            names |= {f"fq/layer{i}/utilisation", f"fq/layer{i}/perplexity"}
    if params.sq.enabled:
        names |= {"loss/sq", "sq/utilisation", "sq/perplexity"}
        if params.sq.lambda_qcr > 0:
            names.add("loss/qcr")
    if r1_gamma(params) > 0:
        names.add("loss/r1")
    if params.train.ortho_reg > 0:
        names.add("loss/ortho")
    if params.model.arch == "fastgan" and (not x.enabled or x.every > 1):
        names.add("loss/d_recon")
    if params.train.pl_weight > 0 and params.model.arch == "stylegan2":
        names |= {"loss/pl", "g/pl_mean"}
    if params.ada.enabled:
        names |= {"ada/p", "ada/rt"}
    if params.metrics.diversity_every:
        names.add("d/feature_similarity")
    if params.metrics.diversity_every and params.metrics.clip_similarity:
        names.add("g/clip_similarity")
    mp = params.metrics
    names |= set(quality_keys(params, mp.num_fake))
    names |= {"diversity/pixel", "diversity/nn_distinct", "diversity/collapsed"}  # the collapse watch's
    if mp.eval_every and mp.eval_every < params.train.steps:
        names |= set(quality_keys(params, mp.eval_num_fake))
    return names


def quality_keys(params: Params, num_fake: int) -> list[str]:
    """The names training's evaluation of `num_fake` images logs (fid500_train_randcnn, …)."""
    mp = params.metrics
    net = feature_net_name(mp.features, mp.inception_weights, mp.randcnn_seed)
    lpips_net = mp.lpips_backbone if mp.lpips_weights else f"rand{mp.lpips_backbone}"
    return [k for name in mp.names for k in keys_of(name, num_fake, net, mp.reference_split, lpips_net, num_fake // 2)]


def interim_key(params: Params, key: str) -> str:
    """The interim evaluation's name of the final evaluation's metric `key` (the same on eval_num_fake images; LPIPS
    counts pairs and PPL uniformity paths, so their N is not the number of images)."""
    parts = parse_metric_key(key)
    if parts is None:
        return key
    finals = quality_keys(params, params.metrics.num_fake)
    if key in finals:
        return quality_keys(params, params.metrics.eval_num_fake)[finals.index(key)]
    return key.replace(f"{parts.metric}{parts.n}_", f"{parts.metric}{count_tag(params.metrics.eval_num_fake)}_", 1)
