"""The one params schema: every key declared once with its type, default, range and doc.

`load_params(path, overrides)` reads `params.yaml`, applies `--set a.b=c` overrides and validates.
Unknown keys and bad values raise `ConfigError` whose message names the key path, the value and
what is allowed (with the closest key for a typo). The CLI turns it into exit status 2.
"""

from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A params file or override that does not fit the schema; the message says what to fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def d_blocks(arch: str, resolution: int) -> int:
    """Blocks of a backbone's discriminator trunk at `resolution` (what fq.layers may name): DCGAN and StyleGAN2 halve
    down to 4×4 (log2 R − 2 blocks); SNGAN's ResNet trunk has 4 at 32², 5 at 64² (`sqgan.models.sngan` builds it
    from this). Pure arithmetic, so the schema needs no model code."""
    if arch == "sngan":
        if resolution not in (32, 64):
            raise ValueError(f"SNGAN supports resolution 32 or 64, got {resolution}")
        return 4 if resolution == 32 else 5
    if arch == "fastgan":  # to 256², then five halvings
        return 6
    if arch == "biggan":  # BigGAN-PyTorch's D_arch: 4 blocks at 32², 5 at 64², 6 at 128²
        if resolution not in (32, 64, 128):
            raise ValueError(f"BigGAN supports resolution 32, 64 or 128, got {resolution}")
        return {32: 4, 64: 5, 128: 6}[resolution]
    return int(math.log2(resolution)) - 2


# ----------------------------------------------------------------------------------------- data
def power_of_two(v: int, what: str) -> int:
    """A validator's check: `v` must be a power of two (the message adds `what`, e.g. its range)."""
    if v & (v - 1):
        raise ValueError(f"must be a power of two {what}, got {v}")
    return v


class DemoDataParams(Section):
    crop: int = Field(128, ge=16, le=512, description="IHC slide crop size in px (BreCaHAD-style overlapping crops)")
    stride: int = Field(64, ge=8, le=512, description="IHC crop stride in px (crops overlap when stride < crop)")
    lfw_faces: int = Field(70, ge=0, le=100, description="how many of lfw_subset's 100 LFW faces to add (70: with "
                                                         "100 the 1000-step demo learns faces only, see README)")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of images put in the seeded 'test' split")
    seed: int = Field(0, ge=0, description="seed of the train/test split")
    labels: bool = Field(False, description="the labelled variant: each image's source as its class in the manifest "
                                            "(label 0 = tissue crops, 1 = faces), for conditional runs offline")


class SourceParams(Section):
    """Where a real dataset comes from: a URL with its sha256 (downloaded by the stage) or a local copy."""

    url: str | None = Field(None, description="archive or file URL (needs sha256); unset = use path")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="sha256 of the file at url")
    path: str | None = Field(None, description="local copy: a folder, or an archive to extract")

    @model_validator(mode="after")
    def _url_needs_sha(self) -> SourceParams:
        if self.url and not self.sha256:
            raise ValueError("url is set but sha256 is not; give the file's sha256 (sha256sum FILE)")
        return self


class FewShotParams(SourceParams):
    """One of the 100-shot sets released with DiffAugment's data-efficient GAN code (Obama, Grumpy Cat, Panda: 100
    images each; AnimalFace cat 160, dog 389), by url + sha256 or path (the zip, or its folder)."""

    set: Literal["obama", "grumpy_cat", "panda", "animalface_cat", "animalface_dog"] = Field(
        "obama", description="which set the source holds (the manifest's source; one set per data.root/fewshot100)")


class CifarParams(SourceParams):
    """A CIFAR release: its python tarball by url + md5 (the checksum the release publishes) or sha256, or path (the
    tarball, or the folder it extracts to)."""

    md5: str | None = Field(None, pattern=r"^[0-9a-fA-F]{32}$", description="md5 of the file at url (as published)")

    @model_validator(mode="after")
    def _url_needs_sha(self) -> CifarParams:
        if self.url and not (self.sha256 or self.md5):
            raise ValueError("url is set but neither sha256 nor md5 is; give the file's checksum (md5sum FILE)")
        return self


