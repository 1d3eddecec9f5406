"""Self-filtering (Mokady et al. 2022, "Self-Distilled StyleGAN: Towards Generation from Internet Photos", §3.1):
quarantine the images a GAN finds hardest to reproduce.

A StyleGAN2 generator G (with its discriminator D, trained adversarially as usual) and an encoder E are trained
together so that G(E(x)) reconstructs each image x. E has the architecture of StyleGAN2's discriminator, without
minibatch stddev (a code must not depend on the rest of its batch), and its last layer gives a w (w_dim values)
instead of one logit; the w is broadcast to every layer of the synthesis network. G and D are built by the model
factory and trained by the training loop's own phases (`sqgan.losses.gan.GANLoss`, no style mixing, no
augmentation), so this is the loop's GAN with an encoder beside it, not a second GAN loop. Per step:
    D:     `d_main` (non-saturating logistic on reals vs G(z), reals and fakes in one call with separate
           minibatch-stddev groups), then `d_r1` (lazy R1 every 16 steps, γ = 0.0002·R²/B as stylegan2-ada's `auto`)
           as its own step
    G, E:  `g_main` (L_adv^G(G(z))) + λ_L1·‖G(E(x)) − x‖₁ + λ_LPIPS·LPIPS(G(E(x)), x)   (into G and E)
           + λ_w·‖E(G(w)) − w‖²,  w = f_W(z) of a batch drawn without gradient          (into E only)
(the norms are means over elements). Then every image is scored with λ_L1·L1 + λ_LPIPS·LPIPS of its
reconstruction (G and E in eval mode, constant noise), and the round(fraction·N) worst are quarantined: images
the model cannot invert are the outliers of the set (wrong subject, clutter, corrupt content).

Output (written atomically: the folder appears complete or not at all):
    images/…             the kept images, hard links of the source's at the same relative paths, at their own size
    quarantine/images/…  copies of the quarantined images
    quarantine.csv       path, reason, score of each quarantined image
    manifest.parquet     the source's rows of the kept images + selffilter_score
    scores.csv           path, score, l1, lpips, rank (1 = worst), kept: every image
    scores.png           histogram of the scores with the threshold
    selffilter.json      counts (seen, kept, quarantined), fraction, threshold, steps, the final losses, the LPIPS
                         network's name (`randalex` when no weights were given: a random backbone)
Same source, params and seed → the same scores on the CPU.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from sqgan.config import Params
from sqgan.data.dataset import ManifestDataset
from sqgan.data.manifest import MANIFEST, read_manifest, write_manifest
from sqgan.io import check_output, link_or_copy, stage_output, write_json_atomic
from sqgan.losses.gan import GANLoss
from sqgan.metrics.features import LPIPSNet
from sqgan.models.factory import build_discriminator, build_generator
from sqgan.models.stylegan2 import DiscriminatorTrunk, FullyConnectedLayer

STAGE = "selffilter"
REPORT = "selffilter.json"
R1_EVERY = 16  # lazy regularisation (StyleGAN2 §B): R1 every 16 D steps, scaled by 16


class Encoder(nn.Module):
    """E: image → w. StyleGAN2's "resnet" discriminator trunk (the class the factory builds D from) without minibatch
    stddev, whose head ends in a w_dim-wide layer instead of the one logit."""

    def __init__(self, resolution: int, w_dim: int, channel_base: int, channel_max: int) -> None:
        super().__init__()

        self.trunk = DiscriminatorTrunk(resolution, channel_base=channel_base, channel_max=channel_max,
                                        mbstd_num_channels=0)
        self.trunk.head.out = FullyConnectedLayer(self.trunk.head.fc.out_features, w_dim)
        self.w_dim = w_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.trunk(x)
        return out.reshape(x.shape[0], self.w_dim)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of indices: successive seeded permutations of 0..n-1, cut into batch_size pieces."""
    queue = torch.empty(0, dtype=torch.long)
    while True:
        while queue.numel() < batch_size:
            queue = torch.cat([queue, torch.randperm(n, generator=generator)])
        yield queue[:batch_size]
        queue = queue[batch_size:]


