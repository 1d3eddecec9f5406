"""`sqgan summary RUN_DIR`: a finished run's metrics, where its results are, and one line on whether it learned."""

from __future__ import annotations

import json
from pathlib import Path

from sqgan.metrics.names import is_quality_metric


def summary_lines(run_dir: Path) -> list[str]:
    """The summary of `run_dir` (its metrics.json, tracking.json) as lines; FileNotFoundError when it has no
    metrics.json (not trained, or not finished)."""
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.exists():
        raise FileNotFoundError(f"{metrics_file} not found; train first (`make demo` or `sqgan train --out {run_dir}`)")
    m = json.loads(metrics_file.read_text())
    quality = {k: v for k, v in m.items() if is_quality_metric(k)}
    usage = {k: v for k, v in m.items() if k.startswith(("sq/", "fq/layer", "d/feature_similarity"))}
    lines = [f"run folder:   {run_dir}  (step {m.get('step')})", f"sample grid:  {run_dir / 'grid.png'}",
             f"checkpoints:  {run_dir / 'checkpoints'}"]
    lines += [f"  {k:28s} {v:.4f}" for k, v in {**quality, **usage}.items()]
    line = learning_verdict(m)
    if line:
        lines.append(line)
    prov = next(iter(m.get("provenance", {}).values()), None)
    if prov:
        lines.append(f"metrics by:   {prov.get('implementation')}; features: {prov.get('feature_extractor')}; "
                     f"{prov.get('n_real')} real ({prov.get('reference')}) vs {prov.get('n_generated')} generated")
    tracking = run_dir / "tracking.json"
    if tracking.exists():
        t = json.loads(tracking.read_text())
        lines.append(f"mlflow run:   {t['run_id']} in {t['tracking_uri']}")
    lines.append("dashboard:    make ui  →  http://127.0.0.1:5000 (the project's mlflow.db; for another tracking URI "
                 "run `mlflow ui --backend-store-uri URI`)")
    return lines


def learning_verdict(m: dict) -> str | None:
    """One line on whether the run learned, from its metrics.json (the collapse watch's final evaluation)."""
    if "diversity/pixel" not in m:
        return None
    pixel, nn = m["diversity/pixel"], m["diversity/nn_distinct"]
    figures = (f"G_ema's fixed-z samples are {pixel:.3f}× as varied as the reals, {nn:.3f} of them distinct "
               f"nearest reals")
    if m.get("diversity/collapsed", 0.0) >= 1:
        first = m.get("diversity/collapse_step")
        since = f", first flagged at step {int(first)}" if first is not None else ""
        return (f"NOT LEARNED: the run collapsed or did not learn ({figures} at step {m.get('step')}{since}); "
                f"see the grid, and try other learning rates or more steps")
    return f"learned:      {figures}"
