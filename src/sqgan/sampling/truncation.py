"""Multi-modal truncation (Mokady et al., "Self-Distilled StyleGAN: Towards Generation from Internet Photos",
SIGGRAPH 2022; DESIGN.md §2.4).

StyleGAN's truncation pulls every w toward one mean w_avg, which on a multi-modal dataset lands between modes.
The paper instead clusters the mapped w into N = 64 centres with k-means and pulls a sample toward the centre whose
*image* is perceptually nearest to its own (LPIPS):

    w ← c + ψ (w − c)        c = the assigned centre; ψ = 1 leaves w as it is, ψ = 0 gives the centre itself

Here: fitting the centres (`fit_centres`), rendering w the way `Generator.forward` does after mapping
(`synthesize`), a cache of centres + their images beside a checkpoint (`save_centres`, `load_centres`,
`load_or_fit`), the two assignments (`assign_lpips`, the paper's; `assign_l2`, nearest in W, an ablation) and
`sample`, which `sqgan sample` calls. Global truncation toward w_avg (StyleGAN's) is the baseline.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from sklearn.cluster import KMeans
from torch import nn
from torchmetrics.functional.image.lpips import _normalize_tensor
from tqdm.auto import tqdm

from sqgan.io import atomic_path, read_torch_file
from sqgan.metrics.evaluate import Z_CHUNK, to_uint8
from sqgan.metrics.features import state_sha256

CACHE_FORMAT = 1
DEFAULT_N = 60_000  # mapped w the paper clusters
DEFAULT_CLUSTERS = 64  # N centres in the paper
CACHE_SUFFIX = ".mmt-centres.pt"

Mode = Literal["multimodal", "global", "none"]
Assign = Literal["lpips", "l2"]


# ---------------------------------------------------------------------------------------------------- helpers
def check_psi(psi: float) -> float:
    """ψ as a float; an error for negative, NaN or infinite ψ (ψ > 1 extrapolates away from the centre, allowed)."""
    value = float(psi)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"truncation psi must be a finite number ≥ 0 (1 = no truncation, 0 = the centre itself; "
                         f"0.5–0.7 is usual), got {psi}")
    return value


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextlib.contextmanager
def _eval_mode(G: nn.Module) -> Iterator[None]:
    """G in eval mode for the duration (so the mapping does not update w_avg), its own mode restored after."""
    was_training = G.training
    G.eval()
    try:
        yield
    finally:
        G.train(was_training)


def _require_mapping(G: nn.Module, what: str) -> None:
    if getattr(G, "mapping", None) is None:
        raise ValueError(f"{what} needs a mapping network z → w, and this generator has none (DCGAN/SNGAN with "
                         f"sq.enabled=false, where w is z ~ N(0, I)); train with model.arch=stylegan2 or "
                         f"sq.enabled=true, or sample with mode='none'")


def _z_chunks(n: int, z_dim: int, seed: int) -> Iterator[torch.Tensor]:
    """n z ~ N(0, I) from a CPU generator seeded `seed`, drawn in whole chunks of Z_CHUNK as `generate_uint8` does:
    the same z on any device and for any batch size."""
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, Z_CHUNK):
        yield torch.randn(Z_CHUNK, z_dim, generator=gen)[: n - start]


# ---------------------------------------------------------------------------------------------------- rendering
def synthesize(G: nn.Module, w: torch.Tensor, noise_mode: str = "const",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """w [B, w_dim] (un-quantized) → images [B, 3, R, R] in [-1, 1], as `Generator.forward` goes on after mapping:
    the style quantizer when G has one, w broadcast to num_ws styles, synthesis."""
    if G.quantizer is not None:  # SQ-GAN's synthesis only ever sees quantized styles
        w = G.quantizer(w).quantized
    ws = w[:, None, :].expand(-1, G.num_ws, -1)
    return G.synthesis(ws, generator=generator, noise_mode=noise_mode)


@torch.no_grad()
def render_uint8(G: nn.Module, w: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """uint8 images [B, 3, R, R] (on the CPU) of w [B, w_dim], const noise, `batch` at a time on G's device."""
    device = _device_of(G)
    with _eval_mode(G):
        return torch.cat([to_uint8(synthesize(G, part.to(device))).cpu() for part in w.split(batch)])


