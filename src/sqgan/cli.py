"""`sqgan` command line: a thin shell over the stage functions.

Every command reads `--params FILE` (default params.yaml) and any number of `--set key.path=value`.
Bad params exit with status 2 and a message naming the key; a failing stage exits with status 1.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from sqgan.config import ConfigError, Params, describe, load_params

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Show or check the resolved params.", no_args_is_help=True)
data_app = typer.Typer(help="Build datasets (each a folder of images + manifest.parquet).", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

ParamsOpt = Annotated[Path | None, typer.Option("--params", "-p", help="params file (default: params.yaml)")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override a param: key.path=value (repeatable)")
]


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def resolve(params_file: Path | None, overrides: list[str] | None) -> Params:
    try:
        return load_params(params_file, overrides or [])
    except ConfigError as e:
        _err(f"error: {e}")
        raise typer.Exit(2) from None


@contextlib.contextmanager
def stage_errors() -> Iterator[None]:
    """A failing stage (missing input, bad data, unloadable model) exits 1 with its message, no traceback."""
    try:
        yield
    except (OSError, ValueError, RuntimeError) as e:
        _err(f"error: {e}")
        raise typer.Exit(1) from None


@config_app.command("show")
def config_show(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved params, each key with its doc and allowed values."""
    typer.echo(describe(resolve(params, set_)), nl=False)


