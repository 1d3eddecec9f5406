"""Does a configuration learn its data? Train it with the plain loop and measure what G_ema covers.

The one function behind the learning ablation (`benchmarks/ablation.py`, on the demo data), the ground-truth mode
benchmark (`benchmarks/modes.py`, on `sqgan.data.modes`) and their tests: train `params` on a curated dataset (no
Ray, no MLflow), draw `num` G_ema samples, and report their pixel diversity and distinct nearest reals against the
training images (`sqgan.metrics.collapse`) and, when the dataset's manifest has a `mode` column (the synthetic modes
set), the modes covered, the KL of the mode histogram from uniform and the clean share (`sqgan.data.modes`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from sqgan.config import Params
from sqgan.data.dataset import ManifestDataset
from sqgan.data.modes import mode_coverage
from sqgan.metrics.collapse import collapse_stats
from sqgan.metrics.evaluate import generate_uint8
from sqgan.metrics.names import is_quality_metric
from sqgan.models.factory import build_generator
from sqgan.train.checkpoint import load_checkpoint
from sqgan.train.loop import train


@dataclass(frozen=True)
class Learned:
    steps: int
    seconds: float  # training wall time
    pixel: float  # pixel diversity of the samples / the reals'
    nn_distinct: int  # distinct nearest reals of the first 64 samples
    modes: int | None = None  # K, when the data has modes
    covered: int | None = None
    kl: float | None = None
    clean: float | None = None
    missing: list[str] | None = None  # the modes not covered ("red-plus", …)
    grid: str | None = None  # the 8 × 8 grid of the first 64 samples
    quality: dict[str, float] | None = None  # the run's final evaluation (metrics.names: fid, pr, lpips, …)

    def as_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


def measure(G: torch.nn.Module, dataset: ManifestDataset, z_dim: int, num: int = 1024, seed: int = 0,
            grid: Path | None = None) -> dict[str, float | int | str | None]:
    """The learning numbers of generator `G` on `dataset` (uint8 samples from fixed seeds)."""
    fake = torch.cat(list(generate_uint8(G, num, z_dim, 128, seed, torch.device("cpu"))))
    st = collapse_stats(fake[:64], dataset.images)
    out: dict[str, float | int | str | None] = {"pixel": st.pixel, "nn_distinct": st.nn_count}
    if "mode" in dataset.manifest.columns:
        k = int(dataset.manifest["mode"].max()) + 1
        names = dataset.manifest["mode_name"].drop_duplicates().tolist()
        shapes = len({n.split("-", 1)[1] for n in names})
        cov = mode_coverage(fake, shapes, k // shapes)
        out.update(modes=cov.modes, covered=cov.covered, kl=cov.kl, clean=cov.clean, missing=cov.missing)
    if grid is not None:
        grid.parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid(fake[:64].float() / 255.0, nrow=8), grid)
        out["grid"] = str(grid)
    return out


def train_and_measure(params: Params, data_dir: str | Path, out_dir: str | Path, num: int = 1024) -> Learned:
    """Train `params` on `data_dir` into `out_dir` with the plain loop, then measure G_ema (grid in out_dir)."""
    t0 = time.perf_counter()
    result = train(params, data_dir, out_dir)
    seconds = time.perf_counter() - t0
    dataset = ManifestDataset(data_dir, params.model.resolution, split="train")
    G = build_generator(params)  # the params it was just trained with
    G.load_state_dict(load_checkpoint(result.checkpoint)["G_ema"])
    numbers = measure(G.eval(), dataset, params.model.z_dim, num,
                      grid=Path(out_dir) / "samples_measured.png")
    quality = {k: v for k, v in result.metrics.items() if is_quality_metric(k)}
    return Learned(steps=params.train.steps, seconds=seconds, quality=quality, **numbers)  # type: ignore[arg-type]
