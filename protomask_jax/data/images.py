"""Image files a person hands over -> the ``uint8 [H, W, 3]`` RGB the segmenters and the
pipeline take (PIL only).

In order: the first frame of an animation is read (a JPEG far over the size limit is decoded
at a reduced scale); the EXIF orientation is applied, so the image is upright as viewers show
it; 16-bit channels keep their high byte (what PIL itself does to 16-bit RGB, silently: the
file's sample format, read before decoding, is what tells); alpha is
composited over white (transparent areas of cut-outs and logos mean "background", and
dropping alpha would show whatever colour the transparent pixels happen to hold); CMYK,
palette and grey become RGB; a longest side over :data:`MAX_SIDE` is scaled down to it
(Lanczos): segmenters return full-resolution masks, ``[N, H, W]`` each, while SAM and SAM 2
look at 1024 px and the classifier at the canvas size anyway. Images smaller than a view are
kept as they are (the pipeline scales them up). A file PIL cannot read raises
:class:`ImageError` with a one-line reason. The export reads dataset images the same way, at
full size, so a model trains on what ``predict`` later shows it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

MAX_SIDE = 2048  # px, longest side after loading
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(ValueError):
    """A file is not an image PIL can read."""


@dataclasses.dataclass
class LoadedImage:
    rgb: np.ndarray  # uint8 [H, W, 3], upright, longest side <= MAX_SIDE
    size: tuple[int, int]  # (H, W) of the upright image before any downscaling
    notes: list[str]  # what was done to the file, for a person


def load_image(path: str | Path | BinaryIO, full_size: bool = False) -> LoadedImage:
    """Reads ``path`` (or an open binary file) as described above; ``full_size``: no
    downscaling."""
    try:
        with warnings.catch_warnings():
            # Photos of 90+ MP trip PIL's decompression-bomb warning; they are scaled down
            # here (PIL still refuses images over twice that size, which then are skipped).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return _upright_rgb(image, None if full_size else MAX_SIDE)
    except Exception as e:  # PIL's plugins raise many types on malformed files
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def _upright_rgb(image: Image.Image, max_side: int | None) -> LoadedImage:
    notes = []
    # PIL decodes 16-bit RGB(A) straight to mode RGB(A); only the raw mode of the undecoded
    # tiles shows it (getexif decodes a PNG, so this comes first).
    if image.mode in ("RGB", "RGBA") and any(";16" in str(tile.args) for tile in image.tile):
        notes.append(f"16-bit {image.mode} converted to 8 bits per channel")
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        notes.append(f"animated ({frames} frames): only the first frame used")
    width, height = image.size
    orientation = image.getexif().get(_ORIENTATION, 1)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    scale = 1.0 if max_side is None else max_side / max(width, height)
    if scale < 1:
        # JPEG only (elsewhere a no-op): decode at the smallest 1/2^k scale still >= target.
        image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    image.load()
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
        notes.append(f"EXIF orientation {orientation} applied")
    if image.mode in _SIXTEEN_BIT:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray((values >> 8).astype(np.uint8))
        notes.append("16-bit grey scaled to 8 bits")
    if image.mode == "CMYK":
        notes.append("CMYK converted to RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("transparent pixels composited over white")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    image = image.convert("RGB")
    if scale < 1:
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(target, Image.Resampling.LANCZOS)
        notes.append(f"downscaled from {width}x{height} to {target[0]}x{target[1]} px")
    return LoadedImage(np.asarray(image), (height, width), notes)
