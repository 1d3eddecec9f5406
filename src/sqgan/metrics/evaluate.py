"""The one evaluation of a generator: the registry of quality metrics, the reference images, the real-feature
cache and `Evaluator`, which the training loop (interim and final), `sqgan eval` and the sweeps all call.

A metric value comes with its provenance (implementation and version, feature network and its weights' sha256,
resizer and resolution, reference split and N real, N generated, seeds); its name holds every part of that a user
can change (`sqgan.metrics.names`), so two values that share a name were computed alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch_fidelity
import torchmetrics
from torch import nn
from tqdm import tqdm

from sqgan.data.dataset import ManifestDataset
from sqgan.data.manifest import MANIFEST
from sqgan.io import atomic_path, sha256_file
from sqgan.metrics.features import LPIPSNet, build_feature_net, to_uint8
from sqgan.metrics.fid import fid_from_features
from sqgan.metrics.inception_score import inception_score
from sqgan.metrics.intra_fid import intra_class_fid
from sqgan.metrics.kid import kid_from_features
from sqgan.metrics.labels import classes_of, eval_labels
from sqgan.metrics.names import REFERENCED, metric_key
from sqgan.metrics.nn_modes import nn_mode_count
from sqgan.metrics.ppl_uniformity import INTERVALS, path_distances, ppl_paths, uniformity
from sqgan.metrics.precision_recall import precision_recall

CACHE_FORMAT = 1  # of the pool/logits entries; sFID's spatial features are a second entry, `<key>-spatial`


Z_CHUNK = 1024  # z is drawn in chunks of this size whatever the batch size, so the images do not depend on it


@torch.no_grad()
def generate_uint8(g_ema: nn.Module, n: int, z_dim: int, batch: int, seed: int,
                   device: torch.device) -> Iterator[torch.Tensor]:
    """n images of G_ema (const noise) in batches of `batch`. z comes from a CPU generator seeded `seed`, drawn in
    whole chunks of Z_CHUNK: for one seed, the same images on any device, with any batch size, and the first k of
    any n (so fid1k's images are the first of fid10k's). A conditional G draws image i in class i mod K."""
    g_ema.eval()
    gen = torch.Generator().manual_seed(seed)
    k = classes_of(g_ema)
    for chunk in range(0, n, Z_CHUNK):
        z = torch.randn(Z_CHUNK, z_dim, generator=gen)[: n - chunk]  # whole chunks: the first k images of any N agree
        for start in range(0, len(z), batch):
            part = z[start : start + batch]
            c = eval_labels(k, chunk + start, len(part))
            args = (part.to(device),) if c is None else (part.to(device), c.to(device))
            yield to_uint8(g_ema(*args, noise_mode="const").images)


# ------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Inputs:
    real: torch.Tensor | None  # real pool features [N_r, F]
    fake: torch.Tensor  # generated pool features [N, F]
    fake_logits: torch.Tensor  # [N, C]
    lpips: torch.Tensor | None  # per-pair LPIPS distances of generated images [P]
    paths: tuple[torch.Tensor, torch.Tensor] | None = None  # pplu: sub-interval [P, 10] and end [P] LPIPS
    real_spatial: torch.Tensor | None = None  # sfid: spatial features [N_r, S], [N, S]
    fake_spatial: torch.Tensor | None = None
    real_labels: torch.Tensor | None = None  # ifid: the classes of the reference and generated images [N_r], [N]
    fake_labels: torch.Tensor | None = None


@dataclass(frozen=True)
class Metric:
    """One quality metric: what it reads, how it is computed, the library that computes it."""

    name: str  # what users list in metrics.names / eval.metrics
    implementation: str
    compute: Callable[[Inputs, Any], dict[str | None, float]]  # (inputs, settings) → {stat: value}
    stats: tuple[str | None, ...]  # the logged variants: None, or "mean"/"std"
    parts: tuple[str, ...] = ()  # sub-metrics with their own names (precision, recall)


def _fid(x: Inputs, s: Any) -> dict[str | None, float]:
    return {None: fid_from_features(x.real, x.fake)}


def _sfid(x: Inputs, s: Any) -> dict[str | None, float]:
    return {None: fid_from_features(x.real_spatial, x.fake_spatial)}


def _kid(x: Inputs, s: Any) -> dict[str | None, float]:
    mean, std = kid_from_features(x.real, x.fake, s.kid_subsets, s.kid_max_subset_size, s.seed)
    return {"mean": mean, "std": std}


def _is(x: Inputs, s: Any) -> dict[str | None, float]:
    mean, std = inception_score(x.fake_logits, s.is_splits, s.seed)
    return {"mean": mean, "std": std}


def _pr(x: Inputs, s: Any) -> dict[str | None, float]:
    p, r = precision_recall(x.real, x.fake, s.pr_k)
    return {"precision": p, "recall": r}


def _nnmodes(x: Inputs, s: Any) -> dict[str | None, float]:
    return {None: float(nn_mode_count(x.real, x.fake))}


def _ifid(x: Inputs, s: Any) -> dict[str | None, float]:
    return {None: intra_class_fid(x.real, x.real_labels, x.fake, x.fake_labels)[0]}


def _lpips(x: Inputs, s: Any) -> dict[str | None, float]:
    return {None: float(x.lpips.double().mean())}


def _pplu(x: Inputs, s: Any) -> dict[str | None, float]:
    return uniformity(*x.paths)  # type: ignore[return-value]


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("fid", "torch_fidelity.metric_fid (eigenvalues of Σ_r Σ_g)", _fid, (None,)),
    Metric("sfid", "torch_fidelity.metric_fid on spatial features (Nash et al. 2021)", _sfid, (None,)),
    Metric("kid", "sqgan.metrics.kid (torch-fidelity's unbiased MMD², cubic kernel, in torch)", _kid,
           ("mean", "std")),
    Metric("is", "torch_fidelity.metric_isc", _is, ("mean", "std")),
    Metric("pr", "torch_fidelity.metric_prc (k-NN manifolds)", _pr, (None,), parts=("precision", "recall")),
    Metric("lpips", "torchmetrics LPIPS, mean over pairs of generated images", _lpips, (None,)),
    Metric("pplu", f"sqgan.metrics.ppl_uniformity (torchmetrics LPIPS along {INTERVALS} equal steps of a straight "
                   f"path in w)", _pplu, ("mean", "std", "end")),
    Metric("nnmodes", "sqgan.metrics.nn_modes (distinct Euclidean-nearest reference images, float64)", _nnmodes,
           (None,)),
    Metric("ifid", "sqgan.metrics.intra_fid (mean over classes of torch_fidelity.metric_fid against that class's "
                   "reals)", _ifid, (None,)),
)}


def check_metric_names(names: list[str] | tuple[str, ...], where: str) -> None:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"{where}: unknown metric(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(METRICS)}")


def needs_reference(names: list[str] | tuple[str, ...]) -> bool:
    return any(n in ("fid", "sfid", "kid", "pr", "nnmodes", "ifid") for n in names)


def keys_of(name: str, n: int, net: str, split: str, lpips_net: str | None = None, pairs: int = 0) -> list[str]:
    """The logged names of registry metric `name` (pr → precision and recall)."""
    m = METRICS[name]
    if name == "lpips":
        return [metric_key("lpips", pairs, lpips_net or "randalex")]
    if name == "pplu":
        return [metric_key("pplu", ppl_paths(n), lpips_net or "randalex", stat=st) for st in m.stats]
    out = []
    for metric in m.parts or (name,):
        for stat in m.stats:
            out.append(metric_key(metric, n, net, split if metric in REFERENCED else None, stat))
    return out


# -------------------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """The real images metrics compare with: one split of a curated dataset (`all` = every image) at the
    generator's resolution (resized with PIL's Lanczos, as the training data)."""

    root: Path
    split: str
    resolution: int
    images: torch.Tensor  # uint8 [N, 3, R, R]
    manifest_sha256: str
    labels: torch.Tensor | None = None  # the images' classes [N] when the manifest has labels

    resizer = "PIL Lanczos to the generator's resolution (as the training images)"

    @classmethod
    def load(cls, root: str | Path, split: str, resolution: int, images: torch.Tensor | None = None,
             labels: torch.Tensor | None = None) -> Reference:
        """`images` (and their `labels`): the split already decoded at `resolution` (the training loop passes its
        dataset's)."""
        root = Path(root)
        if images is None:
            try:
                ds = ManifestDataset(root, resolution, split=None if split == "all" else split)
            except ValueError as e:
                raise ValueError(f"metrics.reference_split = {split!r}: {e}; use a split the manifest has, or all") \
                    from None
            images, labels = ds.images, ds.labels
        return cls(root, split, resolution, images, sha256_file(root / MANIFEST), labels)

    def describe(self) -> str:
        return f"{self.root.name}:{self.split}"


class RealFeatureCache:
    """Real-image features, in memory and (with `folder`) on disk as `<key>.pt`, the key a hash of the dataset's
    manifest, the split, the resolution and resizer, and the feature network's name and weights. A second
    evaluation against the same reference extracts nothing: `extractions` counts the real batches run."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.extractions = 0

    @staticmethod
    def key(ref: Reference, net: nn.Module) -> str:
        facts = {"format": CACHE_FORMAT, "manifest_sha256": ref.manifest_sha256, "split": ref.split,
                 "resolution": ref.resolution, "resizer": ref.resizer, "net": net.name,
                 "net_resizer": net.resizer, "weights_sha256": net.weights_sha256,
                 "implementation": net.implementation}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]

    def get(self, ref: Reference, net: nn.Module, batch: int, device: torch.device, progress: bool = False,
            spatial: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """(pool, logits, spatial features when `spatial` else None, hit) of the reference images."""
        key = self.key(ref, net)
        names = {"pool": key, **({"spatial": f"{key}-spatial"} if spatial else {})}
        found = {what: self._load(k, len(ref.images)) for what, k in names.items()}
        if all(v is not None for v in found.values()):
            pool, logits = found["pool"]
            return pool, logits, found["spatial"][0] if spatial else None, True
        pool, logits, space = extract(net, _batches(ref.images, batch), len(ref.images), device, progress,
                                      f"features of {ref.describe()}", counter=self, spatial=spatial)
        self._store(key, pool, logits)
        if spatial:
            self._store(f"{key}-spatial", space, space[:, :0])
        return pool, logits, space, False

    def _load(self, key: str, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if key in self.memory:
            return self.memory[key]
        path = self.folder / f"{key}.pt" if self.folder is not None else None
        if path is not None and path.is_file():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved.get("key") == key and saved["pool"].shape[0] == n:
                    self.memory[key] = (saved["pool"], saved["logits"])
                    return self.memory[key]
            except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
                pass
        return None

    def _store(self, key: str, pool: torch.Tensor, logits: torch.Tensor) -> None:
        self.memory[key] = (pool, logits)
        if self.folder is not None:
            path = self.folder / f"{key}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save({"key": key, "pool": pool, "logits": logits}, tmp)


def _batches(images: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(images), batch):
        yield images[i : i + batch]


@torch.no_grad()
def extract(net: nn.Module, batches: Iterator[torch.Tensor], total: int, device: torch.device, progress: bool,
            desc: str, counter: RealFeatureCache | None = None, keep: Callable[[torch.Tensor], None] | None = None,
            spatial: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(pool [N, F], logits [N, C], spatial features [N, S] when `spatial` else None) of the images in `batches`."""
    pools, logits, spaces = [], [], []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for b in batches:
            if counter is not None:
                counter.extractions += 1
            if keep is not None:
                keep(b)
            out = net(b.to(device), spatial=True) if spatial else net(b.to(device))
            pools.append(out[0].double().cpu())
            logits.append(out[1].double().cpu())
            if spatial:
                spaces.append(out[2].double().cpu())
            bar.update(len(b))
    return torch.cat(pools), torch.cat(logits), torch.cat(spaces) if spatial else None


# -------------------------------------------------------------------------------------- evaluator
@dataclass
class Evaluation:
    metrics: dict[str, float]
    provenance: dict[str, dict[str, Any]]  # metric name → its provenance
    real_cache_hit: bool | None = None  # None: no real features were needed


@dataclass
class Evaluator:
    """Evaluates generators against one reference with one feature network (both built once, on first use).

    `settings`: the `metrics` params section (feature network, batch size, KID subsets, IS splits, k, seed)."""

    settings: Any
    reference: Callable[[], Reference] | Reference
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache: RealFeatureCache = field(default_factory=RealFeatureCache)
    _net: nn.Module | None = field(default=None, init=False, repr=False)  # built on first use
    _lpips: nn.Module | None = field(default=None, init=False, repr=False)

    @property
    def net(self) -> nn.Module:
        if self._net is None:
            s = self.settings
            self._net = build_feature_net(s.features, s.inception_weights, s.randcnn_seed).to(self.device)
        return self._net

    @property
    def lpips_net(self) -> nn.Module:
        if self._lpips is None:
            self._lpips = LPIPSNet(self.settings.lpips_backbone, self.settings.lpips_weights).to(self.device)
        return self._lpips

    def ref(self) -> Reference:
        if callable(self.reference):
            self.reference = self.reference()
        return self.reference

    def __call__(self, g_ema: nn.Module, z_dim: int, num_fake: int, names: list[str] | tuple[str, ...],
                 seed: int | None = None, lpips_pairs: int = 0, progress: bool = False) -> Evaluation:
        check_metric_names(names, "metrics")
        s = self.settings
        seed = s.seed if seed is None else seed
        net = self.net
        pairs = min(lpips_pairs, num_fake // 2) if "lpips" in names else 0
        if "lpips" in names and pairs < 1:
            raise ValueError(f"lpips needs at least 2 generated images and lpips_pairs ≥ 1, got {num_fake} images "
                             f"and {lpips_pairs} pairs")
        classes = classes_of(g_ema)
        if "ifid" in names and not classes:
            raise ValueError("ifid (intra-class FID) needs a class-conditional generator; this one is unconditional "
                             "(drop ifid from the metrics)")
        kept: list[torch.Tensor] = []
        have = [0]
        resolution: list[int] = []

        def keep(b: torch.Tensor) -> None:  # the generated resolution, and the first 2·pairs images for LPIPS
            resolution[:] = [b.shape[-1]]
            if have[0] < 2 * pairs:
                kept.append(b[: 2 * pairs - have[0]])
                have[0] += len(kept[-1])

        fakes = generate_uint8(g_ema, num_fake, z_dim, s.batch_size, seed, self.device)
        spatial = "sfid" in names
        fake, fake_logits, fake_spatial = extract(net, fakes, num_fake, self.device, progress,
                                                  "features of generated images", keep=keep, spatial=spatial)
        real = real_spatial = None
        hit = None
        ref = None
        if needs_reference(names):
            ref = self.ref()
            real, _, real_spatial, hit = self.cache.get(ref, net, s.batch_size, self.device, progress, spatial)
        paths = None
        if "pplu" in names:
            paths = path_distances(g_ema, self.lpips_net, ppl_paths(num_fake), z_dim, seed, s.batch_size, self.device)
        lp = None
        if pairs:
            imgs = torch.cat(kept).to(self.device)
            a, b = imgs[0::2], imgs[1::2]  # pairs (0, 1), (2, 3), …
            lp = torch.cat([self.lpips_net(a[i : i + s.batch_size], b[i : i + s.batch_size]).cpu()
                            for i in range(0, pairs, s.batch_size)])
        fake_labels = eval_labels(classes, 0, num_fake)
        real_labels = ref.labels if ref is not None else None
        if "ifid" in names and real_labels is None:
            raise ValueError(f"ifid: the reference {ref.describe()} has no class labels (its manifest has no 'label' "
                             f"column); evaluate against a labelled dataset")
        inputs = Inputs(real, fake, fake_logits, lp, paths, real_spatial, fake_spatial, real_labels, fake_labels)
        split = ref.split if ref is not None else s.reference_split
        metrics: dict[str, float] = {}
        provenance: dict[str, dict[str, Any]] = {}
        for name in names:
            m = METRICS[name]
            values = m.compute(inputs, s)
            keys = keys_of(name, num_fake, net.name, split, self._lpips.name if self._lpips else None, pairs)
            ordered = [values[p] for p in m.parts] if m.parts else [values[st] for st in m.stats]
            prov = self._provenance(m, net, ref, num_fake, seed, resolution[0], pairs)
            if classes:
                prov["classes"] = {"num_classes": classes, "generated": "image i in class i mod num_classes"}
            for k, v in zip(keys, ordered, strict=True):
                metrics[k] = v
                provenance[k] = prov
        return Evaluation(metrics, provenance, hit)

    def _provenance(self, m: Metric, net: nn.Module, ref: Reference | None, n: int, seed: int,
                    resolution: int | None, pairs: int) -> dict[str, Any]:
        s = self.settings
        p: dict[str, Any] = {
            "metric": m.name,
            "implementation": f"{m.implementation}; torch-fidelity {torch_fidelity.__version__}, torchmetrics "
                              f"{torchmetrics.__version__}, sqgan {version('sqgan')}",
            "n_generated": n,
            "generator": "G_ema, const noise",
            "seeds": {"z": seed, **({"kid_subsets": seed} if m.name == "kid" else {}),
                      **({"is_shuffle": seed} if m.name == "is" else {})},
            "resolution": resolution,
        }
        if m.name in ("lpips", "pplu"):
            lp = self._lpips
            p.update({"feature_network": lp.name, "weights_sha256": lp.weights_sha256, "resizer": lp.resizer,
                      "feature_implementation": lp.implementation})
            if m.name == "lpips":
                p["pairs"] = pairs
            else:
                p.update({"paths": ppl_paths(n), "intervals": INTERVALS, "truncation": {"mode": "none"},
                          "path": "straight in w before the style quantizer (z without a mapping network)"})
        else:
            p.update({"feature_network": net.name, "feature_extractor": net.describe(),
                      "weights_sha256": net.weights_sha256, "resizer": net.resizer,
                      "feature_implementation": net.implementation})
            if m.name == "sfid":
                p["spatial_features"] = net.spatial_features
        if m.name == "kid":
            p.update({"kid_subsets": s.kid_subsets, "kid_max_subset_size": s.kid_max_subset_size})
        if m.name == "is":
            p["is_splits"] = s.is_splits
        if m.name == "pr":
            p["k"] = s.pr_k
        if ref is not None and needs_reference([m.name]):
            p.update({"reference": ref.describe(), "reference_split": ref.split, "n_real": len(ref.images),
                      "reference_manifest_sha256": ref.manifest_sha256, "reference_resizer": ref.resizer})
        return p
