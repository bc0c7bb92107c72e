"""Masks and ground truth of records, rendered into one ``R x R`` frame of the whole image.

The frame is the image stretched to a square, so masks, object masks, decisive parts and the
(normalised) keypoints land on the same pixels and every ratio is unaffected. A frame pixel
belongs to a mask when at least half of the image pixels it covers do (PIL's box filter).

Ground truth, where a record has it (``docs/explanations.md``): the object is
``gt/object_mask``, else the union of the parts of ``gt/part_map``, else the union of the
``gt/object_boxes``; keypoints are ``gt/keypoints``, else one point per part of
``gt/part_map``; decisive parts need ``gt/part_map`` + ``gt/decisive_parts``.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib

OBJECT_FROM_FIELD = "gt/object_mask"
OBJECT_FROM_PARTS = "union of the parts of gt/part_map"
OBJECT_FROM_BOXES = "union of the gt/object_boxes"
KEYPOINTS_FROM_FIELD = "gt/keypoints"
KEYPOINTS_FROM_PARTS = "one point per part of gt/part_map (deepest part pixel)"
_NO_KEYPOINT = (-1.0, -1.0, 0.0)


def read_record(record_set: pipeline.RecordSet, index: int, num_masks: int = 1):
    """Record ``index`` and where it lies; refuses one without the first ``num_masks`` masks."""
    path, offset = record_set.reader.locate(int(index))
    where = f"{path} at byte offset {offset}"
    record = records_lib.ImageRecord.from_bytes(record_set.reader[int(index)], where)
    if len(record.mask_pngs) < min(record.num_masks, num_masks):
        raise records_lib.RecordError(
            f"{where} (image id {record.image_id}): the record has no mask images "
            "(masks/encoded); re-export the dataset to evaluate or explain it."
        )
    return record, where


def image_size(record) -> tuple[int, int]:
    """``(height, width)`` of a record's image (from its header when the record has no size)."""
    if record.height:
        return record.height, record.width
    with Image.open(io.BytesIO(record.image_bytes)) as image:
        return image.height, image.width


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool ``[H, W]`` -> bool ``[height, width]``: a pixel is set when half its block is."""
    image = Image.fromarray(np.asarray(mask, np.uint8) * 255, mode="L")
    return np.asarray(image.resize((width, height), Image.BOX)) >= 128


def to_frame(mask: np.ndarray, resolution: int) -> np.ndarray:
    return resize_mask(mask, resolution, resolution)


def boxes_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Union of normalised half-open yxyx boxes as bool ``[H, W]`` (pixel centres inside)."""
    rows = (np.arange(height) + 0.5) / height
    cols = (np.arange(width) + 0.5) / width
    mask = np.zeros((height, width), bool)
    for y0, x0, y1, x1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        mask |= ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]
    return mask


def part_keypoints(part_map: np.ndarray, num_parts: int) -> np.ndarray:
    """float32 ``[Q, 3]`` ``(y, x, visible)``, normalised, from a label map (``p + 1`` = part p).

    A part's point is its pixel farthest from the part's boundary (first in row-major order):
    unlike the centroid it lies on the part, also for a forked tail. Absent parts get
    ``(-1, -1, 0)``.
    """
    from scipy import ndimage

    height, width = part_map.shape
    keypoints = np.tile(np.array(_NO_KEYPOINT, np.float32), (num_parts, 1))
    for part in np.unique(part_map):
        if not 0 < part <= num_parts:
            continue
        # Pad so a part touching the image edge has its boundary there too.
        depth = ndimage.distance_transform_edt(np.pad(part_map == part, 1))[1:-1, 1:-1]
        row, col = np.unravel_index(np.argmax(depth), depth.shape)
        keypoints[part - 1] = ((row + 0.5) / height, (col + 0.5) / width, 1.0)
    return keypoints


def decisive_part_masks(part_map: np.ndarray, decisive_parts: np.ndarray) -> np.ndarray:
    """bool ``[N, R, R]``: pixels of the parts (ids ``[N, M]``, -1 padded) deciding the class."""
    part_ids = np.asarray(part_map, dtype=np.int64) - 1  # background -> -1
    decisive = np.asarray(decisive_parts, dtype=np.int64).reshape(len(part_ids), -1)
    # -1 padding must not match background, which is also -1 after the shift.
    decisive = np.where(decisive < 0, -2, decisive)
    return (part_ids[:, None] == decisive[:, :, None, None]).any(axis=1)


