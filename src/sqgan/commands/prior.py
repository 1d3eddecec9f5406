"""`sqgan prior`: pre-train SQ's codebook against CLIP image features of the training set (SQ-GAN, seed 000 A.1-A.2).

The shell around `sqgan.quant.codebook_prior`: load CLIP (fails fast, before any feature is extracted, when the
weights are not there), extract the training split's CLIP features (cached by image sha256), build G as `sqgan train`
will (same seed, so the frozen mapping network the codebook is fitted to is the one training starts from), pre-train
the codebook and the MLP with L_sq + L_uf + λ_OT·L_OT, write `prior.out` atomically, log it to MLflow. `sqgan train`
starts from it when `sq.prior` names the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sqgan.config import ConfigError, Params
from sqgan.data.clip import load_clip
from sqgan.data.manifest import read_manifest
from sqgan.io import write_json_atomic
from sqgan.models.factory import build_generator
from sqgan.quant.codebook_prior import CodebookPrior, clip_image_features, pretrain_codebook, save_prior
from sqgan.shells.tracking import MlflowLogger, end_run, start_run
from sqgan.tags import PRIOR_L_OT_FINAL, STAGE, STAGE_PRIOR


def check_prior_params(params: Params) -> None:
    if not params.sq.enabled:
        raise ConfigError("sq.enabled is false: the codebook prior is for style quantization; --set sq.enabled=true")
    if not params.prior.clip_pretrained:
        raise ConfigError("prior.clip_pretrained is unset: the prior needs CLIP weights — a local file "
                          "(e.g. open_clip_pytorch_model.bin of ViT-B-32 laion2b_s34b_b79k, downloaded where the "
                          "internet is reachable) or an open_clip tag when the hub is reachable")


def run_prior(params: Params, data_dir: str | Path, out: str | Path | None = None,
              log_mlflow: bool = True, project_dir: str | Path = ".") -> dict[str, Any]:
    """Pre-train the codebook prior on the training split of `data_dir`; returns the prior's meta."""
    check_prior_params(params)
    pp, data_dir = params.prior, Path(data_dir)
    out = Path(out or pp.out)
    df = read_manifest(data_dir)
    df = df[df["split"] == "train"]
    if len(df) < 2:
        raise ValueError(f"{data_dir}: the prior needs at least 2 training images, found {len(df)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clip, preprocess = load_clip(pp.clip_model, pp.clip_pretrained, device)  # fails fast without weights
    feats = clip_image_features(clip, preprocess, pp.clip_model, pp.clip_pretrained, data_dir, list(df["path"]),
                                list(df["sha256"]), params.data.cache, batch_size=pp.batch_size)
    torch.manual_seed(params.train.seed)  # the G `sqgan train` builds: its mapping is what the codebook is fit to
    G = build_generator(params)
    mapping = G.mapping
    quantizer = G.quantizer
    assert mapping is not None and quantizer is not None  # SQ on: both exist for every arch
    prior = CodebookPrior(clip, quantizer.code_dim, quantizer.num_subvectors)
    history = pretrain_codebook(quantizer, mapping, prior, feats, z_dim=params.model.z_dim, steps=pp.steps,
                                batch_size=pp.batch_size, lr=pp.lr, epsilon=pp.epsilon,
                                sinkhorn_iters=pp.sinkhorn_iters, seed=params.train.seed, lambda_ot=pp.lambda_ot,
                                device=device)
    first, last = history[0], history[-1]
    meta = {"clip_model": pp.clip_model, "clip_pretrained": str(pp.clip_pretrained), "steps": pp.steps,
            "images": len(df), "dataset": str(data_dir), "l_ot_first": first["l_ot"], "l_ot_final": last["l_ot"],
            "arch": params.model.arch, "w_dim": quantizer.w_dim, "seed": params.train.seed}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_prior(out, quantizer, prior, meta)
    write_json_atomic(out.with_suffix(".json"), {**meta, "history": history})
    if log_mlflow:
        _log(params, data_dir, out, history, meta, project_dir)
    return meta


def _log(params: Params, data_dir: Path, out: Path, history: list[dict[str, float]], meta: dict[str, Any],
         project_dir: str | Path) -> None:
    uri, run_id = start_run(params, data_dir, project_dir, tags={STAGE: STAGE_PRIOR})
    log = MlflowLogger(uri, run_id)
    for i, h in enumerate(history):
        log.log_metrics({f"prior/{k}": v for k, v in h.items()}, i + 1)
    log.log_artifact(out, "prior")
    log.log_artifact(out.with_suffix(".json"), "prior")
    log.set_tags({PRIOR_L_OT_FINAL: f"{meta['l_ot_final']:.6f}"})
    end_run(uri, run_id)
