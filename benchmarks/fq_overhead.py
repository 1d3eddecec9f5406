"""Measured, side by side in one run: the cost of FQ in a discriminator step.

Prints the time of one D forward+backward at the demo size with FQ on two layers and without FQ, and
their ratio (FQ overhead). Run with `make bench`; numbers go in notes, never into timed tests.
"""

from __future__ import annotations

import argparse
import time

import torch

from sqgan.models.dcgan import Discriminator


def _time_step(d: Discriminator, x: torch.Tensor, repeats: int) -> float:
    for _ in range(3):  # warm-up
        out = d(x)
        (out.logits.mean() + out.fq_loss).backward()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = d(x)
        (out.logits.mean() + out.fq_loss).backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]  # median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--codebook-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, a.resolution, a.resolution, device=a.device)
    plain = Discriminator(a.resolution, 64).to(a.device)
    fq = Discriminator(a.resolution, 64, fq_layers=[1, 2], codebook_size=a.codebook_size).to(a.device)
    fq.load_state_dict(plain.state_dict(), strict=False)
    # interleave so drift on the machine hits both alike
    t_plain, t_fq = [], []
    for _ in range(3):
        t_plain.append(_time_step(plain, x, a.repeats))
        t_fq.append(_time_step(fq, x, a.repeats))
    p, f = min(t_plain), min(t_fq)
    print(f"device={a.device} threads={torch.get_num_threads()} batch={a.batch} res={a.resolution} "
          f"K={a.codebook_size}")
    print(f"D fwd+bwd without FQ: {p * 1e3:.2f} ms")
    print(f"D fwd+bwd with FQ on 2 layers: {f * 1e3:.2f} ms")
    print(f"FQ overhead ratio: {f / p:.3f}x")


if __name__ == "__main__":
    main()
