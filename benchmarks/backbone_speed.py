"""Measured, side by side in one run: the step time of one backbone against another at the same resolution and batch
(FastGAN's claim: a fraction of StyleGAN2's cost at 256²), each the loop's real `train_step`, interleaved in rounds so
drift on the machine hits all alike; medians and the ratio to the first.

    python benchmarks/backbone_speed.py                       # FastGAN vs StyleGAN2 at 256², small widths (CPU)
    python benchmarks/backbone_speed.py --resolution 256 --batch 8 --wide   # the papers' widths (a GPU)

Numbers go in notes, never into timed tests.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from quant_overhead import RandomImages, time_configs

from sqgan.train.loop import Runtime

# (arch, --set items): small widths for the CPU; --wide: FastGAN's ngf = ndf = 64, StyleGAN2 config F's widths
SMALL = {"fastgan": ["model.g_channels=8", "model.d_channels=8"],
         "stylegan2": ["model.channel_base=2048", "model.channel_max=64", "model.mapping_layers=2"]}
WIDE = {"fastgan": ["model.g_channels=64", "model.d_channels=64"],
        "stylegan2": ["model.channel_base=32768", "model.channel_max=512"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="steps per round per backbone")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--wide", action="store_true", help="the papers' widths instead of small ones")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra params override (both)")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rt = Runtime(device=device)
    widths = WIDE if a.wide else SMALL
    common = [f"model.resolution={a.resolution}", f"train.batch_size={a.batch}", "metrics.diversity_every=0",
              "fq.enabled=false", "sq.enabled=false", "train.diffaugment=[]", *a.sets]
    configs = {arch: [f"model.arch={arch}", *common, *sets] for arch, sets in widths.items()}
    times, _ = time_configs(configs, RandomImages(64, a.resolution), rt, a.steps, a.rounds)
    print(f"device={device} threads={torch.get_num_threads()} res={a.resolution} batch={a.batch} "
          f"widths={'wide' if a.wide else 'small'} steps={a.steps}x{a.rounds}")
    names = list(configs)
    ref = statistics.median(times[names[0]])
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:10s} {med * 1e3:9.1f} ms/step   ×{med / ref:.3f} of {names[0]}")


if __name__ == "__main__":
    main()
