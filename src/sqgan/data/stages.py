"""The one stage table: name → function, params section, input, output.

The CLI (`sqgan data NAME`, `sqgan data prepare NAME`), the DVC stages (`cmd: sqgan data …`) and later the KFP
components all run a stage through `run_stage`, so the mapping from params to a stage function's arguments is
written once, here (`Stage.arguments`). Every stage function takes `(src, out, **arguments, force=…)`
(`demo` takes no `src`) and writes `out` atomically through `sqgan.io.stage_output`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqgan.config import Params
from sqgan.data.curate import curate
from sqgan.data.embeddings import build_extractor
from sqgan.data.manifest import read_manifest
from sqgan.data.prepare import find_root, raw_source
from sqgan.io import UnsafeOutput, check_output


@dataclass(frozen=True)
class Stage:
    name: str
    function: str  # "module:function"
    section: str  # the params section the stage reads (its `--set` prefix)
    source: str  # where `src` comes from when not given: "none", "raw" (data.<name> url/path), "cli", or a
    #              section's `source` ("subset", "selffilter": data.root/data.<name>.source)
    arguments: Callable[[Params], dict[str, Any]]  # params → the function's keyword arguments
    modules: tuple[str, ...] = ()  # further modules the stage runs (besides the function's own imports)

    def load(self) -> Callable[..., Any]:
        module, _, attr = self.function.partition(":")
        return getattr(importlib.import_module(module), attr)

    def default_out(self, params: Params) -> Path:
        return Path(params.data.root) / self.name


def _demo(p: Params) -> dict[str, Any]:
    return {"resolution": p.model.resolution, **p.data.demo.model_dump()}


def _curate(p: Params) -> dict[str, Any]:
    return {"min_images": p.data.curate.min_images, "labels": p.data.curate.labels}


def _fewshot(p: Params) -> dict[str, Any]:
    return {"min_images": p.data.curate.min_images, "source": p.data.fewshot100.set, "labels": "none"}


def _ffhq(p: Params) -> dict[str, Any]:
    f = p.data.ffhq2k5
    return {"extractor": build_extractor(f.features, f.model, f.pretrained), "cache_dir": p.data.cache, "k": f.k,
            "seed": f.seed, "batch_size": f.batch_size}


def _brecahad(p: Params) -> dict[str, Any]:
    return {"crop": p.data.brecahad.crop, "stride": p.data.brecahad.stride}


def _dogface(p: Params) -> dict[str, Any]:
    g = p.data.dogface
    return {"size": g.size, "margin": g.margin, "seed": g.seed, "detector_steps": g.detector_steps,
            "detector_weights": g.detector_weights}


def _subset(p: Params) -> dict[str, Any]:
    return {"n": p.data.subset.n, "seed": p.data.subset.seed}


def _selffilter(p: Params) -> dict[str, Any]:
    """The filtering GAN takes its latent sizes from `model`, its LPIPS from `metrics`."""
    f, m = p.data.selffilter, p.model
    return {"fraction": f.fraction, "steps": f.steps, "batch_size": f.batch_size, "resolution": f.resolution,
            "lr": f.lr, "lambda_w": f.lambda_w, "lambda_l1": f.lambda_l1, "lambda_lpips": f.lambda_lpips,
            "seed": f.seed, "z_dim": m.z_dim, "w_dim": m.w_dim, "mapping_layers": m.mapping_layers,
            "channel_base": f.channel_base, "channel_max": f.channel_max,
            "lpips_backbone": p.metrics.lpips_backbone, "lpips_weights": p.metrics.lpips_weights}


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("demo", "sqgan.data.demo:build_demo", "data.demo", "none", _demo),
    Stage("curate", "sqgan.data.curate:curate", "data.curate", "cli", _curate),
    Stage("ffhq2k5", "sqgan.data.ffhq:build_ffhq2k5", "data.ffhq2k5", "raw", _ffhq,
          ("sqgan.data.curate", "sqgan.data.prepare")),
    Stage("brecahad", "sqgan.data.brecahad:crop_brecahad", "data.brecahad", "raw", _brecahad, ("sqgan.data.prepare",)),
    Stage("dogface", "sqgan.data.dogface:build_dogface", "data.dogface", "raw", _dogface, ("sqgan.data.prepare",)),
    Stage("metfaces", "sqgan.data.curate:curate", "data.curate", "raw", _curate, ("sqgan.data.prepare",)),
    Stage("fewshot100", "sqgan.data.curate:curate", "data.fewshot100", "raw", _fewshot, ("sqgan.data.prepare",)),
    Stage("cifar10", "sqgan.data.cifar:build_cifar", "data.cifar10", "raw", lambda p: {"name": "cifar10"}),
    Stage("cifar100", "sqgan.data.cifar:build_cifar", "data.cifar100", "raw", lambda p: {"name": "cifar100"}),
    Stage("subset", "sqgan.data.subset:make_subset", "data.subset", "subset", _subset),
    Stage("selffilter", "sqgan.data.selffilter:self_filter", "data.selffilter", "selffilter", _selffilter),
)}
FROM_SECTION = ("subset", "selffilter")  # stages whose input is data.root/data.<name>.source
READ_IN_PLACE = ("cifar10", "cifar100")  # stages that read their archive as it is (no extraction to disk)
PREPARABLE = tuple(name for name, s in STAGES.items() if s.source in ("raw", *FROM_SECTION))


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    return STAGES[name]


def source_for(stage: Stage, params: Params, raw: str | Path | None = None) -> Path:
    """The input folder of a stage run from params alone (`sqgan data prepare NAME`, `dvc repro NAME`), or from
    `raw`, the dataset's raw files already fetched (`download_raw`, as the Kubeflow download component does)."""
    root = Path(params.data.root)
    if stage.source in FROM_SECTION:
        return root / getattr(params.data, stage.source).source
    if stage.source != "raw":
        raise ValueError(f"stage {stage.name!r} takes its input from --src; it has no source in params")
    if raw is None:
        raw = raw_source(stage.name, getattr(params.data, stage.name), root, extract=stage.name not in READ_IN_PLACE)
    raw = Path(raw)
    if stage.name == "dogface":
        return find_root(raw, "annotations")
    if stage.name == "ffhq2k5":  # the clustering reads a curated manifest: curate the raw images first

        curated = root / "raw" / "ffhq-curated"
        try:
            curate(raw, curated, source="ffhq", min_images=params.data.curate.min_images,
                   labels="none")  # FFHQ's folders of 1000 images are not classes
        except UnsafeOutput:
            raise UnsafeOutput(f"{curated} is where `prepare ffhq2k5` keeps its curated copy of FFHQ, and it holds "
                               f"something else; move that folder away, or set data.root to another folder") from None
        return curated
    return raw


def run_stage(
    name: str, params: Params, src: str | Path | None = None, out: str | Path | None = None, force: bool = False,
    raw: str | Path | None = None,
) -> dict[str, Any]:
    """Run stage `name` with its arguments from `params`; `src`/`out` default to params (data.root/NAME). `raw`
    (stages reading a real dataset) is its raw files already fetched, instead of data.<name>.url/path."""
    stage = get_stage(name)
    out = Path(out) if out is not None else stage.default_out(params)
    marker = "curate" if stage.function.endswith(":curate") else name
    if src is None and stage.source in FROM_SECTION:  # cheap to know: check it against --out right away
        src = source_for(stage, params)
    check_output(out, marker, (src,), force)  # before any download or extraction
    fn = stage.load()
    if stage.source == "none":
        result = fn(out, **stage.arguments(params), force=force)
    else:
        if src is None:  # the source first: a missing one is the error to report, before any model loads
            if stage.source == "cli":
                raise ValueError(f"stage {name!r} needs --src (the folder to read)")
            src = source_for(stage, params, raw)
        result = fn(src, out, **stage.arguments(params), force=force)
    if isinstance(result, dict):
        return result

    return {"images": len(read_manifest(out))}
