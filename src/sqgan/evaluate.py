"""`sqgan eval`: the quality metrics of a trained G_ema (sqgan.metrics.evaluate), logged to the run it belongs to.

`--checkpoint PATH` (a step_NNNNNN.pt, or a run folder: its latest checkpoint) or `--run RUN_ID` (the latest
checkpoint that run logged to MLflow). The model comes from the checkpoint; what to measure comes from the params
(`eval` section: metrics, N, LPIPS pairs; `metrics` section: feature network, reference split, seed, batch size).
Real features are cached under metrics.cache_dir by manifest hash and feature network. Results go to the run (its
metrics at the checkpoint's step, each value's provenance as the tag `sqgan.metric.<name>`; a bare checkpoint gets a
new run tagged sqgan.stage=eval) and to a DVC metrics JSON.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqgan.config import Params
from sqgan.io import write_json_atomic

ARCH_SECTIONS = ("data", "model", "fq", "sq", "train")  # what G, its seed and its dataset come from


@dataclass
class EvalResult:
    metrics: dict[str, float]
    provenance: dict[str, dict[str, Any]]
    step: int
    checkpoint: Path
    out: Path
    tracking_uri: str
    run_id: str
    new_run: bool
    real_cache_hit: bool | None


def checkpoints_in(run_dir: str | Path) -> list[Path]:
    """A run folder's complete checkpoints, oldest first (written atomically: a step_*.pt file is whole)."""
    return sorted((Path(run_dir) / "checkpoints").glob("step_*.pt"))


def latest_checkpoint(path: str | Path, option: str = "--checkpoint") -> Path:
    """`path` itself when a file; the last checkpoints/step_NNNNNN.pt of a run folder (or of a checkpoints/ folder).
    `option` names the command-line option in the errors (`--checkpoint`, `--resume`)."""
    path = Path(path)
    if path.is_dir():
        found = checkpoints_in(path) or sorted(path.glob("step_*.pt"))
        if not found:
            raise FileNotFoundError(f"{option} {path}: no step_NNNNNN.pt under {path}/checkpoints; pass a run "
                                    f"folder that `sqgan train` wrote, or a checkpoint file (a run stopped before "
                                    f"its first checkpoint has none: train it again with --force)")
        return found[-1]
    if not path.exists():
        raise FileNotFoundError(f"{option} {path} not found; pass a step_NNNNNN.pt file or a run folder")
    return path


def checkpoint_of_run(tracking_uri: str, run_id: str, into: Path) -> Path:
    """Download the latest checkpoint run `run_id` logged (artifacts checkpoints/step_NNNNNN.pt)."""
    from sqgan.tracking import open_existing

    client = open_existing(tracking_uri, "set mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to the store that holds "
                                         "the run")
    try:
        client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types
        raise ValueError(f"--run {run_id}: no such run in {tracking_uri}; pass a run id from the MLflow UI or "
                         f"`sqgan train`'s output, or set --tracking-uri") from None
    found = [a.path for a in client.list_artifacts(run_id, "checkpoints") if re.search(r"step_\d+\.pt$", a.path)]
    if not found:
        raise ValueError(f"--run {run_id} logged no checkpoint (artifacts checkpoints/step_NNNNNN.pt): it may not "
                         f"have finished; pass --checkpoint with a file from its run folder instead")
    return Path(client.download_artifacts(run_id, sorted(found)[-1], str(into)))


def load_generator(checkpoint: Path, device: Any) -> tuple[Any, Params, int]:
    """(G_ema in eval mode on `device`, the params it was trained with, its step)."""
    from sqgan.models.factory import build_generator
    from sqgan.train.loop import load_checkpoint

    state = load_checkpoint(checkpoint)
    saved = state["params"]  # only what builds G is read: other sections may predate today's schema
    raw = Params().model_dump(mode="json") | {k: saved[k] for k in ARCH_SECTIONS if k in saved}
    try:
        trained = Params.model_validate(raw)
    except ValueError as e:
        raise ValueError(f"{checkpoint}: its model/fq/sq params do not fit this sqgan version ({e}); evaluate it with "
                         f"the version that trained it") from None
    G = build_generator(trained)
    G.load_state_dict(state["G_ema"])
    return G.to(device).eval(), trained, int(state["step"])