class Cifar10Params(CifarParams):  # the official tarball and the md5 its page publishes
    url: str | None = Field("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                            description="the python tarball's URL (needs md5 or sha256); unset = use path")
    md5: str | None = Field("c58f30108f718f92721af3b95e74349a", pattern=r"^[0-9a-fA-F]{32}$",
                            description="md5 of the file at url (as published)")


class Cifar100Params(CifarParams):
    url: str | None = Field("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                            description="the python tarball's URL (needs md5 or sha256); unset = use path")
    md5: str | None = Field("eb9058c3a382ffc7106e4002c42a8d85", pattern=r"^[0-9a-fA-F]{32}$",
                            description="md5 of the file at url (as published)")


class FFHQParams(SourceParams):
    features: Literal["blip", "clip", "pixels"] = Field("blip", description="image features for the clustering")
    model: str | None = Field(None, description="BLIP hub name / local folder, or CLIP architecture")
    pretrained: str | None = Field(None, description="CLIP weights (local file or open_clip tag)")
    k: int = Field(14, ge=2, le=1000, description="KMeans clusters; the smallest becomes the dataset")
    seed: int = Field(0, ge=0, description="KMeans / t-SNE seed")
    batch_size: int = Field(64, ge=1, description="images per feature batch")


class BrecahadParams(SourceParams):
    crop: int = Field(512, ge=16, description="crop side in px")
    stride: int = Field(256, ge=1, description="crop stride in px")


class DogfaceParams(SourceParams):
    size: int = Field(256, ge=16, le=2048, description="output side in px")
    margin: float = Field(0.25, ge=0.0, le=4.0, description="crop side = (1 + margin) × head box's longer side")
    seed: int = Field(0, ge=0, description="seed of the split and the detector")
    detector_steps: int = Field(300, ge=1, description="training steps of the head-box detector")
    detector_weights: str | None = Field(None, description="ResNet-18 weights to start the detector from")


class CurateParams(Section):
    min_images: int = Field(1, ge=1, description="curate fails when fewer usable images remain")
    labels: Literal["auto", "csv", "folders", "none"] = Field(
        "auto", description="class labels into the manifest: csv = the source's labels.csv (path, label), folders = "
                            "<class>/<image> (ImageFolder), auto = csv if labels.csv exists, else folders if every "
                            "image is one folder deep in ≥ 2 folders, else none")


class SubsetParams(Section):
    source: str = Field("demo", min_length=1, description="curated dataset (folder under data.root) to draw from")
    n: int = Field(10, ge=1, description="images in the few-shot subset (10, 100, 1000)")
    seed: int = Field(0, ge=0, description="seed of the choice")


class SelfFilterParams(Section):
    """Self-filtering (Mokady et al. 2022, "Self-Distilled StyleGAN", §3.1): a StyleGAN2 G and an encoder E of
    StyleGAN2-discriminator architecture trained together to invert the images; the worst reconstructed fraction is
    quarantined."""

    source: str = Field("demo", min_length=1, description="curated dataset (folder under data.root) to filter")
    fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of images with the largest reconstruction "
                                                             "error moved to the quarantine (sweep axis)")
    steps: int = Field(2000, ge=1, description="joint training steps of G, D and the encoder E")
    batch_size: int = Field(16, ge=2, le=4096, description="images per step")
    resolution: int = Field(64, ge=32, le=1024, description="side in px of the filtering GAN (a power of two; the "
                                                           "kept images stay at their own size)")
    channel_base: int = Field(4096, ge=16, le=1 << 20, description="widths of the filtering G, D and E: "
                                                                   "min(channel_base / r, channel_max) at side r")
    channel_max: int = Field(256, ge=4, le=4096, description="most channels of any layer of G, D, E")
    lr: float = Field(0.002, gt=0.0, le=1.0, description="Adam learning rate of G, D and E (StyleGAN2's)")
    lambda_w: float = Field(0.1, ge=0.0, le=1000.0, description="λ_w of ‖E(G(w)) − w‖² on generated images")
    lambda_l1: float = Field(0.1, ge=0.0, le=1000.0, description="λ_L1 of ‖G(E(x)) − x‖₁ on real images")
    lambda_lpips: float = Field(0.1, ge=0.0, le=1000.0, description="λ_LPIPS of LPIPS(G(E(x)), x) on real images "
                                                                    "(metrics.lpips_backbone / lpips_weights)")
    seed: int = Field(0, ge=0, description="seed of init, batches and z")

    @field_validator("resolution")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        return power_of_two(v, "between 32 and 1024")


class DataParams(Section):
    dataset: str = Field("demo", min_length=1, description="curated dataset to train on: folder name under data.root")
    root: str = Field("data", min_length=1, description="folder that holds the curated datasets")
    mirror: bool = Field(False, description="training sees every image also flipped left-right (stylegan2-ada's "
                                            "--mirror: an epoch is 2N samples); metrics compare with the images as "
                                            "they are")
    cache: str = Field(".cache/features", min_length=1, description="features cache (keyed by image sha256)")
    demo: DemoDataParams = Field(default_factory=DemoDataParams, description="the offline demo dataset")
    curate: CurateParams = Field(default_factory=CurateParams, description="curation (also used by metfaces, ffhq2k5)")
    ffhq2k5: FFHQParams = Field(default_factory=FFHQParams, description="FFHQ → BLIP features → smallest cluster")
    brecahad: BrecahadParams = Field(default_factory=BrecahadParams, description="BreCaHAD slides → crops")
    dogface: DogfaceParams = Field(default_factory=DogfaceParams, description="Oxford-IIIT Pet → dog faces")
    metfaces: SourceParams = Field(default_factory=SourceParams, description="MetFaces, curated as released")
    fewshot100: FewShotParams = Field(default_factory=FewShotParams,
                                      description="a 100-shot set (DiffAugment's release), curated as released")
    cifar10: Cifar10Params = Field(default_factory=Cifar10Params, description="CIFAR-10: 50k train + 10k test at "
                                   "32², 10 classes (the official python tarball)")
    cifar100: Cifar100Params = Field(default_factory=Cifar100Params, description="CIFAR-100: 50k train + 10k test "
                                     "at 32², 100 fine classes (the official python tarball)")
    subset: SubsetParams = Field(default_factory=SubsetParams, description="few-shot subset")
    selffilter: SelfFilterParams = Field(default_factory=SelfFilterParams,
                                         description="self-filtering: drop the worst-inverted images")


# ---------------------------------------------------------------------------------------- model
ARCH_RESOLUTIONS = {"dcgan": (32, 64), "sngan": (32, 64), "stylegan2": (32, 64, 128, 256, 512, 1024),
                    "biggan": (32, 64, 128), "fastgan": (256, 512, 1024)}


class ModelParams(Section):
    arch: Literal["dcgan", "sngan", "stylegan2", "biggan", "fastgan"] = Field(
        "dcgan", description="backbone: dcgan (32/64px), sngan (ResNet + spectral norm, 32/64px), stylegan2 "
                             "(32-1024px), biggan (conditional BN, hierarchical z, projection D; 32/64/128px), fastgan "
                             "(skip-layer excitation, self-supervised D; 256/512/1024px)"
    )
    resolution: int = Field(32, ge=32, le=1024, description="image side in px (a power of two the arch supports); "
                                                           "images are resized to it")
    z_dim: int = Field(128, ge=1, le=4096, description="latent z dimension")
    w_dim: int = Field(128, ge=1, le=4096, description="style w dimension: the mapping network's output (StyleGAN2; "
                                                        "DCGAN/SNGAN when SQ is on)")
    mapping_layers: int | None = Field(None, ge=1, le=16, description="mapping network depth; unset = 8 for "
                                                                      "stylegan2, 2 for the MLP DCGAN/SNGAN get")
    g_channels: int = Field(64, ge=4, le=1024, description="generator width: DCGAN/SNGAN channels of the last block; "
                                                          "BigGAN's ch (G_ch); FastGAN's ngf")
    d_channels: int = Field(64, ge=4, le=1024, description="discriminator width: DCGAN/SNGAN channels of the first "
                                                          "block; BigGAN's ch (D_ch); FastGAN's ndf")
    channel_base: int = Field(16384, ge=16, le=1 << 20, description="StyleGAN2: channels at resolution r = "
                                                                    "min(channel_base / r, channel_max)")
    channel_max: int = Field(512, ge=4, le=4096, description="StyleGAN2: most channels of any layer")
    style_mixing: float = Field(0.9, ge=0.0, le=1.0, description="StyleGAN2: share of G-step batches whose styles "
                                                                  "switch to a second z at a random layer")
    conv_clamp: float | None = Field(None, gt=0.0, le=1e6, description="StyleGAN2: clamp of every conv's output "
                                                                        "(stylegan2-ada trains with 256; unset = none)")
    mbstd_group_size: int = Field(4, ge=1, le=256, description="D's minibatch-stddev group size (StyleGAN2, DCGAN)")
    mbstd_num_channels: int | None = Field(None, ge=0, le=64, description="D's minibatch-stddev channels (0 = none); "
                                                                          "unset = 1 for stylegan2, 0 for dcgan/sngan")
    pack: int = Field(1, ge=1, le=8, description="PacGAN: D scores this many samples at once, stacked along "
                                                 "channels (1 = off; 2 brought back a dropped mode, issue 25)")
    shared_dim: int = Field(128, ge=1, le=4096, description="BigGAN: the shared class embedding's size (conditional)")
    attention: int | None = Field(None, ge=8, le=1024, description="BigGAN: self-attention after the G and D blocks "
                                                                   "at this side in px (BigGAN 128²: 64); unset = none")
    conditional: bool = Field(False, description="class-conditional G and D: G adds a class embedding to z, D a "
                                                 "projection head ⟨embed(y), features⟩; reads the manifest's labels")
    num_classes: int = Field(0, ge=0, le=100000, description="classes of a conditional run (model.conditional); the "
                                                            "manifest's labels must lie in [0, num_classes)")

    @field_validator("resolution")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        return power_of_two(v, "between 32 and 1024")

    @property
    def d_blocks(self) -> int:
        """Number of blocks of the discriminator trunk (what fq.layers may name)."""
        return d_blocks(self.arch, self.resolution)


# ------------------------------------------------------------------------------------------- fq
class FQParams(Section):
    enabled: bool = Field(True, description="quantize discriminator features (FQ-GAN, ICML 2020)")
    codebook_size: int = Field(64, ge=2, le=65536, description="K = 2^P dictionary entries (sweep axis)")
    decay: float = Field(0.9, ge=0.0, lt=1.0, description="EMA decay λ of the dictionary (sweep axis; paper 0.9)")
    alpha: float = Field(1.0, ge=0.0, le=1000.0, description="weight α of L_Q in L_GAN + α·L_Q (sweep axis)")
    alpha_warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up of α from 0 (0 = no warm-up)")
    commitment: float = Field(0.25, ge=0.0, le=100.0, description="β of the commitment loss β‖sg(e) − h‖²")
    eps: float = Field(1e-5, gt=0.0, le=1.0, description="ε of the Laplace smoothing of the EMA counts")
    mode: Literal["feed", "regularize"] = Field(
        "regularize", description="regularize: D's next layer sees h and only α·L_Q pulls h to the dictionary "
                                  "(official code); feed: it sees quantized h′ (paper's text; loses modes, see README)"
    )
    init: Literal["batch", "random"] = Field(
        "batch", description="initial dictionary: K vectors of the first batch, or N(0, 1) as the official code"
    )
    feed_warmup_steps: int = Field(0, ge=0, description="in feed mode, D's next layer sees h for this many steps first")
    layers: list[int] = Field(
        default_factory=lambda: [1, 2], min_length=1, description="D blocks (0-based) whose output is quantized"
    )
    update_in_g_step: bool = Field(
        True, description="D's dictionaries also take an EMA step on the fakes of the G step (FQ-GAN's official code "
                          "does); false = they learn from the D step's reals and fakes only")

    @field_validator("codebook_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        return power_of_two(v, "(K = 2^P)")

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or any(i < 0 for i in v):
            raise ValueError(f"must be distinct non-negative block indices, got {v}")
        return sorted(v)


# ------------------------------------------------------------------------------------------- sq
class SQParams(Section):
    enabled: bool = Field(True, description="quantize G's styles w against a codebook on the sphere (SQ-GAN)")
    code_dim: int = Field(4, ge=1, le=4096, description="dimension of each sub-vector and code; must divide w "
                                                         "(s = w_dim / code_dim sub-vectors; the paper found 4 best)")
    codebook_size: int = Field(256, ge=2, le=65536, description="K codes of the shared codebook (sweep axis)")
    commitment: float = Field(0.25, ge=0.0, le=100.0, description="β of the commitment term of L_sq")
    lambda_sq: float = Field(0.01, ge=0.0, le=1000.0, description="λ_sq: G minimises L_adv + λ_sq(L_sq + L_uf)")
    lambda_qcr: float = Field(0.01, ge=0.0, le=1000.0, description="λ_qcr: D minimises L_adv + λ_qcr·L_qcr (0 = off)")
    uniformity_t: float = Field(2.0, gt=0.0, le=100.0, description="t of L_uf = log E exp(−t‖c̄_i − c̄_j‖²)")
    qcr_sigma: float = Field(0.1, ge=0.0, le=10.0, description="σ of the QCR noise: w' = f_W(z + ε), ε ~ N(0, σ²)")
    qcr_every: int = Field(1, ge=1, le=1000, description="steps between QCR terms (lazy, weight × qcr_every, as "
                                                          "StyleGAN2's lazy R1); 1 = every step as the paper")
    prior: str | None = Field(None, description="codebook prior file from `sqgan prior` to start the codebook from; "
                                                "unset = random codes on the sphere")


# ---------------------------------------------------------------------------------------- mixdl
class MixDLParams(Section):
    enabled: bool = Field(False, description="MixDL few-shot training (Kong et al., ECCV 2022): distance losses on "
                                             "mixes of anchor styles, mixup images judged by a patch D head")
    every: int = Field(2, ge=1, le=1000, description="one MixDL step in `every` (step % every = every − 1; 2 = the "
                                                      "odd steps, as official --interp_freq 2; 1 = all); the others "
                                                      "are plain steps")
    lambda_g: float = Field(1000.0, ge=0.0, le=1e6, description="λ_G of G's KL(softmax(c) ‖ softmax(cos)) at a "
                                                                 "random synthesis layer (sweep axis)")
    lambda_d: float = Field(1.0, ge=0.0, le=1e6, description="λ_D of D's distance loss on projected penultimate "
                                                              "features (sweep axis)")
    coefficients: Literal["dirichlet", "gaussian", "uniform"] = Field(
        "dirichlet", description="mixing coefficients c: Dirichlet(α·1), softmax of N(0, I), or normalised U(0, 1)")
    dirichlet_alpha: float = Field(1.0, gt=0.0, le=1000.0, description="α of the Dirichlet coefficients")
    num_mix: int | None = Field(None, ge=1, le=4096, description="mixup samples per MixDL step; unset = "
                                                                 "train.batch_size (the official code)")
    reduction: Literal["batchmean", "mean"] = Field(
        "batchmean", description="batchmean: KL summed over anchors, mean over mixes (the paper); mean: also ÷ B, as "
                                 "the official nn.KLDivLoss()")
    layer_per_sample: bool = Field(True, description="a random G layer per mixup sample (official); false = one "
                                                     "per step")
    proj_dim: int | None = Field(None, ge=1, le=8192, description="output size of D's projection head; unset = "
                                                                  "D's feature size")
    patch_sides: list[int] | None = Field(None, description="sides of the D maps the patch head judges; unset = "
                                                            "R/8 and R/16")
    patch_activation: Literal["lrelu", "linear"] = Field(
        "lrelu", description="end of the patch head's 3×3 conv: lrelu (the official ConvLayer) or linear")


# ---------------------------------------------------------------------------------------- prior
class PriorParams(Section):
    clip_model: str = Field("ViT-B-32", min_length=1, description="open_clip architecture of the CLIP prior")
    clip_pretrained: str | None = Field(
        None, description="CLIP weights: a local file or an open_clip tag (e.g. laion2b_s34b_b79k, needs the hub); "
                          "`sqgan prior` fails fast when unset or unreachable")
    steps: int = Field(500, ge=1, description="pre-training steps of the codebook and the MLP (L_sq + L_uf + L_OT)")
    batch_size: int = Field(64, ge=2, description="mapped w's (and image features) per step")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate of the codebook and the MLP")
    epsilon: float = Field(0.05, gt=0.0, le=10.0, description="ε of the entropic OT (Sinkhorn) distance")
    sinkhorn_iters: int = Field(50, ge=1, le=10000, description="Sinkhorn iterations (log domain)")
    lambda_ot: float = Field(1.0, ge=0.0, le=1000.0, description="weight of L_OT beside L_sq + L_uf")
    out: str = Field("runs/prior/prior.pt", min_length=1, description="where `sqgan prior` writes the prior "
                                                                      "(point sq.prior at it)")


# ------------------------------------------------------------------------------------------ ada
class AdaParams(Section):
    enabled: bool = Field(False, description="adaptive discriminator augmentation (Karras et al. 2020) before D, "
                                             "beside train.diffaugment")
    target: float = Field(0.6, gt=0.0, lt=1.0, description="r_t target: p rises while E[sign D(real)] is above it")
    interval: int = Field(4, ge=1, le=10000, description="steps between adjustments of p")
    speed_kimg: float = Field(500.0, gt=0.0, description="thousands of images over which p can move from 0 to 1")
    p_init: float = Field(0.0, ge=0.0, le=1.0, description="starting augmentation probability p")


# ---------------------------------------------------------------------------------------- train
def gpu_spelling(v: Any) -> Any:
    """`--set train.use_gpu=true` parses as a YAML bool; True/False/yes/no/on/off all mean the same."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        low = v.strip().lower()
        return {"yes": "true", "on": "true", "1": "true", "no": "false", "off": "false", "0": "false"}.get(low, low)
    return v


class TrainParams(Section):
    steps: int = Field(1000, ge=1, description="total optimisation steps (d_steps D steps + one G step each)")
    d_steps: int = Field(1, ge=1, le=16, description="D steps per G step, each on its own batch of reals (BigGAN's "
                                                     "num_D_steps; its CIFAR runs: 4)")
    ortho_reg: float = Field(0.0, ge=0.0, le=1.0, description="BigGAN's orthogonal regularisation β of G's weights "
                                                              "(its G_ortho; 1e-4 at ImageNet, 0 on CIFAR)")
    batch_size: int = Field(32, ge=1, le=4096, description="images per step per worker")
    data_on_device_gib: float = Field(4.0, ge=0.0, description="on a GPU, the uint8 training images are copied to it "
                                                               "once when they take at most this many GiB, and each "
                                                               "batch is gathered there (0 = always from host memory)")
    lr_g: float = Field(2e-4, gt=0.0, le=1.0, description="Adam learning rate of G (TTUR: below lr_d)")
    lr_d: float = Field(8e-4, gt=0.0, le=1.0, description="Adam learning rate of D")
    beta1: float = Field(0.5, ge=0.0, lt=1.0, description="Adam β1")
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam β2")
    loss: Literal["auto", "hinge", "nonsaturating"] = Field(
        "auto", description="adversarial loss; auto = the backbone's (stylegan2: nonsaturating; dcgan, sngan, biggan: "
                            "hinge)")
    r1_gamma: float | None = Field(None, ge=0.0, le=1e4, description="R1 weight γ (lazy, every r1_every steps); "
                                                                     "unset = 0.0002·R²/batch for stylegan2, 0 else")
    r1_every: int = Field(16, ge=1, le=10000, description="steps between R1 terms (lazy regularisation)")
    pl_weight: float = Field(0.0, ge=0.0, le=1e4, description="StyleGAN2 path-length regularisation weight "
                                                              "(2 in the paper; 0 = off)")
    pl_every: int = Field(4, ge=1, le=10000, description="steps between path-length terms (lazy)")
    amp: Literal["off", "bf16", "fp16"] = Field(
        "off", description="mixed precision of every G and D pass (torch.autocast on the run's device): bf16 (CPU or "
                           "GPU), fp16 (GPU only, losses scaled by a GradScaler per optimiser); off = float32. The "
                           "quantizers' EMA statistics and codebooks stay float32 either way")
    compile: bool = Field(False, description="torch.compile G's synthesis and D's blocks and head in place (the "
                                             "first steps compile them: minutes; checkpoints load into eager "
                                             "networks and back; R1 and path-length terms run eager, being double "
                                             "backwards); a torch build that cannot compile is refused before Ray")
    g_ema_decay: float = Field(0.999, ge=0.0, lt=1.0, description="G_ema decay (ramped: min(decay, (1+t)/(10+t)))")
    max_abs_logit: float = Field(
        1e4, ge=0.0, description="stop the run as diverged when a logged window mean of D's logits or an adversarial "
                                 "loss exceeds this in magnitude (divergence without NaN); 0 = never")
    diffaugment: list[Literal["color", "translation", "cutout"]] = Field(
        default_factory=lambda: ["color", "translation"],
        description="DiffAugment policies applied to real and fake images before D ([] = off; cutout's R/2 hole can "
                    "cover a small image's one object)",
    )
    log_every: int = Field(10, ge=1, description="steps between metric logs (also the FQ utilisation window)")
    sample_every: int = Field(100, ge=1, description="steps between fixed-z sample grids")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(3, ge=0, description="checkpoints/ keeps the newest N step_*.pt and the one whose "
                                                       "interim FID/KID was best (0 = keep every one)")
    seed: int = Field(0, ge=0, description="seed of init, batches, z and augmentation")
    init_from: str | None = Field(None, description="fine-tune: a run folder (its latest checkpoint) or checkpoint "
                                                    "whose G, G_ema and D start this run at step 0, e.g. an `sqgan "
                                                    "import` of a stylegan2-ada network; model.* must match it, FQ/SQ/"
                                                    "MixDL may be switched on (their dictionaries start fresh)")
    workers: int = Field(1, ge=1, le=1024, description="Ray Train workers (DDP ranks)")
    use_gpu: Literal["auto", "true", "false"] = Field("auto", description="train on GPU: auto = when Ray sees one")
    out_dir: str = Field("runs/demo", min_length=1, description="run folder: checkpoints/, samples/, metrics.json")

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _bool_spellings(cls, v: Any) -> Any:
        return gpu_spelling(v)

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_bools(cls, v: Any) -> Any:  # the field was a bool (true meant bf16 autocast)
        return {True: "bf16", False: "off", "true": "bf16", "false": "off"}.get(v, v) if isinstance(v, bool | str) \
            else v


# -------------------------------------------------------------------------------------- metrics
class MetricsParams(Section):
    names: list[Literal["fid", "sfid", "kid", "is", "pr", "lpips", "pplu", "nnmodes", "ifid"]] = Field(
        ["fid", "kid"], min_length=1, description="quality metrics of training's interim and final evaluations")
    num_fake: int = Field(500, ge=2, description="generated images (G_ema) of training's final evaluation")
    eval_every: int = Field(
        250, ge=0, description="steps between interim evaluations (eval_num_fake images, reported to Ray); 0 = final "
                               "only")
    eval_num_fake: int = Field(200, ge=2, description="generated images of each interim evaluation (final: num_fake)")
    reference_split: str = Field(
        "train", min_length=1, description="split of the curated dataset metrics compare with (its manifest's split "
                                           "column); all = every image")
    seed: int = Field(0, ge=0, description="seed of the evaluated z, KID's subsets and IS's shuffle")
    batch_size: int = Field(100, ge=1, description="images per batch of generation and feature extraction")
    features: Literal["auto", "inception", "randcnn"] = Field(
        "auto", description="feature network: inception (needs its weights file), randcnn (fixed-seed random CNN: "
                            "…_randcnn names), auto = inception when a weights file exists, else randcnn")
    inception_weights: str | None = Field(
        None, description="local torch-fidelity Inception .pth; unset = torch-fidelity's cache in the torch hub folder")
    randcnn_seed: int = Field(0, ge=0, description="seed of the random-CNN feature network (≠ 0 renames: randcnn-sN)")
    kid_subsets: int = Field(100, ge=1, description="KID subsets averaged (stylegan2-ada: 100)")
    kid_max_subset_size: int = Field(1000, ge=2, description="KID subset size cap: min(N_real, N_gen, this), as "
                                                             "stylegan2-ada")
    is_splits: int = Field(10, ge=1, description="Inception Score splits")
    pr_k: int = Field(3, ge=1, description="k of precision/recall's k-NN manifolds (Kynkäänniemi et al.: 3)")
    lpips_backbone: Literal["alex", "vgg"] = Field("alex", description="LPIPS backbone")
    lpips_weights: str | None = Field(
        None, description="torchvision state dict of the LPIPS backbone (ImageNet); unset = random backbone (rand…)")
    cache_dir: str = Field(".cache/metrics", min_length=1, description="real-image features cached by manifest hash "
                                                                       "and feature network (sqgan eval)")
    diversity_every: int = Field(
        100, ge=0, description="steps between the diversity diagnostics: d/feature_similarity (mean pairwise cosine "
                               "of D's penultimate features over the reals) and g/clip_similarity; 0 = off")
    diversity_images: int = Field(256, ge=2, description="images (reals for D, generated for CLIP) the diagnostics "
                                                         "average over")
    collapse_pixel: float = Field(
        0.25, ge=0.0, le=1.0, description="flag G_ema as collapsed when the pixel diversity of its 64 fixed-z samples "
                                          "(diversity/pixel, × the reals') falls below this at an evaluation; 0 = off")
    collapse_nn: float = Field(
        0.1, ge=0.0, le=1.0, description="… or when the share of distinct nearest reals of those samples "
                                         "(diversity/nn_distinct) falls below this; 0 = off")
    truncation: Literal["none", "global", "multimodal"] = Field(
        "none", description="evaluate truncated samples (training's evaluations and `sqgan eval`): ψ, assign, centres "
                            "and fit_samples from the sample section, recorded in each metric's provenance; none = "
                            "untruncated. With a sweep over sample.psi it ranks trials by truncated FID")
    clip_similarity: bool = Field(
        False, description="log g/clip_similarity: mean pairwise cosine of CLIP features of generated images "
                           "(CLIP from prior.clip_model / prior.clip_pretrained)")


class EvalParams(Section):
    metrics: list[Literal["fid", "sfid", "kid", "is", "pr", "lpips", "pplu", "nnmodes", "ifid"]] = Field(
        ["fid", "kid", "is", "pr", "lpips"], min_length=1, description="metrics of `sqgan eval`")
    num_fake: int = Field(5000, ge=2, description="generated images of `sqgan eval`")
    lpips_pairs: int = Field(1000, ge=1, description="pairs of generated images LPIPS diversity averages over "
                                                     "(at most num_fake / 2)")


# -------------------------------------------------------------------------------- sample, cluster
class SampleParams(Section):
    num: int = Field(64, ge=1, le=1_000_000, description="images `sqgan sample` writes")
    truncation: Literal["multimodal", "global", "none"] = Field(
        "multimodal", description="multimodal: w ← c + ψ(w − c) toward the sample's cluster centre (Self-Distilled "
                                  "StyleGAN); global: toward the mean w; none")
    psi: float = Field(0.7, ge=0.0, le=10.0, description="ψ: 1 = no truncation, 0 = the centre itself")
    assign: Literal["lpips", "l2"] = Field(
        "lpips", description="a sample's centre: LPIPS-nearest centre image (the paper) or nearest in W (ablation)")
    centres: int = Field(64, ge=1, le=4096, description="N KMeans centres of the mapped w (init random)")
    fit_samples: int = Field(60000, ge=1, le=10_000_000, description="mapped w the centres are fitted on (cached "
                                                                     "in the run folder's sample-cache/)")
    cluster: int | None = Field(None, ge=0, description="draw images of this cluster of the cluster-guided sampler "
                                                        "(cluster section); unset = no cluster")
    label: int | None = Field(None, ge=0, description="a class-conditional run: draw every image in this class "
                                                      "(`--class`); unset = image i in class i mod K")
    seed: int = Field(0, ge=0, description="seed of z (and of the KMeans)")
    batch_size: int = Field(64, ge=1, le=4096, description="images per batch")


class ClusterParams(Section):
    k: int = Field(8, ge=2, le=1024, description="k-means clusters of generated images (features: metrics.features)")
    fit_samples: int = Field(5000, ge=2, le=1_000_000, description="generated images clustered")
    steps: int = Field(2000, ge=1, description="IMLE steps of the per-cluster latent samplers")
    hidden: int = Field(256, ge=1, le=8192, description="width of each cluster's latent map")
    layers: int = Field(2, ge=1, le=16, description="hidden layers of each latent map")
    num_samples: int = Field(128, ge=1, le=65536, description="IMLE: samples drawn per cluster per step")
    targets_per_step: int = Field(64, ge=1, le=65536, description="IMLE: member codes matched per cluster per step")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate of the latent maps")
    eval_per_cluster: int = Field(100, ge=1, description="images per cluster for the cluster accuracy")
    fid_images: int = Field(2000, ge=2, description="images of the FID cost (sampler vs unconditional)")
    seed: int = Field(0, ge=0, description="seed of the clustering and the samplers")


# --------------------------------------------------------------------------------------- mlflow
class MlflowParams(Section):
    tracking_uri: str | None = Field(
        None, description="tracking URI; unset = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project"
    )
    experiment: str = Field("sqgan", min_length=1, description="MLflow experiment name")
    artifact_root: str = Field("mlartifacts", min_length=1, description="artifact folder of new experiments")
    run_name: str | None = Field(None, description="run name; unset = MLflow picks one")
    parent_run_id: str | None = Field(
        None, description="nest new runs under this run (the Kubeflow pipelines set it to the pipeline's parent run)"
    )


# ------------------------------------------------------------------------------------------ ray
class RayParams(Section):
    address: str | None = Field(None, description="Ray cluster address; unset = start a local Ray")
    storage_path: str = Field("ray_results", min_length=1, description="RunConfig.storage_path (made absolute)")
    max_failures: int = Field(0, ge=0, le=100, description="restarts of a failed worker group, from its checkpoint")
    controller_failure_limit: int = Field(
        1, ge=0, le=10, description="retries of the Train controller (e.g. a worker group that cannot start); bounded"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray; unset = all")
    cpus_per_worker: int = Field(2, ge=1, le=256, description="CPUs (and torch threads) per training worker")


# ----------------------------------------------------------------------------------------- tune
DISTRIBUTIONS = {  # name → (what its list holds, Ray Tune's constructor in sqgan.shells.tune)
    "grid": "values, every one tried (× the other grid axes)",
    "choice": "values, one drawn per trial",
    "uniform": "[low, high]",
    "loguniform": "[low, high], 0 < low",
    "randint": "[low, high], integers, both ends included",
    "qrandint": "[low, high, q], multiples of q, both ends included",
}


def flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, tuple[str, list[Any]]]:
    """Nested `tune.space` ({fq: {decay: {grid: [..]}}}) → {"fq.decay": ("grid", [..])}; a null axis is dropped."""
    out: dict[str, tuple[str, list[Any]]] = {}
    for k, v in space.items():
        key = f"{prefix}{k}"
        if v is None:
            continue
        if not isinstance(v, dict) or not v:
            raise ValueError(f"'{key}' must be {{distribution: [arguments]}} with a distribution among "
                             f"{', '.join(DISTRIBUTIONS)}, got {v!r}")
        dists = [d for d in v if d in DISTRIBUTIONS]
        if not dists:
            out.update(flatten_space(v, key + "."))
            continue
        if len(v) != 1:
            raise ValueError(f"'{key}' must name exactly one distribution, got {', '.join(map(str, v))}")
        (name, args), = v.items()
        out[key] = (name, _distribution_args(key, name, args))
    return out


def _distribution_args(key: str, name: str, args: Any) -> list[Any]:
    shape = DISTRIBUTIONS[name]
    if not isinstance(args, list):
        raise ValueError(f"'{key}': {name} takes a list of {shape}, got {args!r}")
    if name in ("grid", "choice"):
        if not args:
            raise ValueError(f"'{key}': the {name} is empty; list at least one value, e.g. {{{name}: [0.8, 0.9]}}")
        return args
    n = 3 if name == "qrandint" else 2
    is_int = name in ("randint", "qrandint")
    if not is_int:  # YAML 1.1 reads 1e-4 as a string
        args = [_number(a) for a in args]
    ok = len(args) == n and all(isinstance(a, int if is_int else (int, float)) and not isinstance(a, bool)
                                for a in args)
    if not ok or args[0] > args[1] or (name == "loguniform" and args[0] <= 0) or (name == "qrandint" and args[2] < 1):
        raise ValueError(f"'{key}': {name} takes {shape}, got {args!r}")
    return args


def _number(a: Any) -> Any:
    if isinstance(a, str):
        try:
            return float(a)
        except ValueError:
            return a
    return a


class TuneParams(Section):
    space: dict[str, Any] = Field(
        default_factory=lambda: {"fq": {"codebook_size": {"grid": [16, 64]}, "decay": {"grid": [0.8, 0.9]},
                                        "alpha": {"grid": [1.0]}},
                                 "sq": {"codebook_size": {"grid": [64, 256]}}},
        description="search space, nested like params: key → {grid|choice: [values]}, {uniform|loguniform: "
                    "[low, high]}, {randint: [low, high]} or {qrandint: [low, high, q]}; null drops an axis",
    )
    fixed: dict[str, Any] = Field(
        default_factory=lambda: {"train": {"steps": 60, "log_every": 10, "sample_every": 20, "checkpoint_every": 20},
                                 "metrics": {"eval_every": 20}},
        description="params every trial gets on top of the rest, nested like params (e.g. a short schedule)",
    )
    cells: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="named sets of params (nested like params), one per trial crossed with tune.space's axes: "
                    "configurations that differ in several keys, e.g. {BigGAN: {fq: {layers: []}}, FQ-BigGAN: {…}}; "
                    "a cell's keys win over tune.fixed, the axes' over a cell's; {} = none",
    )
    searcher: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid: every grid combination × num_samples draws; random: grids drawn like choices; "
                            "optuna: Optuna TPE (grids become choices)",
    )
    scheduler: Literal["fifo", "asha"] = Field("asha", description="asha stops weak trials at its milestones; fifo "
                                                                  "runs all to the end")
    metric: str = Field("kid", min_length=1, description="what trials are ranked (and ASHA prunes) on: kid | fid (the "
                                                         "run's KID/FID: interim, then final) or a logged metric name")
    mode: Literal["min", "max"] = Field("min", description="whether a lower or a higher metric is better")
    num_samples: int = Field(1, ge=1, le=10000, description="trials (grid: draws per grid combination)")
    max_concurrent_trials: int = Field(2, ge=1, le=1024, description="trials at once (also capped by the CPUs)")
    workers: int | None = Field(None, ge=1, le=1024, description="DDP workers per trial; unset = train.workers")
    use_gpu: Literal["auto", "true", "false"] | None = Field(None, description="per trial; unset = train.use_gpu")
    cpus_per_worker: int | None = Field(None, ge=1, le=256, description="per trial; unset = ray.cpus_per_worker")
    grace_period: int | None = Field(None, ge=1, description="ASHA: steps before a trial can be stopped; unset = "
                                                             "the trials' metrics.eval_every")
    reduction_factor: int = Field(2, ge=2, le=100, description="ASHA: keep the best 1/reduction_factor at each "
                                                              "milestone")
    max_failures: int = Field(1, ge=0, le=100, description="retries of a failed trial, from its last checkpoint")
    seed: int = Field(0, ge=0, description="seed of the random/optuna searcher")
    out_dir: str = Field("runs/sweep", min_length=1, description="sweep folder: trials/, trials.csv/.md, plots, "
                                                                 "best_params.yaml")

    @field_validator("space")
    @classmethod
    def _space_shape(cls, v: dict[str, Any]) -> dict[str, Any]:
        axes = flatten_space(v)
        if not axes:
            raise ValueError("is empty; give at least one axis, e.g. fq: {decay: {grid: [0.8, 0.9]}}")
        return v

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _bool_spellings(cls, v: Any) -> Any:
        return None if v is None else gpu_spelling(v)

    @field_validator("cells")
    @classmethod
    def _cell_names(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in v:
            if not str(name).strip():
                raise ValueError("a cell needs a name (a non-empty key)")
        return v

    def cell_values(self, name: str) -> dict[str, Any]:
        """Cell `name` as dotted keys ({"fq.layers": [], …})."""
        return flatten(self.cells[name])

    def axes(self) -> dict[str, tuple[str, list[Any]]]:
        """The search space as {"fq.decay": ("grid", [0.8, 0.9]), …}."""
        return flatten_space(self.space)


class Params(Section):
    data: DataParams = Field(default_factory=DataParams, description="datasets")
    model: ModelParams = Field(default_factory=ModelParams, description="G and D")
    fq: FQParams = Field(default_factory=FQParams, description="feature quantization in D")
    sq: SQParams = Field(default_factory=SQParams, description="style quantization in G")
    prior: PriorParams = Field(default_factory=PriorParams, description="CLIP codebook prior (`sqgan prior`)")
    ada: AdaParams = Field(default_factory=AdaParams, description="adaptive discriminator augmentation")
    mixdl: MixDLParams = Field(default_factory=MixDLParams, description="MixDL few-shot distance learning")
    train: TrainParams = Field(default_factory=TrainParams, description="training loop")
    metrics: MetricsParams = Field(default_factory=MetricsParams, description="quality metrics and diagnostics")
    eval: EvalParams = Field(default_factory=EvalParams, description="`sqgan eval`")
    sample: SampleParams = Field(default_factory=SampleParams, description="`sqgan sample`: truncation")
    cluster: ClusterParams = Field(default_factory=ClusterParams, description="cluster-guided sampling "
                                                                              "(`sqgan sample --cluster`)")
    mlflow: MlflowParams = Field(default_factory=MlflowParams, description="tracking")
    ray: RayParams = Field(default_factory=RayParams, description="Ray Train")
    tune: TuneParams = Field(default_factory=TuneParams, description="Ray Tune sweeps (`sqgan tune`)")

    @model_validator(mode="after")
    def _fits_the_arch(self) -> Params:
        m = self.model
        allowed = ARCH_RESOLUTIONS[m.arch]
        if m.resolution not in allowed:
            raise ValueError(f"model.resolution: {m.arch} supports {', '.join(map(str, allowed))} px, got "
                             f"{m.resolution}; pick one of those or another model.arch")
        n = m.d_blocks
        bad = [i for i in self.fq.layers if i >= n]
        if bad:
            raise ValueError(
                f"fq.layers: the {m.resolution}px {m.arch} discriminator has blocks 0..{n - 1}, "
                f"got {bad}; pick indices below {n}"
            )
        x = self.mixdl
        if m.pack > 1 and self.train.batch_size % m.pack:
            raise ValueError(f"model.pack: D packs {m.pack} samples, so train.batch_size ({self.train.batch_size}) "
                             f"must be a multiple of it; pick a batch size divisible by {m.pack} or model.pack 1")
        if m.pack > 1 and x.enabled:
            raise ValueError("model.pack: MixDL scores single mixed images with D's per-image features, which a "
                             "packing D does not have; use model.pack 1 with mixdl.enabled")
        if x.enabled and self.train.batch_size < 2:
            raise ValueError(f"mixdl.enabled: MixDL mixes the styles of a step's batch (its anchors) and needs "
                             f"train.batch_size ≥ 2, got {self.train.batch_size}")
        bad = [s for s in (x.patch_sides or []) if s < 4 or s >= m.resolution or s & (s - 1)]
        if bad:
            raise ValueError(f"mixdl.patch_sides: D's maps at {m.resolution}px have sides 4, 8, … "
                             f"{m.resolution // 2}, got {bad}; pick powers of two in that range (unset = R/8, R/16)")
        if m.arch == "biggan":
            slots = {32: 4, 64: 5, 128: 6}[m.resolution]  # hierarchical z: one chunk per G block + the first linear
            latent = m.w_dim if self.sq.enabled else m.z_dim
            if latent % slots:
                raise ValueError(f"model.{'w_dim' if self.sq.enabled else 'z_dim'}: BigGAN at {m.resolution}px splits "
                                 f"its latent into {slots} chunks, so it must be a multiple of {slots} (got {latent})")
        if m.attention is not None and m.arch != "biggan":
            raise ValueError("model.attention: self-attention is BigGAN's (model.arch biggan); unset it")
        if m.attention is not None and (m.attention & (m.attention - 1) or not 8 <= m.attention <= m.resolution):
            raise ValueError(f"model.attention: BigGAN's G blocks output 8, 16, … {m.resolution} px; got "
                             f"{m.attention}, pick one of those")
        if m.conditional:
            self._check_conditional()
        elif "ifid" in self.metrics.names:
            raise ValueError("metrics.names: ifid (intra-class FID) needs a class-conditional run; set "
                             "model.conditional true (and model.num_classes) or drop ifid")
        if self.sq.enabled and m.w_dim % self.sq.code_dim:  # with SQ on every arch has a mapping network z → w
            raise ValueError(f"sq.code_dim: {self.sq.code_dim} does not divide model.w_dim={m.w_dim}; pick a divisor "
                             f"(e.g. 4) so w splits into whole sub-vectors")
        return self

    def _check_conditional(self) -> None:
        """What a class-conditional run cannot be combined with (yet), each named with its fix."""
        m = self.model
        if m.num_classes < 2:
            raise ValueError(f"model.num_classes: a conditional run needs the number of classes (≥ 2) of its "
                             f"dataset's labels, got {m.num_classes}; set it (CIFAR-10: 10) or model.conditional false")
        if m.pack > 1:
            raise ValueError("model.pack: a packing D scores several samples, which may differ in class, in one "
                             "logit, and its projection head needs one class per score; use model.pack 1 with "
                             "model.conditional")
        if self.mixdl.enabled:
            raise ValueError("mixdl.enabled: MixDL mixes the styles of samples of any class; use it unconditionally "
                             "(model.conditional false)")
        if self.metrics.truncation != "none":
            raise ValueError(f"metrics.truncation: {self.metrics.truncation} truncation pulls w toward centres fitted "
                             f"without classes; evaluate a conditional run untruncated (metrics.truncation none)")
        if self.sq.enabled and self.sq.prior:
            raise ValueError("sq.prior: the codebook prior is fitted on unconditional w; set sq.prior null for a "
                             "conditional run")

    def flat(self) -> dict[str, Any]:
        """Resolved params as {"a.b": value} (for MLflow and for comparing runs)."""
        return flatten(self.model_dump(mode="json"))

    def override(self, values: dict[str, Any], source: str = "override") -> Params:
        """A copy with dotted keys set ({"fq.decay": 0.8}): how a sweep applies a trial's values. Unknown keys and
        values the schema rejects raise ConfigError naming the key."""
        raw = self.model_dump(mode="json")
        for key, value in values.items():
            path = key.split(".")
            msg = _unknown_key_message(path, source)
            if msg:
                raise ConfigError(msg)
            node = raw
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        try:
            return Params.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(_format_validation_error(err, source)) from None


# ------------------------------------------------------------------------------- load/override
# dict-valued keys: one value each (MLflow param, `config show` line)
FREE_FORM = ("tune.space", "tune.fixed", "tune.cells")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in FREE_FORM:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _all_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        sub = _section_type(info.annotation)
        paths.append(prefix + name)
        if sub is not None:
            paths.extend(_all_paths(sub, prefix + name + "."))
    return paths


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _unknown_key_message(path: list[str], source: str) -> str:
    """Name the first unknown segment of `path` and suggest the closest declared key."""
    model: type[BaseModel] = Params
    for i, part in enumerate(path):
        if part not in model.model_fields:
            dotted = ".".join(path)
            prefix = ".".join(path[:i])
            candidates = [prefix + "." + f if prefix else f for f in model.model_fields]
            close = difflib.get_close_matches(dotted, _all_paths(Params), n=1, cutoff=0.6)
            close = close or difflib.get_close_matches(".".join(path[: i + 1]), candidates, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            allowed = ", ".join(sorted(model.model_fields))
            where = f"'{prefix}'" if prefix else "the top level"
            return f"{source}: unknown key '{dotted}'; {hint}keys allowed in {where}: {allowed}"
        sub = _section_type(model.model_fields[part].annotation)
        if sub is None:
            if get_origin(model.model_fields[part].annotation) is dict:  # free-form (tune.space): any depth
                return ""
            if i < len(path) - 1:
                return f"{source}: '{'.'.join(path[: i + 1])}' is a value, not a section; cannot set '{'.'.join(path)}'"
            return ""
        model = sub
    return ""


def _field_info(path: list[str]):
    model: type[BaseModel] = Params
    info = None
    for part in path:
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = _section_type(info.annotation)
    return info


def allowed_values(info) -> str:
    """Human description of what a field accepts, from its annotation and constraints."""
    if info is None:
        return ""
    ann = info.annotation
    if get_origin(ann) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(ann))
    args = [a for a in get_args(ann) if a is not type(None)]
    if len(args) == 1 and get_origin(args[0]) is Literal:  # Optional[Literal[…]]
        return "one of " + ", ".join(repr(a) for a in get_args(args[0])) + " or null"
    if get_origin(ann) is list and args and get_origin(args[0]) is Literal:
        return "a list of " + ", ".join(repr(a) for a in get_args(args[0]))
    lo = hi = None
    lo_inc = hi_inc = True
    for m in info.metadata:
        if getattr(m, "ge", None) is not None:
            lo = m.ge
        if getattr(m, "gt", None) is not None:
            lo, lo_inc = m.gt, False
        if getattr(m, "le", None) is not None:
            hi = m.le
        if getattr(m, "lt", None) is not None:
            hi, hi_inc = m.lt, False
    tname = getattr(ann, "__name__", str(ann)).replace("typing.", "")
    if lo is not None or hi is not None:
        left = ("[" if lo_inc else "(") + (str(lo) if lo is not None else "-inf")
        right = (str(hi) if hi is not None else "inf") + ("]" if hi_inc else ")")
        return f"{tname} in {left}, {right}"
    return tname


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not isinstance(p, int)]
        idx = [p for p in e["loc"] if isinstance(p, int)]
        path = ".".join(loc)
        if e["type"] == "extra_forbidden":
            lines.append(_unknown_key_message(loc, source))
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if not loc:  # model-level validator: its message already names the key
            lines.append(f"{source}: {msg}")
            continue
        got = e.get("input")
        item = f"[{idx[0]}]" if idx else ""
        if e["type"] == "value_error":  # our own validators write the whole sentence
            lines.append(f"{source}: {path} {msg}")
            continue
        allowed = allowed_values(_field_info(loc)) or msg
        lines.append(f"{source}: {path}{item} must be {allowed}, got {got!r} ({msg})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'fq.decay=0.8' → (['fq', 'decay'], 0.8); the value is parsed as YAML ('null', '[1, 2]', 'true')."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set fq.decay=0.8")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key path; expected key.path=value, e.g. --set fq.decay=0.8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set` overrides to a raw params dict; unknown keys are errors naming the key."""
    for item in overrides:
        path, value = parse_override(item)
        msg = _unknown_key_message(path, f"--set {item}")
        if msg:
            raise ConfigError(msg)
        _seed_free_form(raw, path)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
        try:
            Params.model_validate(raw)
        except ValidationError as err:
            mine = [e for e in err.errors() if [str(p) for p in e["loc"] if not isinstance(p, int)] == path]
            if mine:
                raise ConfigError(_format_validation_error(err, f"--set {item}")) from None
    return raw


def _seed_free_form(raw: dict[str, Any], path: list[str]) -> None:
    """`--set tune.space.fq.decay=…` edits the space in force: when the file does not give the free-form key, its
    schema default is copied in first (else the override would replace the whole default space)."""
    dotted = ".".join(path)
    for key in FREE_FORM:
        if dotted.startswith(key + ".") or dotted == key:
            section, name = key.split(".")
            holder = raw.setdefault(section, {})
            if isinstance(holder, dict) and name not in holder and dotted != key:
                holder[name] = copy.deepcopy(Params().model_dump(mode="json")[section][name])


def load_params(
    path: str | Path | None = None, overrides: list[str] | None = None, *, use_file: bool = True
) -> Params:
    """Read the params file (`path`, default params.yaml), apply `--set` overrides, validate.

    The file must exist and hold a mapping of sections: a missing, empty or comment-only file is an error, never
    a silent switch to the schema defaults. `use_file=False` (`--no-params-file`) asks for the defaults on purpose.
    """
    if not use_file:
        if path is not None:
            raise ConfigError(f"--params {path} and --no-params-file contradict each other; drop one")
        raw: dict[str, Any] = {}
        source = "defaults"
    else:
        source = str(path or DEFAULT_PARAMS)
        raw = _read_params_file(Path(source), explicit=path is not None)
    # Overrides go on before the file is judged, so `--set` can mend a bad value in the file.
    raw = apply_overrides(raw, list(overrides or []))
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source + (" with --set" if overrides else ""))) from None


