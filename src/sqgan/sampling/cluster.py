"""Cluster-guided sampling (DESIGN.md §2.4, seed 004): k-means in a feature space of generated images, then a
per-cluster latent sampler learned with IMLE (Li & Malik 2018, "Implicit Maximum Likelihood Estimation") that draws
codes whose images fall in a chosen cluster.

  1. `cluster_latents`: n seeded z → G → features → KMeans(k): centroids, labels and the z of each cluster.
  2. `nearest_centroid`: the classifier that judges a drawn image (argmin of the Euclidean distance to the
     centroids: the rule k-means assigns by, in the same feature space).
  3. `ClusterLatentMaps` + `train_imle`: T_j: e ~ N(0, I) → z for each cluster j, trained so that every member z of
     cluster j has a sample T_j(e) near it.
  4. `ClusterSampler.sample(j, n)`: e → T_j → z → G → images of cluster j; `save`/`load`.
  5. `cluster_accuracy` (how often a drawn image's nearest centroid is the asked cluster, against unconditional
     sampling as chance) and `fid_cost` (FID of the sampler minus FID of unconditional sampling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn
from tqdm import tqdm

from sqgan.io import atomic_path, read_torch_file
from sqgan.metrics.evaluate import Z_CHUNK, to_uint8
from sqgan.metrics.features import state_sha256
from sqgan.metrics.fid import fid_from_features

# uint8 images [B, 3, H, W] → features [B, F], or (pool, logits) as RandomCNNFeatures / InceptionFeatures return
FeatureFn = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, ...]"]
SAMPLER_FORMAT = "sqgan-cluster-sampler/1"  # the `format` of a saved sampler; a change of layout bumps it
LEAKY_SLOPE = 0.2  # of the latent maps' hidden activations


# ------------------------------------------------------------------------------------------ images and features
def seeded_latents(n: int, z_dim: int, seed: int) -> torch.Tensor:
    """[n, z_dim] z ~ N(0, I) drawn exactly as `generate_uint8` draws them (CPU generator, whole chunks of Z_CHUNK),
    so their images are that function's images for the same seed, on any device and with any batch size."""
    gen = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(Z_CHUNK, z_dim, generator=gen)[: n - start] for start in range(0, n, Z_CHUNK)]
    return torch.cat(chunks) if chunks else torch.zeros(0, z_dim)


