"""OxfordDog (DESIGN.md §3): dog faces from Oxford-IIIT Pet, centred square crops resized to 256².

- Dogs only: species 2 in `annotations/list.txt` (without that file: names starting lower-case, the
  dataset's convention for dog breeds).
- Head box from `annotations/xmls/<name>.xml` (PASCAL VOC) where present (trainval only). Images without a
  usable box go through the detector: a head-box regressor (torchvision ResNet-18, random init or the
  weights file given) trained here on the annotated boxes; its IoU on a held-out tenth is reported.
- Crop: a square centred on the box, side = (1 + margin) · the box's longer side, padded (edge pixels)
  where it leaves the image, resized to `size`.
- Split: seeded, test share 498 / 4,990 (4,492 train / 498 test on the full set).
A malformed XML falls back to the detector and is listed; a box outside the image is quarantined.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision.models import resnet18
from tqdm import tqdm

from sqgan.data.images import UnusableImage, load_rgb
from sqgan.data.manifest import write_manifest
from sqgan.data.recipe import split_for
from sqgan.io import UniqueNames, check_output, stage_output, write_json_atomic

TEST_SHARE = 498 / 4990
REPORT = "dogface.json"


class BadAnnotation(ValueError):
    """A VOC XML that cannot be read or holds no usable head box."""


@dataclass(frozen=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def w(self) -> float:
        return self.x1 - self.x0

    @property
    def h(self) -> float:
        return self.y1 - self.y0


def read_species(root: Path) -> dict[str, int] | None:
    """{image name: species} from annotations/list.txt (1 = cat, 2 = dog), or None when the file is absent."""
    path = root / "annotations" / "list.txt"
    if not path.exists():
        return None
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 3:
            raise ValueError(f"{path}: malformed line {line!r}; expected 'Image CLASS-ID SPECIES BREED-ID'")
        out[parts[0]] = int(parts[2])
    return out


def read_voc_box(path: Path) -> Box:
    """The first object's bndbox of a PASCAL VOC file."""
    try:
        root = ET.parse(path).getroot()
        bb = root.find("object/bndbox")
        if bb is None:
            raise BadAnnotation(f"{path.name}: no object/bndbox")
        vals = [float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[arg-type]
    except (ET.ParseError, TypeError, ValueError) as e:
        raise BadAnnotation(f"{path.name}: malformed VOC XML ({e})") from None
    box = Box(*vals)
    if box.w <= 0 or box.h <= 0:
        raise BadAnnotation(f"{path.name}: empty box {vals}")
    return box


def clip_box(box: Box, width: int, height: int) -> Box:
    """The box clipped to the image; raises when nothing of it is inside."""
    c = Box(max(0.0, box.x0), max(0.0, box.y0), min(float(width), box.x1), min(float(height), box.y1))
    if c.w <= 0 or c.h <= 0:
        raise BadAnnotation(f"box {box} lies outside the {width}×{height} image")
    return c


def square_crop(pixels: np.ndarray, box: Box, size: int, margin: float = 0.25) -> np.ndarray:
    """A square centred on `box` with side (1 + margin)·max(w, h), edge-padded outside the image, resized."""
    h, w = pixels.shape[:2]
    side = max(1, int(round(max(box.w, box.h) * (1.0 + margin))))
    cx, cy = (box.x0 + box.x1) / 2.0, (box.y0 + box.y1) / 2.0
    x0, y0 = int(round(cx - side / 2.0)), int(round(cy - side / 2.0))
    pad = max(0, -x0, -y0, x0 + side - w, y0 + side - h)
    padded = np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)), mode="edge") if pad else pixels
    crop = padded[y0 + pad : y0 + pad + side, x0 + pad : x0 + pad + side]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS))


