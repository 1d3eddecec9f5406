"""`sqgan prior` end to end with a tiny random open_clip CLIP registered under a name, and `train` starting from it."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import tiny_overrides
from typer.testing import CliRunner

from sqgan.cli import app

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}


def _sets(tmp_path, **extra) -> list[str]:
    items = tiny_overrides(**{"mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                              "mlflow.artifact_root": str(tmp_path / "art"), "data.cache": str(tmp_path / "cache"),
                              "prior.clip_model": "sqgan-tiny-prior", "prior.steps": 8, "prior.batch_size": 16,
                              **extra})
    return [a for item in items for a in ("--set", item)]


def test_prior_pretrains_the_codebook_logs_it_and_train_starts_from_it(demo_dir, tmp_path, monkeypatch):
    import open_clip
    from mlflow.tracking import MlflowClient

    from sqgan.config import default_params
    from sqgan.quant.codebook_prior import load_prior
    from sqgan.train.loop import Runtime, setup

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "sqgan-tiny-prior", TINY_CLIP)
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), weights)  # random weights standing in for a download
    out = tmp_path / "prior" / "prior.pt"
    sets = _sets(tmp_path, **{"prior.clip_pretrained": str(weights)})
    r = CliRunner().invoke(app, ["prior", "--data", str(demo_dir), "--out", str(out), "--no-params-file", *sets])
    assert r.exit_code == 0, r.output
    assert "L_OT" in r.output and f"sq.prior={out}" in r.output
    saved = load_prior(out)
    assert saved["codebook"].shape == (16, 4) and saved["meta"]["steps"] == 8
    history = json.loads(out.with_suffix(".json").read_text())["history"]
    assert len(history) == 8 and all(h["l_ot"] > 0 for h in history)
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("sqgan").experiment_id])
    (run,) = runs
    assert run.data.tags["sqgan.stage"] == "prior" and "prior/l_ot" in run.data.metrics

    params = default_params(tiny_overrides(**{"sq.prior": str(out)}))
    state = setup(params, Runtime())
    assert torch.equal(state.G.quantizer.codebook.detach(), saved["codebook"])
    assert torch.equal(state.G_ema.quantizer.codebook, saved["codebook"])  # G_ema is copied after the load
    fresh = setup(default_params(tiny_overrides()), Runtime())
    assert not torch.equal(fresh.G.quantizer.codebook.detach(), saved["codebook"])


def test_prior_without_weights_fails_fast_and_names_the_key(demo_dir, tmp_path):
    r = CliRunner().invoke(app, ["prior", "--data", str(demo_dir), "--no-params-file", *_sets(tmp_path)])
    assert r.exit_code == 2 and "prior.clip_pretrained is unset" in r.output
    t = time.monotonic()
    r = CliRunner().invoke(app, ["prior", "--data", str(demo_dir), "--no-params-file",
                                 *_sets(tmp_path, **{"prior.clip_pretrained": str(tmp_path / "missing.bin"),
                                                     "prior.clip_model": "ViT-B-32"})])
    assert r.exit_code == 1 and "prior.clip_pretrained" in r.output and time.monotonic() - t < 10
    assert not (tmp_path / "cache").exists()  # nothing extracted before the weights were there


def test_train_refuses_a_prior_of_another_codebook_shape_before_ray(tmp_path):
    from sqgan.config import default_params
    from sqgan.quant.sq import StyleQuantizer
    from sqgan.shells.ray_train import check_prior_file

    path = tmp_path / "prior.pt"
    torch.save({"format": 1, "codebook": StyleQuantizer(32, 4, 8).codebook.detach(), "mlp": {}, "meta": {}}, path)
    with pytest.raises(ValueError, match=r"holds a 8 × 4 codebook but sq.codebook_size × sq.code_dim is 16 × 4"):
        check_prior_file(default_params(tiny_overrides(**{"sq.prior": str(path)})))
