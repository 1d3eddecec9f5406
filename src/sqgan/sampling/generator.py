"""Truncation as a generator: `TruncatedGenerator` wraps G_ema so that anything that samples a generator (the
evaluator, the cluster sampler, `generate_uint8`) sees truncated samples, and `eval_generator` builds the one an
evaluation uses from the params (training's interim and final evaluations, `sqgan eval`, `sqgan sample`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sqgan.config import Params
from sqgan.metrics.evaluate import to_uint8
from sqgan.metrics.features import LPIPSNet
from sqgan.sampling import truncation as T


@dataclass
class TruncatedOutput:
    images: torch.Tensor  # [B, 3, R, R] in [-1, 1], as GeneratorOutput.images
    w: torch.Tensor  # the truncated, un-quantized w [B, w_dim]
    assignment: torch.Tensor | None  # multimodal: the centre each sample was pulled toward [B]


def require_mapping(G: nn.Module, mode: str) -> None:
    """An error naming sample.truncation=none when `mode` needs a mapping network z → w that G lacks."""
    if mode != "none" and getattr(G, "mapping", None) is None:
        raise ValueError(f"sample.truncation={mode} needs a mapping network z → w, and this generator has none "
                         f"(DCGAN/SNGAN trained with sq.enabled=false: w is z ~ N(0, I)); sample it with "
                         f"--set sample.truncation=none (--truncation none), or train with model.arch=stylegan2 or "
                         f"sq.enabled=true")


class TruncatedGenerator(nn.Module):
    """G_ema with truncation applied inside `forward`, so anything that samples a generator — `generate_uint8`,
    `sqgan.metrics.evaluate.Evaluator`, `ClusterSampler` — sees truncated samples unchanged.

    mode `multimodal`: w ← c + ψ(w − c) toward the centre assigned by `assign` (lpips: the LPIPS-nearest centre image
    to the untruncated image, the paper's; l2: nearest in W); `global`: toward w_avg; `none`: G itself. The same
    arithmetic as `sqgan.sampling.truncation.sample`, but returning float images like `Generator.forward`."""

    def __init__(self, G: nn.Module, mode: T.Mode = "multimodal", psi: float = 0.7, assign: T.Assign = "lpips",
                 centres: T.Centres | None = None, lpips_net: nn.Module | None = None) -> None:
        super().__init__()
        if mode not in ("multimodal", "global", "none"):
            raise ValueError(f"sample.truncation must be multimodal, global or none, got {mode!r}")
        require_mapping(G, mode)
        self.num_classes = int(getattr(G, "num_classes", 0))
        if self.num_classes and mode != "none":
            raise ValueError(f"sample.truncation={mode}: the truncation centres and w_avg are fitted without classes, "
                             f"and this generator is class-conditional ({self.num_classes} classes); sample it with "
                             f"--truncation none (metrics.truncation none)")
        self.G, self.mode, self.psi, self.assign = G, mode, T.check_psi(psi), assign
        self.z_dim, self.w_dim = G.z_dim, G.w_dim
        self.centres = centres
        self.lpips_net = lpips_net if mode == "multimodal" and assign == "lpips" else None
        if mode == "multimodal":
            T.check_multimodal(G, assign, centres, lpips_net)
            self.register_buffer("centre_w", centres.w.detach().float().clone(), persistent=False)
            self.register_buffer("centre_images", centres.images.detach().clone(), persistent=False)
        self._centre_features: tuple[torch.device, list[torch.Tensor]] | None = None

    def describe(self) -> str:
        if self.mode == "none":
            return "no truncation"
        if self.mode == "global":
            return f"global truncation ψ = {self.psi:g} toward w_avg"
        return (f"multi-modal truncation ψ = {self.psi:g} toward {self.centres.n_clusters} centres "
                f"(assigned by {self.assign})")

    def _lpips_centre_features(self) -> list[torch.Tensor]:
        device = T._device_of(self.lpips_net)
        if self._centre_features is None or self._centre_features[0] != device:
            self._centre_features = (device, T.lpips_features(self.centre_images, self.lpips_net))
        return self._centre_features[1]

    @torch.no_grad()
    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, noise_mode: str = "const",
                generator: torch.Generator | None = None, **_: Any) -> TruncatedOutput:
        """`c`: the classes of a conditional G (truncation none only)."""
        G = self.G
        with T._eval_mode(G):  # the mapping must not move w_avg, the quantizer must not learn
            z = G.condition(z, c) if hasattr(G, "condition") else z
            w = z if G.mapping is None else G.mapping(z, update_w_avg=False)
            idx = None
            if self.mode == "global":
                w = T.truncate_global(G, w, self.psi)
            elif self.mode == "multimodal":
                if self.assign == "lpips":  # the paper assigns by the image the untruncated w renders to
                    seen = to_uint8(T.synthesize(G, w, noise_mode, generator))
                    idx = T.assign_lpips(seen, self.centre_images, self.lpips_net, len(seen),
                                         self._lpips_centre_features()).to(w.device)
                else:
                    idx = T.assign_l2(w, self.centre_w)
                w = T.truncate_toward(w, self.centre_w[idx], self.psi)
            images = T.synthesize(G, w, noise_mode, generator)
        return TruncatedOutput(images, w, idx)


def eval_generator(params: Params, G: nn.Module, cache: Path | None = None) -> tuple[nn.Module, dict[str, Any] | None]:
    """(what an evaluation samples, its truncation for the provenance): G itself when metrics.truncation is none, else
    a `TruncatedGenerator` with ψ, assign, centres and fit_samples from the sample section (multimodal: the centres
    fitted on G now, or read from `cache` when it matches G). Training's interim and final evaluations and `sqgan eval`
    use it, so a sweep over sample.psi ranks trials by the FID of truncated samples."""
    mode = params.metrics.truncation
    if mode == "none":
        return G, None
    sp, mp = params.sample, params.metrics
    require_mapping(G, mode)
    info: dict[str, Any] = {"mode": mode, "psi": sp.psi}
    centres = lpips_net = None
    if mode == "multimodal":
        if cache is not None:
            centres, _ = T.load_or_fit(G, cache, sp.fit_samples, sp.centres, sp.seed)
        else:
            centres = T.fit_centres(G, sp.fit_samples, sp.centres, sp.seed)
        if sp.assign == "lpips":
            lpips_net = LPIPSNet(mp.lpips_backbone, mp.lpips_weights).to(T._device_of(G))
        info.update(assign=sp.assign, centres=sp.centres, fit_samples=sp.fit_samples, seed=sp.seed)
        if centres.inertia is not None:
            info["inertia"] = centres.inertia
    return TruncatedGenerator(G, mode, sp.psi, sp.assign, centres, lpips_net), info


INERTIA_KEY = "truncation/kmeans_inertia"  # the metric an evaluation with multimodal truncation logs beside FID


def record_truncation(ev: Any, info: dict[str, Any] | None) -> None:
    """What an evaluation (training's and `sqgan eval`'s) records of its truncation (`eval_generator`'s info): each
    metric's provenance gains it (pplu, always untruncated, keeps its own) and the metrics the k-means inertia of the
    multimodal centres (Σ over the fit_samples mapped w of the squared distance to the nearest centre), the elbow
    study's y."""
    if info is None:
        return
    for prov in ev.provenance.values():
        prov.setdefault("truncation", info)
    if "inertia" in info:
        ev.metrics[INERTIA_KEY] = float(info["inertia"])
