"""`sqgan sample`: images of a trained G_ema with multi-modal (or global, or no) truncation, optionally drawn from one
cluster of the cluster-guided sampler (DESIGN.md §2.4).

`--checkpoint PATH` (a step_NNNNNN.pt, or a run folder: its latest checkpoint) or `--run RUN_ID` (the latest
checkpoint that run logged to MLflow). What to draw comes from the params' `sample` section, the cluster-guided
sampler from `cluster`, the feature network and LPIPS from `metrics`.

  z       `sample.num` codes `seeded_latents(num, z_dim, sample.seed)`: with truncation=none these are exactly the
          images `sqgan eval` generates for that seed. With `sample.cluster = j` they are instead T_j(e) of the
          cluster sampler, e drawn from a CPU generator seeded `sample.seed`; truncation then acts on those z.
  caches  the truncation centres (`<stem>.mmt-centres.pt`, `sqgan.sampling.truncation.load_or_fit`) and the cluster
          sampler (`<stem>.cluster-k{k}.pt` with its accuracy and FID cost in `<stem>.cluster-k{k}.json`) live beside
          the checkpoint. For `--run` the checkpoint is a temporary download, so they live in
          `runs/sample/<run id>/` of the project instead. Each cache is refitted when it belongs to other weights
          or other settings (and the evaluation is redone when its settings or reference changed).
  output  `images/000000.png …`, `grid.png` (the first 64), `sample.json`; written atomically into `--out`,
          by default `<run folder>/samples/<name>` for a checkpoint in a run folder's checkpoints/, else
          `runs/sample/<run id or checkpoint stem>/<name>`, name = `multimodal-psi0.7` (`multimodal-l2-psi0.7`
          with assign=l2, `global-psi0.5`, `none`) plus `-cluster<j>`. An earlier `sqgan sample` output is replaced;
          a folder anything else wrote is refused unless `force`.
  mlflow  with `--run`, or when the checkpoint's run folder has tracking.json, grid.png and sample.json are logged to
          that run under `samples/<name>/` (with `--cluster`: metrics cluster/accuracy, cluster/chance,
          cluster/fid_cost at the checkpoint's step, each with its provenance tag); otherwise no MLflow run at all.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from sqgan.config import Params
from sqgan.io import check_output, sha256_file, stage_output, write_json_atomic
from sqgan.metrics.evaluate import RealFeatureCache, Reference, to_uint8
from sqgan.metrics.features import LPIPSNet, build_feature_net, state_sha256
from sqgan.metrics.labels import classes_of, eval_labels
from sqgan.sampling import truncation as T
from sqgan.sampling.cluster import (
    ClusterSampler,
    cluster_accuracy,
    cluster_latents,
    fid_cost,
    fit_cluster_sampler,
    latent_features,
    nearest_centroid,
    seeded_latents,
)
from sqgan.sampling.generator import TruncatedGenerator, require_mapping
from sqgan.shells.tracking import (
    MlflowLogger,
    checkpoint_of_run,
    existing_run,
    open_existing,
    previous_run,
    resolve_tracking_uri,
)
from sqgan.tags import DATA_DIR, METRIC_PROVENANCE, SAMPLE_LAST_CHECKPOINT, SAMPLE_LAST_OUT
from sqgan.train.checkpoint import latest_checkpoint, load_generator

STAGE = "sample"  # the marker of its output folders (sqgan.io.stage_output)
GRID_IMAGES = 64  # images in grid.png
SAMPLER_SUFFIX = ".cluster-k{k}.pt"
REPORT_SUFFIX = ".cluster-k{k}.json"
REPORT_FORMAT = 1
REFERENCE_SEED_OFFSET = 1  # generated FID reference: seeded_latents(fid_images, z_dim, cluster.seed + this), so it is
#                            never the very codes fid_cost's unconditional images use (that FID would be exactly 0)


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class ClusterInfo:
    """The cluster-guided sampler a sample was drawn with, and how well it hits its clusters."""

    cluster: int  # the asked cluster j
    k: int
    fitted: bool  # the sampler was fitted by this call (False: read from its cache)
    evaluated: bool  # accuracy and FID cost were computed by this call (False: read from the report)
    sampler_path: Path
    report_path: Path
    accuracy: float  # sampler: mean over clusters of the share of drawn images whose nearest centroid is the asked one
    chance: float  # the same for unconditional sampling (1/k)
    accuracy_of_cluster: float  # the share for cluster j
    chance_of_cluster: float  # unconditional images in cluster j
    fid_cost: float  # FID(sampler) − FID(unconditional), same reference
    reference: dict[str, Any]  # what the FID cost was measured against (real images, or unconditional generated)
    hits: int  # of the images written, how many have nearest centroid j


@dataclass
class SampleResult:
    out: Path
    images: int  # written
    checkpoint: str  # the file, or "mlflow run <id>: step_NNNNNN.pt"
    step: int
    run_id: str | None  # the MLflow run logged to; None: no MLflow run
    tracking_uri: str | None
    centres_fitted: bool  # multimodal centres fitted by this call (False: cached, or not multimodal)
    cluster: ClusterInfo | None
    mlflow: str  # where the results were logged, or why they were not
    timings: dict[str, float] = field(default_factory=dict)
    assignment_counts: list[int] | None = None  # multimodal: samples truncated toward each centre


# ---------------------------------------------------------------------------------------------------- paths
def output_name(params: Params) -> str:
    """`multimodal-psi0.7`, `multimodal-l2-psi0.7`, `global-psi0.5`, `none`; `-cluster<j>` with sample.cluster."""
    sp = params.sample
    name = sp.truncation
    if sp.truncation == "multimodal" and sp.assign != "lpips":
        name += f"-{sp.assign}"
    if sp.truncation != "none":
        name += f"-psi{sp.psi:g}"
    if sp.cluster is not None:
        name += f"-cluster{sp.cluster}"
    if sp.label is not None:
        name += f"-class{sp.label}"
    return name


def default_out(params: Params, ckpt: Path, run_id: str | None, project_dir: Path) -> Path:
    """`<run folder>/sampled/<name>` for a checkpoint in a run folder's checkpoints/, else
    `runs/sample/<run id or checkpoint stem>/<name>` in the project. (Not inside checkpoints/ or samples/: those are
    DVC outputs of the train stage, which a change would mark as modified.)"""
    name = output_name(params)
    if run_id is None and ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "sampled" / name
    return project_dir / "runs" / "sample" / (run_id or ckpt.stem) / name


def sampler_path(cache_dir: Path, stem: str, k: int) -> Path:
    return cache_dir / (stem + SAMPLER_SUFFIX.format(k=k))


def report_path(cache_dir: Path, stem: str, k: int) -> Path:
    return cache_dir / (stem + REPORT_SUFFIX.format(k=k))


# ---------------------------------------------------------------------------------------------------- cluster
def _sampler_settings(params: Params, G: nn.Module, net: nn.Module) -> dict[str, Any]:
    """What a cached sampler must have been fitted with (compared against its saved meta)."""
    cp = params.cluster
    return {"k": cp.k, "z_dim": int(G.z_dim), "hidden": cp.hidden, "layers": cp.layers, "steps": cp.steps,
            "num_samples": cp.num_samples, "targets_per_step": cp.targets_per_step, "lr": cp.lr, "seed": cp.seed,
            "cluster_seed": cp.seed, "n_clustered": cp.fit_samples, "feature_net": net.name,
            "feature_net_sha256": net.weights_sha256, "generator_sha256": state_sha256(G)}


def load_or_fit_sampler(params: Params, G: nn.Module, net: nn.Module, path: Path, device: torch.device,
                        progress: bool = False) -> tuple[Any, bool]:
    """(sampler, fitted): the cached sampler at `path` when it was fitted for G's weights with these cluster settings
    and this feature net, else clusters `cluster.fit_samples` images and fits one (IMLE), written to `path`."""
    cp, batch = params.cluster, params.sample.batch_size
    want = _sampler_settings(params, G, net)
    if path.is_file():
        try:
            sampler = ClusterSampler.load(path, G, device)
            if all(sampler.meta.get(k) == v for k, v in want.items()):
                return sampler, False
        except ValueError:  # another generator, another format or a damaged file: refitted, never used
            pass
    if cp.fit_samples < cp.k:
        raise ValueError(f"cluster.fit_samples = {cp.fit_samples} images cannot make cluster.k = {cp.k} clusters; "
                         f"raise cluster.fit_samples or lower cluster.k")
    clusters = cluster_latents(G, int(G.z_dim), cp.fit_samples, cp.k, net, cp.seed, batch=batch, device=device,
                               progress=progress)
    sampler = fit_cluster_sampler(G, clusters, cp.steps, cp.hidden, cp.layers, cp.num_samples, cp.targets_per_step,
                                  cp.lr, cp.seed, device, progress)
    sampler.meta.update(want)  # adds the feature net's weights, which fit_cluster_sampler does not record
    sampler.save(path)
    return sampler, True


def _reference_source(params: Params, data: Path) -> dict[str, Any]:
    """Which reference the FID cost is measured against (and, for the report's staleness check, its identity)."""
    mp, cp = params.metrics, params.cluster
    if (data / "manifest.parquet").is_file():
        return {"kind": "real", "data": str(data), "split": mp.reference_split,
                "manifest_sha256": sha256_file(data / "manifest.parquet")}
    return {"kind": "generated", "n": cp.fid_images, "seed": cp.seed + REFERENCE_SEED_OFFSET,
            "why": f"the checkpoint's curated dataset {data} was not found"}


def _reference_features(params: Params, source: dict[str, Any], G: nn.Module, net: nn.Module, resolution: int,
                        project_dir: Path, device: torch.device, progress: bool) -> tuple[torch.Tensor, int]:
    """(features [N, F], N) of the FID cost's reference: the curated dataset's `metrics.reference_split` (real
    features cached like `sqgan eval`'s), else `cluster.fid_images` unconditional images of another seed."""
    mp = params.metrics
    if source["kind"] == "real":
        ref = Reference.load(source["data"], mp.reference_split, resolution)
        pool, _, _, _ = RealFeatureCache(project_dir / mp.cache_dir).get(ref, net, mp.batch_size, device, progress)
        return pool, len(pool)
    z = seeded_latents(source["n"], int(G.z_dim), source["seed"])
    feats = latent_features(G, z, net, params.sample.batch_size, device, progress, "features of the reference")
    return feats, len(feats)


def evaluate_sampler(params: Params, sampler: Any, net: nn.Module, source: dict[str, Any], resolution: int,
                     project_dir: Path, device: torch.device, progress: bool = False) -> dict[str, Any]:
    """The report of a sampler: `cluster_accuracy` (cluster.eval_per_cluster images per cluster) and `fid_cost`
    (cluster.fid_images images) against `source`, with the settings they were computed with."""
    cp, batch = params.cluster, params.sample.batch_size
    t0 = time.perf_counter()
    acc = cluster_accuracy(sampler, net, cp.eval_per_cluster, seed=cp.seed, batch=batch, progress=progress)
    ref, n_ref = _reference_features(params, source, sampler.G, net, resolution, project_dir, device, progress)
    cost = fid_cost(sampler, net, ref, cp.fid_images, cp.seed, batch, progress)
    return {"format": REPORT_FORMAT, "sampler": dict(sampler.meta),
            "evaluation": _evaluation_settings(params, source), "reference_n": n_ref,
            "accuracy": acc.as_dict(), "fid_cost": cost.as_dict(),
            "feature_network": {"name": net.name, "weights_sha256": net.weights_sha256,
                                "describe": net.describe(), "implementation": net.implementation},
            "imle_final_loss": sampler.losses[-1] if sampler.losses else None,
            "seconds": time.perf_counter() - t0}


def _evaluation_settings(params: Params, source: dict[str, Any]) -> dict[str, Any]:
    cp = params.cluster
    return {"eval_per_cluster": cp.eval_per_cluster, "fid_images": cp.fid_images, "seed": cp.seed,
            "reference": source}


def load_or_evaluate(params: Params, sampler: Any, fitted: bool, net: nn.Module, source: dict[str, Any],
                     path: Path, resolution: int, project_dir: Path, device: torch.device,
                     progress: bool = False) -> tuple[dict[str, Any], bool]:
    """(report, evaluated): the report at `path` when it belongs to this sampler and these evaluation settings,
    else computed (`evaluate_sampler`) and written there."""
    if not fitted and path.is_file():
        try:
            saved = json.loads(path.read_text())
            if (saved.get("format") == REPORT_FORMAT
                    and saved.get("sampler") == json.loads(json.dumps(sampler.meta))
                    and saved.get("evaluation") == json.loads(json.dumps(_evaluation_settings(params, source)))):
                return saved, False
        except (OSError, ValueError):  # unreadable: recomputed
            pass
    report = evaluate_sampler(params, sampler, net, source, resolution, project_dir, device, progress)
    write_json_atomic(path, report)
    return report, True


# ---------------------------------------------------------------------------------------------------- writing
def _write_png(image: torch.Tensor, path: Path) -> None:
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path, format="PNG")