# ---------------------------------------------------------------------------------------------------- fitting
@torch.no_grad()
def mapped_w(G: nn.Module, n: int, seed: int = 0, batch: int = 1024, device: torch.device | str | None = None,
             progress: bool = False) -> torch.Tensor:
    """n un-quantized w [n, w_dim] (float32, CPU) of z ~ N(0, I) seeded `seed`, mapped `batch` at a time on
    `device` (G is moved there; default: where G is), G in eval mode, no grad.

    Un-quantized: the paper clusters W itself, and truncation moves w before the quantizer sees it."""
    _require_mapping(G, "multi-modal truncation")
    device = torch.device(device) if device is not None else _device_of(G)
    G.to(device)
    out: list[torch.Tensor] = []
    with _eval_mode(G):
        bar = tqdm(total=n, desc="mapping z → w", unit="w", disable=not progress)
        for z in _z_chunks(n, G.z_dim, seed):
            for part in z.split(batch):
                out.append(G.mapping(part.to(device), update_w_avg=False).float().cpu())
                bar.update(len(part))
        bar.close()
    return torch.cat(out) if out else torch.zeros(0, G.w_dim)


def kmeans_centres(w: torch.Tensor, n_clusters: int = DEFAULT_CLUSTERS, seed: int = 0
                   ) -> tuple[torch.Tensor, float]:
    """(k-means centres [n_clusters, w_dim] of w [n, w_dim], their inertia: Σ over w of the squared distance to its
    nearest centre, the y of the paper's elbow plot): scikit-learn's KMeans with random init, as the paper
    (defaults otherwise: Lloyd, n_init chosen by sklearn, tol 1e-4)."""
    if n_clusters < 1 or len(w) < n_clusters:
        raise ValueError(f"k-means needs 1 ≤ n_clusters ≤ number of w, got n_clusters={n_clusters} for {len(w)} w; "
                         f"map more z (n) or ask for fewer clusters")

    km = KMeans(n_clusters=n_clusters, init="random", random_state=seed)
    km.fit(w.detach().cpu().float().numpy())
    return torch.from_numpy(km.cluster_centers_).float(), float(km.inertia_)


@dataclass
class Centres:
    """The truncation centres of one generator, the images they render to, and how they were made."""

    w: torch.Tensor  # [N, w_dim] float32, un-quantized
    images: torch.Tensor  # [N, 3, R, R] uint8, const noise
    n: int  # mapped w they were fitted on
    seed: int  # of z and of k-means
    g_sha256: str  # `generator_fingerprint` of the G they belong to
    inertia: float | None = None  # k-means inertia on those n w (None: a cache written before it was kept)

    @property
    def n_clusters(self) -> int:
        return int(self.w.shape[0])

    @property
    def w_dim(self) -> int:
        return int(self.w.shape[1])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])


def generator_fingerprint(G: nn.Module) -> str:
    """sha256 of G's weights and buffers (mapping, style quantizer, synthesis with its const noise): everything the
    centres and their images depend on."""
    return state_sha256(G)


def fit_centres(G: nn.Module, n: int = DEFAULT_N, n_clusters: int = DEFAULT_CLUSTERS, seed: int = 0,
                batch: int = 1024, device: torch.device | str | None = None, progress: bool = False) -> Centres:
    """Map n seeded z to w, k-means them into n_clusters centres, render each centre once."""
    w = mapped_w(G, n, seed, batch, device, progress)
    centres, inertia = kmeans_centres(w, n_clusters, seed)
    images = render_uint8(G, centres, batch=min(batch, 64))
    return Centres(centres, images, n, seed, generator_fingerprint(G), inertia)