def default_params(overrides: list[str] | None = None) -> Params:
    """The schema defaults (equal to the shipped params.yaml) with `overrides` applied."""
    return load_params(None, overrides, use_file=False)


def _read_params_file(p: Path, explicit: bool) -> dict[str, Any]:
    hint = "pass a params file with --params FILE, or --no-params-file to use the built-in defaults on purpose"
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder, not a params file; {hint}")
    if not p.exists():
        where = "" if explicit else f" in {Path.cwd()}"
        raise ConfigError(f"{p}: params file not found{where}; {hint}")
    try:
        raw = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{p}: not valid YAML ({err}); fix the file or pass another with --params") from None
    if raw is None:
        raise ConfigError(f"{p}: is empty (or only comments); copy the project's params.yaml, or {hint}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of sections (data:, model:, …), got {type(raw).__name__}")
    return raw


def describe(params: Params) -> str:
    """The resolved params as YAML with each key's doc and allowed values (what `sqgan config show` prints)."""
    lines: list[str] = []

    def walk(obj: BaseModel, indent: int) -> None:
        for name, info in type(obj).model_fields.items():
            value = getattr(obj, name)
            pad = "  " * indent
            if isinstance(value, BaseModel):
                lines.append(f"{pad}{name}:  # {info.description}")
                walk(value, indent + 1)
            else:
                dumped = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
                dumped = dumped.strip().removesuffix("...").strip()
                allowed = allowed_values(info)
                lines.append(f"{pad}{name}: {dumped}  # {info.description} [{allowed}]")

    walk(params, 0)
    return "\n".join(lines) + "\n"
