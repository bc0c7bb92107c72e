"""Post-processing rules on hand-made masks; expected values are written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from segmentation import postprocess


def _rect(height: int, width: int, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """A bool mask with rows[0]..rows[1] and cols[0]..cols[1] (inclusive) set."""
    mask = np.zeros((height, width), bool)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return mask


def test_pixel_boxes_are_inclusive_extents():
    a = np.zeros((6, 7), bool)
    a[1, 2] = a[3, 4] = True  # two pixels: rows 1..3, cols 2..4
    b = _rect(6, 7, (0, 5), (6, 6))  # last column
    empty = np.zeros((6, 7), bool)
    np.testing.assert_array_equal(
        postprocess.pixel_boxes(np.stack([a, b, empty])),
        [[1, 2, 3, 4], [0, 6, 5, 6], [0, 0, 0, 0]])


def test_boxes_are_half_open_normalised_yxyx_and_areas_fractions():
    # H = 10, W = 8; rows 2..5, cols 1..3 -> (2/10, 1/8, 6/10, 4/8); area 12 / 80.
    mask = _rect(10, 8, (2, 5), (1, 3))
    result = postprocess.postprocess(mask[None], max_masks=4)
    np.testing.assert_allclose(result.boxes, [[0.2, 0.125, 0.6, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(result.areas, [0.15], rtol=1e-6)
    assert result.boxes.dtype == np.float32 and result.areas.dtype == np.float32
    assert not result.used_fallback


def test_sorted_by_area_descending_with_stable_ties():
    h, w = 12, 12
    area_9 = _rect(h, w, (0, 2), (0, 2))
    area_16_first = _rect(h, w, (4, 7), (4, 7))
    area_20 = _rect(h, w, (0, 3), (7, 11))
    area_16_second = _rect(h, w, (8, 11), (0, 3))
    masks = np.stack([area_9, area_16_first, area_20, area_16_second])
    result = postprocess.postprocess(masks, max_masks=10)
    expected = np.stack([area_20, area_16_first, area_16_second, area_9])
    np.testing.assert_array_equal(result.masks, expected)
    np.testing.assert_allclose(result.areas * h * w, [20, 16, 16, 9])


@pytest.mark.parametrize(
    "rows, cols, kept",
    [
        ((0, 4), (3, 4), False),  # 2 px wide: x_min = 3 >= x_max - 1 = 3 -> dropped
        ((0, 4), (3, 5), True),  # 3 px wide: 3 >= 4 is false -> kept
        ((2, 3), (0, 6), False),  # 2 px high -> dropped
        ((2, 4), (0, 6), True),  # 3 px high -> kept
        ((2, 2), (5, 5), False),  # a single pixel -> dropped
    ],
)
def test_degenerate_boxes_dropped_exactly_at_two_pixels(rows, cols, kept):
    big = _rect(10, 10, (5, 9), (0, 9))  # always survives, so no fallback interferes
    candidate = _rect(10, 10, rows, cols)
    result = postprocess.postprocess(np.stack([big, candidate]), max_masks=10)
    assert len(result.masks) == (2 if kept else 1)
    # The rule is the reference's: x_min >= x_max - 1 or y_min >= y_max - 1 (inclusive).
    y0, x0, y1, x1 = postprocess.pixel_boxes(candidate[None])[0]
    assert (x0 >= x1 - 1 or y0 >= y1 - 1) == (not kept)


def test_min_box_px_is_configurable():
    mask = _rect(10, 10, (0, 9), (2, 5))  # 4 px wide
    assert not postprocess.postprocess(mask[None], 4, min_box_px=3).used_fallback
    assert postprocess.postprocess(mask[None], 4, min_box_px=4).used_fallback


def _four_masks() -> np.ndarray:
    """Areas 40, 30, 20, 9 (already in order) in a 10 x 10 image."""
    return np.stack([
        _rect(10, 10, (0, 3), (0, 9)),
        _rect(10, 10, (4, 6), (0, 9)),
        _rect(10, 10, (5, 9), (6, 9)),
        _rect(10, 10, (7, 9), (0, 2)),
    ])


def test_four_masks_helper_has_the_stated_areas():
    np.testing.assert_array_equal(_four_masks().sum(axis=(1, 2)), [40, 30, 20, 9])


def test_skip_background_drops_the_largest():
    masks = _four_masks()
    result = postprocess.postprocess(masks, max_masks=10, skip_background=1)
    np.testing.assert_array_equal(result.masks, masks[1:])


def test_skip_background_decrements_once_when_too_few_masks():
    masks = _four_masks()
    # 2 masks, skip 2: 2 <= 2 so skip becomes 1 -> only the smaller one is kept.
    result = postprocess.postprocess(masks[:2], max_masks=10, skip_background=2)
    np.testing.assert_array_equal(result.masks, masks[1:2])
    # 1 mask, skip 1: skip becomes 0 -> the mask is kept.
    result = postprocess.postprocess(masks[:1], max_masks=10, skip_background=1)
    np.testing.assert_array_equal(result.masks, masks[:1])
    # 2 masks, skip 3: skip becomes 2 -> nothing left -> full-image fallback.
    result = postprocess.postprocess(masks[:2], max_masks=10, skip_background=3)
    assert result.used_fallback


def test_max_masks_keeps_the_largest():
    masks = _four_masks()
    result = postprocess.postprocess(masks[::-1], max_masks=2)
    np.testing.assert_array_equal(result.masks, masks[:2])
    np.testing.assert_allclose(result.areas, [0.4, 0.3])


def test_skip_then_cap():
    masks = _four_masks()
    result = postprocess.postprocess(masks, max_masks=2, skip_background=1)
    np.testing.assert_array_equal(result.masks, masks[1:3])


@pytest.mark.parametrize("masks", [
    np.zeros((0, 5, 6), bool),  # the segmenter found nothing
    np.zeros((2, 5, 6), bool),  # only empty masks
    _rect(5, 6, (0, 4), (2, 3))[None],  # only a degenerate (2 px wide) mask
])
def test_nothing_left_falls_back_to_the_full_image(masks):
    result = postprocess.postprocess(masks, max_masks=3)
    assert result.used_fallback
    np.testing.assert_array_equal(result.masks, np.ones((1, 5, 6), bool))
    np.testing.assert_array_equal(result.boxes, [[0.0, 0.0, 1.0, 1.0]])
    np.testing.assert_array_equal(result.areas, [1.0])


def _scan_reference(masks, max_masks, skip, min_box_px):
    """Per-mask Python scans, written like the reference's loop (independent of the code)."""
    items = []
    for index, mask in enumerate(masks):
        ys = [y for y in range(mask.shape[0]) if mask[y].any()]
        xs = [x for x in range(mask.shape[1]) if mask[:, x].any()]
        box = (min(ys), min(xs), max(ys), max(xs)) if ys else (0, 0, 0, 0)
        items.append((int(mask.sum()), index, box))
    items.sort(key=lambda item: item[0], reverse=True)  # stable
    items = [i for i in items if i[0] > 0 and i[2][2] - i[2][0] + 1 > min_box_px
             and i[2][3] - i[2][1] + 1 > min_box_px]
    if len(items) <= skip:
        skip -= 1
    items = items[max(skip, 0):][:max_masks]
    return [i[1] for i in items], [i[2] for i in items]


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_rules_match_per_mask_scans(seed):
    rng = np.random.default_rng(seed)
    height, width = 17, 13
    masks = []
    for _ in range(12):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        y1, x1 = rng.integers(y0, height), rng.integers(x0, width)
        masks.append(_rect(height, width, (y0, y1), (x0, x1)) & (rng.random((height, width))
                                                                 > 0.3))
    masks = np.stack(masks)
    for skip in (0, 1, 3):
        indices, boxes = _scan_reference(masks, 5, skip, 2)
        result = postprocess.postprocess(masks, max_masks=5, skip_background=skip)
        if not indices:
            assert result.used_fallback
            continue
        np.testing.assert_array_equal(result.masks, masks[indices])
        expected = np.array(boxes, np.float64) + [0, 0, 1, 1]
        expected /= [height, width, height, width]
        np.testing.assert_allclose(result.boxes, expected, rtol=1e-6)