@torch.no_grad()
def image_batches(G: nn.Module, z: torch.Tensor, batch: int = 64,
                  device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """uint8 [B, 3, R, R] CPU images of G (const noise, as evaluation) for the rows of z, `batch` at a time."""
    G.eval()
    for start in range(0, len(z), batch):
        yield to_uint8(G(z[start : start + batch].to(device), noise_mode="const").images).cpu()


def feature_name(feature_fn: FeatureFn) -> str:
    """How a feature function is named in a sampler's metadata: its `name` (sqgan's feature nets), else its type."""
    return str(getattr(feature_fn, "name", None) or getattr(feature_fn, "__name__", None) or type(feature_fn).__name__)


@torch.no_grad()
def image_features(feature_fn: FeatureFn, batches: Iterator[torch.Tensor] | list[torch.Tensor], total: int,
                   device: torch.device | str = "cpu", progress: bool = False,
                   desc: str = "features") -> torch.Tensor:
    """float64 [N, F] CPU features of uint8 image batches (a (pool, logits) net gives its pool: FID's features).

    Batches are consumed one at a time, so n images never sit in memory together (60k at 256 px would be 12 GB)."""
    feats = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for b in batches:
            f = feature_fn(b.to(device))
            if isinstance(f, tuple):
                f = f[0]
            feats.append(f.reshape(len(b), -1).double().cpu())
            bar.update(len(b))
    if not feats:
        raise ValueError("image_features: no images were given; draw at least one")
    return torch.cat(feats)


def latent_features(G: nn.Module, z: torch.Tensor, feature_fn: FeatureFn, batch: int = 64,
                    device: torch.device | str = "cpu", progress: bool = False, desc: str = "features") -> torch.Tensor:
    """float64 [N, F]: features of G's images of the rows of z, generated and extracted batch by batch."""
    return image_features(feature_fn, image_batches(G, z, batch, device), len(z), device, progress, desc)


# ------------------------------------------------------------------------------------------ clustering
@dataclass
class LatentClusters:
    """KMeans on the features of G's images of seeded codes, with the codes kept (the IMLE targets)."""

    z: torch.Tensor  # [n, z_dim] the seeded codes (`seeded_latents(n, z_dim, seed)`)
    features: torch.Tensor  # [n, F] float64 features of their images
    labels: torch.Tensor  # [n] int64 KMeans' cluster of each code
    centroids: torch.Tensor  # [k, F] float64 KMeans' centres
    seed: int  # of the codes and of KMeans
    feature_net: str  # the feature function's name

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def sizes(self) -> torch.Tensor:
        """[k] int64 members per cluster."""
        return torch.bincount(self.labels, minlength=self.k)

    def members(self, j: int) -> torch.Tensor:
        """[n_j, z_dim] the codes of cluster j (the targets its latent map learns)."""
        return self.z[self.labels == j]


def cluster_latents(G: nn.Module, z_dim: int, n: int, k: int, feature_fn: FeatureFn, seed: int = 0,
                    n_init: int = 10, batch: int = 64, device: torch.device | str = "cpu",
                    progress: bool = False) -> LatentClusters:
    """n codes z (`seeded_latents`, seed `seed`) → G → `feature_fn` → KMeans(k, random_state=seed, n_init)."""
    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"cluster-guided sampling: k must be in [1, n] with n ≥ 1, got k = {k}, n = {n}; "
                         f"generate at least k images")
    z = seeded_latents(n, z_dim, seed)
    features = latent_features(G, z, feature_fn, batch, device, progress, "features of generated images")
    km = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(features.numpy())
    return LatentClusters(z, features, torch.from_numpy(km.labels_).long(),
                          torch.from_numpy(km.cluster_centers_).double(), seed, feature_name(feature_fn))


