"""The feature networks of the quality metrics, each with the facts its metrics are named and tagged by.

- Inception-v3 (torch-fidelity's port of the TF graph FID was defined with): pool3 (2048-d) for FID/KID/PR and
  its 1008-way logits for IS, inputs resized to 299 px by torch-fidelity's TF1-compatible bilinear. Its weights
  come from a local file: `metrics.inception_weights`, or torch-fidelity's cache in the torch hub folder.
- A fixed-seed random CNN when no Inception file exists (nothing can be downloaded here): its metrics are
  named `…_randcnn` and compare runs with each other, never with published numbers.
- Spatial features for sFID (Nash et al. 2021): Inception's `mixed_6/conv` — torch-fidelity's Mixed_6d.branch1x1
  (conv, BN, ReLU: 192 × 17 × 17) — first 7 channels, 2023-d; the random CNN's stand-in is the first 7 channels
  of its third conv's 8 × 8 map (448-d). A feature net returns them when called with `spatial=True`.
- LPIPS (torchmetrics' port of Zhang et al.'s network, its linear heads bundled with torchmetrics) on an AlexNet
  or VGG backbone from a local torchvision weights file (`metrics.lpips_weights`), else a random backbone,
  named `rand<net>`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_fidelity
import torchmetrics
import torchvision
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torchmetrics.functional.image.lpips import _NoTrainLpips

from sqgan.io import read_torch_file, sha256_file

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release asset
INCEPTION_SHA256_PREFIX = "6726825d"  # torch hub's convention: the file name carries its sha256's first 8 digits
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16"}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images (a generator's) → uint8 [0, 255], what every feature net here takes."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def state_sha256(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, shapes and bytes, in order): identifies its weights."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def inception_cache_file() -> Path:
    """Where torch-fidelity caches the Inception weights it downloads (torch hub's checkpoints folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


LOGIT_SCALE = 3.0  # of the random CNN's class head on unit features
SPATIAL_CHANNELS = 7  # sFID: the first 7 channels of a spatial map (Nash et al.: Inception's mixed_6/conv)
SPATIAL_LAYER = 2  # the random CNN's sFID map: its third conv (8 × 8 at its 64 px input)


class RandomCNNFeatures(nn.Module):
    """Fixed-seed random conv net: uint8 [N, 3, H, W] → (pool [N, num_features], logits [N, num_classes]).

    The logits (a fixed random linear head) give an IS-like score named `is…_randcnn`: it compares runs with
    each other, like the rest of this network's metrics."""

    implementation = "sqgan RandomCNNFeatures"
    spatial_features = "the first 7 channels of the third conv's 8 × 8 map (448-d)"

    def __init__(self, seed: int = 0, num_features: int = 64, size: int = 64, num_classes: int = 16) -> None:
        super().__init__()
        self.seed, self.size, self.num_features = seed, size, num_features
        widths = [3, 32, 64, 128, num_features]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, 2, 1) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.head = nn.Linear(num_features, num_classes)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.in_channels * 9
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                conv.bias.zero_()
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * LOGIT_SCALE)
            self.head.bias.zero_()
        self.requires_grad_(False)
        self.eval()
        self.name = "randcnn" if seed == 0 else f"randcnn-s{seed}"
        self.weights_sha256 = state_sha256(self)
        self.resizer = f"bilinear with antialias to {size}px (torch.nn.functional.interpolate)"

    def train(self, mode: bool = True) -> RandomCNNFeatures:  # always eval: a fixed function
        return super().train(False)

    def describe(self) -> str:
        return f"random CNN (seed {self.seed}, {self.num_features}-d, input resized bilinear to {self.size}px)"

    @torch.no_grad()
    def forward(self, x: torch.Tensor, spatial: bool = False) -> tuple[torch.Tensor, ...]:
        """(pool, logits), and with `spatial` the sFID stand-in: the first SPATIAL_CHANNELS channels of the third
        conv's map (after its activation), flattened."""
        x = x.float() / 127.5 - 1.0
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        space = None
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.leaky_relu(x, 0.2)
            if i == SPATIAL_LAYER:
                space = x[:, :SPATIAL_CHANNELS].flatten(1)
        pool = x.mean(dim=(2, 3))
        logits = self.head(F.normalize(pool, dim=1))  # logits ~ N(0, LOGIT_SCALE²): a class-like softmax
        return (pool, logits, space) if spatial else (pool, logits)


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception-v3 from a local weights file: uint8 → (pool3 [N, 2048], logits [N, 1008])."""

    num_features = 2048
    spatial_features = "mixed_6/conv (Mixed_6d.branch1x1: conv, BN, ReLU), first 7 channels of 17 × 17 (2023-d)"

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"metrics.inception_weights: {path} not found; download {INCEPTION_URL} where the internet is "
                f"reachable and give its path in metrics.inception_weights (or put it at {inception_cache_file()}), "
                f"or set metrics.features=randcnn for the random-CNN metrics")


        read_torch_file(path, "metrics.inception_weights", "give torch-fidelity's Inception .pth (a state dict)")
        self.path = path
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))
        self.weights_sha256 = sha256_file(path)
        canonical = self.weights_sha256.startswith(INCEPTION_SHA256_PREFIX)
        self.name = "inception" if canonical else f"inception-{self.weights_sha256[:8]}"
        self.implementation = f"torch-fidelity {torch_fidelity.__version__} FeatureExtractorInceptionV3"
        self.resizer = "torch-fidelity TF1-compatible bilinear to 299px"

    def describe(self) -> str:
        return f"inception-v3-compat (torch-fidelity) pool3 2048-d from {self.path.name}, input resized to 299px"

    @torch.no_grad()
    def forward(self, x: torch.Tensor, spatial: bool = False) -> tuple[torch.Tensor, ...]:
        """(pool3, logits), and with `spatial` sFID's features: mixed_6/conv (Mixed_6d.branch1x1), first 7 channels."""
        kept: list[torch.Tensor] = []
        hook = self.net.Mixed_6d.branch1x1.register_forward_hook(
            lambda m, i, out: kept.append(out[:, :SPATIAL_CHANNELS].flatten(1))) if spatial else None
        try:
            pool, logits = self.net(x)
        finally:
            if hook is not None:
                hook.remove()
        out = (pool.reshape(x.shape[0], -1), logits.reshape(x.shape[0], -1))
        return (*out, kept[0]) if spatial else out


