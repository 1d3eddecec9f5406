"""Decode any image file fully and turn it into 8-bit RGB, or say why it cannot be used.

Used by every dataset stage, so CMYK, palette, grayscale, 16-bit and alpha images are handled one way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm"}
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on


class UnusableImage(ValueError):
    """A file that cannot become a training image; the message is the quarantine reason."""


@dataclass
class RGBImage:
    pixels: np.ndarray  # uint8 [H, W, 3]
    mode_in: str  # PIL mode of the file ("RGB", "CMYK", "I;16", …)
    converted: bool  # whether anything but a plain decode was needed

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def _sixteen_bit_to_8(im: Image.Image) -> Image.Image:
    arr = np.asarray(im)
    if arr.dtype.kind == "f":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo or 1.0) * 255.0
    else:  # integer 16/32-bit: full 16-bit range → 8-bit by the top byte (keeps relative exposure)
        arr = arr.astype(np.int64).clip(0, 65535) // 257
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image) -> tuple[Image.Image, bool]:
    """(RGB image, converted?) for any PIL mode; alpha is composited on white."""
    mode = im.mode
    if mode == "RGB":
        return im, False
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode == "RGB":
            return im, True
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _sixteen_bit_to_8(im).convert("RGB"), True
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB"), True
    return im.convert("RGB"), True  # CMYK, L, 1, YCbCr, LAB, HSV


def load_rgb(path: str | Path) -> RGBImage:
    """Fully decode `path` and convert it to uint8 RGB; raise `UnusableImage` with the reason otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UnusableImage(f"unreadable: {e.strerror}") from None
    if size == 0:
        raise UnusableImage("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                mode_in = im.mode
                im.load()  # decode every pixel: truncated files fail here, not at training time
                rgb, converted = to_rgb(im)
                pixels = np.asarray(rgb, dtype=np.uint8).copy()
    except UnidentifiedImageError:
        raise UnusableImage("not an image (no decoder recognises it)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise UnusableImage(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UnusableImage(f"truncated or corrupt: {e}") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3 or min(pixels.shape[:2]) < 1:
        raise UnusableImage(f"unexpected decoded shape {pixels.shape}")
    return RGBImage(pixels, mode_in, converted)


def list_files(src: str | Path) -> list[Path]:
    """Every regular file below `src`, sorted (hidden files and folders skipped)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} not found; give an existing folder with --src")
    return sorted(
        p for p in src.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)
    )