# ---------------------------------------------------------------------------------------------------- cache
def centres_path(checkpoint: str | Path) -> Path:
    """Where the centres of `checkpoint` are cached: beside it, `<stem>.mmt-centres.pt`."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + CACHE_SUFFIX)


def save_centres(centres: Centres, path: str | Path) -> Path:
    """Write the centres, their images and the settings they were made with to `path` atomically."""
    payload = {"format": CACHE_FORMAT, "w": centres.w.detach().cpu().contiguous(),
               "images": centres.images.detach().cpu().contiguous(), "n": centres.n, "n_clusters": centres.n_clusters,
               "seed": centres.seed, "w_dim": centres.w_dim, "resolution": centres.resolution,
               "g_sha256": centres.g_sha256, "inertia": centres.inertia}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


class StaleCentres(ValueError):
    """A centres cache made for another generator or with other settings."""


def load_centres(path: str | Path, G: nn.Module, n: int = DEFAULT_N, n_clusters: int = DEFAULT_CLUSTERS,
                 seed: int = 0) -> Centres:
    """The cached centres at `path`, refused (StaleCentres) unless they were made for this G's weights with these
    settings; a missing or unreadable file is an error naming it."""
    path = Path(path)
    fix = "delete it, or call sqgan.sampling.truncation.load_or_fit to refit"
    saved = read_torch_file(path, "truncation centres", fix)
    if not isinstance(saved, dict) or saved.get("format") != CACHE_FORMAT:
        raise StaleCentres(f"truncation centres {path}: not a format-{CACHE_FORMAT} centres file; {fix}")
    want = {"n": n, "n_clusters": n_clusters, "seed": seed, "w_dim": G.w_dim, "g_sha256": generator_fingerprint(G)}
    differ = [f"{k} {saved.get(k)!r} ≠ {v!r}" for k, v in want.items() if saved.get(k) != v]
    if differ:
        what = "; ".join("G's weights differ" if d.startswith("g_sha256") else d for d in differ)
        raise StaleCentres(f"truncation centres {path} were made for another generator or settings ({what}); {fix}")
    return Centres(saved["w"], saved["images"], saved["n"], saved["seed"], saved["g_sha256"], saved.get("inertia"))


def load_or_fit(G: nn.Module, path: str | Path, n: int = DEFAULT_N, n_clusters: int = DEFAULT_CLUSTERS,
                seed: int = 0, batch: int = 1024, device: torch.device | str | None = None,
                progress: bool = False) -> tuple[Centres, bool]:
    """(centres, fitted): the cache at `path` when it matches G and the settings, else fitted anew and written
    there (a stale or damaged cache is replaced, never used)."""
    path = Path(path)
    if path.is_file():
        try:
            return load_centres(path, G, n, n_clusters, seed), False
        except ValueError:  # StaleCentres, or a damaged file: both are refitted
            pass
    centres = fit_centres(G, n, n_clusters, seed, batch, device, progress)
    save_centres(centres, path)
    return centres, True


# ---------------------------------------------------------------------------------------------------- assignment
def _lpips_parts(lpips_net: nn.Module) -> nn.Module:
    """torchmetrics' LPIPS module inside `LPIPSNet`, checked to be the plain form `lpips_features` decomposes."""
    net = getattr(lpips_net, "net", lpips_net)
    if getattr(net, "spatial", False) or getattr(net, "resize", None) is not None:
        raise ValueError("assign_lpips needs LPIPS without spatial output or resizing (sqgan's LPIPSNet)")
    return net


@torch.no_grad()
def lpips_features(images_uint8: torch.Tensor, lpips_net: nn.Module) -> list[torch.Tensor]:
    """Per LPIPS layer, the channel-normalised backbone features [B, C_k, H_k, W_k] of uint8 images (on the LPIPS
    net's device): LPIPS(a, b) = Σ_k mean_hw(lin_k((f_k(a) − f_k(b))²)) (Zhang et al. 2018, Eq. 1)."""
    net = _lpips_parts(lpips_net)
    x = images_uint8.to(_device_of(net)).float() / 127.5 - 1.0  # as LPIPSNet.forward
    outs = net.net(net.scaling_layer(x))
    return [_normalize_tensor(outs[k]) for k in range(net.L)]


def _lin_weights(lpips_net: nn.Module) -> list[torch.Tensor]:
    """The 1×1 linear heads' weights per layer [C_k] (dropout is off in eval)."""
    net = _lpips_parts(lpips_net)
    return [lin.model[-1].weight.reshape(-1) for lin in net.lins]


@torch.no_grad()
def lpips_distances(images_uint8: torch.Tensor, centre_images_uint8: torch.Tensor, lpips_net: nn.Module,
                    batch: int = 64, centre_features: list[torch.Tensor] | None = None) -> torch.Tensor:
    """LPIPS [B, N] between every image and every centre image, `batch` images at a time.

    The backbone runs once per image and once per centre (not once per pair): with v_k the head's weights over the
    H_k·W_k pixels, mean_hw Σ_c v_c (a − b)² = A(a) + A(b) − 2⟨a, b⟩_v, a matrix product over pairs."""
    weights = _lin_weights(lpips_net)
    if centre_features is None:
        centre_features = lpips_features(centre_images_uint8, lpips_net)
    flat_c = [f.flatten(1) for f in centre_features]
    scales = [(v[:, None] / (f.shape[2] * f.shape[3])).expand(-1, f.shape[2] * f.shape[3]).reshape(-1)
              for v, f in zip(weights, centre_features, strict=True)]  # v_c / (H·W), per flattened feature
    norm_c = [(fc.square() * s).sum(1) for fc, s in zip(flat_c, scales, strict=True)]
    out = []
    for part in images_uint8.split(batch):
        d = torch.zeros(len(part), len(centre_images_uint8), device=flat_c[0].device)
        for f, fc, s, nc in zip(lpips_features(part, lpips_net), flat_c, scales, norm_c, strict=True):
            fa = f.flatten(1)
            d += (fa.square() * s).sum(1)[:, None] + nc[None, :] - 2.0 * (fa * s) @ fc.t()
        out.append(d.cpu())
    return torch.cat(out) if out else torch.zeros(0, len(centre_images_uint8))