def _existing_run(target: tuple[str, str] | None) -> Any:
    """The MLflow run `target` names, or None (no target, or a store that no longer has that run)."""
    if target is None:
        return None
    from sqgan.tracking import _client

    try:
        return _client(target[0]).get_run(target[1])
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types for a missing run
        return None


def run_eval(
    params: Params,
    checkpoint: str | Path | None = None,
    run_id: str | None = None,
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    project_dir: str | Path = ".",
    progress: bool = True,
) -> EvalResult:
    """Evaluate the checkpoint (or run) with `params`' eval and metrics sections; log and write the results."""
    import torch

    from sqgan.metrics.evaluate import Evaluator, RealFeatureCache, Reference, check_metric_names
    from sqgan.tracking import MlflowLogger, check_tracking, previous_run, resolve_tracking_uri, start_run

    if (checkpoint is None) == (run_id is None):
        raise ValueError("pass exactly one of --run RUN_ID and --checkpoint PATH")
    check_metric_names(params.eval.metrics, "eval.metrics")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="sqgan-eval-") as tmp:
        if run_id is not None:
            ckpt = checkpoint_of_run(resolve_tracking_uri(params, project_dir), run_id, Path(tmp))
            target = (resolve_tracking_uri(params, project_dir), run_id)
        else:
            ckpt = latest_checkpoint(checkpoint)
            target = previous_run(ckpt)  # the run folder's tracking.json, if it has one
        G, trained, step = load_generator(ckpt, device)
        source = ckpt if run_id is None else f"mlflow run {run_id}: {ckpt.name}"
        run = _existing_run(target)
        target = target if run is not None else None
        tagged = run.data.tags.get("data.dir") if run is not None else None
        data = Path(data_dir or tagged or Path(trained.data.root) / trained.data.dataset)
        if not (data / "manifest.parquet").is_file():
            raise FileNotFoundError(f"reference data {data}: no manifest.parquet; pass --data with the curated dataset "
                                    f"the run trained on")
        mp, ep = params.metrics, params.eval
        evaluator = Evaluator(mp, lambda: Reference.load(data, mp.reference_split, trained.model.resolution), device,
                              RealFeatureCache(Path(project_dir) / mp.cache_dir))
        from sqgan.sample import eval_generator
        from sqgan.sampling.truncation import centres_path

        cache = centres_path(ckpt) if run_id is None and ckpt.parent.name != "checkpoints" else None
        sampled, truncation = eval_generator(params, G, cache)
        ev = evaluator(sampled, trained.model.z_dim, ep.num_fake, ep.metrics, lpips_pairs=ep.lpips_pairs,
                       progress=progress)
        if truncation is not None:
            for prov in ev.provenance.values():
                prov["truncation"] = truncation
        new_run = target is None
        if new_run:
            uri = resolve_tracking_uri(params, project_dir)
            check_tracking(uri)
            logged = trained.model_copy(update={"mlflow": params.mlflow, "metrics": mp, "eval": ep})
            uri, new_id = start_run(logged, data, project_dir, tags={"sqgan.stage": "eval",
                                                                     "sqgan.eval.checkpoint": str(ckpt)})
            target = (uri, new_id)
        logger = MlflowLogger(*target, skip_logged=True)  # an identical re-evaluation adds no second point
        logger.log_metrics(ev.metrics, step)
        logger.set_tags({f"sqgan.metric.{k}": json.dumps(v, sort_keys=True) for k, v in ev.provenance.items()})
        logger.set_tags({"sqgan.eval.last_checkpoint": str(source)})
        if out is None:
            out = ckpt.parent.parent / "eval.json" if run_id is None and ckpt.parent.name == "checkpoints" \
                else Path(project_dir) / "runs" / "eval" / f"{target[1]}.json"
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, {"step": step, "checkpoint": str(source), "run_id": target[1], **ev.metrics,
                                "provenance": ev.provenance})
        logger.log_artifact(out, "eval")
        if new_run:
            from sqgan.tracking import end_run

            end_run(*target)
    return EvalResult(ev.metrics, ev.provenance, step, ckpt if run_id is None else Path(str(source)), out,
                      target[0], target[1], new_run, ev.real_cache_hit)
