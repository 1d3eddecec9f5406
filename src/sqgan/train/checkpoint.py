"""One home for checkpoints: the format, atomic save, pruning, load (with its one-line errors), the latest of a run
folder, and G_ema rebuilt from one (what `sqgan sample`, `sqgan eval`, fine-tuning and the learning benchmark read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sqgan.config import Params
from sqgan.io import atomic_path, read_torch_file
from sqgan.models.factory import build_generator

CHECKPOINT_FORMAT = 3  # 2: G = mapping/quantizer/synthesis, D = trunk + quantizers, ADA and path-length state;
#                        3: the DCGAN/SNGAN mapping MLP is residual (issue 25)
ARCH_SECTIONS = ("data", "model", "fq", "sq", "train")  # what G, its seed and its dataset come from


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def prune_checkpoints(ckpt_dir: Path, keep_last: int, keep: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` step_*.pt in `ckpt_dir` (0: none deleted) and `keep`; returns what went."""
    if keep_last <= 0:
        return []
    found = sorted(ckpt_dir.glob("step_*.pt"))
    gone = [p for p in found[:-keep_last] if keep is None or p.resolve() != Path(keep).resolve()]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state (weights_only=True); any file that is not one is a one-line ValueError."""
    path = Path(path)
    pick = "pass a step_NNNNNN.pt file from a run's checkpoints/ folder"
    state = read_torch_file(path, "checkpoint", pick)
    if isinstance(state, dict) and state.get("format") == 2:
        p = state.get("params") or {}
        if p.get("model", {}).get("arch") in ("dcgan", "sngan") and p.get("sq", {}).get("enabled"):
            raise ValueError(f"{path}: a DCGAN/SNGAN + SQ checkpoint from before the residual mapping network (format "
                             f"2; its mapping MLP made the generator ignore z, issue 25): it cannot be loaded into "
                             f"this version; train it again")
        state["format"] = CHECKPOINT_FORMAT  # nothing else changed between 2 and 3
    if isinstance(state, dict) and isinstance(state.get("format"), int) and state["format"] < CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: an sqgan checkpoint of format {state['format']}, from before the model factory "
                         f"(format {CHECKPOINT_FORMAT}); its networks cannot be loaded into this version: start a new "
                         f"run, or resume it with the sqgan version that wrote it")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an sqgan checkpoint (format {CHECKPOINT_FORMAT}); {pick}")
    return state


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


def load_generator(checkpoint: Path, device: Any) -> tuple[Any, Params, int]:
    """(G_ema in eval mode on `device`, the params it was trained with, its step)."""
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
