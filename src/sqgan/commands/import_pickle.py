"""`sqgan import`: a stylegan2-ada-pytorch network pickle becomes an sqgan run folder and an MLflow run.

The pickle is read without running its code (`sqgan.models.ada_pickle`); its networks' kwargs set `model.*`
(StyleGAN2, resolution, z/w dims, mapping depth, channel base/max, conv_clamp, minibatch-stddev) and its G, G_ema
(with `w_avg`) and D are loaded into sqgan's StyleGAN2 with every tensor checked by name and shape. The run folder
then holds what `sqgan train` leaves: `checkpoints/step_000000.pt` (format 3, FQ and SQ off, no optimiser state),
`params.yaml`, `tracking.json`; so `sqgan sample --checkpoint RUN_DIR` (plain, `--truncation multimodal|global`,
`--cluster J`), `sqgan eval --checkpoint RUN_DIR` and `--run RUN_ID` work on it, and `sqgan train --set
train.init_from=RUN_DIR` fine-tunes it. The MLflow run is tagged `sqgan.stage=import` with the pickle's sha256 and
logs the networks' kwargs as `ada.*` params.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from mlflow.entities import Param

from sqgan.config import Params
from sqgan.io import sha256_file, stage_output, write_bytes_atomic, write_json_atomic
from sqgan.models.ada_pickle import load_into, networks_of, read_pickle
from sqgan.models.factory import build_discriminator, build_generator
from sqgan.shells.tracking import TRACKING_FILE, end_run, mlflow_client, start_run
from sqgan.tags import IMPORT_HAS_D, IMPORT_KIMG, IMPORT_SHA256, IMPORT_SOURCE, STAGE, STAGE_IMPORT
from sqgan.train.checkpoint import CHECKPOINT_FORMAT

MARKER = STAGE_IMPORT  # its run's sqgan.stage and the marker of its run folder


@dataclass
class Imported:
    out: Path
    checkpoint: Path
    run_id: str
    tracking_uri: str
    sha256: str
    model: dict[str, object]
    kimg: int | None


def imported_params(params: Params, model: dict[str, object]) -> Params:
    """`params` with the pickle's model.* and FQ, SQ and MixDL off (the source has no dictionaries or heads)."""
    raw = params.model_dump(mode="json")
    raw["model"] = raw["model"] | model
    raw["fq"]["enabled"] = raw["sq"]["enabled"] = raw["mixdl"]["enabled"] = False
    return Params.model_validate(raw)


def run_import(params: Params, pkl: str | Path, out: str | Path, data_dir: str | Path | None = None,
               force: bool | str = False, project_dir: str | Path = ".") -> Imported:
    pkl, out = Path(pkl), Path(out)
    nets = networks_of(read_pickle(pkl), pkl)  # everything that can be refused is refused before anything is written
    p = imported_params(params, nets.model)
    G, G_ema, D = build_generator(p), build_generator(p), build_discriminator(p)
    load_into(G, nets.G, "G", pkl)
    load_into(G_ema, nets.G_ema, "G_ema", pkl)
    if nets.D is not None:
        load_into(D, nets.D, "D", pkl)
    digest = sha256_file(pkl)
    m = re.search(r"network-snapshot-(\d+)\.pkl$", pkl.name)
    kimg = int(m.group(1)) if m else None
    state = {
        "format": CHECKPOINT_FORMAT, "step": 0, "G": G.state_dict(), "G_ema": G_ema.state_dict(),
        "D": D.state_dict() if nets.D is not None else None, "opt_g": None, "opt_d": None, "ada": None,
        "mixdl_heads": None,
        "pl_mean": torch.zeros([]), "rng": None, "params": p.model_dump(mode="json"), "metrics": {},
        "imported": {"source": str(pkl), "sha256": digest, "kimg": kimg},
    }
    data = Path(data_dir) if data_dir is not None else Path(p.data.root) / p.data.dataset
    tags = {STAGE: STAGE_IMPORT, IMPORT_SHA256: digest, IMPORT_SOURCE: str(pkl.resolve()),
            IMPORT_KIMG: str(kimg) if kimg is not None else "unknown", IMPORT_HAS_D:
            str(nets.D is not None).lower()}
    with stage_output(out, MARKER, (pkl,), force) as tmp:
        uri, run_id = start_run(p, data, project_dir, tags=tags)
        try:
            client = mlflow_client(uri)
            kw = [Param(f"ada.{k}"[:250], str(v)[:6000]) for k, v in sorted(nets.kwargs.items())]
            kw += [Param(f"ada.training_set.{k}"[:250], str(v)[:6000]) for k, v in sorted(nets.training_set.items())
                   if not isinstance(v, dict)]
            for i in range(0, len(kw), 100):
                client.log_batch(run_id, params=kw[i : i + 100])
            ckpt = tmp / "checkpoints" / "step_000000.pt"
            ckpt.parent.mkdir(parents=True)
            torch.save(state, ckpt)
            write_bytes_atomic(tmp / "params.yaml", yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False).encode())
            write_json_atomic(tmp / TRACKING_FILE, {"tracking_uri": uri, "run_id": run_id})
            client.log_artifact(run_id, str(ckpt), "checkpoints")
        except BaseException:
            end_run(uri, run_id, "FAILED")
            raise
    end_run(uri, run_id, "FINISHED")
    return Imported(out, out / "checkpoints" / "step_000000.pt", run_id, uri, digest, nets.model, kimg)
