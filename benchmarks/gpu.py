"""The GPU benchmark (issue 24), ready before a GPU is: StyleGAN2 training steps in float32, bf16 and bf16 with
`train.compile`, plain / FQ + SQ / FQ + SQ + QCR every 4 steps, side by side (the loop's real `train_step`,
interleaved in rounds, after warm-up steps that hold the compile); per row the median step time, sec/kimg, peak
memory and, on a GPU, its utilisation (nvidia-smi); then the metric pipeline's images/s on Inception-sized inputs
(299², torch-fidelity's Inception-v3 architecture, random weights: the speed does not depend on them). One JSON and
one markdown table. It runs wherever torch runs: on a CPU `--quick` takes about two minutes, most of it compiling
(tests/test_gpu_ready.py runs it).

    python benchmarks/gpu.py --out benchmarks/results/gpu                # StyleGAN2 256², batch 32 (a GPU)
    python benchmarks/gpu.py --quick --out /tmp/gpu-quick                 # 32², tiny widths: the CPU check

With 2 or more GPUs it also runs `benchmarks/ray_overhead.py --device cuda --workers 2` (1 vs 2 GPU workers under
Ray Train, DDP) and puts its rows in the JSON; with fewer the JSON says it was not measured. Numbers go in notes and
benchmarks/results/, never into timed tests.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from metrics_pipeline import _images, _net
from quant_overhead import RandomImages, time_configs

from sqgan.io import atomic_path, write_json_atomic
from sqgan.train.loop import Runtime

METHODS = {
    "plain": ["fq.enabled=false", "sq.enabled=false"],
    "fq+sq": ["fq.enabled=true", "sq.enabled=true", "sq.lambda_qcr=0"],
    "fq+sq+qcr/4": ["fq.enabled=true", "sq.enabled=true", "sq.qcr_every=4"],
}
PRECISIONS = {"float32": ["train.amp=off"], "bf16": ["train.amp=bf16"],
              "bf16+compile": ["train.amp=bf16", "train.compile=true"]}
FULL = {"resolution": 256, "batch": 32, "steps": 5, "rounds": 3, "metric_images": 1024,
        "sets": ["model.channel_base=16384", "model.channel_max=512"]}
QUICK = {"resolution": 32, "batch": 4, "steps": 2, "rounds": 1, "metric_images": 16,
         "sets": ["model.channel_base=256", "model.channel_max=16", "model.mapping_layers=2", "model.z_dim=32",
                  "model.w_dim=32", "fq.codebook_size=16", "sq.codebook_size=16"]}


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def metric_images_per_s(n: int, device: torch.device, batch: int = 64) -> float:
    """Images/s of the Inception-v3 feature pass over n uint8 images resized to 299² (what FID/KID/IS extract)."""
    from sqgan.metrics.evaluate import extract

    net = _net(True, device)
    images = _images(n, 299, 0)
    extract(net, iter(images[: min(n, batch)].split(batch)), min(n, batch), device, False, "warm-up")
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    extract(net, iter(images.split(batch)), n, device, False, "fake")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def ray_workers(out: Path) -> dict:
    """1 vs 2 GPU workers under Ray Train: benchmarks/ray_overhead.py's plain, Ray ×1 and Ray ×2 rows on cuda."""
    import json
    import subprocess

    path = out / "ray_workers.json"
    subprocess.run([sys.executable, str(Path(__file__).with_name("ray_overhead.py")), "--device", "cuda", "--workers",
                    "2", "--trials", "0", "--json", str(path)], check=True, timeout=3600)
    return json.loads(path.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32², tiny widths, one round: the CPU check")
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra params override (every row)")
    ap.add_argument("--precision", dest="precisions", action="append", choices=list(PRECISIONS),
                    help="only these precisions (repeatable; default: all)")
    a = ap.parse_args()
    precisions = a.precisions or list(PRECISIONS)
    size = QUICK if a.quick else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rt = Runtime(device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    base = ["model.arch=stylegan2", f"model.resolution={size['resolution']}", f"train.batch_size={size['batch']}",
            "metrics.diversity_every=0", *size["sets"], *a.sets]
    configs = {f"{m} {p}": base + METHODS[m] + PRECISIONS[p] for m in METHODS for p in precisions}
    data = RandomImages(max(64, 4 * size["batch"]), size["resolution"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, util = time_configs(configs, data, rt, size["steps"], size["rounds"], kimg=True)
    rows = []
    for cfg, ts in times.items():
        method, precision = cfg.rsplit(" ", 1)
        step = statistics.median(ts)
        rows.append({"method": method, "precision": precision, "compile": "compile" in precision,
                     "ms_per_step": step * 1e3,
                     "sec_per_kimg": step * 1000 / size["batch"], "steps_timed": len(ts)})
    ips = metric_images_per_s(size["metric_images"], device)
    report = {
        "device": device.type, "device_name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"), "resolution": size["resolution"], "batch": size["batch"],
        "quick": a.quick, "rows": rows, "peak_memory": peak_memory(device), "gpu_utilisation": util or "n/a",
        "metric_pipeline": {"network": "inception-v3 (random weights)", "input": "299² uint8",
                            "images": size["metric_images"], "images_per_s": ips},
        "not_measured": {},
    }
    if torch.cuda.device_count() >= 2:
        report["ray_1_vs_2_gpus"] = ray_workers(a.out)
    else:
        report["not_measured"]["ray_1_vs_2_gpus"] = f"needs 2 GPUs; this machine has {torch.cuda.device_count()}"
    a.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.out / "gpu.json", report)
    ref = {r["method"]: r["ms_per_step"] for r in rows if r["precision"] == precisions[0]}
    lines = [f"# sqgan GPU benchmark: {name} ({device.type}), {report['date']}", "",
             f"StyleGAN2 {size['resolution']}², batch {size['batch']}, torch {torch.__version__}, "
             f"{size['steps']} × {size['rounds']} timed steps per row{' (--quick)' if a.quick else ''}; peak memory "
             f"{report['peak_memory']}; GPU utilisation {report['gpu_utilisation']}.", "",
             f"| method | precision | ms/step | sec/kimg | × {precisions[0]} |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['precision']} | {r['ms_per_step']:.1f} | {r['sec_per_kimg']:.2f} | "
                     f"{r['ms_per_step'] / ref[r['method']]:.3f} |")
    lines += ["", f"Metric pipeline: {ips:.1f} images/s (Inception-v3 features of 299² inputs, "
                  f"{size['metric_images']} images).",
              "", *(f"Not measured: {k} — {v}." for k, v in report["not_measured"].items()),
              *(["Ray Train 1 vs 2 GPU workers: ray_workers.json (benchmarks/ray_overhead.py's rows)."]
                if "ray_1_vs_2_gpus" in report else []), ""]
    with atomic_path(a.out / "gpu.md") as tmp:
        tmp.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