def resolve_inception_weights(weights: str | None) -> Path | None:
    """The Inception file to use: the one params name, else torch-fidelity's cached download, else None."""
    if weights:
        return Path(weights)
    cached = inception_cache_file()
    return cached if cached.is_file() else None


def build_feature_net(features: str = "auto", inception_weights: str | None = None,
                      randcnn_seed: int = 0) -> nn.Module:
    """`metrics.features`: inception (a missing file is an error naming how to get it), randcnn, or auto
    (Inception when a weights file exists, else the random CNN)."""
    if features not in ("auto", "inception", "randcnn"):
        raise ValueError(f"metrics.features must be auto, inception or randcnn, got {features!r}")
    if features == "randcnn":
        return RandomCNNFeatures(seed=randcnn_seed)
    path = resolve_inception_weights(inception_weights)
    if path is None:
        if features == "inception":
            raise FileNotFoundError(
                f"metrics.features=inception but no Inception weights: metrics.inception_weights is unset and "
                f"{inception_cache_file()} does not exist; download {INCEPTION_URL} where the internet is reachable "
                f"and set metrics.inception_weights to it, or set metrics.features=randcnn")
        return RandomCNNFeatures(seed=randcnn_seed)
    return InceptionFeatures(path)


def feature_net_name(features: str = "auto", inception_weights: str | None = None, randcnn_seed: int = 0) -> str:
    """The name `build_feature_net` would give, without building it (for sweeps to know their metric names)."""
    path = None if features == "randcnn" else resolve_inception_weights(inception_weights)
    if path is None or not path.is_file():
        if features == "inception":
            return "inception"
        return "randcnn" if randcnn_seed == 0 else f"randcnn-s{randcnn_seed}"

    sha = sha256_file(path)
    return "inception" if sha.startswith(INCEPTION_SHA256_PREFIX) else f"inception-{sha[:8]}"


class LPIPSNet(nn.Module):
    """LPIPS distance between two batches of uint8 images (torchmetrics' network with its bundled linear heads).

    `weights`: a torchvision AlexNet/VGG16 state dict file for the backbone (ImageNet weights, as the paper);
    None gives a random backbone, named `rand<backbone>`."""

    def __init__(self, backbone: str = "alex", weights: str | Path | None = None) -> None:
        super().__init__()
        if backbone not in LPIPS_BACKBONES:
            raise ValueError(f"metrics.lpips_backbone must be one of {', '.join(LPIPS_BACKBONES)}, got {backbone!r}")

        with torch.random.fork_rng(devices=[]):  # the random backbone is a fixed function (seed 0), like randcnn's
            torch.manual_seed(0)
            self.net = _NoTrainLpips(net=backbone, pretrained=True, pnet_rand=True)  # no download: backbone below
        if weights is not None:
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(
                    f"metrics.lpips_weights: {path} not found; give a torchvision {LPIPS_BACKBONES[backbone]} "
                    f"ImageNet state dict (torchvision.models.{LPIPS_BACKBONES[backbone]}(weights='DEFAULT')."
                    f"state_dict() saved with torch.save where the internet is reachable), or unset it for a random "
                    f"backbone (lpips…_rand{backbone})")

            state = read_torch_file(path, "metrics.lpips_weights",
                                    f"give a torchvision {LPIPS_BACKBONES[backbone]} state dict")
            tv = getattr(torchvision.models, LPIPS_BACKBONES[backbone])(weights=None)
            try:
                tv.load_state_dict(state)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"metrics.lpips_weights: {path} is not a torchvision {LPIPS_BACKBONES[backbone]} "
                                 f"state dict ({str(e).splitlines()[0]})") from None
            for slice_ in (m for n, m in self.net.net.named_children() if n.startswith("slice")):
                for idx, layer in slice_.named_children():
                    layer.load_state_dict(tv.features[int(idx)].state_dict())
        self.net.requires_grad_(False).eval()
        self.name = backbone if weights is not None else f"rand{backbone}"
        self.weights_sha256 = state_sha256(self.net)
        self.implementation = f"torchmetrics {torchmetrics.__version__} LPIPS (lpips 0.1 linear heads)"
        self.resizer = "none (generated resolution)"

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-pair distance [N] of uint8 batches a, b."""
        to_unit = lambda x: x.float() / 127.5 - 1.0  # noqa: E731
        return self.net(to_unit(a), to_unit(b)).reshape(a.shape[0])
