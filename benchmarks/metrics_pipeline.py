"""The metric pipeline's throughput against torchmetrics' on the same images, side by side in one run (a ratio).

Both compute FID and KID of N generated vs N real uint8 images with the same feature network (the random CNN, or
torch-fidelity's Inception-v3 architecture with random weights via --inception: the speed does not depend on the
weights):
- sqgan: `sqgan.metrics.evaluate.extract` (features once per set) + FID/KID from the feature matrices
  (torch-fidelity's functions), the way `Evaluator` runs;
- torchmetrics: `FrechetInceptionDistance` and `KernelInceptionDistance`, each updated with every batch (each
  metric runs the network on every image itself) and computed.
Rounds are interleaved; the median of each is reported, with images/s = 2N / time. GPU when there is one.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _net(inception: bool, device: torch.device) -> torch.nn.Module:
    from sqgan.metrics.features import RandomCNNFeatures

    if not inception:
        return RandomCNNFeatures().to(device)
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    fe.load_state_dict_from_url = lambda *a, **k: None  # random weights: same architecture, same cost
    orig = fe.FeatureExtractorInceptionV3.load_state_dict
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None
    try:
        inner = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict = orig

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = inner

        def forward(self, x):
            pool, logits = self.net(x)
            return pool, logits

    return Wrapped().to(device)


def ours(net, real, fake, batch, device) -> tuple[float, float]:
    from sqgan.metrics.evaluate import extract
    from sqgan.metrics.fid import fid_from_features
    from sqgan.metrics.kid import kid_from_features

    fr, _, _ = extract(net, iter(real.split(batch)), len(real), device, False, "real")
    ff, _, _ = extract(net, iter(fake.split(batch)), len(fake), device, False, "fake")
    return fid_from_features(fr, ff), kid_from_features(fr, ff, subsets=100)[0]


def theirs(net, real, fake, batch, device) -> tuple[float, float]:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    class Pool(torch.nn.Module):  # torchmetrics wants one feature tensor
        def __init__(self) -> None:
            super().__init__()
            self.inner = net

        def forward(self, x):
            return self.inner(x)[0]

    feat = Pool()
    fid = FrechetInceptionDistance(feature=feat, normalize=False, sync_on_compute=False).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=feat, normalize=False, subsets=100,
                                      subset_size=min(1000, len(real)), sync_on_compute=False).to(device)
    for b in real.split(batch):
        fid.update(b.to(device), real=True)
        kid.update(b.to(device), real=True)
    for b in fake.split(batch):
        fid.update(b.to(device), real=False)
        kid.update(b.to(device), real=False)
    return float(fid.compute()), float(kid.compute()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="images per set")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--inception", action="store_true", help="Inception-v3 architecture (random weights)")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = _net(a.inception, device)
    real, fake = _images(a.n, a.size, 0), _images(a.n, a.size, 1)
    times: dict[str, list[float]] = {"sqgan": [], "torchmetrics": []}
    values = {}
    for _ in range(a.rounds):
        for name, fn in (("sqgan", ours), ("torchmetrics", theirs)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            values[name] = fn(net, real, fake, a.batch, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    feat = "inception-v3 (random weights)" if a.inception else "random CNN"
    print(f"metric pipeline, FID + KID of {a.n} vs {a.n} images {a.size}px, {feat}, {device.type}, batch {a.batch}:")
    for k in med:
        print(f"  {k:13s} {med[k]:7.2f} s = {2 * a.n / med[k]:8.1f} images/s   FID {values[k][0]:.4f} "
              f"KID {values[k][1]:.5f}")
    print(f"  ratio sqgan/torchmetrics images/s: ×{med['torchmetrics'] / med['sqgan']:.2f}")


if __name__ == "__main__":
    main()
