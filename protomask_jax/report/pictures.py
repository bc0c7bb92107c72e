"""Pictures of records for the report: one colour per class, a mask outlined on its image,
the view crop the network saw, and the decoded records behind them.

Pictures are uint8 ``[H, W, 3]``; masks bool ``[H, W]`` at the image's size; boxes normalised
half-open yxyx as in the records. Display widths are CSS pixels (:data:`SIZES`); pictures are
rendered at :data:`PIXEL_DENSITY` times that for sharp high-DPI output.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
from PIL import Image

from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from protomask_jax.evaluators import frame

RGB = tuple[int, int, int]
SIZES = {"source": 176, "view": 84, "whole": 230, "match": 150, "match_view": 96, "topk": 76}
PIXEL_DENSITY = 2
_OUTLINE_PX = 3  # mask outline width in rendered pixels
_DIM = 0.55  # brightness kept outside the outlined mask


def rendered(name: str) -> int:
    """Width in picture pixels of the display size ``name``."""
    return SIZES[name] * PIXEL_DENSITY


def class_colours(num_classes: int) -> list[RGB]:
    """One distinct, stable colour per class (tab10 / tab20, then golden-ratio hues)."""
    import matplotlib

    if num_classes <= 20:
        colours = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"].colors
    else:
        classes = np.arange(num_classes)
        hsv = np.stack(
            [
                (classes * 0.618034) % 1.0,
                np.full(num_classes, 0.65),
                np.where(classes % 2, 0.75, 0.9),
            ],
            axis=1,
        )
        colours = matplotlib.colors.hsv_to_rgb(hsv)
    return [tuple(int(round(255 * v)) for v in colour[:3]) for colour in colours[:num_classes]]


def fit_width(image: np.ndarray, width: int) -> np.ndarray:
    """The image at ``width`` (aspect kept; Lanczos)."""
    height = max(1, int(round(image.shape[0] * width / image.shape[1])))
    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))


def _pixel_box(box, height: int, width: int) -> tuple[int, int, int, int]:
    """Normalised half-open yxyx -> pixel ``(top, left, bottom, right)``, at least 1 px."""
    y0, x0, y1, x1 = np.asarray(box, np.float64) * [height, width, height, width]
    top, left = min(int(np.floor(y0)), height - 1), min(int(np.floor(x0)), width - 1)
    return top, left, max(top + 1, int(np.ceil(y1))), max(left + 1, int(np.ceil(x1)))


def mask_overlay(image, mask, colour: RGB, width: int, box=None) -> np.ndarray:
    """The image at ``width``, ``mask`` outlined in ``colour``, the rest dimmed. A mask too
    small to survive the resize is shown by its ``box`` instead, so no segment is invisible."""
    from scipy import ndimage

    shown = fit_width(image, width).astype(np.float32)
    height = shown.shape[0]
    region = frame.resize_mask(mask, height, width)
    if not region.any() and box is not None:
        top, left, bottom, right = _pixel_box(box, height, width)
        region[top:bottom, left:right] = True
    dimmed = _DIM * (0.6 * shown + 0.4 * shown.mean(axis=-1, keepdims=True))
    out = np.where(region[..., None], shown, dimmed)
    edge = _edge(region, _OUTLINE_PX)
    halo = ndimage.binary_dilation(edge, iterations=1) & ~edge & ~region
    out[halo] = 255.0
    out[edge] = colour
    return np.clip(out, 0, 255).astype(np.uint8)


def _edge(region: np.ndarray, width: int) -> np.ndarray:
    """The pixels of ``region`` within ``width`` pixels of its border (the picture's edge
    counts as outside)."""
    from scipy import ndimage

    return region & ~ndimage.binary_erosion(region, iterations=width, border_value=0)


def outline(picture: np.ndarray, region: np.ndarray, colour: RGB, width: int = _OUTLINE_PX):
    """``picture`` with the border of ``region`` (bool, the picture's size), ``width`` pixels
    inward, in ``colour``; every other pixel as it was."""
    out = picture.copy()
    out[_edge(region, width)] = colour
    return out


def view_crop(image: np.ndarray, box, size: int) -> np.ndarray:
    """The view of ``box`` stretched to ``size x size``, as the model's crop-and-resize."""
    top, left, bottom, right = _pixel_box(box, *image.shape[:2])
    crop = image[top:bottom, left:right]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))


@dataclasses.dataclass
class Canvas:
    """Where a report's pictures go, and the class names and colours they are drawn with."""

    out_dir: Path
    class_names: list[str]
    colours: list[RGB]

    def save(self, picture: np.ndarray, name: str) -> str:
        """Writes ``out_dir/name``; returns ``name`` (the page links it relatively)."""
        path = self.out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(path)
        return name


@dataclasses.dataclass
class DecodedImage:
    record: records_lib.ImageRecord
    image: np.ndarray  # uint8 [H, W, 3]

    @property
    def file_name(self) -> str:
        """The name of the file the image was exported from (no folders)."""
        return Path(self.record.filename).name

    def mask(self, index: int) -> np.ndarray:
        return records_lib.decode_mask_png(self.record.mask_pngs[index])

    def overlay(self, index: int, colour: RGB, size: str) -> np.ndarray:
        """Mask ``index`` outlined on the image at display size ``size``."""
        box = self.record.boxes[index]
        return mask_overlay(self.image, self.mask(index), colour, rendered(size), box)

    def view(self, index: int, size: str) -> np.ndarray:
        return view_crop(self.image, self.record.boxes[index], rendered(size))

    def view_mask(self, index: int, size: str) -> np.ndarray | None:
        """Mask ``index`` in the frame of :meth:`view` (None: the record has no masks)."""
        if index >= len(self.record.mask_pngs):
            return None
        mask = self.mask(index)
        top, left, bottom, right = _pixel_box(self.record.boxes[index], *mask.shape)
        side = rendered(size)
        return frame.resize_mask(mask[top:bottom, left:right], side, side)


class RecordImages:
    """Decoded images of a split by image id (a few kept in a cache)."""

    def __init__(self, record_set: pipeline.RecordSet):
        self.record_set = record_set
        self.index_of_id = {int(i): n for n, i in enumerate(record_set.image_ids)}

    @functools.lru_cache(maxsize=16)  # noqa: B019 (one object per report, small cache)
    def get(self, image_id: int) -> DecodedImage:
        index = self.index_of_id.get(int(image_id))
        if index is None:
            raise records_lib.RecordError(
                f"image id {image_id} is not in split '{self.record_set.split}' of "
                f"{self.record_set.records_dir}"
            )
        record, where = frame.read_record(self.record_set, index)
        return DecodedImage(record, records_lib.decode_image(record.image_bytes, where))