@dataclasses.dataclass
class FrameMaps:
    """N images in the frame. ``masks [N, K, R, R]``: the first ``num_masks[n]`` slots hold
    the masks the views showed, largest first. ``object_masks``, ``decisive_masks [N, R, R]``,
    ``keypoints [N, Q, 3]`` are empty / invisible where the ``has_*`` flags ``[N]`` are False.
    ``sizes [N, 2]``: each image's height and width in pixels. ``view_boxes [N, K, 4]``: the
    box of each view in the image (= frame) as normalised yxyx, view ``k`` showing mask
    ``k % masks/count``, as the host pipeline pads.
    """

    masks: np.ndarray
    object_masks: np.ndarray
    decisive_masks: np.ndarray
    keypoints: np.ndarray
    has_object: np.ndarray
    has_decisive: np.ndarray
    has_keypoints: np.ndarray
    object_sources: set[str]
    keypoint_sources: set[str]
    sizes: np.ndarray | None = None
    view_boxes: np.ndarray | None = None


def _object_mask(record, part_map, resolution: int):
    if record.object_mask_png is not None:
        mask = records_lib.decode_mask_png(record.object_mask_png)
        return to_frame(mask, resolution), OBJECT_FROM_FIELD
    if part_map is not None:
        return to_frame(part_map > 0, resolution), OBJECT_FROM_PARTS
    if record.object_boxes is not None and len(record.object_boxes):
        # The image's own size only decides which pixels the box edges cut (records without
        # a size: the frame's).
        size = (record.height, record.width) if record.height else (resolution, resolution)
        return to_frame(boxes_mask(record.object_boxes, *size), resolution), OBJECT_FROM_BOXES
    return None, None


def _keypoints(record, part_map, num_parts: int):
    if record.keypoints is not None:
        return np.asarray(record.keypoints, np.float32).reshape(-1, 3), KEYPOINTS_FROM_FIELD
    if part_map is not None and num_parts > 0:
        return part_keypoints(part_map, num_parts), KEYPOINTS_FROM_PARTS
    return None, None


def render_frame_maps(
    record_set: pipeline.RecordSet,
    record_indices: np.ndarray,
    num_views: int,
    resolution: int,
    num_parts: int = 0,
) -> FrameMaps:
    """Decodes ``record_indices`` and renders them; K = ``num_views`` (an image with more masks
    showed only the first K). ``num_parts`` is Q for keypoints from part maps (records with
    ``gt/keypoints`` bring their own Q); rows are padded to the largest Q."""
    count, frame = len(record_indices), (resolution, resolution)
    maps = FrameMaps(
        masks=np.zeros((count, num_views, *frame), bool),
        object_masks=np.zeros((count, *frame), bool),
        decisive_masks=np.zeros((count, *frame), bool),
        keypoints=np.zeros((count, 0, 3), np.float32),
        has_object=np.zeros(count, bool),
        has_decisive=np.zeros(count, bool),
        has_keypoints=np.zeros(count, bool),
        object_sources=set(),
        keypoint_sources=set(),
        sizes=np.zeros((count, 2), np.int64),
        view_boxes=np.zeros((count, num_views, 4), np.float32),
    )
    points = [None] * count
    for n, index in enumerate(np.asarray(record_indices)):
        record, _ = read_record(record_set, index, num_views)
        maps.sizes[n] = image_size(record)
        maps.view_boxes[n] = record.boxes[np.arange(num_views) % record.num_masks]
        for k in range(min(record.num_masks, num_views)):
            maps.masks[n, k] = to_frame(
                records_lib.decode_mask_png(record.mask_pngs[k]), resolution
            )
        part_map = None
        if record.part_map_png is not None:
            part_map = records_lib.decode_label_map_png(record.part_map_png)
        object_mask, source = _object_mask(record, part_map, resolution)
        if source:
            maps.object_masks[n], maps.has_object[n] = object_mask, True
            maps.object_sources.add(source)
        if part_map is not None and record.decisive_parts is not None:
            decisive = decisive_part_masks(part_map[None], np.asarray(record.decisive_parts))
            maps.decisive_masks[n], maps.has_decisive[n] = to_frame(decisive[0], resolution), True
        points[n], source = _keypoints(record, part_map, num_parts)
        if source:
            maps.has_keypoints[n] = True
            maps.keypoint_sources.add(source)
    num_points = max([len(row) for row in points if row is not None], default=0)
    maps.keypoints = np.tile(np.array(_NO_KEYPOINT, np.float32), (count, num_points, 1))
    for n, row in enumerate(points):
        if row is not None:
            maps.keypoints[n, : len(row)] = row
    return maps