def nearest_centroid(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[N] int64 index of each row's nearest centroid (Euclidean: the distance KMeans clustered by)."""
    if features.ndim != 2 or centroids.ndim != 2 or features.shape[1] != centroids.shape[1]:
        raise ValueError(f"nearest_centroid needs features [N, F] and centroids [k, F] of one F, got "
                         f"{tuple(features.shape)} and {tuple(centroids.shape)}")
    return torch.cdist(features.double(), centroids.double()).argmin(dim=1)


# ------------------------------------------------------------------------------------------ IMLE latent maps
class ClusterLatentMaps(nn.Module):
    """T_j(e) = e + MLP_j(e) for clusters j = 0..k−1, e ~ N(0, I) of z's size.

    One MLP per cluster rather than one network conditioned on j: clusters are separate IMLE problems, so their
    maps never compete for capacity and a cluster's map sees only its own members. The k MLPs' weights are stacked
    [k, in, out] and run with batched matmuls, so training all clusters is one step, not k. The last layer starts at
    zero: an untrained T_j is the identity, i.e. the unconditional prior z = e, and training moves mass from there.
    """

    def __init__(self, k: int, z_dim: int, hidden: int = 256, layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        if k < 1 or z_dim < 1 or hidden < 1 or layers < 0:
            raise ValueError(f"ClusterLatentMaps needs k, z_dim, hidden ≥ 1 and layers ≥ 0, got k = {k}, "
                             f"z_dim = {z_dim}, hidden = {hidden}, layers = {layers}")
        self.k, self.z_dim, self.hidden, self.layers = k, z_dim, hidden, layers
        dims = [z_dim] + [hidden] * layers + [z_dim]
        g = torch.Generator().manual_seed(seed)  # its own generator: the init is a function of `seed` alone
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            bound = 0.0 if i == len(dims) - 2 else 1 / math.sqrt(a)  # nn.Linear's U(±1/√fan_in); last layer 0
            self.weights.append(nn.Parameter((torch.rand(k, a, b, generator=g) * 2 - 1) * bound))
            self.biases.append(nn.Parameter((torch.rand(k, b, generator=g) * 2 - 1) * bound))

    def forward(self, e: torch.Tensor, clusters: torch.Tensor | None = None) -> torch.Tensor:
        """e [c, m, z_dim] → z [c, m, z_dim]: row block i through T_{clusters[i]} (default: block j through T_j)."""
        idx = torch.arange(self.k, device=e.device) if clusters is None else clusters.to(e.device)
        if e.ndim != 3 or e.shape[0] != len(idx) or e.shape[2] != self.z_dim:
            raise ValueError(f"ClusterLatentMaps takes e [{len(idx)}, m, {self.z_dim}], got {tuple(e.shape)}")
        h = e
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b[idx][:, None, :], h, w[idx])
            if i < len(self.weights) - 1:
                h = F.leaky_relu(h, LEAKY_SLOPE)
        return e + h

    def map_cluster(self, j: int, e: torch.Tensor) -> torch.Tensor:
        """e [n, z_dim] → T_j(e) [n, z_dim]."""
        return self(e[None], torch.tensor([j], device=e.device))[0]


def imle_loss(targets: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """IMLE's objective (Li & Malik 2018, eq. 1 with the squared L2 distance): for each target its nearest sample,
    mean over targets of ‖target − nearest sample‖². targets [..., b, d], samples [..., m, d] → [...].

    Nearest *sample* for each target, not the reverse: every target must be reachable (no mode is dropped), while a
    sample near no target is left alone."""
    with torch.no_grad():  # the search picks a sample; the gradient flows through the chosen one only
        nearest = torch.cdist(targets, samples).argmin(dim=-1)  # [..., b]
    chosen = torch.gather(samples, -2, nearest[..., None].expand(*nearest.shape, samples.shape[-1]))
    return (targets - chosen).pow(2).sum(dim=-1).mean(dim=-1)


def train_imle(maps: ClusterLatentMaps, members: list[torch.Tensor], steps: int = 2000, num_samples: int = 128,
               targets_per_step: int = 64, lr: float = 1e-3, seed: int = 0, device: torch.device | str = "cpu",
               progress: bool = False) -> list[float]:
    """Train every T_j with IMLE on its cluster's member codes `members[j]` [n_j, z_dim]; returns each step's loss
    (mean over clusters of `imle_loss`).

    Each step draws `targets_per_step` members of every cluster (with replacement, so small and large clusters take
    the same step) and `num_samples` fresh candidates T_j(e) (m in the paper), finds each target's nearest candidate
    and moves it toward the target (Adam). Fresh candidates each step, rather than the paper's nearest neighbours
    reused for several epochs: the search is a cdist of [b, m] per cluster, cheaper than the step itself here."""
    if len(members) != maps.k:
        raise ValueError(f"train_imle: {len(members)} member sets for {maps.k} latent maps; give one per cluster")
    empty = [j for j, m in enumerate(members) if len(m) == 0]
    if empty:
        raise ValueError(f"train_imle: clusters {empty} have no members; cluster more images or use a smaller k")
    if steps < 0 or num_samples < 1 or targets_per_step < 1:
        raise ValueError(f"train_imle needs steps ≥ 0, num_samples ≥ 1 and targets_per_step ≥ 1, got {steps}, "
                         f"{num_samples}, {targets_per_step}")
    gen = torch.Generator().manual_seed(seed)  # draws on the CPU: a run is a function of its seed on any device
    maps.to(device).train()
    everything = torch.cat([m.float() for m in members]).to(device)  # [Σ n_j, z_dim]
    sizes = torch.tensor([len(m) for m in members])
    offsets = torch.cumsum(sizes, 0) - sizes  # where cluster j's members start in `everything`
    opt = torch.optim.Adam(maps.parameters(), lr=lr)
    losses: list[float] = []
    for _ in tqdm(range(steps), desc="IMLE latent maps", unit="step", disable=not progress, leave=False):
        pick = (torch.rand(maps.k, targets_per_step, generator=gen) * sizes[:, None]).long()
        pick = torch.minimum(pick, sizes[:, None] - 1) + offsets[:, None]  # [k, b] rows of `everything`
        targets = everything[pick.to(device)]  # [k, b, z_dim]
        e = torch.randn(maps.k, num_samples, maps.z_dim, generator=gen).to(device)
        per_cluster = imle_loss(targets, maps(e))  # [k]
        opt.zero_grad(set_to_none=True)
        per_cluster.sum().backward()  # a sum: each map's gradient is its own cluster's loss, whatever k is
        opt.step()
        losses.append(float(per_cluster.detach().mean()))
    maps.eval()
    return losses


def proportional_counts(sizes: torch.Tensor | list[int], n: int) -> list[int]:
    """n split over clusters in proportion to `sizes` (largest remainder: the counts sum to n exactly)."""
    s = torch.as_tensor(sizes, dtype=torch.float64)
    if s.ndim != 1 or len(s) == 0 or (s < 0).any() or s.sum() <= 0 or n < 0:
        raise ValueError(f"proportional_counts needs non-negative sizes with a positive sum and n ≥ 0, got "
                         f"{s.tolist()} and {n}")
    quota = s / s.sum() * n
    counts = quota.floor().long()
    short = n - int(counts.sum())
    order = torch.argsort(quota - counts, descending=True, stable=True)  # ties go to the lower index
    counts[order[:short]] += 1
    return counts.tolist()


# ------------------------------------------------------------------------------------------ the sampler
class ClusterSampler:
    """G with a trained latent map per cluster, and the clusters (centroids, sizes) it was fit on.

    G is not saved with the sampler (its checkpoint is training's); `meta["generator_sha256"]` names the G it was
    fit with, and `load` refuses another."""

    def __init__(self, G: nn.Module, maps: ClusterLatentMaps, centroids: torch.Tensor, sizes: torch.Tensor,
                 meta: dict[str, Any] | None = None, losses: list[float] | None = None,
                 device: torch.device | str = "cpu") -> None:
        if not centroids.shape[0] == len(sizes) == maps.k:
            raise ValueError(f"ClusterSampler: {centroids.shape[0]} centroids, {len(sizes)} sizes and {maps.k} "
                             f"latent maps; all three must count the same clusters")
        self.G, self.maps, self.device = G, maps.to(device).eval(), torch.device(device)
        self.centroids = centroids.detach().double().cpu()
        self.sizes = torch.as_tensor(sizes).long().cpu()
        self.meta = dict(meta or {})
        self.losses = list(losses or [])

    @property
    def k(self) -> int:
        return self.maps.k

    @property
    def z_dim(self) -> int:
        return self.maps.z_dim

    def _check(self, j: int) -> None:
        if not 0 <= j < self.k:
            raise ValueError(f"cluster {j} does not exist: this sampler has clusters 0..{self.k - 1}")

    @torch.no_grad()
    def latents(self, j: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[n, z_dim] CPU codes of cluster j: T_j(e), e ~ N(0, I) drawn on the CPU from `generator`."""
        self._check(j)
        e = torch.randn(n, self.z_dim, generator=generator)
        return self.maps.map_cluster(j, e.to(self.device)).cpu()

    def sample(self, j: int, n: int, generator: torch.Generator | None = None, batch: int = 64) -> torch.Tensor:
        """uint8 [n, 3, R, R]: G's images (const noise) of n codes of cluster j."""
        z = self.latents(j, n, generator)
        return torch.cat(list(image_batches(self.G, z, batch, self.device)))

    @torch.no_grad()
    def mixture_latents(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [n, z_dim], cluster [n]): codes of every cluster in proportion to its size. e is
        `seeded_latents(n, z_dim, seed)` (cluster 0 takes the first rows, …): with identity maps these are
        exactly the unconditional codes of that seed."""
        counts = proportional_counts(self.sizes, n)
        cluster = torch.repeat_interleave(torch.arange(self.k), torch.tensor(counts))
        e = seeded_latents(n, self.z_dim, seed)
        z = torch.empty_like(e)
        for j in range(self.k):
            rows = cluster == j
            if rows.any():
                z[rows] = self.maps.map_cluster(j, e[rows].to(self.device)).cpu()
        return z, cluster

    def save(self, path: str | Path) -> None:
        """State dicts and metadata only (loadable with torch.load(weights_only=True)), written atomically."""
        payload = {"format": SAMPLER_FORMAT, "meta": self.meta,
                   "maps": {name: t.detach().cpu() for name, t in self.maps.state_dict().items()},
                   "centroids": self.centroids, "sizes": self.sizes,
                   "losses": torch.tensor(self.losses, dtype=torch.float64)}
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, path: str | Path, G: nn.Module, device: torch.device | str = "cpu") -> ClusterSampler:
        """A saved sampler for the G it was fit with (checked by its weights' sha256)."""
        fix = "give a file written by ClusterSampler.save"
        saved = read_torch_file(path, "cluster sampler", fix)
        if not isinstance(saved, dict) or saved.get("format") != SAMPLER_FORMAT:
            got = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"cluster sampler {path} has format {got!r}, not {SAMPLER_FORMAT!r}; {fix}")
        meta = saved["meta"]
        want = meta.get("generator_sha256")
        if want is not None and want != state_sha256(G):
            raise ValueError(f"cluster sampler {path} was fit for the generator with weights sha256 {want[:12]}…, "
                             f"not this one ({state_sha256(G)[:12]}…); load it with the G it was fit on, or refit")
        maps = ClusterLatentMaps(meta["k"], meta["z_dim"], meta["hidden"], meta["layers"])
        maps.load_state_dict(saved["maps"])
        return cls(G, maps, saved["centroids"], saved["sizes"], meta, saved["losses"].tolist(), device)


def fit_cluster_sampler(G: nn.Module, clusters: LatentClusters, steps: int = 2000, hidden: int = 256,
                        layers: int = 2, num_samples: int = 128, targets_per_step: int = 64, lr: float = 1e-3,
                        seed: int = 0, device: torch.device | str = "cpu", progress: bool = False) -> ClusterSampler:
    """A latent map per cluster of `clusters`, trained with IMLE on each cluster's codes (`train_imle`)."""
    z_dim = int(clusters.z.shape[1])
    maps = ClusterLatentMaps(clusters.k, z_dim, hidden, layers, seed)
    losses = train_imle(maps, [clusters.members(j) for j in range(clusters.k)], steps, num_samples,
                        targets_per_step, lr, seed, device, progress)
    meta = {"k": clusters.k, "z_dim": z_dim, "hidden": hidden, "layers": layers, "steps": steps,
            "num_samples": num_samples, "targets_per_step": targets_per_step, "lr": lr, "seed": seed,
            "cluster_seed": clusters.seed, "n_clustered": int(len(clusters.z)), "feature_net": clusters.feature_net,
            "generator_sha256": state_sha256(G)}
    return ClusterSampler(G, maps, clusters.centroids, clusters.sizes, meta, losses, device)


# ------------------------------------------------------------------------------------------ evaluation
@dataclass
class ClusterAccuracy:
    """How often an image drawn for cluster j has nearest centroid j, for the sampler and for unconditional G."""

    per_cluster: list[float]  # sampler: fraction of cluster j's images whose nearest centroid is j
    overall: float  # sampler: over all its images (n per cluster, so the mean of per_cluster)
    unconditional_per_cluster: list[float]  # unconditional images with nearest centroid j: chance for cluster j
    unconditional_overall: float  # mean of those over clusters (1/k: what asking for a cluster gets by chance)
    confusion: list[list[int]]  # [j][i]: images drawn for cluster j whose nearest centroid is i
    n_per_cluster: int
    n_unconditional: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cluster_accuracy(sampler: ClusterSampler, feature_fn: FeatureFn, n_per_cluster: int = 100,
                     n_unconditional: int | None = None, seed: int = 0, batch: int = 64,
                     progress: bool = False) -> ClusterAccuracy:
    """Nearest-centroid accuracy of `n_per_cluster` images drawn for each cluster (e from a generator seeded
    `seed`), and the unconditional reference: `n_unconditional` (default k · n_per_cluster) images of
    `seeded_latents(…, seed)` classified the same way."""
    if n_per_cluster < 1:
        raise ValueError(f"cluster_accuracy: n_per_cluster must be ≥ 1, got {n_per_cluster}")
    k = sampler.k
    n_u = k * n_per_cluster if n_unconditional is None else n_unconditional
    if n_u < 1:
        raise ValueError(f"cluster_accuracy: n_unconditional must be ≥ 1, got {n_u}")
    gen = torch.Generator().manual_seed(seed)
    confusion = torch.zeros(k, k, dtype=torch.long)
    for j in range(k):
        z = sampler.latents(j, n_per_cluster, gen)
        f = latent_features(sampler.G, z, feature_fn, batch, sampler.device, progress, f"features of cluster {j}")
        confusion[j] = torch.bincount(nearest_centroid(f, sampler.centroids), minlength=k)
    per_cluster = (confusion.diag().double() / n_per_cluster).tolist()
    z_u = seeded_latents(n_u, sampler.z_dim, seed)
    f_u = latent_features(sampler.G, z_u, feature_fn, batch, sampler.device, progress, "features of unconditional")
    share = (torch.bincount(nearest_centroid(f_u, sampler.centroids), minlength=k).double() / n_u).tolist()
    return ClusterAccuracy(per_cluster, float(confusion.diag().sum()) / (k * n_per_cluster), share,
                           sum(share) / k, confusion.tolist(), n_per_cluster, n_u)


@dataclass
class FIDCost:
    """FID of the sampler's images and of unconditional images against one reference, and the difference."""

    fid_sampler: float
    fid_unconditional: float
    cost: float  # fid_sampler − fid_unconditional: > 0 when guiding costs quality or diversity
    n: int
    counts: list[int]  # the sampler's images per cluster (in proportion to the cluster sizes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fid_cost(sampler: ClusterSampler, feature_fn: FeatureFn, reference_features: torch.Tensor, n: int = 10_000,
             seed: int = 0, batch: int = 64, progress: bool = False) -> FIDCost:
    """FID (`sqgan.metrics.fid`) against `reference_features` [N_r, F] (the same feature function's features of the
    reference images) of n sampler images drawn in proportion to the cluster sizes, minus that of n unconditional
    images (`seeded_latents(n, z_dim, seed)`, as `generate_uint8`). Both draw e from the same seed (common random
    numbers): the difference measures the latent maps, not the luck of the draw."""
    if n < 2:
        raise ValueError(f"fid_cost needs n ≥ 2 images, got {n}")
    z_s, cluster = sampler.mixture_latents(n, seed)
    f_s = latent_features(sampler.G, z_s, feature_fn, batch, sampler.device, progress, "features of cluster-guided")
    z_u = seeded_latents(n, sampler.z_dim, seed)
    f_u = latent_features(sampler.G, z_u, feature_fn, batch, sampler.device, progress, "features of unconditional")
    fid_s, fid_u = fid_from_features(reference_features, f_s), fid_from_features(reference_features, f_u)
    return FIDCost(fid_s, fid_u, fid_s - fid_u, n, torch.bincount(cluster, minlength=sampler.k).tolist())