@config_app.command("validate")
def config_validate(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Check the params; exit 2 naming the first bad key."""
    resolve(params, set_)
    typer.echo(f"{params or 'params.yaml'}: ok")


@data_app.command("demo")
def data_demo(
    out: Annotated[Path, typer.Option(help="output folder (replaced atomically)")] = Path("data/demo"),
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Build the offline demo dataset from images bundled in scikit-image (data.demo.*, model.resolution)."""
    from sqgan.data.demo import build_demo

    p = resolve(params, set_)
    d = p.data.demo
    with stage_errors():
        path = build_demo(out, p.model.resolution, d.crop, d.stride, d.lfw_faces, d.test_fraction, d.seed)
    typer.echo(f"demo dataset written to {path}")


@data_app.command("download")
def data_download(
    url: Annotated[str, typer.Option(help="http(s) URL of the file")],
    sha256: Annotated[str, typer.Option(help="expected sha256 (64 hex digits)")],
    out: Annotated[Path, typer.Option(help="folder to download into")],
    extract: Annotated[bool, typer.Option("--extract", help="extract the tar/zip into OUT/<name>")] = False,
    filename: Annotated[str | None, typer.Option(help="file name (default: the URL's last part)")] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Download a file (resuming a partial one), verify its sha256, optionally extract it safely."""
    from sqgan.data.download import archive_stem, download, extract_archive

    resolve(params, set_)
    with stage_errors():
        path = download(url, sha256, out, filename)
        if extract:
            path = extract_archive(path, out / archive_stem(path.name))
    typer.echo(f"ready: {path}")


@data_app.command("curate")
def data_curate(
    src: Annotated[Path, typer.Option(help="folder of raw images (searched recursively)")],
    out: Annotated[Path, typer.Option(help="curated dataset folder (replaced atomically)")],
    min_images: Annotated[int, typer.Option(help="fail when fewer usable images remain")] = 1,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Decode, convert to RGB, drop exact duplicates, quarantine unusable files (listed with reasons)."""
    from sqgan.data.curate import curate

    resolve(params, set_)
    with stage_errors():
        counts = curate(src, out, min_images=min_images)
    typer.echo(f"curated {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@data_app.command("brecahad")
def data_brecahad(
    src: Annotated[Path, typer.Option(help="folder of BreCaHAD slides (TIFF, 1360×1024)")],
    out: Annotated[Path, typer.Option(help="crop dataset folder (replaced atomically)")],
    crop: Annotated[int, typer.Option(help="crop side in px")] = 512,
    stride: Annotated[int, typer.Option(help="crop stride in px")] = 256,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Crop every slide on the BreCaHAD grid (x outer, y inner): 12 crops per 1360×1024 slide."""
    from sqgan.data.brecahad import crop_brecahad

    resolve(params, set_)
    with stage_errors():
        counts = crop_brecahad(src, out, crop, stride)
    typer.echo(f"cropped {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@data_app.command("subset")
def data_subset(
    src: Annotated[Path, typer.Option(help="curated dataset folder")],
    n: Annotated[int, typer.Option(help="images in the subset (10, 100, 1000-shot)")],
    out: Annotated[Path, typer.Option(help="subset folder (replaced atomically)")],
    seed: Annotated[int, typer.Option(help="seed of the choice")] = 0,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """A seeded n-image subset of a curated dataset's train split (few-shot)."""
    from sqgan.data.subset import make_subset

    resolve(params, set_)
    with stage_errors():
        path = make_subset(src, out, n, seed)
    typer.echo(f"subset of {n} written to {path}")


@data_app.command("ffhq2k5")
def data_ffhq2k5(
    src: Annotated[Path, typer.Option(help="curated FFHQ (manifest with sha256)")],
    out: Annotated[Path, typer.Option(help="output folder: the smallest cluster (replaced atomically)")],
    features: Annotated[str, typer.Option(help="blip | clip | pixels")] = "blip",
    k: Annotated[int, typer.Option(help="KMeans clusters")] = 14,
    seed: Annotated[int, typer.Option(help="KMeans / t-SNE seed")] = 0,
    model: Annotated[str | None, typer.Option(help="BLIP hub name or local folder; CLIP architecture")] = None,
    pretrained: Annotated[str | None, typer.Option(help="CLIP weights: local file or open_clip tag")] = None,
    cache: Annotated[Path, typer.Option(help="features cache (keyed by image sha256)")] = Path(".cache/features"),
    batch_size: Annotated[int, typer.Option(help="images per feature batch")] = 64,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """FFHQ-2.5k: features of every image → KMeans → the smallest cluster, with size and t-SNE plots."""
    from sqgan.data.features import build_extractor
    from sqgan.data.ffhq import build_ffhq2k5

    resolve(params, set_)
    with stage_errors():
        extractor = build_extractor(features, model, pretrained)
        report = build_ffhq2k5(src, out, extractor, cache, k=k, seed=seed, batch_size=batch_size)
    typer.echo(f"{out}: cluster {report['chosen_cluster']} with {report['images']} of {report['input_images']} "
               f"images; sizes {report['sizes']}")


@data_app.command("dogface")
def data_dogface(
    src: Annotated[Path, typer.Option(help="Oxford-IIIT Pet root (images/, annotations/)")],
    out: Annotated[Path, typer.Option(help="dog-face dataset folder (replaced atomically)")],
    size: Annotated[int, typer.Option(help="output side in px")] = 256,
    margin: Annotated[float, typer.Option(help="crop side = (1 + margin) × the head box's longer side")] = 0.25,
    seed: Annotated[int, typer.Option(help="seed of the split and the detector")] = 0,
    detector_steps: Annotated[int, typer.Option(help="training steps of the head-box detector")] = 300,
    detector_weights: Annotated[Path | None, typer.Option(help="ResNet-18 weights to start the detector")] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Dog faces: head boxes from the VOC XMLs (a trained detector for the rest), centred square crops."""
    from sqgan.data.dogface import build_dogface

    resolve(params, set_)
    with stage_errors():
        report = build_dogface(src, out, size, margin, seed, detector_steps, detector_weights)
    typer.echo(f"{out}: " + ", ".join(f"{k} {v}" for k, v in report.items()))


@data_app.command("prepare")
def data_prepare(
    name: Annotated[str, typer.Argument(help="ffhq2k5 | brecahad | dogface | metfaces | subset")],
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Build a real dataset from params (data.<name>.url+sha256 or .path) into data.root/<name>."""
    from sqgan.data.prepare import prepare

    p = resolve(params, set_)
    with stage_errors():
        report = prepare(name, p)
    typer.echo(f"{Path(p.data.root) / name}: " + ", ".join(f"{k} {v}" for k, v in report.items()))


@app.command("train")
def train_cmd(
    data: Annotated[Path | None, typer.Option(help="curated dataset folder (default: data.root/data.dataset)")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (default: train.out_dir)")] = None,
    resume: Annotated[Path | None, typer.Option(help="checkpoint .pt to continue from")] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train a GAN as a Ray Train job (train.workers DDP ranks), tracked in MLflow."""
    from sqgan.train.ray_train import run_training

    p = resolve(params, set_)
    data_dir = data or Path(p.data.root) / p.data.dataset
    out_dir = out or Path(p.train.out_dir)
    with stage_errors():
        run = run_training(p, data_dir, out_dir, resume=resume)
    typer.echo(f"mlflow run {run.run_id} ({run.tracking_uri})")
    summary(out_dir)


@app.command("summary")
def summary(run_dir: Annotated[Path, typer.Argument(help="run folder")] = Path("runs/demo")) -> None:
    """Print a finished run's metrics and where its results are."""
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.exists():
        _err(f"error: {metrics_file} not found; train first (`make demo` or `sqgan train --out {run_dir}`)")
        raise typer.Exit(1)
    m = json.loads(metrics_file.read_text())
    quality = {k: v for k, v in m.items() if k.startswith(("fid_", "kid_"))}
    fq = {k: v for k, v in m.items() if k.startswith("fq/layer")}
    typer.echo(f"run folder:   {run_dir}  (step {m.get('step')})")
    typer.echo(f"sample grid:  {run_dir / 'grid.png'}")
    typer.echo(f"checkpoints:  {run_dir / 'checkpoints'}")
    for k, v in {**quality, **fq}.items():
        typer.echo(f"  {k:28s} {v:.4f}")
    prov = m.get("provenance", {})
    if prov:
        typer.echo(f"metrics by:   {prov.get('implementation')}; features: {prov.get('feature_extractor')}; "
                   f"{prov.get('n_real')} real vs {prov.get('n_fake')} generated")
    typer.echo("dashboard:    make ui  →  http://127.0.0.1:5000")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="sqgan")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
