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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sqgan.config import Params
from sqgan.io import write_json_atomic
from sqgan.metrics.evaluate import Evaluator, RealFeatureCache, Reference, check_metric_names
from sqgan.sampling.generator import eval_generator, record_truncation
from sqgan.sampling.truncation import centres_path
from sqgan.shells.tracking import (
    MlflowLogger,
    check_tracking,
    checkpoint_of_run,
    end_run,
    existing_run,
    previous_run,
    resolve_tracking_uri,
    start_run,
)
from sqgan.tags import DATA_DIR, EVAL_CHECKPOINT, EVAL_LAST_CHECKPOINT, METRIC_PROVENANCE, STAGE, STAGE_EVAL
from sqgan.train.checkpoint import latest_checkpoint, load_generator


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


def run_eval(
    params: Params,
    checkpoint: str | Path | None = None,
    run_id: str | None = None,
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    project_dir: str | Path = ".",
    progress: bool = True,
    new_run_tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> EvalResult:
    """Evaluate the checkpoint (or run) with `params`' eval and metrics sections; log and write the results.
    `new_run_tags` and `parent_run_id` go to the run created for a checkpoint that belongs to none (an experiment's
    evaluation-only cell: nested under the experiment's parent run, tagged as its cell)."""
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
        run = existing_run(target)
        target = target if run is not None else None
        tagged = run.data.tags.get(DATA_DIR) if run is not None else None
        data = Path(data_dir or tagged or Path(trained.data.root) / trained.data.dataset)
        if not (data / "manifest.parquet").is_file():
            raise FileNotFoundError(f"reference data {data}: no manifest.parquet; pass --data with the curated dataset "
                                    f"the run trained on")
        mp, ep = params.metrics, params.eval
        evaluator = Evaluator(mp, lambda: Reference.load(data, mp.reference_split, trained.model.resolution), device,
                              RealFeatureCache(Path(project_dir) / mp.cache_dir))

        cache = centres_path(ckpt) if run_id is None and ckpt.parent.name != "checkpoints" else None
        sampled, truncation = eval_generator(params, G, cache)
        ev = evaluator(sampled, trained.model.z_dim, ep.num_fake, ep.metrics, lpips_pairs=ep.lpips_pairs,
                       progress=progress)
        record_truncation(ev, truncation)
        new_run = target is None
        if new_run:
            uri = resolve_tracking_uri(params, project_dir)
            check_tracking(uri)
            logged = trained.model_copy(update={"mlflow": params.mlflow, "metrics": mp, "eval": ep,
                                                "sample": params.sample})  # the truncation evaluated
            uri, new_id = start_run(logged, data, project_dir, tags={STAGE: STAGE_EVAL, EVAL_CHECKPOINT: str(ckpt),
                                                                     **(new_run_tags or {})},
                                    parent_run_id=parent_run_id)
            target = (uri, new_id)
        logger = MlflowLogger(*target, skip_logged=True)  # an identical re-evaluation adds no second point
        logger.log_metrics(ev.metrics, step)
        logger.set_tags({f"{METRIC_PROVENANCE}{k}": json.dumps(v, sort_keys=True) for k, v in ev.provenance.items()})
        logger.set_tags({EVAL_LAST_CHECKPOINT: str(source)})
        if out is None:
            out = ckpt.parent.parent / "eval.json" if run_id is None and ckpt.parent.name == "checkpoints" \
                else Path(project_dir) / "runs" / "eval" / f"{target[1]}.json"
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, {"step": step, "checkpoint": str(source), "run_id": target[1], **ev.metrics,
                                "provenance": ev.provenance})
        logger.log_artifact(out, "eval")
        if new_run:
            end_run(*target)
    return EvalResult(ev.metrics, ev.provenance, step, ckpt if run_id is None else Path(str(source)), out,
                      target[0], target[1], new_run, ev.real_cache_hit)