# ------------------------------------------------------------------------------------- detector
class HeadBoxRegressor(torch.nn.Module):
    """ResNet-18 → (cx, cy, w, h) of the head box, each in [0, 1] of the image."""

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()

        self.net = resnet18(weights=None, num_classes=4)
        if weights:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # keep our 4-output head
            missing, _ = self.net.load_state_dict(state, strict=False)
            if any(not k.startswith("fc.") for k in missing):
                raise ValueError(f"{weights}: not ResNet-18 weights (missing {missing[:3]}…)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


def _to_cxcywh(box: Box, w: int, h: int) -> list[float]:
    return [(box.x0 + box.x1) / 2 / w, (box.y0 + box.y1) / 2 / h, box.w / w, box.h / h]


def _from_cxcywh(v: np.ndarray, w: int, h: int) -> Box:
    cx, cy, bw, bh = v[0] * w, v[1] * h, v[2] * w, v[3] * h
    return Box(cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    iy = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = ix * iy
    union = a.w * a.h + b.w * b.h - inter
    return inter / union if union > 0 else 0.0


def _batch(images: list[np.ndarray], side: int) -> torch.Tensor:
    arr = np.stack([np.asarray(Image.fromarray(p).resize((side, side), Image.Resampling.BILINEAR)) for p in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_detector(
    images: list[np.ndarray], boxes: list[Box], steps: int = 300, side: int = 128, seed: int = 0,
    weights: str | Path | None = None, batch_size: int = 32,
) -> tuple[HeadBoxRegressor, float]:
    """Fit the regressor on 90% of the annotated boxes; returns (model, mean IoU on the held-out 10%)."""
    if len(images) < 2:
        raise ValueError("the detector needs at least 2 annotated dog images to train and evaluate on")
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = max(1, len(images) // 10)
    val, tr = order[:n_val], order[n_val:]
    x_all = _batch(images, side)
    y_all = torch.tensor([_to_cxcywh(b, im.shape[1], im.shape[0]) for im, b in zip(images, boxes, strict=True)])
    model = HeadBoxRegressor(weights).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="dog-head detector", unit="step", mininterval=2.0):
        idx = torch.from_numpy(tr)[torch.randint(len(tr), (min(batch_size, len(tr)),), generator=g)]
        loss = torch.nn.functional.smooth_l1_loss(model(x_all[idx].to(device)), y_all[idx].to(device), beta=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(x_all[torch.from_numpy(val)].to(device)).cpu().numpy()
    ious = [iou(_from_cxcywh(p, images[i].shape[1], images[i].shape[0]), boxes[i])
            for p, i in zip(pred, val, strict=True)]
    return model, float(np.mean(ious))


@torch.no_grad()
def detect(model: HeadBoxRegressor, images: list[np.ndarray], side: int = 128) -> list[Box]:
    device = next(model.parameters()).device
    pred = model(_batch(images, side).to(device)).cpu().numpy()
    return [_from_cxcywh(p, im.shape[1], im.shape[0]) for p, im in zip(pred, images, strict=True)]


# ---------------------------------------------------------------------------------------- stage
def build_dogface(
    src: str | Path, out: str | Path, size: int = 256, margin: float = 0.25, seed: int = 0,
    detector_steps: int = 300, detector_weights: str | Path | None = None, detector_side: int = 128,
    force: bool = False,
) -> dict:
    """Crop the dog faces of an Oxford-IIIT Pet folder `src` into `out` (atomically); returns the report."""
    root, out = Path(src), Path(out)
    img_dir = root / "images"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{img_dir} not found; --src must be the Oxford-IIIT Pet root (images/, annotations/)")
    check_output(out, "dogface", (root,), force)  # before the detector trains, not after
    species = read_species(root)
    files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if species is not None:
        dogs = [p for p in files if species.get(p.stem) == 2]
    else:
        dogs = [p for p in files if p.name[:1].islower()]
    if not dogs:
        raise ValueError(f"{root}: no dog images found (species 2 in annotations/list.txt or lower-case names)")

    quarantine, xml_errors = [], []
    annotated: list[tuple[str, np.ndarray, Box]] = []
    unannotated: list[tuple[str, np.ndarray]] = []
    for p in tqdm(dogs, desc="dog images", unit="img", mininterval=1.0):
        try:
            px = load_rgb(p).pixels
        except UnusableImage as e:
            quarantine.append({"path": p.name, "reason": str(e)})
            continue
        xml = root / "annotations" / "xmls" / f"{p.stem}.xml"
        if not xml.exists():
            unannotated.append((p.stem, px))
            continue
        try:
            box = read_voc_box(xml)
        except BadAnnotation as e:
            xml_errors.append({"path": xml.name, "reason": str(e)})
            unannotated.append((p.stem, px))
            continue
        try:
            annotated.append((p.stem, px, clip_box(box, px.shape[1], px.shape[0])))
        except BadAnnotation as e:
            quarantine.append({"path": p.name, "reason": str(e)})

    detector_iou = None
    detected: list[Box] = []
    if unannotated:
        model, detector_iou = train_detector([a[1] for a in annotated], [a[2] for a in annotated],
                                             steps=detector_steps, side=detector_side, seed=seed,
                                             weights=detector_weights)
        detected = detect(model, [u[1] for u in unannotated], detector_side)

    items = [(n, px, b, "xml") for n, px, b in annotated]
    items += [(n, px, b, "detector") for (n, px), b in zip(unannotated, detected, strict=True)]
    items.sort(key=lambda t: t[0])
    if not items:
        raise ValueError(f"{root}: no usable dog image left; quarantined: {quarantine[:3]}")
    splits = split_for(len(items), TEST_SHARE, seed)
    rows = []
    names = UniqueNames()
    with stage_output(out, "dogface", (root,), force) as tmp:
        (tmp / "images").mkdir()
        for (name, px, box, how), split in zip(items, splits, strict=True):
            rel = names.claim(f"images/{name}.png")
            Image.fromarray(square_crop(px, box, size, margin)).save(tmp / rel, format="PNG")
            rows.append({"path": rel, "width": size, "height": size, "source": "oxford-iiit-pet", "source_id": name,
                         "split": split, "box_source": how, "x0": box.x0, "y0": box.y0, "x1": box.x1, "y1": box.y1})
        write_manifest(tmp, rows)
        pd.DataFrame(quarantine + xml_errors, columns=["path", "reason"]).to_csv(tmp / "quarantine.csv", index=False)
        report = {"dogs": len(dogs), "crops": len(rows), "from_xml": len(annotated), "from_detector": len(detected),
                  "xml_errors": len(xml_errors), "quarantined": len(quarantine),
                  "train": splits.count("train"), "test": splits.count("test"), "detector_heldout_iou": detector_iou}
        write_json_atomic(tmp / REPORT, report)
    return report