def write_grid(images: torch.Tensor, path: Path) -> None:
    """uint8 images [N ≤ 64, 3, R, R] as one PNG, ⌈√N⌉ per row (torchvision's make_grid, 2 px black gaps)."""
    grid = make_grid(images, nrow=max(1, math.ceil(math.sqrt(len(images)))), padding=2, pad_value=0)
    _write_png(grid, path)


def _batches(z: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(z), batch):
        yield z[start : start + batch]


# ---------------------------------------------------------------------------------------------------- mlflow
def _tracked_run(target: tuple[str, str] | None) -> tuple[tuple[str, str] | None, str]:
    """(target or None, why not) for the run a checkpoint's tracking.json names: None when the store or the run is
    gone (a sqlite file that no longer exists is not recreated)."""
    if target is None:
        return None, ("not logged to MLflow: no --run was given and the checkpoint's run folder has no "
                      "tracking.json")
    uri, run_id = target
    try:  # a server that does not answer fails here, in seconds, before any work
        client = open_existing(uri, "")
    except FileNotFoundError:
        return None, f"not logged to MLflow: tracking.json names run {run_id} in {uri}, whose database is gone"
    try:
        client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types for a missing run
        return None, f"not logged to MLflow: tracking.json names run {run_id}, which {uri} no longer has"
    return target, f"logged to MLflow run {run_id} ({uri})"