def assign_lpips(images_uint8: torch.Tensor, centre_images_uint8: torch.Tensor, lpips_net: nn.Module,
                 batch: int = 64, centre_features: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Index [B] of the LPIPS-nearest centre image of each image: the paper's assignment (perceptual, not in W)."""
    return lpips_distances(images_uint8, centre_images_uint8, lpips_net, batch, centre_features).argmin(dim=1)


def assign_l2(w: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index [B] of the nearest centre in W (Euclidean): the ablation of the paper's perceptual assignment."""
    return torch.cdist(w.float(), centres.to(w.device).float()).argmin(dim=1)


# ---------------------------------------------------------------------------------------------------- truncation
def truncate_toward(w: torch.Tensor, centres: torch.Tensor, psi: float) -> torch.Tensor:
    """w ← c + ψ (w − c) per row, c [B, w_dim] its assigned centre (the paper's multi-modal truncation);
    lerp is exact at both ends: ψ = 1 returns w, ψ = 0 returns c."""
    return torch.lerp(centres.to(w), w, check_psi(psi))


def truncate_global(G: nn.Module, w: torch.Tensor, psi: float) -> torch.Tensor:
    """w ← w_avg + ψ (w − w_avg): StyleGAN's truncation toward the running mean of w (the baseline)."""
    _require_mapping(G, "global truncation")
    if not hasattr(G.mapping, "w_avg"):
        raise ValueError("global truncation needs a mapping network that tracks w_avg (StyleGAN2's, or sq.enabled)")
    return G.mapping.w_avg.to(w).lerp(w, check_psi(psi))


@dataclass
class Samples:
    images: torch.Tensor  # uint8 [B, 3, R, R] on the CPU
    w: torch.Tensor  # the (truncated, un-quantized) w they were rendered from [B, w_dim], CPU
    assignment: torch.Tensor | None  # index of the centre each sample was truncated toward [B]; None unless multimodal


@torch.no_grad()
def check_multimodal(G: nn.Module, assign: str, centres: Centres | None, lpips_net: nn.Module | None) -> None:
    """What multi-modal truncation needs, each lack a ValueError naming the fix (sample.assign / the centres)."""
    if assign not in ("lpips", "l2"):
        raise ValueError(f"truncation assign (sample.assign) must be lpips or l2, got {assign!r}")
    if centres is None:
        raise ValueError("multimodal truncation needs centres: fit_centres(G) or load_or_fit(G, path)")
    if centres.w_dim != G.w_dim:
        raise ValueError(f"centres have w_dim {centres.w_dim} but G has {G.w_dim}: they belong to another "
                         f"generator; refit them (load_or_fit)")
    if assign == "lpips" and lpips_net is None:
        raise ValueError("assign='lpips' needs an LPIPS net: sqgan.metrics.features.LPIPSNet(weights=…) (ImageNet "
                         "AlexNet weights, as the paper), or sample.assign=l2")


def sample(G: nn.Module, z: torch.Tensor, psi: float = 0.7, mode: Mode = "multimodal", assign: Assign = "lpips",
           centres: Centres | None = None, lpips_net: nn.Module | None = None, batch: int = 64,
           noise_mode: str = "const") -> Samples:
    """Images of z [B, z_dim] with truncation ψ: `multimodal` toward each sample's assigned centre (assign `lpips`:
    the centre whose image is LPIPS-nearest to the untruncated image, the paper's; `l2`: nearest in W), `global`
    toward w_avg, `none` untruncated. Runs on G's device, `batch` z at a time, G in eval mode."""
    psi = check_psi(psi)
    if mode not in ("multimodal", "global", "none"):
        raise ValueError(f"truncation mode must be multimodal, global or none, got {mode!r}")
    if mode == "multimodal":
        check_multimodal(G, assign, centres, lpips_net)
    device = _device_of(G)
    images, ws, assignment = [], [], []
    centre_w = centre_feats = None
    if mode == "multimodal":
        centre_w = centres.w.to(device)
        if assign == "lpips":
            centre_feats = lpips_features(centres.images, lpips_net)
    with _eval_mode(G):
        for part in z.split(batch):
            part = part.to(device)
            w = part if G.mapping is None else G.mapping(part, update_w_avg=False)
            if mode == "global":
                w = truncate_global(G, w, psi)
            elif mode == "multimodal":
                if assign == "lpips":  # the paper assigns by the image the untruncated w renders to
                    seen = to_uint8(synthesize(G, w, noise_mode))
                    idx = assign_lpips(seen, centres.images, lpips_net, len(seen), centre_feats).to(device)
                else:
                    idx = assign_l2(w, centre_w)
                w = truncate_toward(w, centre_w[idx], psi)
                assignment.append(idx.cpu())
            images.append(to_uint8(synthesize(G, w, noise_mode)).cpu())
            ws.append(w.cpu())
    return Samples(torch.cat(images), torch.cat(ws), torch.cat(assignment) if assignment else None)