def _plot_scores(scores: np.ndarray, threshold: float | None, fraction: float, path: Path) -> None:
    matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(scores, bins=min(50, max(10, len(scores) // 5)), color="tab:gray")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--",
                   label=f"threshold {threshold:.3g} (worst {fraction:.0%})")
        ax.legend()
    ax.set_xlabel("reconstruction error λ_L1·L1 + λ_LPIPS·LPIPS")
    ax.set_ylabel("images")
    ax.set_title(f"self-filter scores, {len(scores)} images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def self_filter(
    src: str | Path,
    out: str | Path,
    *,
    fraction: float,
    steps: int,
    batch_size: int,
    resolution: int,
    lr: float,
    lambda_w: float,
    lambda_l1: float,
    lambda_lpips: float,
    seed: int,
    z_dim: int,
    w_dim: int,
    mapping_layers: int | None,
    channel_base: int,
    channel_max: int,
    lpips_backbone: str,
    lpips_weights: str | None,
    force: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Train G, D and E on every image of `src` (all splits) for `steps` steps, score each image by its
    reconstruction error and write the kept ones to `out`, the worst round(fraction·N) to its quarantine.
    Returns the counts: seen, kept, quarantined, threshold (the lowest quarantined score; None when none is)."""
    src, out = Path(src), Path(out)
    # Everything that can be refused is refused before the training starts.
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.selffilter.fraction must be in [0, 1) (the share of images to quarantine), got "
                         f"{fraction}")
    if lambda_l1 == 0 and lambda_lpips == 0:
        raise ValueError("data.selffilter.lambda_l1 and data.selffilter.lambda_lpips are both 0: the score "
                         "λ_L1·L1 + λ_LPIPS·LPIPS would be 0 for every image; set at least one of them > 0")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"data.selffilter.steps and batch_size must be ≥ 1, got {steps} and {batch_size}")
    try:
        df = read_manifest(src)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    n = len(df)
    if n < 2:
        raise ValueError(f"{src / MANIFEST}: self-filtering needs at least 2 images to rank, the manifest lists {n}; "
                         f"filter a larger curated dataset (data.selffilter.source)")
    k = round(fraction * n)
    if k >= n:
        raise ValueError(f"data.selffilter.fraction {fraction} of {n} images would quarantine {k}, leaving none; "
                         f"lower it below {(n - 0.5) / n:.3g}")
    check_output(out, STAGE, (src,), force)
    params = Params().override({
        "model.arch": "stylegan2", "model.resolution": resolution, "model.z_dim": z_dim, "model.w_dim": w_dim,
        "model.mapping_layers": mapping_layers, "model.channel_base": channel_base, "model.channel_max": channel_max,
        "sq.enabled": False, "fq.enabled": False, "train.batch_size": batch_size, "model.style_mixing": 0.0,
        "train.r1_every": R1_EVERY, "train.loss": "nonsaturating",
    }, source="self_filter arguments")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lpips = LPIPSNet(lpips_backbone, lpips_weights).to(device)  # first: a wrong weights file is refused at once
    lpips_distance = lpips.net  # the differentiable network (LPIPSNet.forward is no_grad, on uint8)
    data = ManifestDataset(src, resolution, split=None)  # rows in manifest order (sorted by path)
    with torch.random.fork_rng(devices=[]):  # the init is a function of the seed; the caller's RNG is untouched
        torch.manual_seed(seed)
        G = build_generator(params).to(device)
        D = build_discriminator(params).to(device)
        E = Encoder(resolution, w_dim, channel_base, channel_max).to(device)
    betas = (0.0, 0.99)  # StyleGAN2's Adam
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=betas, eps=1e-8)
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=betas, eps=1e-8)
    opt_e = torch.optim.Adam(E.parameters(), lr=lr, betas=betas, eps=1e-8)
    phases = GANLoss(params, G, D, lambda x, gen: x, device, G.num_ws)  # the loop's D and G terms, no augmentation

    cpu_gen = torch.Generator().manual_seed(seed)  # batches
    gen = torch.Generator(device=device).manual_seed(seed + 1)  # z and StyleGAN2's per-pixel noise
    batches = _batches(n, batch_size, cpu_gen)
    history: dict[str, list[float]] = {"d_adv": [], "r1": [], "g_adv": [], "l1": [], "lpips": [], "w": []}

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        # Constant noise also in training: the scores reconstruct with it, so E learns to invert that function.
        ws = E(x)[:, None, :].expand(-1, G.num_ws, -1)
        return G.synthesis(ws, noise_mode="const")

    G.train()
    D.train()
    E.train()
    for step in tqdm(range(steps), desc=f"self-filter {src.name}", unit="step", disable=not progress,
                     mininterval=1.0):
        x = data.batch(next(batches)).to(device)
        b = x.shape[0]

        # D: the loop's main phase, then its lazy R1 as a step of its own (as the training loop applies them).
        D.requires_grad_(True)
        d = phases.d_main(x, gen, step)
        opt_d.zero_grad(set_to_none=True)
        d.loss.backward()
        opt_d.step()
        r1 = phases.d_r1(x, gen, step)
        if r1 is not None:
            opt_d.zero_grad(set_to_none=True)
            r1.loss.backward()
            opt_d.step()

        # G and E: the loop's G phase + reconstruction of the reals (into G and E) + latent loss on G(w) (into E).
        D.requires_grad_(False)
        g = phases.g_main(gen, step)
        rec = reconstruct(x)
        loss_l1 = (rec - x).abs().mean()
        loss_lpips = lpips_distance(rec, x).mean()
        with torch.no_grad():
            drawn = G(torch.randn(b, z_dim, generator=gen, device=device), generator=gen)
        loss_w = (E(drawn.images) - drawn.ws[:, 0]).square().mean()
        opt_g.zero_grad(set_to_none=True)
        opt_e.zero_grad(set_to_none=True)
        (g.loss + lambda_l1 * loss_l1 + lambda_lpips * loss_lpips + lambda_w * loss_w).backward()
        opt_g.step()
        opt_e.step()
        for key, value in (("d_adv", d.stats["loss/d_adv"]), ("g_adv", g.stats["loss/g_adv"]), ("l1", loss_l1),
                           ("lpips", loss_lpips), ("w", loss_w)):
            history[key].append(float(value.detach()))
        if r1 is not None:
            history["r1"].append(float(r1.stats["loss/r1"]))

    # Score every image: λ_L1·L1 + λ_LPIPS·LPIPS of its reconstruction.
    G.eval()
    E.eval()
    l1s, lps = [], []
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc="self-filter scores", unit="batch", disable=not progress):
            x = data.batch(torch.arange(start, min(start + batch_size, n))).to(device)
            rec = reconstruct(x)
            l1s.append((rec - x).abs().mean(dim=(1, 2, 3)).cpu())
            lps.append(lpips_distance(rec, x).reshape(x.shape[0]).cpu())
    l1 = torch.cat(l1s).double().numpy()
    lp = torch.cat(lps).double().numpy()
    scores = lambda_l1 * l1 + lambda_lpips * lp
    order = np.argsort(-scores, kind="stable")  # worst first; ties in path order
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    kept = rank > k
    threshold = float(scores[order[k - 1]]) if k > 0 else None

    rows = data.manifest.copy()
    rows["selffilter_score"] = scores
    table = pd.DataFrame({"path": rows["path"], "score": scores, "l1": l1, "lpips": lp, "rank": rank, "kept": kept})
    # The final losses: means over the last tenth of the values (R1: of its lazy steps), less noisy than one step.
    final = {key: float(np.mean(vals[-max(1, len(vals) // 10):])) for key, vals in history.items() if vals}
    report = {
        "seen": n, "kept": int(kept.sum()), "quarantined": k, "fraction": fraction, "threshold": threshold,
        "steps": steps, "final_losses": final, "resolution": resolution, "seed": seed, "device": str(device),
        "lpips": lpips.name, "lambda_l1": lambda_l1, "lambda_lpips": lambda_lpips, "lambda_w": lambda_w,
    }
    quarantine = []
    for i in order[:k]:
        quarantine.append({"path": rows["path"][i], "score": float(scores[i]),
                           "reason": f"self-filter: reconstruction error {scores[i]:.3g} ≥ threshold {threshold:.3g} "
                                     f"(worst {fraction:.0%}: {k} of {n})"})

    with stage_output(out, STAGE, (src,), force) as tmp:
        for rel, keep in zip(rows["path"], kept, strict=True):
            dest = tmp / rel if keep else tmp / "quarantine" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if keep:
                link_or_copy(src / rel, dest)
            else:
                shutil.copy2(src / rel, dest)
        pd.DataFrame(quarantine, columns=["path", "reason", "score"]).to_csv(tmp / "quarantine.csv", index=False)
        table.to_csv(tmp / "scores.csv", index=False)
        write_manifest(tmp, rows[kept].drop(columns=["sha256"]).to_dict("records"))
        _plot_scores(scores, threshold, fraction, tmp / "scores.png")
        write_json_atomic(tmp / REPORT, report)
    return {"seen": n, "kept": int(kept.sum()), "quarantined": k, "threshold": threshold}
