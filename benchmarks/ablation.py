"""Does each backbone and method learn the demo data? The learning ablation of issue 25, side by side in one run.

Each row trains the shipped params with a few switches (the plain loop of `sqgan.train.loop`, no Ray or MLflow) on
the demo data (IHC tissue crops + LFW faces) and measures G_ema: pixel diversity of 64 fixed-z samples relative to
the reals' (`diversity/pixel`), how many distinct reals are their nearest neighbours, the share of samples nearest a
face (the shipped demo data is ~3/5 faces), and the final evaluation's FID, precision/recall and LPIPS diversity
(random-CNN features offline: `_randcnn`/`_randalex`). A collapsed generator has pixel ≪ 1, one nearest real and
recall 0.

    python benchmarks/ablation.py                          # DCGAN rows at the demo schedule (1000 steps)
    python benchmarks/ablation.py --arch sngan --steps 600
    python benchmarks/ablation.py --arch stylegan2 --steps 600 --only plain --only "fq+sq"

Results: a markdown table on stdout; `--out FILE` appends the rows as JSON lines. Numbers go in notes and
benchmarks/results/, never into timed tests.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from sqgan.config import default_params
from sqgan.data.dataset import ManifestDataset
from sqgan.data.demo import LFW_SOURCE
from sqgan.data.stages import run_stage
from sqgan.metrics.collapse import nearest_real
from sqgan.train.checkpoint import load_generator
from sqgan.train.learning import train_and_measure

ROWS = {
    "plain": ["fq.enabled=false", "sq.enabled=false", "train.diffaugment=[]"],
    "+diffaugment": ["fq.enabled=false", "sq.enabled=false"],
    "+fq": ["fq.enabled=true", "sq.enabled=false"],
    "+sq (no qcr)": ["fq.enabled=false", "sq.enabled=true", "sq.lambda_qcr=0"],
    "+sq": ["fq.enabled=false", "sq.enabled=true"],
    "+sq (no uniformity)": ["fq.enabled=false", "sq.enabled=true", "sq.uniformity_t=0"],
    "+fq+sq (demo)": ["fq.enabled=true", "sq.enabled=true"],
    "+fq+sq+ada": ["fq.enabled=true", "sq.enabled=true", "ada.enabled=true"],
}
# StyleGAN2 small enough for 2 CPU cores, at its own optimiser settings (stylegan2-ada: lr 0.0025, betas (0, 0.99))
ARCH = {
    "dcgan": [],
    "sngan": ["model.g_channels=64", "model.d_channels=64"],
    "stylegan2": ["model.channel_base=2048", "model.channel_max=128", "model.mapping_layers=2", "train.lr_g=0.0025",
                  "train.lr_d=0.0025", "train.beta1=0", "train.beta2=0.99", "train.batch_size=32"],
}


def face_share(G: torch.nn.Module, dataset: ManifestDataset, z_dim: int) -> float:
    """Share of 64 fixed-z samples whose pixel-nearest real is an LFW face."""
    from sqgan.metrics.evaluate import generate_uint8

    fake = torch.cat(list(generate_uint8(G, 64, z_dim, 64, 0, torch.device("cpu"))))
    faces = torch.tensor((dataset.manifest["source"] == LFW_SOURCE).to_numpy())
    return float(faces[nearest_real(fake, dataset.images)].float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="dcgan", choices=list(ARCH))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--only", action="append", help="row name (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="extra key=value for every row")
    ap.add_argument("--out", type=Path, help="append the rows to this JSON-lines file")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [r for r in ROWS if not args.only or r in args.only]
    work = Path(tempfile.mkdtemp(prefix="sqgan-ablation-"))
    data = work / "demo"
    run_stage("demo", default_params(args.set), out=data)  # the demo stage `make demo` runs (70 faces, 49 crops)
    dataset = ManifestDataset(data, 32)
    print("| arch | row | steps | pixel div. | distinct NN / 64 | faces | FID (randcnn) | precision | recall | "
          "LPIPS div. | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    try:
        for row in rows:
            sets = [f"model.arch={args.arch}", f"train.steps={args.steps}", "metrics.eval_every=0",
                    "metrics.names=[fid,pr,lpips]", "metrics.num_fake=500", "metrics.diversity_every=0",
                    f"train.checkpoint_every={args.steps}", *ARCH[args.arch], *ROWS[row], *args.set]
            params = default_params(sets)
            out = work / "runs" / row.replace(" ", "_")
            got = train_and_measure(params, data, out, num=64)
            G = load_generator(sorted((out / "checkpoints").glob("step_*.pt"))[-1], torch.device("cpu"))[0]
            faces = face_share(G, dataset, params.model.z_dim)
            q = got.quality or {}
            fid = next((v for k, v in q.items() if k.startswith("fid")), float("nan"))
            prec = next((v for k, v in q.items() if k.startswith("precision")), float("nan"))
            rec = next((v for k, v in q.items() if k.startswith("recall")), float("nan"))
            lp = next((v for k, v in q.items() if k.startswith("lpips")), float("nan"))
            print(f"| {args.arch} | {row} | {args.steps} | {got.pixel:.3f} | {got.nn_distinct} | {faces:.2f} | "
                  f"{fid:.3f} | {prec:.3f} | {rec:.3f} | {lp:.4f} | {got.seconds:.0f} |", flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps({"arch": args.arch, "row": row, "faces": faces,
                                        **got.as_dict()}) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
