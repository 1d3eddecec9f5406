"""What multi-modal truncation costs (Self-Distilled StyleGAN; `sqgan.sampling.truncation`), side by side in one run.

(a) Fitting: mapping --n-fit z through a StyleGAN2 mapping network (w_dim --w-dim) and scikit-learn's KMeans
    (N = --clusters, init random, sklearn defaults otherwise) on them, timed apart; then rendering the centres.
(b) Sampling images/s on the same G: plain (no truncation), global truncation, multimodal with W (l2) assignment and
    multimodal with LPIPS assignment (the paper's: one extra synthesis pass to see the untruncated image, the LPIPS
    backbone once per image, pairwise distances as a matrix product). Rounds are interleaved; medians are reported,
    with each mode's images/s as a ratio to plain sampling. The LPIPS backbone is random (same cost as ImageNet's).
GPU when there is one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-fit", type=int, default=60_000, help="mapped w k-means is fitted on")
    ap.add_argument("--clusters", type=int, default=64)
    ap.add_argument("--w-dim", type=int, default=512)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--channel-base", type=int, default=16384)
    ap.add_argument("--channel-max", type=int, default=512)
    ap.add_argument("--sq", action="store_true", help="with the style quantizer (SQ-GAN) in G")
    ap.add_argument("--n-sample", type=int, default=512, help="images per sampling round")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--psi", type=float, default=0.7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from sqgan.config import default_params
    from sqgan.metrics.features import LPIPSNet
    from sqgan.models.factory import build_generator
    from sqgan.sampling import truncation as T

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = default_params(["model.arch=stylegan2", f"model.resolution={a.resolution}", f"model.w_dim={a.w_dim}",
                             f"model.z_dim={a.w_dim}", f"model.channel_base={a.channel_base}",
                             f"model.channel_max={a.channel_max}", f"sq.enabled={str(a.sq).lower()}"])
    torch.manual_seed(0)
    G = build_generator(params).to(device).eval()

    # (a) fitting
    _sync(device)
    t0 = time.perf_counter()
    w = T.mapped_w(G, a.n_fit, seed=0, batch=1024, device=device)
    _sync(device)
    t1 = time.perf_counter()
    centres_w = T.kmeans_centres(w, a.clusters, seed=0)
    t2 = time.perf_counter()
    images = T.render_uint8(G, centres_w, batch=a.batch)
    _sync(device)
    t3 = time.perf_counter()
    centres = T.Centres(centres_w, images, a.n_fit, 0, T.generator_fingerprint(G))
    print(f"fitting {a.clusters} centres on {a.n_fit} × {a.w_dim} w ({device.type}, {torch.get_num_threads()} CPU "
          f"threads for k-means):")
    print(f"  mapping z → w     {t1 - t0:8.2f} s")
    print(f"  k-means (sklearn) {t2 - t1:8.2f} s")
    print(f"  render centres    {t3 - t2:8.2f} s")

    # (b) sampling
    lpips_net = LPIPSNet("alex").to(device)
    z = torch.randn(a.n_sample, G.z_dim, generator=torch.Generator().manual_seed(1))
    runs = {
        "plain": dict(mode="none"),
        "global": dict(mode="global"),
        "multimodal l2": dict(mode="multimodal", assign="l2", centres=centres),
        "multimodal lpips": dict(mode="multimodal", assign="lpips", centres=centres, lpips_net=lpips_net),
    }
    T.sample(G, z[: a.batch], a.psi, **runs["multimodal lpips"], batch=a.batch)  # warm-up (cuDNN, allocator)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(a.rounds):
        for name, kw in runs.items():
            _sync(device)
            t = time.perf_counter()
            T.sample(G, z, a.psi, **kw, batch=a.batch)
            _sync(device)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"sampling {a.n_sample} images {a.resolution}px, ψ = {a.psi}, batch {a.batch}, {a.clusters} centres, "
          f"{'SQ' if a.sq else 'no SQ'}, {device.type}, median of {a.rounds} interleaved rounds:")
    print(f"  {'mode':17s} {'s':>8s} {'images/s':>10s} {'× plain':>8s}")
    for k, v in med.items():
        print(f"  {k:17s} {v:8.3f} {a.n_sample / v:10.1f} {med['plain'] / v:8.2f}")


if __name__ == "__main__":
    main()
