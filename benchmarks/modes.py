"""The ground-truth learning benchmark: does every backbone × method cover a distribution with K known modes?

The data (`sqgan.data.modes`): K = 16 modes (4 shapes × 4 colours) at 32² (FastGAN: 256², its smallest size), 64
seeded images per mode. Each row
trains with the plain loop (no Ray or MLflow), draws 1024 G_ema samples and reads their modes back from the pixels:
modes covered of K (a mode counts when it holds a quarter of its uniform share of the clean samples), KL of the
generated mode histogram from uniform, and the share of samples that are a clean mode. The target: ≥ 14 of 16
covered, KL ≤ 0.3, ≥ 80 % clean. MixDL is a few-shot method: its row trains on 16 images, one per mode (a 10-shot
subset cannot hold 16 modes), and must reproduce all of them.

    python benchmarks/modes.py                              # every backbone × method (hours on 2 CPU cores: a
                                                            # DCGAN row of 3000 steps took 16–27 min on one core)
    python benchmarks/modes.py --arch dcgan --only fq+sq    # one row
    python benchmarks/modes.py --steps 1500 --out rows.jsonl
    python benchmarks/modes.py --arch dcgan --only fq+sq --steps 3000 --set model.pack=2 --grids grids/

Prints a markdown table (and `--out` appends JSON lines); exits 1 when a row misses the target. Numbers go in notes
and benchmarks/results/, never into timed tests.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from sqgan.config import default_params
from sqgan.data.modes import build_modes
from sqgan.train.learning import train_and_measure

METHODS = {
    "fq": ["fq.enabled=true", "sq.enabled=false"],
    "sq": ["fq.enabled=false", "sq.enabled=true"],
    "fq+sq": ["fq.enabled=true", "sq.enabled=true"],
    "mixdl (16-shot)": ["fq.enabled=true", "sq.enabled=true", "mixdl.enabled=true", "train.batch_size=16"],
}
# each backbone at a size a CPU core trains in tens of minutes, with its own optimiser settings (DCGAN/SNGAN: the
# shipped lr_g 2e-4 / lr_d 8e-4 and DiffAugment colour + translation — at half the rates 16 modes reach 10/16 in 3000
# steps, and cutout's 16 × 16 hole can cover most of a 32² image's one shape, benchmarks/results/learning.md;
# StyleGAN2: stylegan2-ada's lr 0.0025, betas (0, 0.99)); the step counts are what the table states
# (BigGAN: the CIFAR launch script's rates, unconditional here; FastGAN: the official lr 2e-4, betas (0.5, 0.999),
# batch 8, at its smallest size, 256², with 16 channels where the official has 64)
ARCHS = {
    "dcgan": (["model.g_channels=64", "model.d_channels=64"], 3000),
    "sngan": (["model.g_channels=64", "model.d_channels=64"], 3000),
    "stylegan2": (["model.channel_base=2048", "model.channel_max=128", "model.mapping_layers=2",
                   "train.lr_g=0.0025", "train.lr_d=0.0025", "train.beta1=0", "train.beta2=0.99"], 1000),
    "biggan": (["model.g_channels=16", "model.d_channels=16", "train.lr_g=2e-4", "train.lr_d=2e-4",
                "train.beta1=0", "train.beta2=0.999"], 3000),
    "fastgan": (["model.resolution=256", "model.g_channels=16", "model.d_channels=16", "train.batch_size=8",
                 "train.lr_g=2e-4", "train.lr_d=2e-4"], 1000),
}
RESOLUTION = {"fastgan": 256}  # the modes data at the backbone's size (default 32²)
TARGET = {"covered": 14 / 16, "kl": 0.3, "clean": 0.8}


def passes(row: dict) -> bool:
    return (row["covered"] >= TARGET["covered"] * row["modes"] and row["kl"] <= TARGET["kl"]
            and row["clean"] >= TARGET["clean"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", choices=list(ARCHS), help="backbone (repeatable; default all)")
    ap.add_argument("--only", action="append", choices=list(METHODS), help="method (repeatable; default all)")
    ap.add_argument("--steps", type=int, help="override every row's step count")
    ap.add_argument("--set", action="append", default=[], help="extra key=value for every row")
    ap.add_argument("--out", type=Path, help="append the rows to this JSON-lines file")
    ap.add_argument("--grids", type=Path, help="keep each row's grid of 64 measured samples here (ARCH-METHOD.png)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="sqgan-modes-"))
    made: dict[tuple[int, int], Path] = {}

    def modes_data(resolution: int, per_mode: int) -> Path:  # built once per size, seeded
        if (resolution, per_mode) not in made:
            made[resolution, per_mode] = build_modes(work / f"modes-{resolution}-{per_mode}", resolution=resolution,
                                                     shapes=4, colours=4, per_mode=per_mode)
        return made[resolution, per_mode]

    print("| arch | method | steps | modes covered | KL(p‖uniform) | clean | pixel div. | s | target | missing |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    try:
        for arch in args.arch or list(ARCHS):
            sets, steps = ARCHS[arch]
            steps = args.steps or steps
            for method in args.only or list(METHODS):
                data = modes_data(RESOLUTION.get(arch, 32), 1 if method.startswith("mixdl") else 64)
                params = default_params([f"model.arch={arch}", f"train.steps={steps}", "metrics.eval_every=0",
                                         "metrics.names=[fid]", "metrics.num_fake=64", "metrics.diversity_every=0",
                                         f"train.checkpoint_every={steps}", *sets, *METHODS[method], *args.set])
                run = work / "runs" / f"{arch}-{method.split()[0]}"
                got = train_and_measure(params, data, run, num=1024)
                if args.grids:
                    args.grids.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(run / "samples_measured.png", args.grids / f"{run.name}.png")
                row = {"arch": arch, "method": method, **got.as_dict()}
                good = passes(row)
                ok &= good
                missing = ", ".join(got.missing or []) or "-"
                print(f"| {arch} | {method} | {steps} | {got.covered}/{got.modes} | {got.kl:.3f} | {got.clean:.2f} | "
                      f"{got.pixel:.2f} | {got.seconds:.0f} | {'pass' if good else 'FAIL'} | {missing} |", flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps({**row, "pass": good}) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
