"""From raw segmenter masks to the masks, boxes and areas stored per image.

The reference's rules (``docs/reference.md`` §1.3), vectorised over masks: sort by area,
largest first (stable); drop empty masks and those whose box is at most ``min_box_px``
pixels wide or high (the reference's ``x_min >= x_max - 1 or y_min >= y_max - 1`` is
``min_box_px = 2``); skip the ``skip_background`` largest (one fewer when no more are left);
keep the ``max_masks`` largest. If nothing survives, the image gets one full-image mask and
the result says so. Boxes are normalised yxyx with half-open pixel edges: rows ``r0..r1``
and columns ``c0..c1`` (inclusive) give ``(r0 / H, c0 / W, (r1 + 1) / H, (c1 + 1) / W)``,
so a box covers its whole mask (the reference's crop loses the last row and column, §9.8)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class ProcessedMasks:
    """Masks of one image after post-processing, largest first."""

    masks: np.ndarray  # bool [N, H, W], N >= 1
    boxes: np.ndarray  # float32 [N, 4] normalised yxyx, half-open pixel edges
    areas: np.ndarray  # float32 [N], mask pixels / (H W)
    used_fallback: bool  # no mask survived: ``masks`` is the full image


def pixel_boxes(masks: np.ndarray) -> np.ndarray:
    """Inclusive pixel extents ``(y_min, x_min, y_max, x_max)`` of bool ``[N, H, W]`` masks,
    int64 ``[N, 4]``; ``(0, 0, 0, 0)`` for an empty mask (as the reference)."""
    masks = np.asarray(masks, dtype=bool)
    height, width = masks.shape[1:]
    rows = masks.any(axis=2)  # [N, H]
    cols = masks.any(axis=1)  # [N, W]
    y_min = rows.argmax(axis=1)
    y_max = height - 1 - rows[:, ::-1].argmax(axis=1)
    x_min = cols.argmax(axis=1)
    x_max = width - 1 - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([y_min, x_min, y_max, x_max], axis=1).astype(np.int64)
    boxes[~rows.any(axis=1)] = 0
    return boxes


def postprocess(
    masks: np.ndarray,
    max_masks: int,
    skip_background: int = 0,
    min_box_px: int = 2,
) -> ProcessedMasks:
    """Applies the rules above to bool ``[N, H, W]`` masks (N may be 0)."""
    if max_masks < 1:
        raise ValueError(f"segmentation.max_masks must be >= 1, got {max_masks}.")
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}.")
    height, width = masks.shape[1:]
    pixel_counts = masks.sum(axis=(1, 2))  # [N]
    extents = pixel_boxes(masks)  # [N, 4]
    box_height = extents[:, 2] - extents[:, 0] + 1
    box_width = extents[:, 3] - extents[:, 1] + 1
    survives = (pixel_counts > 0) & (box_height > min_box_px) & (box_width > min_box_px)
    by_area = np.argsort(-pixel_counts, kind="stable")
    selected = by_area[survives[by_area]]  # surviving mask indices, largest first

    skip = skip_background - 1 if len(selected) <= skip_background else skip_background
    skip = max(skip, 0)
    selected = selected[skip : skip + max_masks]

    if len(selected) == 0:
        return ProcessedMasks(
            masks=np.ones((1, height, width), bool),
            boxes=np.array([[0.0, 0.0, 1.0, 1.0]], np.float32),
            areas=np.ones(1, np.float32),
            used_fallback=True,
        )
    half_open = extents[selected].astype(np.float64) + np.array([0, 0, 1, 1])
    return ProcessedMasks(
        masks=masks[selected],
        boxes=(half_open / np.array([height, width, height, width], np.float64)).astype(np.float32),
        areas=(pixel_counts[selected] / (height * width)).astype(np.float32),
        used_fallback=False,
    )
