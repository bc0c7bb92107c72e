"""The "parts world": a procedurally generated fine-grained classification dataset.

Each image shows one creature of 4-6 parts (body, head, wing, tail, optionally leg and
crest) at a random pose on a textured background. A class is decided by one or two
*decisive* parts, each with a class-specific shape and a saturated signature colour that
no other class shares; every other part has a random shape and a muted colour, and
classes come in pairs that differ only by the decisive part's shape. Each image's part
label map is written too, so explanations can be checked against the deciding part.

The multi-label variant (``multi_label=True``) asks which *attributes* an image shows: class
c is the first decisive (part, shape, colour) signature of single-label class c, each part
carries one of its attributes with probability ``ATTRIBUTE_PROBABILITY`` (else a distractor),
every image at least one; its label is the sorted list of the attributes drawn.

Layout under ``root`` (ids are global, train first; the same seed gives the same bytes):
``images/{id:05d}.png`` (RGB), ``part_maps/{id:05d}.png`` (uint8: 0 background, p + 1 =
part p), ``contact_sheet.png`` (examples per class, for people) and ``parts_world.json``
(metadata, written last: its presence marks a complete dataset)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

FORMAT = "parts_world"
VERSION = 1
METADATA_FILE = "parts_world.json"
CONTACT_SHEET_FILE = "contact_sheet.png"

PART_NAMES = ("body", "head", "wing", "tail", "leg", "crest")
BODY, HEAD, WING, TAIL, LEG, CREST = range(len(PART_NAMES))
# Back to front: later parts occlude earlier ones (in the image and in the part map alike).
DRAW_ORDER = (TAIL, LEG, BODY, WING, HEAD, CREST)
# Parts that may decide a class (body is too large to be telling, legs too small).
DECISIVE_CANDIDATES = (HEAD, WING, TAIL, CREST)
# Parts absent from some images (probability of presence) unless they decide the class.
OPTIONAL_PARTS = {LEG: 0.5, CREST: 0.5}

SHAPE_NAMES = {
    BODY: ("oval", "capsule"),
    HEAD: ("round", "square", "triangle"),
    WING: ("leaf", "pointed", "broad"),
    TAIL: ("fan", "fork", "bar"),
    LEG: ("stick",),
    CREST: ("spikes", "dome", "horn"),
}

# Saturated colours reserved for decisive parts; muted ones for every other part.
SIGNATURE_COLOURS = dict(
    red=(220, 40, 40), blue=(40, 90, 235), yellow=(245, 215, 30), magenta=(215, 45, 205),
    green=(40, 185, 60),
)  # fmt: skip
DISTRACTOR_COLOURS = dict(
    grey=(150, 150, 150), brown=(125, 90, 60), olive=(125, 125, 70), slate=(90, 105, 130),
    sand=(195, 180, 150),
)  # fmt: skip
BACKGROUND_COLOURS = ((205, 200, 185), (180, 190, 170), (170, 180, 190), (150, 145, 135),
                      (215, 210, 200))  # fmt: skip
BACKGROUND_KINDS = ("noise", "stripes", "blobs")

COLOUR_JITTER = 20  # max per-channel deviation of a part's colour from its palette colour
STRIPE_SHADE = 0.6  # brightness of the dark stripes of a striped part
OUTLINE_SHADE = 0.55  # brightness of a part's one-pixel outline
STRIPED_PROBABILITY = 0.3
MAX_CLASSES = 40  # beyond this the construction of unique signatures below repeats
ATTRIBUTE_PROBABILITY = 0.5  # multi-label: a part shows one of its attributes

# Object geometry in "units": one unit is one pixel of a 96 px image at scale 1.
_REFERENCE_SIZE = 96
_SCALE_RANGE = (0.8, 0.92)
_MAX_ROTATION_DEG = 20.0
_MARGIN_PX = 2


@dataclasses.dataclass(frozen=True)
class PartAttributes:
    """How one part of one image looks."""

    shape: str
    colour: str  # a key of SIGNATURE_COLOURS (decisive parts) or DISTRACTOR_COLOURS
    rgb: tuple[int, int, int]  # the jittered colour actually painted
    pattern: str  # "solid" or "stripes"


@dataclasses.dataclass(frozen=True)
class ClassSpec:
    """A class: its decisive parts and the (shape, colour) each must have."""

    name: str
    decisive: dict[int, tuple[str, str]]  # part id -> (shape name, signature colour name)


def class_specs(num_classes: int) -> list[ClassSpec]:
    """The classes of a parts world (independent of the seed).

    Pair k (classes 2k and 2k + 1) uses part ``DECISIVE_CANDIDATES[k % 4]`` in one signature
    colour with shape 0 or 1; the second class of every other pair also gets a second
    decisive part with shape 2. Colours advance so no (part, colour, shape) repeats."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(
            f"parts world num_classes must be in [2, {MAX_CLASSES}], got {num_classes}."
        )
    colours = list(SIGNATURE_COLOURS)
    specs = []
    for c in range(num_classes):
        pair = c // 2
        part = DECISIVE_CANDIDATES[pair % len(DECISIVE_CANDIDATES)]
        colour = colours[(pair + 2 * (pair // len(DECISIVE_CANDIDATES))) % len(colours)]
        decisive = {part: (SHAPE_NAMES[part][c % 2], colour)}
        if c % 4 == 3:
            second = DECISIVE_CANDIDATES[(pair + 1) % len(DECISIVE_CANDIDATES)]
            second_colour = colours[
                (pair + 2 * (pair // len(DECISIVE_CANDIDATES)) + 2) % len(colours)
            ]
            decisive[second] = (SHAPE_NAMES[second][2], second_colour)
        name = "+".join(f"{col}-{shape}-{PART_NAMES[p]}" for p, (shape, col) in decisive.items())
        specs.append(ClassSpec(name=name, decisive=decisive))
    triples = [(p, s, col) for spec in specs for p, (s, col) in spec.decisive.items()]
    assert len(set(triples)) == len(triples), "decisive signatures must be unique"
    return specs


def attribute_specs(num_classes: int) -> list[ClassSpec]:
    """The multi-label classes: one (part, shape, colour) signature each."""
    firsts = [
        (spec.name.split("+")[0], next(iter(spec.decisive.items())))
        for spec in class_specs(num_classes)
    ]
    return [ClassSpec(name=name, decisive=dict([first])) for name, first in firsts]


def draw_attributes(rng: np.random.Generator, specs: list[ClassSpec]) -> list[int]:
    """The sorted attributes of one multi-label image: per part at most one (a part has one
    shape and colour), at least one in all."""
    chosen = []
    for part in sorted({p for spec in specs for p in spec.decisive}):
        on_part = [c for c, spec in enumerate(specs) if part in spec.decisive]
        if rng.random() < ATTRIBUTE_PROBABILITY:
            chosen.append(on_part[rng.integers(len(on_part))])
    return sorted(chosen) if chosen else [int(rng.integers(len(specs)))]


def _ellipse(
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    start: float = 0.0,
    stop: float = 2 * math.pi,
    n: int = 24,
) -> np.ndarray:
    t = np.linspace(start, stop, n, endpoint=stop - start < 2 * math.pi)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _capsule(x0: float, y0: float, x1: float, y1: float, radius: float) -> np.ndarray:
    corners = (
        (x1 - radius, y1 - radius, 0.0),
        (x0 + radius, y1 - radius, 0.5 * math.pi),
        (x0 + radius, y0 + radius, math.pi),
        (x1 - radius, y0 + radius, 1.5 * math.pi),
    )
    arcs = [_ellipse(cx, cy, radius, radius, a, a + 0.5 * math.pi, 6) for cx, cy, a in corners]
    return np.concatenate(arcs)


def _polygon(*points: tuple[float, float]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


# Outlines in object units (x towards the head, y down), by shape; shape names are unique
# across parts. The leg shape is a pair of legs.
_OUTLINES = {
    "oval": [_ellipse(0, 0, 21, 12)],
    "capsule": [_capsule(-20, -11, 20, 11, 6)],
    "round": [_ellipse(25, -9, 9, 9)],
    "square": [_polygon((17, -17.5), (34, -17.5), (34, -0.5), (17, -0.5))],
    "triangle": [_polygon((15, -20), (15, 2), (37, -9))],
    "leaf": [_ellipse(-3, -4, 13, 7)],
    "pointed": [_polygon((8, -9), (8, 3), (-19, -8))],
    "broad": [_polygon((7, -10), (7, 3), (-13, 3), (-16, -10))],
    "fan": [_polygon((-14, 0), (-36, -12), (-36, 12))],
    "fork": [_polygon((-14, -4), (-36, -13), (-29, 0), (-36, 13), (-14, 4))],
    "bar": [_polygon((-14, -5), (-35, -5), (-35, 5), (-14, 5))],
    "stick": [
        _polygon((-9, 7), (-4, 7), (-4, 25), (-9, 25)),
        _polygon((4, 7), (9, 7), (9, 25), (4, 25)),
    ],
    "spikes": [
        _polygon((17, -15), (19, -28), (22, -19), (25, -30), (28, -19), (31, -28), (33, -15))
    ],
    "dome": [_ellipse(25, -15, 8, 11, math.pi, 2 * math.pi, 13)],
    "horn": [_polygon((18, -15), (30, -15), (15, -32))],
}


@dataclasses.dataclass
class RenderedImage:
    image: np.ndarray  # uint8 [H, W, 3]
    part_map: np.ndarray  # uint8 [H, W], equal to the painted parts, occlusion included
    parts: dict[int, PartAttributes]


def _jittered(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    noise = np.clip(np.rint(rng.normal(0.0, COLOUR_JITTER / 2, 3)), -COLOUR_JITTER, COLOUR_JITTER)
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + noise, 0, 255))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background, float32 ``[size, size, 3]`` in 0..255."""
    base = np.asarray(BACKGROUND_COLOURS[rng.integers(len(BACKGROUND_COLOURS))], np.float32)
    kind = BACKGROUND_KINDS[rng.integers(len(BACKGROUND_KINDS))]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    luminance = np.zeros((size, size), np.float32)
    if kind == "noise":
        luminance += rng.normal(0.0, 14.0, (size, size)).astype(np.float32)
    elif kind == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 16) * size / _REFERENCE_SIZE
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        luminance += np.where(np.floor(phase) % 2 == 0, 22.0, -22.0).astype(np.float32)
    else:
        for _ in range(rng.integers(6, 13)):
            cy, cx = rng.uniform(0, size, 2)
            radius = rng.uniform(4, 14) * size / _REFERENCE_SIZE
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            luminance[inside] += rng.uniform(-30, 30)
    pixels = base + luminance[..., None]
    pixels += rng.normal(0.0, 4.0, (size, size, 3)).astype(np.float32)
    return pixels


def _choose_parts(rng: np.random.Generator, spec: ClassSpec) -> dict[int, PartAttributes]:
    parts = {}
    distractors = list(DISTRACTOR_COLOURS)
    for part in range(len(PART_NAMES)):
        present_probability = OPTIONAL_PARTS.get(part, 1.0)
        if part not in spec.decisive and rng.random() >= present_probability:
            continue
        pattern = "stripes" if rng.random() < STRIPED_PROBABILITY else "solid"
        if part in spec.decisive:
            shape, colour = spec.decisive[part]
            rgb = SIGNATURE_COLOURS[colour]
        else:
            shape = SHAPE_NAMES[part][rng.integers(len(SHAPE_NAMES[part]))]
            colour = distractors[rng.integers(len(distractors))]
            rgb = DISTRACTOR_COLOURS[colour]
        parts[part] = PartAttributes(shape, colour, _jittered(rng, rgb), pattern)
    return parts


def render_image(rng: np.random.Generator, spec: ClassSpec, size: int) -> RenderedImage:
    """Draws one creature of class ``spec``; all its randomness comes from ``rng``."""
    parts = _choose_parts(rng, spec)
    # Pose: mirror, rotate, scale, then translate so the object stays inside.
    scale = rng.uniform(*_SCALE_RANGE) * size / _REFERENCE_SIZE
    angle = math.radians(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    cos, sin = math.cos(angle), math.sin(angle)
    # Object units -> pixels: p_px = R @ diag(mirror, 1) @ p * scale + offset.
    linear = scale * np.array([[cos * mirror, -sin], [sin * mirror, cos]])
    polygons = {p: [poly @ linear.T for poly in _OUTLINES[a.shape]] for p, a in parts.items()}
    points = np.concatenate([poly for polys in polygons.values() for poly in polys])
    low = -points.min(axis=0) + _MARGIN_PX
    high = size - _MARGIN_PX - points.max(axis=0)
    offset = rng.uniform(low, np.maximum(high, low))

    label_image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(label_image)
    for part in DRAW_ORDER:
        for poly in polygons.get(part, []):
            draw.polygon([tuple(v) for v in (poly + offset)], fill=part + 1)
    part_map = np.asarray(label_image, dtype=np.uint8)

    pixels = _background(rng, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Stripes run across the object's own x axis, so they rotate with it.
    along_axis = ((xx - offset[0]) * cos + (yy - offset[1]) * sin) / scale
    dark_stripe = np.floor(along_axis / 4.0) % 2 == 1
    for part, attributes in parts.items():
        inside = part_map == part + 1
        colour = np.asarray(attributes.rgb, np.float32)
        pixels[inside] = colour
        if attributes.pattern == "stripes":
            pixels[inside & dark_stripe] = colour * STRIPE_SHADE
    # A dark one-pixel outline wherever a part meets a different label (or the image edge).
    padded = np.pad(part_map, 1, mode="edge")
    boundary = (
        (padded[:-2, 1:-1] != part_map)
        | (padded[2:, 1:-1] != part_map)
        | (padded[1:-1, :-2] != part_map)
        | (padded[1:-1, 2:] != part_map)
    ) & (part_map > 0)
    pixels[boundary] *= OUTLINE_SHADE
    image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return RenderedImage(image=image, part_map=part_map, parts=parts)


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    # Export processes sharing a fresh root all generate it, and one may read a file
    # another is rewriting: same bytes, never half-written.
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_metadata(root: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata of a complete parts world under ``root``, or None if there is none."""
    path = Path(root) / METADATA_FILE
    if not path.exists():
        return None
    metadata = json.loads(path.read_text())
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise ValueError(f"{path}: not a version-{VERSION} parts world metadata file.")
    return metadata


def _write_image(root: Path, image_id: int, rendered: RenderedImage) -> tuple[str, str]:
    image_file, part_map_file = f"images/{image_id:05d}.png", f"part_maps/{image_id:05d}.png"
    _write_atomic(root / image_file, _png_bytes(rendered.image))
    _write_atomic(root / part_map_file, _png_bytes(rendered.part_map))
    return image_file, part_map_file


def _class_metadata(spec: ClassSpec) -> dict[str, Any]:
    return dict(
        name=spec.name,
        decisive_parts=sorted(spec.decisive),
        decisive={
            PART_NAMES[p]: dict(shape=s, colour=col)
            for p, (s, col) in sorted(spec.decisive.items())
        },
    )


def generate(
    root: str | os.PathLike,
    num_classes: int = 8,
    image_size: int = 96,
    train_per_class: int = 80,
    test_per_class: int = 20,
    seed: int = 0,
    multi_label: bool = False,
) -> dict[str, Any]:
    """Generates a parts world under ``root`` unless it is there already; returns its metadata.

    Within a split ids interleave the classes (c0, c1, ..., c0, c1, ...), so any contiguous
    id range is close to class-balanced (multi-label: ``num_classes * per_class`` images, each
    with its own attributes). A ``root`` generated with other parameters is refused
    (ValueError)."""
    root = Path(root)
    params = dict(
        num_classes=int(num_classes),
        image_size=int(image_size),
        train_per_class=int(train_per_class),
        test_per_class=int(test_per_class),
        seed=int(seed),
    )
    if multi_label:  # absent when False: single-label worlds made before the variant still match
        params["multi_label"] = True
    existing = load_metadata(root)
    if existing is not None:
        if existing["params"] != params:
            raise ValueError(
                f"{root} already holds a parts world generated with {existing['params']}, "
                f"not {params}. Delete the folder or choose another dataset root."
            )
        return existing
    if image_size < 32:
        raise ValueError(f"parts world image_size must be >= 32 px, got {image_size}.")
    specs = attribute_specs(num_classes) if multi_label else class_specs(num_classes)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "part_maps").mkdir(parents=True, exist_ok=True)
    images = []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for _ in range(per_class):
            for label, spec in enumerate(specs):
                image_id = len(images)
                rng = np.random.default_rng([seed, image_id])
                entry = dict(id=image_id, split=split, label=label)
                if multi_label:
                    shown = draw_attributes(rng, specs)
                    decisive = {p: s for c in shown for p, s in specs[c].decisive.items()}
                    spec = ClassSpec("+".join(specs[c].name for c in shown), decisive)
                    entry.update(label=shown, decisive_parts=sorted(decisive))
                rendered = render_image(rng, spec, image_size)
                image_file, part_map_file = _write_image(root, image_id, rendered)
                parts = {
                    PART_NAMES[p]: dataclasses.asdict(a) for p, a in sorted(rendered.parts.items())
                }
                images.append(dict(entry, image=image_file, part_map=part_map_file, parts=parts))
    metadata = dict(
        format=FORMAT,
        version=VERSION,
        params=params,
        part_names=list(PART_NAMES),
        class_names=[spec.name for spec in specs],
        classes=[_class_metadata(spec) for spec in specs],
        images=images,
    )
    _write_atomic(root / CONTACT_SHEET_FILE, _png_bytes(contact_sheet(root, metadata)))
    # Written last: its presence means every file above is complete.
    _write_atomic(root / METADATA_FILE, (json.dumps(metadata, indent=1) + "\n").encode())
    return load_metadata(root)


_PART_MAP_PALETTE = np.array(
    [(0, 0, 0), (160, 160, 160), (230, 80, 80), (80, 140, 240), (240, 200, 60), (120, 200, 120),
     (210, 90, 210)], np.uint8
)  # fmt: skip


def contact_sheet(
    root: str | os.PathLike, metadata: dict[str, Any], examples_per_class: int = 6
) -> np.ndarray:
    """One row per class: its name, ``examples_per_class`` training images and the part
    map of the first one (parts coloured). Returns ``uint8 [H, W, 3]``."""
    root = Path(root)
    size = metadata["params"]["image_size"]
    class_names: Sequence[str] = metadata["class_names"]
    by_class: dict[int, list[dict[str, Any]]] = {c: [] for c in range(len(class_names))}
    for entry in metadata["images"]:
        for label in np.atleast_1d(entry["label"]).tolist() if entry["split"] == "train" else ():
            if len(by_class[label]) < examples_per_class:
                by_class[label].append(entry)
    label_width, gap = 200, 2
    width = label_width + (examples_per_class + 1) * (size + gap)
    sheet = Image.new("RGB", (width, len(class_names) * (size + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(class_names):
        top = c * (size + gap)
        for line, text in enumerate(name.split("+")):
            draw.text((4, top + 4 + 12 * line), text, fill=(0, 0, 0))
        for k, entry in enumerate(by_class[c]):
            with Image.open(root / entry["image"]) as image:
                sheet.paste(image.convert("RGB"), (label_width + k * (size + gap), top))
        if by_class[c]:
            with Image.open(root / by_class[c][0]["part_map"]) as part_map:
                coloured = _PART_MAP_PALETTE[np.asarray(part_map)]
            sheet.paste(
                Image.fromarray(coloured), (label_width + examples_per_class * (size + gap), top)
            )
    return np.asarray(sheet)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="output folder")
    for name, parameter in list(inspect.signature(generate).parameters.items())[1:]:
        parser.add_argument(f"--{name}", type=int, default=parameter.default)
    args = parser.parse_args(argv)
    metadata = generate(args.root, **{k: v for k, v in vars(args).items() if k != "root"})
    print(
        f"{args.root}: {len(metadata['images'])} images, {args.num_classes} classes "
        f"({', '.join(metadata['class_names'])}); contact sheet: "
        f"{Path(args.root) / CONTACT_SHEET_FILE}"
    )


if __name__ == "__main__":
    main()
