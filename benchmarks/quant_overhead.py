"""Measured, side by side in one run: what FQ and SQ add to a whole training step (and StyleGAN2's step time).

Each configuration runs the loop's real `train_step` (D main, lazy regularisers, G main, G_ema) on the same random
images, interleaved in rounds so drift on the machine hits all alike; the median step time of each is printed with
its ratio to the plain step (no FQ, no SQ). The FQ paper measured +1.2 % to +3.1 %. `fq+sq mixdl step` is a MixDL
step (patch head, projection head, distance losses; sqgan.losses.mixdl).

    python benchmarks/quant_overhead.py                      # DCGAN 32², the demo size
    python benchmarks/quant_overhead.py --arch stylegan2 --resolution 64 --set model.channel_base=4096 \
        --set model.channel_max=128                          # StyleGAN2 G+D step on CPU
    python benchmarks/quant_overhead.py --arch stylegan2 --resolution 256 --only fq+sq --kimg   # on a GPU
    python benchmarks/quant_overhead.py --arch biggan --only plain --only fq --set model.conditional=true \
        --set model.num_classes=10 --set 'fq.layers=[0,1,2,3]' --set model.g_channels=16 --set model.d_channels=16
                                                             # BigGAN 32², FQ at every D block (FQ-GAN Table 4)

Numbers go in notes, never into timed tests.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

from sqgan.config import default_params
from sqgan.train.loop import Runtime, setup, train_step

CONFIGS = {
    "plain": ["fq.enabled=false", "sq.enabled=false"],
    "fq": ["fq.enabled=true", "sq.enabled=false"],
    "sq (no qcr)": ["fq.enabled=false", "sq.enabled=true", "sq.lambda_qcr=0"],
    "fq+sq (no qcr)": ["fq.enabled=true", "sq.enabled=true", "sq.lambda_qcr=0"],
    "fq+sq": ["fq.enabled=true", "sq.enabled=true"],
    # every step a MixDL step (mixdl.every = 1): what one costs; at the default every = 2 a run pays the mean of this
    # and fq+sq
    "fq+sq mixdl step": ["fq.enabled=true", "sq.enabled=true", "mixdl.enabled=true", "mixdl.every=1"],
}


class RandomImages:
    """What train_step needs of a dataset: len(), batch(indices) in [-1, 1] and (conditional) labels."""

    def __init__(self, n: int, resolution: int, classes: int = 0) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, resolution, resolution, generator=gen) * 2 - 1
        self.labels = torch.randint(classes, (n,), generator=gen) if classes else None

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx]


def gpu_utilisation() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def time_configs(configs: dict[str, list[str]], data: RandomImages, rt: Runtime, steps: int, rounds: int,
                 kimg: bool = False) -> tuple[dict[str, list[float]], str]:
    """Seconds per `train_step` of each configuration (its --set items), interleaved: `rounds` rounds of `steps` steps
    of each in turn, after two warm-up steps each (FQ initialises its dictionary on the first batch). Also the GPU
    utilisation at the end (kimg on a GPU), else ""."""
    device = rt.device
    states = {}
    for name, sets in configs.items():
        p = default_params(sets)
        states[name] = (p, setup(p, rt))
        for _ in range(2):
            train_step(states[name][1], p, data, rt)
    times: dict[str, list[float]] = {n: [] for n in configs}
    util = ""
    for _ in range(rounds):
        for name in configs:
            p, st = states[name]
            for _ in range(steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                train_step(st, p, data, rt)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
            if kimg and device.type == "cuda":
                util = gpu_utilisation()
    return times, util


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="dcgan")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="steps per round per configuration")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", action="append", help="configurations to run (default: all)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra params override")
    ap.add_argument("--kimg", action="store_true", help="also print seconds per 1000 images and GPU utilisation")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rt = Runtime(device=device)
    names = a.only or list(CONFIGS)
    base = [f"model.arch={a.arch}", f"model.resolution={a.resolution}", f"train.batch_size={a.batch}",
            "metrics.diversity_every=0", *a.sets]
    model = default_params(base).model
    data = RandomImages(512, a.resolution, model.num_classes if model.conditional else 0)
    times, util = time_configs({name: base + CONFIGS[name] for name in names}, data, rt, a.steps, a.rounds, a.kimg)
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) "
          f"threads={torch.get_num_threads()} arch={a.arch} res={a.resolution} batch={a.batch} "
          f"steps={a.steps}x{a.rounds}")
    ref = statistics.median(times[names[0]])
    for name in names:
        med = statistics.median(times[name])
        line = f"{name:16s} {med * 1e3:9.1f} ms/step   ×{med / ref:.3f} of {names[0]}"
        if a.kimg:
            line += f"   {med * 1000 / a.batch:.1f} s/kimg"
        print(line)
    if util:
        print(f"GPU utilisation, memory (nvidia-smi, at the end of the last round): {util}")


if __name__ == "__main__":
    main()
