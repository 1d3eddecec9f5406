"""`sqgan` command line: a thin shell over the stage table (sqgan.data.stages).

The config, data, prior, train and tune commands read `--params FILE` (default ./params.yaml, which must exist;
`--no-params-file` for the built-in defaults) and any number of `--set key.path=value`. Bad params exit
with status 2 naming the key; a failing stage exits with status 1 and a one-line message. No stage writes
over its input or over a folder it did not write (`--force` to replace one).

This module only parses arguments and wires each command to the function that does it (`sqgan.commands.*`,
`sqgan.shells.*`, `sqgan.data.stages`). Those are imported inside the command that needs them, the one exception to
imports-at-the-top (ARCHITECTURE.md): torch, Ray and MLflow load only for the command that runs, so `sqgan --help`
and `sqgan config show` start in well under a second instead of ~10 s.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from sqgan.commands.params import show, validated
from sqgan.commands.summary import summary_lines
from sqgan.config import ConfigError, Params, load_params
from sqgan.io import sigterm_as_interrupt

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Show or check the resolved params.", no_args_is_help=True)
data_app = typer.Typer(help="Build datasets (each a folder of images + manifest.parquet).", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

ParamsOpt = Annotated[Path | None, typer.Option("--params", "-p", help="params file (default: params.yaml)")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override a param: key.path=value (repeatable)")
]
NoParamsOpt = Annotated[
    bool, typer.Option("--no-params-file", help="use the built-in defaults (= the shipped params.yaml) on purpose")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="replace an existing --out that a sqgan stage wrote, whichever (add "
                                "--delete-unknown for one holding files no stage wrote)")
]
DeleteUnknownOpt = Annotated[
    bool, typer.Option("--delete-unknown", help="with --force: also delete files in --out that no sqgan stage wrote "
                                                "(by default --force refuses, naming them)")
]
SrcOpt = Annotated[Path, typer.Option(help="input folder (never written to)")]
OutOpt = Annotated[Path, typer.Option(help="output folder: written atomically; refused if it is or holds the input, "
                                           "or exists and is not this stage's earlier output")]


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def resolve(params_file: Path | None, overrides: list[str] | None, no_params_file: bool = False) -> Params:
    try:
        return load_params(params_file, overrides or [], use_file=not no_params_file)
    except ConfigError as e:
        _err(f"error: {e}")
        raise typer.Exit(2) from None


@contextlib.contextmanager
def stage_errors() -> Iterator[None]:
    """A failing stage (missing input, bad data, unloadable model) exits 1 with its message, no traceback."""
    try:
        yield
    except ConfigError as e:  # params that do not fit (a sweep's space, a trial's values): status 2 like --set
        _err(f"error: {e}")
        raise typer.Exit(2) from None
    except (OSError, ValueError, RuntimeError) as e:
        _err(f"error: {e}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: the stage's own line (what was kept, how to go on), status 130
        _err(str(e) if str(e) and str(e) != "SIGTERM" else "interrupted; nothing was left looking finished")
        raise typer.Exit(130) from None


def force_value(force: bool, delete_unknown: bool) -> bool | str:
    """What stage outputs take as `force`: --force replaces a sqgan output; with --delete-unknown, any folder."""
    # on demand: this command's stack only (module docstring)
    from sqgan.io import DELETE_UNKNOWN

    if delete_unknown and not force:
        _err("error: --delete-unknown only widens --force; pass both to replace a folder holding files no sqgan "
             "stage wrote")
        raise typer.Exit(2)
    return DELETE_UNKNOWN if delete_unknown else force


def run_data_stage(
    name: str, src: Path | None, out: Path | None, force: bool, params: Path | None, set_: list[str] | None,
    no_params_file: bool, delete_unknown: bool = False, **options: object,
) -> None:
    """Options given on the command line are `--set <section>.<option>` overrides; the stage table does the rest."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.data import option_sets, run_data

    force = force_value(force, delete_unknown)  # type: ignore[assignment]
    p = resolve(params, list(set_ or []) + option_sets(name, options), no_params_file)
    with stage_errors(), sigterm_as_interrupt():  # SIGTERM unwinds like Ctrl-C: no temp folder is left behind
        report, where = run_data(name, p, src, out, force)
    typer.echo(f"{name} → {where}: " + ", ".join(f"{k} {v}" for k, v in report.items()))


