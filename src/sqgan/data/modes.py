"""A ground-truth learning benchmark: a synthetic dataset with K known modes and a classifier that reads them back.

Each image is one filled shape (square, disc, triangle, plus) in one colour on a black background, its centre and
size jittered; K = shapes × colours modes, the same number of images per mode, all seeded. `classify_modes` reads
the mode of any image from its pixels (foreground mask → bounding box → the best-fitting shape template by IoU, mean
foreground colour → the nearest palette colour) and says whether the image is a *clean* mode (one shape of one
colour on a clean background). `mode_coverage` turns a generator's samples into the benchmark's numbers: modes
covered of K, KL(generated mode histogram ‖ uniform) and the clean share. A generator that learns the data covers
every mode about equally with clean images; a collapsed one covers few, and a blurry one is not clean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sqgan.data.manifest import write_manifest
from sqgan.io import stage_output

SHAPES = ("disc", "plus", "triangle", "square")  # in this order: a 2-shape set is the two least alike
PALETTE = {  # far apart in RGB, none near the black background
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 215, 40),
}
SOURCE = "synthetic:modes"
SUPERSAMPLE = 4  # shapes are drawn at 4× and box-filtered down, so their edges are anti-aliased


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "square":
        s = r * 0.85  # the same area order as the disc, so size does not tell the shapes apart
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "plus":
        a = r / 3
        draw.rectangle([cx - a, cy - r, cx + a, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - a, cx + r, cy + a], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")


def mode_names(shapes: int = 4, colours: int = 4) -> list[str]:
    """The K = shapes × colours mode names, `<colour>-<shape>`, in mode-index order."""
    if not (1 <= shapes <= len(SHAPES) and 1 <= colours <= len(PALETTE)):
        raise ValueError(f"modes: shapes must be in 1..{len(SHAPES)} and colours in 1..{len(PALETTE)}, "
                         f"got {shapes} and {colours}")
    return [f"{c}-{s}" for c in list(PALETTE)[:colours] for s in SHAPES[:shapes]]


def render_mode(mode: int, resolution: int, rng: np.random.Generator, shapes: int = 4) -> np.ndarray:
    """One image of mode `mode` (uint8 [R, R, 3]): its shape and colour, centre ±R/10 and radius R·[0.22, 0.32]."""
    shape, colour = SHAPES[mode % shapes], list(PALETTE.values())[mode // shapes]
    big = resolution * SUPERSAMPLE
    cx, cy = (big / 2 + rng.uniform(-0.1, 0.1, 2) * big).tolist()
    r = float(rng.uniform(0.22, 0.32)) * big
    img = Image.new("RGB", (big, big), (0, 0, 0))
    _draw(ImageDraw.Draw(img), shape, cx, cy, r, colour)
    return np.asarray(img.resize((resolution, resolution), Image.Resampling.BOX))


def build_modes(out: str | Path, resolution: int = 32, shapes: int = 4, colours: int = 4, per_mode: int = 64,
                seed: int = 0, force: bool = False) -> Path:
    """Write the modes dataset (images + manifest with a `mode` and `mode_name` column; every image in the train
    split) to `out`, atomically. Same arguments → byte-identical output."""
    if resolution < 16:
        raise ValueError(f"modes: resolution must be ≥ 16 for the shapes to be told apart, got {resolution}")
    names = mode_names(shapes, colours)
    rng = np.random.default_rng(seed)
    out = Path(out)
    rows = []
    with stage_output(out, "modes", force=force) as tmp:
        (tmp / "images").mkdir()
        for mode, name in enumerate(names):
            for j in range(per_mode):
                rel = f"images/{name}_{j:04d}.png"
                Image.fromarray(render_mode(mode, resolution, rng, shapes)).save(tmp / rel, format="PNG")
                rows.append({"path": rel, "width": resolution, "height": resolution, "source": SOURCE,
                             "source_id": f"{name}_{j:04d}", "split": "train", "mode": mode, "mode_name": name})
        write_manifest(tmp, rows)
    return out


# ----------------------------------------------------------------------------------------- classifier
FOREGROUND = 80  # a pixel whose brightest channel exceeds this is foreground (the palette's darkest max is 200)
MIN_IOU = 0.6  # the best shape template must overlap the foreground this much
MAX_COLOUR_DIST = 70.0  # RGB distance of the foreground's mean colour to its palette colour
MAX_STRAY = 0.04  # share of foreground pixels allowed outside the shape's box (a second blob, speckle)


def _templates(shapes: int, side: int) -> np.ndarray:
    """Each shape drawn to fill a side×side box, as a boolean mask [shapes, side, side]."""
    out = []
    big = side * SUPERSAMPLE
    for shape in SHAPES[:shapes]:
        img = Image.new("L", (big, big), 0)
        r = big / 2 / (0.85 if shape == "square" else 1.0)  # the square is drawn at 0.85 r
        _draw(ImageDraw.Draw(img), shape, big / 2, big / 2, r, 255)
        out.append(np.asarray(img.resize((side, side), Image.Resampling.BOX)) > 127)
    return np.stack(out)


@dataclass(frozen=True)
class ModeReading:
    mode: np.ndarray  # [N] the mode index of each image (−1: no foreground)
    clean: np.ndarray  # [N] bool: one clean shape of one palette colour on a clean background
    iou: np.ndarray  # [N] IoU of the foreground with the chosen shape's template
    colour_dist: np.ndarray  # [N] RGB distance of the mean foreground colour to its palette colour


def classify_modes(images: np.ndarray | torch.Tensor, shapes: int = 4, colours: int = 4) -> ModeReading:
    """Read the mode of each image (uint8 [N, H, W, 3] or [N, 3, H, W])."""
    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"classify_modes expects a batch of images [N, H, W, 3] or [N, 3, H, W], got {x.shape}")
    if x.shape[1] == 3 and x.shape[-1] != 3:
        x = x.transpose(0, 2, 3, 1)
    palette = np.array(list(PALETTE.values())[:colours], dtype=np.float64)
    n = len(x)
    mode = np.full(n, -1)
    clean = np.zeros(n, dtype=bool)
    ious, dists = np.zeros(n), np.full(n, np.inf)
    cache: dict[tuple[int, int], np.ndarray] = {}
    for i, img in enumerate(x.astype(np.float64)):
        fg = img.max(axis=2) > FOREGROUND
        if fg.sum() < 4:
            continue
        # the box of the bulk of the foreground (2nd–98th percentile), so a stray pixel does not stretch it
        ys, xs = np.nonzero(fg)
        r0, r1 = np.percentile(ys, [2, 98]).round().astype(int)
        c0, c1 = np.percentile(xs, [2, 98]).round().astype(int)
        h, w = r1 - r0 + 1, c1 - c0 + 1
        side = max(h, w)
        key = (shapes, side)
        if key not in cache:
            cache[key] = _templates(shapes, side)
        # the templates fill a side×side box centred on the foreground's box
        cr, cc = (r0 + r1) / 2, (c0 + c1) / 2
        top, left = int(round(cr - (side - 1) / 2)), int(round(cc - (side - 1) / 2))
        canvas = np.zeros((len(cache[key]),) + fg.shape, dtype=bool)
        t0, l0 = max(top, 0), max(left, 0)
        t1, l1 = min(top + side, fg.shape[0]), min(left + side, fg.shape[1])
        canvas[:, t0:t1, l0:l1] = cache[key][:, t0 - top : t1 - top, l0 - left : l1 - left]
        inter = (canvas & fg).sum((1, 2))
        union = (canvas | fg).sum((1, 2))
        iou = inter / np.maximum(union, 1)
        shape = int(iou.argmax())
        colour_d = np.linalg.norm(palette - img[fg].mean(0), axis=1)
        colour = int(colour_d.argmin())
        mode[i] = colour * shapes + shape
        ious[i], dists[i] = iou[shape], colour_d[colour]
        box = np.zeros_like(fg)
        box[max(r0 - 1, 0) : r1 + 2, max(c0 - 1, 0) : c1 + 2] = True
        stray = (fg & ~box).sum() / fg.sum()
        clean[i] = iou[shape] >= MIN_IOU and colour_d[colour] <= MAX_COLOUR_DIST and stray <= MAX_STRAY
    return ModeReading(mode, clean, ious, dists)


@dataclass(frozen=True)
class Coverage:
    modes: int  # K
    covered: int  # modes holding at least a quarter of their uniform share of the clean samples
    kl: float  # KL(p ‖ uniform) of the clean samples' mode histogram p, nats (0 = every mode equally often)
    clean: float  # share of samples that are a clean mode
    histogram: list[int]  # clean samples per mode
    missing: list[str]  # the names of the modes not covered ("red-plus", …), in mode order

    def as_dict(self) -> dict[str, float]:
        return {"modes/covered": float(self.covered), "modes/kl": self.kl, "modes/clean": self.clean}


def mode_coverage(images: np.ndarray | torch.Tensor, shapes: int = 4, colours: int = 4) -> Coverage:
    """The benchmark's numbers for a set of generated images (uint8)."""
    k = shapes * colours
    reading = classify_modes(images, shapes, colours)
    hist = np.bincount(reading.mode[reading.clean], minlength=k)
    n_clean = int(hist.sum())
    names = mode_names(shapes, colours)
    if n_clean == 0:
        return Coverage(k, 0, math.log(k), 0.0, hist.tolist(), names)
    p = hist / n_clean
    nz = p > 0
    kl = float((p[nz] * np.log(p[nz] * k)).sum())
    held = hist >= max(1.0, n_clean / k / 4)
    missing = [name for name, ok in zip(names, held, strict=True) if not ok]
    return Coverage(k, int(held.sum()), kl, n_clean / len(reading.mode), hist.tolist(), missing)