def _log(target: tuple[str, str], out: Path, step: int, cluster: ClusterInfo | None, report: dict[str, Any] | None,
         source: str) -> None:
    logger = MlflowLogger(*target)
    for name in ("grid.png", "sample.json"):
        logger.log_artifact(out / name, f"samples/{out.name}")
    logger.set_tags({SAMPLE_LAST_OUT: str(out), SAMPLE_LAST_CHECKPOINT: source})
    if cluster is None or report is None:
        return
    logger.log_metrics({"cluster/accuracy": cluster.accuracy, "cluster/chance": cluster.chance,
                        "cluster/fid_cost": cluster.fid_cost}, step)
    prov = {"k": cluster.k, "feature_network": report["feature_network"], "sampler": report["sampler"],
            "evaluation": report["evaluation"], "reference_n": report["reference_n"]}
    logger.set_tags({f"{METRIC_PROVENANCE}cluster/{name}": json.dumps({"metric": name, **prov}, sort_keys=True)
                     for name in ("accuracy", "chance", "fid_cost")})


# ---------------------------------------------------------------------------------------------------- the stage
def run_sample(
    params: Params,
    checkpoint: str | Path | None = None,
    run_id: str | None = None,
    out: str | Path | None = None,
    project_dir: str | Path = ".",
    force: bool = False,
    progress: bool = False,
) -> SampleResult:
    """Draw `sample.num` truncated images (of cluster `sample.cluster` when set) of the checkpoint (or run); write
    them with a grid and sample.json into `out`; log to the checkpoint's MLflow run when it has one."""
    if (checkpoint is None) == (run_id is None):
        raise ValueError("pass exactly one of --run RUN_ID and --checkpoint PATH")
    sp, cp, mp = params.sample, params.cluster, params.metrics
    psi = T.check_psi(sp.psi)
    if sp.cluster is not None and sp.cluster >= cp.k:
        raise ValueError(f"sample.cluster = {sp.cluster}: the cluster sampler has cluster.k = {cp.k} clusters "
                         f"(0..{cp.k - 1}); pick one of those or raise cluster.k")
    if sp.truncation == "multimodal" and sp.fit_samples < sp.centres:
        raise ValueError(f"sample.fit_samples = {sp.fit_samples} mapped w cannot make sample.centres = {sp.centres} "
                         f"centres; raise sample.fit_samples or lower sample.centres")
    project_dir = Path(project_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sqgan-sample-") as tmp:
        if run_id is not None:
            uri = resolve_tracking_uri(params, project_dir)
            ckpt = checkpoint_of_run(uri, run_id, Path(tmp))
            target, why = (uri, run_id), f"logged to MLflow run {run_id} ({uri})"
            cache_dir = project_dir / "runs" / "sample" / run_id  # the download is temporary: cache in the project
            source = f"mlflow run {run_id}: {ckpt.name}"
        else:
            ckpt = latest_checkpoint(checkpoint)
            target, why = _tracked_run(previous_run(ckpt))
            # a run folder's checkpoints/ is a DVC output of the train stage: the caches go beside it, not into it
            cache_dir = ckpt.parent.parent / "sample-cache" if ckpt.parent.name == "checkpoints" else ckpt.parent
            source = str(ckpt)
        out = Path(out) if out is not None else default_out(params, ckpt, run_id, project_dir)
        centres_file = T.centres_path(cache_dir / ckpt.name)
        spath, rpath = sampler_path(cache_dir, ckpt.stem, cp.k), report_path(cache_dir, ckpt.stem, cp.k)
        inputs = (ckpt, centres_file, spath, rpath)  # --out may neither be nor contain the checkpoint or a cache
        check_output(out, STAGE, inputs, force)  # before any work; stage_output checks again when writing

        t = time.perf_counter()
        G, trained, step = load_generator(ckpt, device)
        classes = classes_of(G)
        eval_labels(classes, 0, 0, sp.label)  # --class on an unconditional G, or out of range: refused here
        if classes and sp.cluster is not None:
            raise ValueError(f"sample.cluster: the cluster-guided sampler is fitted without classes and this generator "
                             f"is class-conditional ({classes} classes); pick a class with --class instead")
        require_mapping(G, sp.truncation)
        timings["load"] = time.perf_counter() - t

        centres, centres_fitted, lpips_net = None, False, None
        if sp.truncation == "multimodal":
            t = time.perf_counter()
            centres, centres_fitted = T.load_or_fit(G, centres_file, sp.fit_samples,
                                                    sp.centres, sp.seed, device=device, progress=progress)
            timings["centres_fit" if centres_fitted else "centres_load"] = time.perf_counter() - t
            if sp.assign == "lpips":
                lpips_net = LPIPSNet(mp.lpips_backbone, mp.lpips_weights).to(device)
        truncated = TruncatedGenerator(G, sp.truncation, psi, sp.assign, centres, lpips_net).to(device)

        cluster_info, report, net, sampler = None, None, None, None
        if sp.cluster is not None:
            net = build_feature_net(mp.features, mp.inception_weights, mp.randcnn_seed).to(device)
            t = time.perf_counter()
            sampler, fitted = load_or_fit_sampler(params, G, net, spath, device, progress)
            timings["cluster_fit" if fitted else "cluster_load"] = time.perf_counter() - t
            t = time.perf_counter()
            data = _dataset_of(trained, target, project_dir)
            report, evaluated = load_or_evaluate(params, sampler, fitted, net, _reference_source(params, data), rpath,
                                                 trained.model.resolution, project_dir, device, progress)
            timings["cluster_eval" if evaluated else "cluster_report_load"] = time.perf_counter() - t
            acc, cost = report["accuracy"], report["fid_cost"]
            j = sp.cluster
            cluster_info = ClusterInfo(j, cp.k, fitted, evaluated, spath, rpath, float(acc["overall"]),
                                       float(acc["unconditional_overall"]), float(acc["per_cluster"][j]),
                                       float(acc["unconditional_per_cluster"][j]), float(cost["cost"]),
                                       report["evaluation"]["reference"], 0)
            z = sampler.latents(j, sp.num, torch.Generator().manual_seed(sp.seed))
        else:
            z = seeded_latents(sp.num, int(G.z_dim), sp.seed)


        counts = torch.zeros(centres.n_clusters if centres is not None else 0, dtype=torch.long)
        hits = 0
        grid: list[torch.Tensor] = []
        sampling = writing = 0.0
        with stage_output(out, STAGE, inputs, force) as folder:
            (folder / "images").mkdir()
            bar = tqdm(total=sp.num, desc="sampling", unit="img", disable=not progress)
            written = 0
            for part in _batches(z, sp.batch_size):
                t = time.perf_counter()
                c = eval_labels(classes, written, len(part), sp.label)  # as `sqgan eval` draws them
                res = truncated(part.to(device), None if c is None else c.to(device), noise_mode="const")
                images = to_uint8(res.images).cpu()
                if res.assignment is not None:
                    counts += torch.bincount(res.assignment.cpu(), minlength=len(counts))
                if net is not None:
                    feats = net(images.to(device))
                    feats = feats[0] if isinstance(feats, tuple) else feats
                    hits += int((nearest_centroid(feats.double().cpu(), sampler.centroids) == sp.cluster).sum())
                sampling += time.perf_counter() - t
                t = time.perf_counter()
                for image in images:
                    _write_png(image, folder / "images" / f"{written:06d}.png")
                    written += 1
                if written - len(images) < GRID_IMAGES:  # the first 64 images make the grid
                    grid.append(images[: GRID_IMAGES - (written - len(images))])
                writing += time.perf_counter() - t
                bar.update(len(images))
            bar.close()
            write_grid(torch.cat(grid)[:GRID_IMAGES], folder / "grid.png")
            timings["sampling"], timings["writing"] = sampling, writing
            timings["total"] = time.perf_counter() - t_start
            if cluster_info is not None:
                cluster_info.hits = hits
            info = _sample_json(params, source, step, target, truncated, centres, centres_fitted, counts,
                                cluster_info, report, written, trained.model.resolution, timings)
            write_json_atomic(folder / "sample.json", info)
        out = out.resolve()
        if target is not None:
            _log(target, out, step, cluster_info, report, source)
    return SampleResult(out, written, source, step, target[1] if target else None, target[0] if target else None,
                        centres_fitted, cluster_info, why, timings,
                        counts.tolist() if centres is not None else None)


def _dataset_of(trained: Params, target: tuple[str, str] | None, project_dir: Path) -> Path:
    """The curated dataset the checkpoint trained on: its run's `data.dir` tag (as `sqgan eval`), else the
    checkpoint's data.root / data.dataset (relative to the project); the first that holds a manifest."""
    candidates = []
    if target is not None:
        run = existing_run(target)
        tagged = run.data.tags.get(DATA_DIR) if run is not None else None
        if tagged:
            candidates.append(Path(tagged))
    candidates.append(project_dir / trained.data.root / trained.data.dataset)
    return next((c for c in candidates if (c / "manifest.parquet").is_file()), candidates[-1])


def _sample_json(params: Params, source: str, step: int, target: tuple[str, str] | None,
                 truncated: TruncatedGenerator, centres: T.Centres | None, centres_fitted: bool, counts: torch.Tensor,
                 cluster: ClusterInfo | None, report: dict[str, Any] | None, n: int, resolution: int,
                 timings: dict[str, float]) -> dict[str, Any]:
    sp = params.sample
    trunc: dict[str, Any] = {"mode": sp.truncation, "psi": None if sp.truncation == "none" else sp.psi,
                             "describe": truncated.describe()}
    if centres is not None:
        trunc.update({"assign": sp.assign, "centres": centres.n_clusters, "fit_samples": centres.n,
                      "centres_seed": centres.seed, "centres_fitted": centres_fitted,
                      "generator_sha256": centres.g_sha256})
        if truncated.lpips_net is not None:
            lp = truncated.lpips_net
            trunc["lpips"] = {"name": lp.name, "weights_sha256": lp.weights_sha256,
                              "implementation": lp.implementation}
    info: dict[str, Any] = {
        "checkpoint": source, "step": step, "run_id": target[1] if target else None, "images": n,
        "resolution": resolution, "sample": sp.model_dump(mode="json"), "truncation": trunc,
        "assignment_counts": counts.tolist() if centres is not None else None,
        "z": ("T_j(e), e ~ N(0, I) from torch.Generator().manual_seed(sample.seed)" if sp.cluster is not None
              else "seeded_latents(sample.num, z_dim, sample.seed), as sqgan eval's generated images"),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "cluster": None,
    }
    if cluster is not None and report is not None:
        info["cluster"] = {
            "cluster": cluster.cluster, "k": cluster.k, "fitted": cluster.fitted, "evaluated": cluster.evaluated,
            "sampler": str(cluster.sampler_path), "report": str(cluster.report_path),
            "accuracy": cluster.accuracy, "chance": cluster.chance,
            "accuracy_of_cluster": cluster.accuracy_of_cluster, "chance_of_cluster": cluster.chance_of_cluster,
            "hits_in_written_images": cluster.hits, "share_in_written_images": cluster.hits / max(n, 1),
            "fid_cost": report["fid_cost"], "accuracy_detail": report["accuracy"],
            "reference": cluster.reference, "reference_n": report["reference_n"],
            "feature_network": report["feature_network"], "settings": params.cluster.model_dump(mode="json"),
        }
    return info