@config_app.command("show")
def config_show(params: ParamsOpt = None, set_: SetOpt = None, no_params_file: NoParamsOpt = False) -> None:
    """Print the resolved params, each key with its doc and allowed values."""
    typer.echo(show(resolve(params, set_, no_params_file)), nl=False)


@config_app.command("validate")
def config_validate(params: ParamsOpt = None, set_: SetOpt = None, no_params_file: NoParamsOpt = False) -> None:
    """Check the params; exit 2 naming the first bad key."""
    resolve(params, set_, no_params_file)
    typer.echo(validated(params, no_params_file))


@data_app.command("demo")
def data_demo(out: OutOpt, force: ForceOpt = False, params: ParamsOpt = None, set_: SetOpt = None,
              no_params_file: NoParamsOpt = False, delete_unknown: DeleteUnknownOpt = False) -> None:
    """The offline demo dataset from images bundled in scikit-image (data.demo.*, model.resolution)."""
    run_data_stage("demo", None, out, force, params, set_, no_params_file, delete_unknown)


@data_app.command("download")
def data_download(
    url: Annotated[str, typer.Option(help="http(s) URL of the file")],
    sha256: Annotated[str, typer.Option(help="expected sha256 (64 hex digits)")],
    out: Annotated[Path, typer.Option(help="folder to download into (existing files other than this one are kept)")],
    extract: Annotated[bool, typer.Option("--extract", help="extract the tar/zip into OUT/<name>")] = False,
    filename: Annotated[str | None, typer.Option(help="file name (default: the URL's last part)")] = None,
    force: ForceOpt = False,
) -> None:
    """Download a file (resuming a partial one), verify its sha256, optionally extract it safely."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.data import download_file

    with stage_errors(), sigterm_as_interrupt():
        path = download_file(url, sha256, out, filename, extract, force)
    typer.echo(f"ready: {path}")


@data_app.command("fetch")
def data_fetch(
    uri: Annotated[str, typer.Option(help="the curated dataset: a path, file://, s3://, gs:// or minio:// "
                                          "(endpoint in $SQGAN_S3_ENDPOINT)")],
    out: OutOpt,
    force: ForceOpt = False,
) -> None:
    """Copy a curated dataset from storage to a local folder (each pod of a Kubeflow sweep's RayJob runs it)."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.data import fetch_dataset

    with stage_errors(), sigterm_as_interrupt():
        report = fetch_dataset(uri, out, force)
    typer.echo(f"fetch → {out}: " + ", ".join(f"{k} {v}" for k, v in report.items()))


@data_app.command("curate")
def data_curate(
    src: SrcOpt, out: OutOpt,
    min_images: Annotated[int | None, typer.Option(help="fail when fewer usable images remain [data.curate]")] = None,
    labels: Annotated[str | None, typer.Option(help="class labels: auto | csv (SRC/labels.csv) | folders "
                                                    "(<class>/<image>) | none [data.curate]")] = None,
    force: ForceOpt = False, params: ParamsOpt = None, set_: SetOpt = None, no_params_file: NoParamsOpt = False,
    delete_unknown: DeleteUnknownOpt = False,
) -> None:
    """Decode, convert to RGB, drop exact duplicates, quarantine unusable files (listed with reasons); keep class
    labels from SRC/labels.csv or from class folders, and say which."""
    run_data_stage("curate", src, out, force, params, set_, no_params_file, delete_unknown, min_images=min_images,
                   labels=labels)


@data_app.command("brecahad")
def data_brecahad(
    src: SrcOpt, out: OutOpt,
    crop: Annotated[int | None, typer.Option(help="crop side in px [data.brecahad.crop]")] = None,
    stride: Annotated[int | None, typer.Option(help="crop stride in px [data.brecahad.stride]")] = None,
    force: ForceOpt = False, params: ParamsOpt = None, set_: SetOpt = None, no_params_file: NoParamsOpt = False,
    delete_unknown: DeleteUnknownOpt = False,
) -> None:
    """Crop every slide on the BreCaHAD grid (x outer, y inner): 12 crops per 1360×1024 slide."""
    run_data_stage("brecahad", src, out, force, params, set_, no_params_file, delete_unknown, crop=crop, stride=stride)


@data_app.command("subset")
def data_subset(
    out: OutOpt,
    src: Annotated[Path | None, typer.Option(help="curated dataset (default: data.root/data.subset.source)")] = None,
    n: Annotated[int | None, typer.Option(help="images in the subset, 10/100/1000-shot [data.subset.n]")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the choice [data.subset.seed]")] = None,
    force: ForceOpt = False, params: ParamsOpt = None, set_: SetOpt = None, no_params_file: NoParamsOpt = False,
    delete_unknown: DeleteUnknownOpt = False,
) -> None:
    """A seeded n-image subset of a curated dataset's train split (few-shot)."""
    run_data_stage("subset", src, out, force, params, set_, no_params_file, delete_unknown, n=n, seed=seed)


@data_app.command("selffilter")
def data_selffilter(
    out: OutOpt,
    src: Annotated[Path | None, typer.Option(help="curated dataset (default: data.root/data.selffilter.source)")
                   ] = None,
    fraction: Annotated[float | None, typer.Option(help="share quarantined [data.selffilter.fraction]")] = None,
    steps: Annotated[int | None, typer.Option(help="joint G/D/encoder steps [data.selffilter.steps]")] = None,
    resolution: Annotated[int | None, typer.Option(help="the filtering GAN's side [data.selffilter.resolution]")
                          ] = None,
    seed: Annotated[int | None, typer.Option(help="seed [data.selffilter.seed]")] = None,
    force: ForceOpt = False, params: ParamsOpt = None, set_: SetOpt = None, no_params_file: NoParamsOpt = False,
    delete_unknown: DeleteUnknownOpt = False,
) -> None:
    """Self-filtering: a StyleGAN2 and an encoder learn to invert the images; the worst-reconstructed fraction goes to
    quarantine/ with its score (scores.csv, scores.png histogram), the rest to a new manifest."""
    run_data_stage("selffilter", src, out, force, params, set_, no_params_file, delete_unknown, fraction=fraction,
                   steps=steps, resolution=resolution, seed=seed)


@data_app.command("ffhq2k5")
def data_ffhq2k5(
    src: Annotated[Path, typer.Option(help="curated FFHQ (manifest with sha256)")], out: OutOpt,
    features: Annotated[str | None, typer.Option(help="blip | clip | pixels [data.ffhq2k5.features]")] = None,
    k: Annotated[int | None, typer.Option(help="KMeans clusters [data.ffhq2k5.k]")] = None,
    seed: Annotated[int | None, typer.Option(help="KMeans / t-SNE seed [data.ffhq2k5.seed]")] = None,
    model: Annotated[str | None, typer.Option(help="BLIP hub name or local folder; CLIP architecture")] = None,
    pretrained: Annotated[str | None, typer.Option(help="CLIP weights: local file or open_clip tag")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per feature batch")] = None,
    force: ForceOpt = False, params: ParamsOpt = None, set_: SetOpt = None, no_params_file: NoParamsOpt = False,
    delete_unknown: DeleteUnknownOpt = False,
) -> None:
    """FFHQ-2.5k: features of every image → KMeans → the smallest cluster, with size and t-SNE plots."""
    run_data_stage("ffhq2k5", src, out, force, params, set_, no_params_file, delete_unknown, features=features, k=k,
                   seed=seed, model=model, pretrained=pretrained, batch_size=batch_size)


@data_app.command("dogface")
def data_dogface(
    src: Annotated[Path, typer.Option(help="Oxford-IIIT Pet root (images/, annotations/)")], out: OutOpt,
    size: Annotated[int | None, typer.Option(help="output side in px [data.dogface.size]")] = None,
    margin: Annotated[float | None, typer.Option(help="crop side = (1 + margin) × the head box's longer side")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the split and the detector")] = None,
    detector_steps: Annotated[int | None, typer.Option(help="training steps of the head-box detector")] = None,
    detector_weights: Annotated[Path | None, typer.Option(help="ResNet-18 weights to start the detector")] = None,
    force: ForceOpt = False, params: ParamsOpt = None, set_: SetOpt = None, no_params_file: NoParamsOpt = False,
    delete_unknown: DeleteUnknownOpt = False,
) -> None:
    """Dog faces: head boxes from the VOC XMLs (a trained detector for the rest), centred square crops."""
    run_data_stage("dogface", src, out, force, params, set_, no_params_file, delete_unknown, size=size, margin=margin,
                   seed=seed, detector_steps=detector_steps, detector_weights=detector_weights)


@data_app.command("prepare")
def data_prepare(
    name: Annotated[str, typer.Argument(help="ffhq2k5 | brecahad | dogface | metfaces | fewshot100 | cifar10 | "
                                             "cifar100 | subset | selffilter")],
    out: Annotated[Path | None, typer.Option(help="output folder (default: data.root/NAME)")] = None,
    force: ForceOpt = False, params: ParamsOpt = None, set_: SetOpt = None, no_params_file: NoParamsOpt = False,
    delete_unknown: DeleteUnknownOpt = False,
) -> None:
    """Build a real dataset from params alone (source: data.<name>.url+sha256 or .path)."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.data import PREPARABLE

    if name not in PREPARABLE:
        _err(f"error: unknown dataset {name!r} for prepare; choose one of {', '.join(PREPARABLE)} "
             f"(the demo: sqgan data demo --out DIR)")
        raise typer.Exit(2)
    run_data_stage(name, None, out, force, params, set_, no_params_file, delete_unknown)


@app.command("train")
def train_cmd(
    data: Annotated[Path | None, typer.Option(help="curated dataset folder (default: data.root/data.dataset)")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (default: train.out_dir)")] = None,
    resume: Annotated[Path | None, typer.Option(help="run folder (its latest checkpoint) or checkpoint .pt to "
                                                     "continue from exactly, in its MLflow run; --out defaults to that "
                                                     "folder")] = None,
    force: Annotated[bool, typer.Option("--force", help="write into an existing --out that no training wrote")] = False,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    no_params_file: NoParamsOpt = False,
) -> None:
    """Train a GAN as a Ray Train job (train.workers DDP ranks), tracked in MLflow.

    Data, run folder, checkpoint, CPUs/GPUs and the tracking server are checked before Ray starts."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.train import run_train

    p = resolve(params, set_, no_params_file)
    with stage_errors():
        run, out_dir = run_train(p, data, out, resume, force)
    typer.echo(f"mlflow run {run.run_id} ({run.tracking_uri})")
    summary(out_dir)


@app.command("prior")
def prior_cmd(
    data: Annotated[Path | None, typer.Option(help="curated dataset folder (default: data.root/data.dataset)")] = None,
    out: Annotated[Path | None, typer.Option(help="prior file to write (default: prior.out)")] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    no_params_file: NoParamsOpt = False,
) -> None:
    """Pre-train SQ's codebook on CLIP features of the training images (L_sq + L_uf + Sinkhorn OT); point
    sq.prior at the file it writes. Needs CLIP weights: prior.clip_pretrained (a local file, or a tag with the hub)."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.prior import run_prior

    p = resolve(params, set_, no_params_file)
    data_dir = data or Path(p.data.root) / p.data.dataset
    with stage_errors():
        meta = run_prior(p, data_dir, out)
    where = out or Path(p.prior.out)
    typer.echo(f"codebook prior → {where}: L_OT {meta['l_ot_first']:.4f} → {meta['l_ot_final']:.4f} over "
               f"{meta['steps']} steps on {meta['images']} images; train from it with --set sq.prior={where}")


@app.command("tune")
def tune_cmd(
    data: Annotated[Path | None, typer.Option(help="curated dataset folder (default: data.root/data.dataset)")] = None,
    out: Annotated[Path | None, typer.Option(help="sweep folder (default: tune.out_dir)")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue the interrupted sweep in this folder")] = None,
    report: Annotated[str | None, typer.Option(help="re-render the report of this sweep parent run id from MLflow "
                                                    "alone, into --out (default: <tune.out_dir>-report-<id>)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace the earlier sweep in --out (its runs stay in "
                                                        "MLflow), or write into a folder no sweep wrote")] = False,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    no_params_file: NoParamsOpt = False,
) -> None:
    """Sweep trainings with Ray Tune over tune.space (ASHA on the interim KID by default), one MLflow parent run
    with a nested run per trial; writes trials.csv/.md, plots and best_params.yaml to the sweep folder.

    The search space, resources, storage and tracking server are checked before any trial starts."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.sweep import report_tune, resume_tune, run_tune

    if sum(x is not None for x in (resume, report)) > 1:
        _err("error: --resume and --report exclude each other; pass one")
        raise typer.Exit(2)
    if resume is not None and (params is not None or set_ or no_params_file or data is not None or out is not None):
        _err(f"error: --resume continues the sweep with the params saved in {resume}/params.yaml; drop --params, "
             f"--set, --data and --out (or start a new sweep with them)")
        raise typer.Exit(2)
    if resume is not None:
        with stage_errors():
            result = resume_tune(resume)
    else:
        p = resolve(params, set_, no_params_file)
        if report is not None:
            with stage_errors():
                rows, where = report_tune(p, report, out)
            typer.echo(f"{len(rows)} trials → {where}")
            typer.echo((where / "trials.md").read_text(), nl=False)
            return
        with stage_errors():
            result = run_tune(p, data, out, force)
    typer.echo(f"sweep {result.sweep_dir}: {len(result.table)} trials; mlflow parent run {result.parent_run_id} "
               f"({result.tracking_uri})")
    typer.echo((result.sweep_dir / "trials.md").read_text(), nl=False)
    typer.echo(f"best params: {result.sweep_dir / 'best_params.yaml'}")


@app.command("eval")
def eval_cmd(
    run: Annotated[str | None, typer.Option("--run", help="MLflow run id: its last logged checkpoint")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="a step_NNNNNN.pt or a run folder (its last one)")] = None,
    data: Annotated[Path | None, typer.Option(help="reference dataset (default: the run's data.dir tag)")] = None,
    out: Annotated[Path | None, typer.Option(help="metrics JSON (default: <run folder>/eval.json, or "
                                                  "runs/eval/<run id>.json for --run)")] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    no_params_file: NoParamsOpt = False,
) -> None:
    """FID, KID, IS, precision/recall and LPIPS diversity of G_ema (eval.metrics, eval.num_fake images) against the
    curated dataset's metrics.reference_split, logged to the run with each value's provenance.

    Inception weights: metrics.inception_weights or torch-fidelity's cache; with metrics.features=auto and neither,
    the random-CNN features (…_randcnn names). Real features are cached under metrics.cache_dir."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.eval import run_eval

    p = resolve(params, set_, no_params_file)
    if (run is None) == (checkpoint is None):
        _err("error: pass exactly one of --run RUN_ID and --checkpoint PATH")
        raise typer.Exit(2)
    with stage_errors():
        result = run_eval(p, checkpoint=checkpoint, run_id=run, data_dir=data, out=out)
    where = "new run" if result.new_run else "run"
    typer.echo(f"{result.checkpoint} (step {result.step}) → {where} {result.run_id} ({result.tracking_uri}), "
               f"{result.out}; real features: "
               f"{'cached' if result.real_cache_hit else 'extracted' if result.real_cache_hit is False else 'unused'}")
    for k, v in result.metrics.items():
        prov = result.provenance[k]
        typer.echo(f"  {k:32s} {v:.6g}   ({prov['feature_network']}, {prov.get('reference', 'no reference')})")


@app.command("sample")
def sample_cmd(
    checkpoint: Annotated[Path | None, typer.Option(help="a step_NNNNNN.pt or a run folder (its last one)")] = None,
    run: Annotated[str | None, typer.Option("--run", help="MLflow run id: its last logged checkpoint")] = None,
    truncation: Annotated[str | None, typer.Option(help="multimodal | global | none [sample.truncation]")] = None,
    psi: Annotated[float | None, typer.Option(help="ψ: 1 = untruncated, 0 = the centre [sample.psi]")] = None,
    assign: Annotated[str | None, typer.Option(help="multimodal: lpips | l2 [sample.assign]")] = None,
    cluster: Annotated[int | None, typer.Option(help="draw images of this cluster (cluster-guided) [sample.cluster]")
                       ] = None,
    num: Annotated[int | None, typer.Option(help="images to write [sample.num]")] = None,
    label: Annotated[int | None, typer.Option("--class", help="a class-conditional run: draw this class (unset: "
                                                             "image i in class i mod K) [sample.label]")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder, written atomically (default: <run folder>/sampled/"
                                                  "<mode>-psi<ψ>[-cluster<j>][-class<c>], or runs/sample/<run id>/…)")
                   ] = None,
    force: ForceOpt = False,
    delete_unknown: DeleteUnknownOpt = False,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    no_params_file: NoParamsOpt = False,
) -> None:
    """Images + grid.png + sample.json of G_ema, truncated toward the sample's KMeans centre in W (multimodal, the
    centres cached in the run's sample-cache/), toward the mean w (global) or not; --cluster J draws cluster J of the
    cluster-guided sampler (k-means of generated images' features + per-cluster IMLE latent maps; its cluster accuracy
    and FID cost are reported). Logged to the run when it has one (--run, or the run folder's MLflow run)."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.sample import run_sample

    if (run is None) == (checkpoint is None):
        _err("error: pass exactly one of --run RUN_ID and --checkpoint PATH")
        raise typer.Exit(2)
    options = {"truncation": truncation, "psi": psi, "assign": assign, "cluster": cluster, "num": num, "label": label}
    sets = list(set_ or []) + [f"sample.{k}={v}" for k, v in options.items() if v is not None]
    p = resolve(params, sets, no_params_file)
    with stage_errors(), sigterm_as_interrupt():
        r = run_sample(p, checkpoint=checkpoint, run_id=run, out=out, force=force_value(force, delete_unknown),
                       progress=True)
    typer.echo(f"{r.images} images of {r.checkpoint} (step {r.step}) → {r.out} (grid.png, sample.json); {r.mlflow}")
    if r.cluster is not None:
        c = r.cluster
        typer.echo(f"cluster {c.cluster} of {c.k}: {c.hits}/{r.images} images land in it; sampler accuracy "
                   f"{c.accuracy:.3f} vs {c.chance:.3f} unconditional; FID cost {c.fid_cost:+.3f}")


@app.command("import")
def import_cmd(
    pkl: Annotated[Path, typer.Argument(help="a stylegan2-ada-pytorch network-snapshot-*.pkl")],
    out: Annotated[Path, typer.Option(help="run folder to write (checkpoints/step_000000.pt, params.yaml, "
                                           "tracking.json)")],
    data: Annotated[Path | None, typer.Option(help="curated dataset the network is evaluated against / fine-tuned "
                                                   "on (default: data.root/data.dataset)")] = None,
    force: ForceOpt = False,
    delete_unknown: DeleteUnknownOpt = False,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    no_params_file: NoParamsOpt = False,
) -> None:
    """A pretrained stylegan2-ada network (G, G_ema with w_avg, D) as an sqgan run: read without running the pickle's
    code, its kwargs set model.*, every tensor checked; logged as an MLflow run (sqgan.stage=import, the pickle's
    sha256, its kwargs as ada.* params). Then `sqgan sample --checkpoint OUT`, `sqgan eval --checkpoint OUT`, and
    `sqgan train --set train.init_from=OUT` to fine-tune."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.import_pickle import run_import

    p = resolve(params, set_, no_params_file)
    with stage_errors():
        r = run_import(p, pkl, out, data_dir=data, force=force_value(force, delete_unknown))
    m = r.model
    typer.echo(f"{pkl} (sha256 {r.sha256[:12]}…) → {r.checkpoint}: StyleGAN2 {m['resolution']}px, z {m['z_dim']}, "
               f"w {m['w_dim']}, {m['mapping_layers']} mapping layers, channel_base {m['channel_base']}, channel_max "
               f"{m['channel_max']}, conv_clamp {m['conv_clamp']}; mlflow run {r.run_id} ({r.tracking_uri})")


@app.command("reproduce")
def reproduce_cmd(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a finished training run or sweep trial")],
    out: Annotated[Path | None, typer.Option(help="new run folder, never an existing one (default: "
                                                  "runs/reproduce-<first 8 of RUN_ID>)")] = None,
    force: Annotated[bool, typer.Option("--force", help="train even though the git commit, the data or the version of "
                                                        "a package that computes the numbers differs")] = False,
    tracking_uri: Annotated[str | None, typer.Option(help="where the run is (default: $MLFLOW_TRACKING_URI, else "
                                                          "the project's mlflow.db)")] = None,
) -> None:
    """Train a recorded run again with its params and compare every final metric; exit 1 unless all are equal.

    Git commit, data hashes and package versions are checked against the run's tags first: a different commit,
    data or torch/torchvision/numpy/torchmetrics/sqgan version refuses (nothing trained) unless --force."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.reproduce import REPORT_FILE, reproduce

    with stage_errors():
        r = reproduce(run_id, out, force=force, tracking_uri=tracking_uri, say=typer.echo)
    typer.echo(r.comparison.table())
    typer.echo(f"mlflow run {r.run_id} reproduces {r.reproduces} ({r.tracking_uri}); {r.seconds:.0f} s; "
               f"report {r.out_dir / REPORT_FILE}")
    if not r.equal:
        _err(f"error: {len(r.comparison.differing)} metrics differ from the recorded run: "
             f"{', '.join(r.comparison.differing)}")
        raise typer.Exit(1)
    typer.echo(f"all {len(r.comparison.rows)} metrics equal")


@app.command("report")
def report_cmd(
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default: mlflow.experiment; with --runs: "
                                                        "theirs)")] = None,
    runs: Annotated[list[str] | None, typer.Option("--runs", help="run ids (repeat it, or comma-separate them); a "
                                                                  "sweep's parent run brings its trials")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder, written atomically (default: runs/report, or "
                                                  "runs/table with --table)")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="where the runs are (default: mlflow.tracking_uri, "
                                                          "$MLFLOW_TRACKING_URI, else ./mlflow.db)")] = None,
    table: Annotated[tuple[str, str] | None, typer.Option(metavar="ROWS COLS", help="a paper table instead: rows and "
                                                          "columns by these param (or tag) keys")] = None,
    metric: Annotated[str | None, typer.Option(help="--table's metric (default: the FID every run logged)")] = None,
    mode: Annotated[str | None, typer.Option(help="--table: min | max, which value over steps is a run's best "
                                                  "(default: max for precision, recall, is, lpips, nnmodes, usage; "
                                                  "else min)")
                    ] = None,
    log: Annotated[bool, typer.Option("--log/--no-log", help="log the folder back to MLflow (onto the sweep's "
                                                             "parent for one sweep, else a new sqgan.stage=report "
                                                             "run)")] = True,
    force: ForceOpt = False,
    delete_unknown: DeleteUnknownOpt = False,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    no_params_file: NoParamsOpt = False,
) -> None:
    """Render an experiment's runs from MLflow alone: report.html + report.md with the runs table, FID/KID curves,
    sample grids, codebook usage and each sweep's metric against its axes; or, with --table, mean ± std over seeds
    of each run's best metric as markdown and LaTeX."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.report import render_report, write_table
    from sqgan.shells.tracking import resolve_tracking_uri

    if table is None and (metric is not None or mode is not None):
        _err("error: --metric and --mode choose the metric of --table ROWS COLS; add --table, or drop them")
        raise typer.Exit(2)
    p = resolve(params, set_, no_params_file)
    uri = tracking_uri or resolve_tracking_uri(p)
    default = p.mlflow.experiment
    force = force_value(force, delete_unknown)  # type: ignore[assignment]
    with stage_errors(), sigterm_as_interrupt():
        if table is not None:
            where = out or Path("runs/table")
            t = write_table(uri, where, *table, metric=metric, mode=mode, experiment=experiment, run_ids=runs,
                            default_experiment=default, force=force, log=log)
            typer.echo(t.table.markdown(), nl=False)
            typer.echo(f"→ {where / 'table.md'}, {where / 'table.tex'}, {where / 'table.csv'}")
            logged_to = t.logged_to
        else:
            where = out or Path("runs/report")
            r = render_report(uri, where, experiment=experiment, run_ids=runs, default_experiment=default,
                              force=force, log=log)
            typer.echo(f"report of {len(r.runs)} runs of experiment {r.experiment!r}"
                       f"{f' ({len(r.sweeps)} sweeps)' if r.sweeps else ''} → {where / 'report.html'}, "
                       f"{where / 'report.md'}, {len(r.images)} images")
            logged_to = r.logged_to
    if logged_to:
        typer.echo(f"logged to mlflow run {logged_to} ({uri})")


@app.command("summary")
def summary(run_dir: Annotated[Path, typer.Argument(help="run folder")] = Path("runs/demo")) -> None:
    """Print a finished run's metrics and where its results are."""
    try:
        lines = summary_lines(run_dir)
    except FileNotFoundError as e:
        _err(f"error: {e}")
        raise typer.Exit(1) from None
    for line in lines:
        typer.echo(line)


experiment_app = typer.Typer(help="A seed paper's table or figure as a file in experiments/: list, show, run it "
                                    "(--scale demo offline in minutes, paper on a cluster), render its table.",
                               no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")
DirOpt = Annotated[Path, typer.Option("--dir", help="folder of the experiment files")]
NameArg = Annotated[str, typer.Argument(help="experiment name (a file in --dir) or an experiment .yaml path")]
ScaleOpt = Annotated[str, typer.Option(help="demo: offline stand-in data and a short schedule (minutes on 2 CPUs); "
                                            "paper: the paper's recipe as written (a GPU cluster: ray.address)")]


def _scale(scale: str) -> str:
    if scale not in ("demo", "paper"):
        _err(f"error: --scale must be demo or paper, got {scale!r}")
        raise typer.Exit(2)
    return scale


@experiment_app.command("list")
def experiment_list(folder: DirOpt = Path("experiments")) -> None:
    """Every experiment file: its name and title."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.experiment import list_experiments

    for name, title in list_experiments(folder):
        typer.echo(f"{name:18s} {title}")


@experiment_app.command("show")
def experiment_show(name: NameArg, folder: DirOpt = Path("experiments")) -> None:
    """An experiment's source, rows, columns, metrics, paper numbers and what each scale trains."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.experiment import show_experiment

    with stage_errors():
        typer.echo(show_experiment(name, folder))


@experiment_app.command("run")
def experiment_run(
    name: NameArg,
    scale: ScaleOpt = "demo",
    resume: Annotated[bool, typer.Option("--resume", help="continue the interrupted run in --out: only the unfinished "
                                                          "cells train")] = False,
    out: Annotated[Path | None, typer.Option(help="sweep folder (default: runs/experiments/NAME-SCALE)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an earlier run's folder (its runs stay in "
                                                        "MLflow)")] = False,
    folder: DirOpt = Path("experiments"),
    params: ParamsOpt = None,
    set_: SetOpt = None,
    no_params_file: NoParamsOpt = False,
) -> None:
    """Build the datasets the cells need, train every cell × seed as one Ray Tune sweep under one MLflow parent run,
    and print the table beside the paper's numbers. The file and every cell's params are checked before any data or
    Ray work; --params/--set give what is yours (mlflow.*, ray.*, data.root, tune.max_concurrent_trials)."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.experiment import run_experiment, write_table
    from sqgan.shells.tracking import mlflow_client

    p = resolve(params, set_, no_params_file)
    with stage_errors():
        uri, parent_id, sweep_dir = run_experiment(p, name, _scale(scale), out, resume, force, folder)  # type: ignore[arg-type]
        parent = mlflow_client(uri).get_run(parent_id)
        _, md = write_table(uri, parent, sweep_dir / "table")
    typer.echo(f"experiment {name}: sweep {sweep_dir}; mlflow parent run {parent_id} ({uri})")
    typer.echo(md, nl=False)
    typer.echo(f"table: {sweep_dir / 'table'} (table.md, .tex, .csv, .json)")


@experiment_app.command("table")
def experiment_table(
    name: NameArg,
    scale: Annotated[str | None, typer.Option(help="the newest run at this scale (default: the newest at any)")] = None,
    run: Annotated[str | None, typer.Option("--run", help="this parent run id instead of the newest")] = None,
    out: Annotated[Path | None, typer.Option(help="folder of table.md/.tex/.csv/.json (default: "
                                                  "runs/experiments/NAME-SCALE-table)")] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    no_params_file: NoParamsOpt = False,
) -> None:
    """Render an experiment's table from MLflow alone (ours as mean ± std over seeds, the paper's number, the
    difference) as markdown, LaTeX, CSV and JSON, logged back to its parent run."""
    # on demand: this command's stack only (module docstring)
    from sqgan.commands.experiment import table_experiment

    p = resolve(params, set_, no_params_file)
    name = Path(name).stem if name.endswith((".yaml", ".yml")) else name
    with stage_errors():
        _, md, where = table_experiment(p, name, _scale(scale) if scale else None, run, out)  # type: ignore[arg-type]
    typer.echo(md, nl=False)
    typer.echo(f"table: {where} (table.md, .tex, .csv, .json)")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="sqgan")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
