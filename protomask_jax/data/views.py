"""On-device views: crop-and-resize K boxes per canvas, augment, normalise.

From one canvas per image (``uint8 [S, S, 3]``) and K boxes, inside the jitted step:

1. one sampling grid per view (output pixel -> box-relative point), with the random flip,
   perspective and rotation + shear (wrap-around border) folded in;
2. one bilinear sample of the canvas per output pixel, clamped to the box's pixels: without
   augmentation as two matmuls per view (``Wy @ canvas @ Wx^T``, separable), with it a
   gather of each pixel's packed neighbourhood, one view slot at a time for large batches;
3. photometric jitter (brightness, contrast, saturation, hue) on [0, 1] values;
4. optionally zero outside the view's segmentation mask;
5. ImageNet normalisation and the cast to the compute dtype.

A box is ``(y0, x0, y1, x1)`` normalised to the canvas with half-open pixel edges (pixel
``r`` spans ``[r, r+1)``). Output pixel ``(i, j)`` of a ``V x V`` view samples canvas
coordinate ``y = y0*S + (i + 0.5) / V * (y1 - y0) * S - 0.5``, clamped to the centres of the
box's first and last pixel: for an integer-aligned box exactly torch's bilinear
``interpolate(crop, align_corners=False)``, as the reference crops, then resizes. The
augmentations follow the reference's definitions and order (``docs/reference.md`` §2.5);
the sampler undoes them in reverse."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# albumentations' Perspective wraps the |N(0, sigma)| corner offsets into [0, 0.32).
_PERSPECTIVE_MAX_OFFSET = 0.32
# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma).
_GREY_WEIGHTS = (0.2989, 0.587, 0.114)


_GEOMETRIC_KEYS = ("flip", "rotate_deg", "shear_deg", "perspective")
_AUGMENT_KEYS = (*_GEOMETRIC_KEYS, "brightness", "contrast", "saturation", "hue")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the per-view random augmentation, each a closed ``(low, high)``; frozen and
    hashable, so a static argument of a jitted function. Angles in degrees (rotation
    positive = counter-clockwise; x and y shears drawn independently); ``perspective_scale``:
    the corner-jitter sigma as a fraction of the side; colour factors multiply (1 = none);
    ``hue`` in turns of the colour circle."""

    flip_prob: float = 0.0
    rotate_deg: tuple[float, float] = (0.0, 0.0)
    shear_deg: tuple[float, float] = (0.0, 0.0)
    perspective_scale: tuple[float, float] = (0.0, 0.0)
    brightness: tuple[float, float] = (1.0, 1.0)
    contrast: tuple[float, float] = (1.0, 1.0)
    saturation: tuple[float, float] = (1.0, 1.0)
    hue: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"AugmentConfig.flip_prob must be in [0, 1], got {self.flip_prob}")
        for field in dataclasses.fields(self):
            if field.name == "flip_prob":
                continue
            value = getattr(self, field.name)
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(
                    f"AugmentConfig.{field.name} must be a (low, high) range with low <= high, "
                    f"got {value!r}"
                )
            # Store plain float tuples so equal configs hash equally (jit cache key).
            object.__setattr__(self, field.name, (float(value[0]), float(value[1])))
        for name in ("perspective_scale", "brightness", "contrast", "saturation"):
            if getattr(self, name)[0] < 0:
                raise ValueError(f"AugmentConfig.{name} must not go below 0: {getattr(self, name)}")
        if max(abs(h) for h in self.hue) > 0.5:
            raise ValueError(f"AugmentConfig.hue must lie in [-0.5, 0.5] turns, got {self.hue}")

    @classmethod
    def from_config(cls, augment: Mapping[str, Any]) -> AugmentConfig:
        """From ``config.input.augment``: ``flip`` (bool), symmetric ``rotate_deg``,
        ``shear_deg`` and ``hue``, ``perspective`` (upper bound of the scale) and factors
        ``1 +- x`` for ``brightness``, ``contrast``, ``saturation``."""
        missing = [k for k in _AUGMENT_KEYS if k not in augment]
        if missing:
            raise KeyError(f"config.input.augment lacks {missing}; expected keys {_AUGMENT_KEYS}")
        symmetric = lambda key: (-float(augment[key]), float(augment[key]))
        factor = lambda key: (max(0.0, 1.0 - float(augment[key])), 1.0 + float(augment[key]))
        return cls(
            flip_prob=0.5 if augment["flip"] else 0.0,
            rotate_deg=symmetric("rotate_deg"),
            shear_deg=symmetric("shear_deg"),
            perspective_scale=(0.0, float(augment["perspective"])),
            brightness=factor("brightness"),
            contrast=factor("contrast"),
            saturation=factor("saturation"),
            hue=symmetric("hue"),
        )


# Runs the augmentation path and yields the unaugmented views (up to rounding); pass
# ``augment=None`` or ``key=None`` to skip that work.
NO_AUGMENT = AugmentConfig()


@functools.partial(jax.jit, static_argnames=("view_size", "augment", "dtype"))
def make_views(
    canvas: jax.Array,
    boxes: jax.Array,
    key: jax.Array | None,
    *,
    view_size: int,
    augment: AugmentConfig | None = None,
    masks: jax.Array | None = None,
    dtype: Any = jnp.bfloat16,
) -> jax.Array:
    """``[B, K, V, V, 3]`` ImageNet-normalised views in ``dtype``.

    ``canvas`` ``uint8 [B, S, S, 3]``; ``boxes`` ``float32 [B, K, 4]`` in the canvas frame;
    ``key`` ``None`` (or ``augment`` ``None``): no augmentation, else drawn independently per
    view. ``masks`` ``uint8 [B, K, M, M]`` in the canvas frame (``fill_background="mask"``):
    pixels outside a view's mask become 0 before normalisation."""
    _check_shapes(canvas, boxes, masks)
    canvas_size = canvas.shape[1]
    boxes = boxes.astype(jnp.float32)
    # Everything stays [B, K, ...]: merging the batch axis into another would need explicit
    # output shardings when the batch is sharded over a mesh.
    if key is None or augment is None:
        images = _axis_aligned_crop(canvas, boxes, view_size, dtype) / 255.0
        keep = None
        if masks is not None:
            canvas_y, canvas_x = _box_to_canvas_coords(
                *_output_grid(boxes.shape[:2], view_size, offset=0.5), boxes, canvas_size
            )
            keep = _mask_keep(masks, canvas_y, canvas_x, canvas_size)[..., None]
        return _finish(images, keep, None, dtype)

    params = _sample_params(key, boxes.shape[:2], augment)
    packed = _pack_neighbourhoods(canvas)

    if boxes.size * view_size**2 * 3 * 4 <= _WHOLE_BATCH_WARP_BYTES:
        return _warped_views(packed, canvas_size, boxes, params, masks, view_size, dtype)

    # One view slot at a time: the warp and the jitter keep a few dozen float32 [B, V, V, 3]
    # intermediates alive, which at 64 images x 11 views of 224^2 per chip took 9 GB of a
    # 16 GB TPU; one slot takes 1/K of that. The batch axis stays whole (and sharded).
    def slot_first(x):  # [B, K, ...] -> [K, B, 1, ...]
        return jnp.moveaxis(x, 1, 0)[:, :, None]

    def one_slot(slot):
        slot_boxes, slot_params, slot_masks = slot
        return _warped_views(
            packed, canvas_size, slot_boxes, slot_params, slot_masks, view_size, dtype
        )

    slot_masks = None if masks is None else slot_first(masks)
    slots = (slot_first(boxes), jax.tree.map(slot_first, params), slot_masks)
    return jnp.moveaxis(jax.lax.map(one_slot, slots)[:, :, 0], 0, 1)


# Up to this many bytes of float32 views (global batch), all view slots are warped at once;
# beyond, one slot at a time (same values; small programs compile faster without the loop).
_WHOLE_BATCH_WARP_BYTES = 1 << 28


def _output_grid(views_shape: tuple[int, int], view_size: int, offset: float = 0.0):
    """``[B, K, V, V]`` row and column coordinates of the output pixels in box-relative
    units minus ``0.5 - offset``: ``(i + 0.5) / V - 0.5 + offset``."""
    shape = (*views_shape, view_size, view_size)
    centred = (jnp.arange(view_size, dtype=jnp.float32) + 0.5) / view_size - 0.5 + offset
    return jnp.broadcast_to(centred[:, None], shape), jnp.broadcast_to(centred[None, :], shape)


def _warped_views(
    packed, canvas_size: int, boxes, params, masks, view_size: int, dtype
) -> jax.Array:
    """``[B, k, V, V, 3]`` augmented views of ``k`` view slots: the grid warped, one bilinear
    sample per output pixel from the packed canvas ``[B, S * S, 12]``, jitter, normalise."""
    rel_y, rel_x = _augmented_grid(*_output_grid(boxes.shape[:2], view_size), params)
    canvas_y, canvas_x = _box_to_canvas_coords(rel_y, rel_x, boxes, canvas_size)
    sample = functools.partial(_bilinear, width=canvas_size)
    images = jax.vmap(sample)(packed, y=canvas_y, x=canvas_x) / 255.0
    keep = None
    if masks is not None:
        keep = _mask_keep(masks, canvas_y, canvas_x, canvas_size)[..., None]
    return _finish(images, keep, params, dtype)


def _finish(images: jax.Array, keep: jax.Array | None, params, dtype) -> jax.Array:
    """[0, 1] views -> mask fill, colour jitter (``params``), ImageNet normalisation."""
    if keep is not None:
        # Zero before the jitter too, so the contrast mean sees the reference's black
        # background ("zero" fill) ...
        images = images * keep
    if params is not None:
        images = _photometric(images, params)
    if keep is not None:
        # ... and again after it: contrast would otherwise lift the background off 0.
        images = images * keep
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return ((images - mean) / std).astype(dtype)


def _check_shapes(canvas: jax.Array, boxes: jax.Array, masks: jax.Array | None) -> None:
    if canvas.ndim != 4 or canvas.shape[1] != canvas.shape[2] or canvas.shape[3] != 3:
        raise ValueError(f"make_views: canvas must be [B, S, S, 3], got {canvas.shape}")
    if canvas.dtype != jnp.uint8:
        raise ValueError(f"make_views: canvas must be uint8, got {canvas.dtype}")
    batch = canvas.shape[0]
    if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4:
        raise ValueError(f"make_views: boxes must be [B={batch}, K, 4], got {boxes.shape}")
    if masks is not None and (
        masks.ndim != 4 or masks.shape[:2] != boxes.shape[:2] or masks.shape[2] != masks.shape[3]
    ):
        raise ValueError(
            f"make_views: masks must be [B={batch}, K={boxes.shape[1]}, M, M], got {masks.shape}"
        )


class _ViewParams(NamedTuple):
    """Augmentation parameters, each ``[B, K]`` (corner offsets ``[B, K, 4, 2]``)."""

    flip: jax.Array
    corner_offsets: jax.Array  # inward (x, y) offsets of tl, tr, br, bl, fraction of the side
    rotate: jax.Array  # radians
    tan_shear_x: jax.Array
    tan_shear_y: jax.Array
    brightness: jax.Array
    contrast: jax.Array
    saturation: jax.Array
    hue: jax.Array  # turns


def _sample_params(key: jax.Array, shape: tuple[int, int], augment: AugmentConfig) -> _ViewParams:
    """Draws every view's parameters independently (the reference samples per mask view)."""
    keys = jax.random.split(key, 10)

    def uniform(k, bounds):
        return jax.random.uniform(k, shape, jnp.float32, bounds[0], bounds[1])

    sigma = uniform(keys[1], augment.perspective_scale)
    offsets = jnp.abs(jax.random.normal(keys[2], (*shape, 4, 2), jnp.float32))
    offsets = jnp.mod(offsets * sigma[..., None, None], _PERSPECTIVE_MAX_OFFSET)
    return _ViewParams(
        flip=jax.random.bernoulli(keys[0], augment.flip_prob, shape),
        corner_offsets=offsets,
        rotate=jnp.deg2rad(uniform(keys[3], augment.rotate_deg)),
        tan_shear_x=jnp.tan(jnp.deg2rad(uniform(keys[4], augment.shear_deg))),
        tan_shear_y=jnp.tan(jnp.deg2rad(uniform(keys[5], augment.shear_deg))),
        brightness=uniform(keys[6], augment.brightness),
        contrast=uniform(keys[7], augment.contrast),
        saturation=uniform(keys[8], augment.saturation),
        hue=uniform(keys[9], augment.hue),
    )


def _per_pixel(per_view: jax.Array) -> jax.Array:
    """``[B, K]`` -> ``[B, K, 1, 1]``, to broadcast against ``[B, K, V, V]``."""
    return per_view[..., None, None]


def _augmented_grid(
    rows: jax.Array, cols: jax.Array, params: _ViewParams
) -> tuple[jax.Array, jax.Array]:
    """Maps centred output coordinates ``[B, K, V, V]`` to box-relative source coordinates.

    Forward affine about the view centre: ``R(theta) @ Sx(phi_x) @ Sy(phi_y)`` on ``(x, y)``
    with ``Sx = [[1, tan phi_x], [0, 1]]``, ``Sy = [[1, 0], [tan phi_y, 1]]``; the
    perspective maps the output square onto a quadrilateral inside it, so the reference's
    zero border is never sampled; the flip is ``x -> 1 - x``."""
    # Inverse affine: R(-theta), then the inverse x shear, then the inverse y shear.
    cos, sin = _per_pixel(jnp.cos(params.rotate)), _per_pixel(jnp.sin(params.rotate))
    x = cos * cols - sin * rows
    y = sin * cols + cos * rows
    x = x - _per_pixel(params.tan_shear_x) * y
    y = y - _per_pixel(params.tan_shear_y) * x
    # Wrap border: coordinates outside the (perspective output) square re-enter at the
    # opposite side.
    x = jnp.mod(x + 0.5, 1.0)
    y = jnp.mod(y + 0.5, 1.0)

    h = _square_to_quad_homography(_perspective_quads(params.corner_offsets))
    a, b, c, d, e, f, g, h = (_per_pixel(h[..., i]) for i in range(8))
    denom = g * x + h * y + 1.0
    src_x = (a * x + b * y + c) / denom
    src_y = (d * x + e * y + f) / denom

    src_x = jnp.where(_per_pixel(params.flip), 1.0 - src_x, src_x)
    return src_y, src_x


def _perspective_quads(offsets: jax.Array) -> jax.Array:
    """``[..., 4, 2]`` inward corner offsets -> quad corners (x, y), order tl, tr, br, bl."""
    square = jnp.asarray([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], jnp.float32)
    inward = jnp.asarray([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]], jnp.float32)
    return square + inward * offsets


def _square_to_quad_homography(quads: jax.Array) -> jax.Array:
    """``[..., 8]`` entries ``(a, b, c, d, e, f, g, h)`` of the homographies ``x' = (a x + b y +
    c) / (g x + h y + 1)``, ``y' = (d x + e y + f) / (g x + h y + 1)`` taking the unit square's
    corners (0,0), (1,0), (1,1), (0,1) onto ``quads`` ``[..., 4, 2]`` (Heckbert 1989)."""
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = [
        (quads[..., i, 0], quads[..., i, 1]) for i in range(4)
    ]
    sum_x = x0 - x1 + x2 - x3
    sum_y = y0 - y1 + y2 - y3
    dx1, dx2 = x1 - x2, x3 - x2
    dy1, dy2 = y1 - y2, y3 - y2
    # For a convex quad (always, offsets < 0.5) the determinant is far from 0.
    det = dx1 * dy2 - dx2 * dy1
    g = (sum_x * dy2 - dx2 * sum_y) / det
    h = (dx1 * sum_y - sum_x * dy1) / det
    return jnp.stack(
        [x1 - x0 + g * x1, x3 - x0 + h * x3, x0, y1 - y0 + g * y1, y3 - y0 + h * y3, y0, g, h],
        axis=-1,
    )


def _canvas_coord(rel: jax.Array, start: jax.Array, stop: jax.Array, canvas_size: int):
    """Box-relative coordinates -> canvas pixel indices along one axis (``start``, ``stop``
    normalised, broadcast against ``rel``), clamped to the box's pixel centres."""
    start = start * canvas_size
    stop = stop * canvas_size
    coord = start + rel * (stop - start) - 0.5
    # Clamp to the centres of the box's first and last pixel (the reference crops, then
    # resizes), and to the canvas for boxes touching its border.
    last = jnp.maximum(start, stop - 1.0)
    return jnp.clip(jnp.clip(coord, start, last), 0.0, canvas_size - 1.0)


def _box_to_canvas_coords(
    rel_y: jax.Array, rel_x: jax.Array, boxes: jax.Array, canvas_size: int
) -> tuple[jax.Array, jax.Array]:
    """Box-relative ``[B, K, V, V]`` -> canvas pixel-index coordinates, clamped to the box."""
    y = _canvas_coord(rel_y, _per_pixel(boxes[..., 0]), _per_pixel(boxes[..., 2]), canvas_size)
    x = _canvas_coord(rel_x, _per_pixel(boxes[..., 1]), _per_pixel(boxes[..., 3]), canvas_size)
    return y, x


def _axis_aligned_crop(canvas: jax.Array, boxes: jax.Array, view_size: int, dtype) -> jax.Array:
    """``float32 [B, K, V, V, 3]`` unaugmented views in [0, 255]: the same bilinear samples
    as the gather path, as two matmuls per view.

    Without augmentation output row ``i`` reads canvas rows at one coordinate ``y_i`` and
    column ``j`` canvas columns at ``x_j``, so bilinear sampling is separable:
    ``view = Wy @ canvas @ Wx^T`` with the hat weights ``W[i, s] = max(0, 1 - |s - y_i|)``
    (``1 - frac`` and ``frac`` on the two neighbours). On TPUs the MXU does this far faster
    than gathering every output pixel's neighbourhood. The canvas is exact in bfloat16
    (integers to 255), so bfloat16 output takes the 3-pass bf16 matmul (weights to ~16
    bits: well below bfloat16's own rounding); float32 output the exact float32 matmul."""
    canvas_size = canvas.shape[1]
    rel = (jnp.arange(view_size, dtype=jnp.float32) + 0.5) / view_size  # [V]
    pixels = jnp.arange(canvas_size, dtype=jnp.float32)

    def weights(start, stop):  # [B, K] -> [B, K, V, S]
        coord = _canvas_coord(rel, start[..., None], stop[..., None], canvas_size)
        return jnp.maximum(0.0, 1.0 - jnp.abs(pixels - coord[..., None]))

    wy = weights(boxes[..., 0], boxes[..., 2])
    wx = weights(boxes[..., 1], boxes[..., 3])
    exact = jnp.dtype(dtype).itemsize >= 4
    precision = jax.lax.Precision.HIGHEST if exact else jax.lax.Precision.HIGH
    rows = jnp.einsum("bkis,bstc->bkitc", wy, canvas.astype(jnp.float32), precision=precision)
    return jnp.einsum("bkitc,bkjt->bkijc", rows, wx, precision=precision)


# At the paper's shape (B=16, K=11, V=224, S=448) one H100 (jax 0.11.2) makes the views in
# 0.46 ms, 0.95 ms with the "medium" augmentation, 1.2 ms with mask fill too. One gather of
# the packed 12-byte neighbourhood, a uint32 bitcast and four 3-byte gathers timed the
# same; one gather matters more on TPUs.
#
# The pixel axes come out flattened, once, outside the slot loop: flattened in the loop body,
# the TPU compiler relaid the whole packed canvas out for the gather on every slot (11 copies
# of 38 MB at 16 images per chip, 6 % of the compiled CUB joint step; benchmarks/README.md).
def _pack_neighbourhoods(images: jax.Array) -> jax.Array:
    """``[..., H, W, C]`` -> ``[..., H * W, 4C]``: pixel, right, below, below-right
    (edge-clamped), so that one gather fetches a whole bilinear neighbourhood."""
    height, width = images.shape[-3:-1]
    # Edge-clamped by one row and column (jnp.pad's "edge" mode slices the batch axis too,
    # which a batch sharded over a mesh refuses).
    edged = jnp.concatenate([images, images[..., -1:, :]], axis=-2)
    edged = jnp.concatenate([edged, edged[..., -1:, :, :]], axis=-3)
    packed = jnp.concatenate(
        [
            edged[..., :height, :width, :],
            edged[..., :height, 1:, :],
            edged[..., 1:, :width, :],
            edged[..., 1:, 1:, :],
        ],
        axis=-1,
    )
    return packed.reshape(*packed.shape[:-3], -1, packed.shape[-1])


def _bilinear(packed: jax.Array, width: int, y: jax.Array, x: jax.Array) -> jax.Array:
    """``float32 [..., C]`` bilinear samples of one packed image ``[H * W, 4C]`` (row length
    ``width``) at in-range coordinates ``[...]``."""
    channels4 = packed.shape[-1]
    y_floor, x_floor = jnp.floor(y), jnp.floor(x)
    wy, wx = (y - y_floor)[..., None], (x - x_floor)[..., None]
    index = y_floor.astype(jnp.int32) * width + x_floor.astype(jnp.int32)
    # The coordinates keep their [.., V, V] shape: gathered for a flat [V * V] index, the
    # samples needed a relayout to [V, V] afterwards. The gathered rows go channel-first
    # while still uint8, then each corner back to channel-last as float32: not a reshape
    # to [..., 4, C] nor float32 slices of [..., 4C], which the TPU compiler relays out in
    # float32. (The crop in the compiled CUB joint step at 16 images per v5e chip: 13.0 ->
    # 7.8 M cycles, aot_v5e_2x4_batch16.json; benchmarks/README.md.)
    corners = jnp.moveaxis(jnp.take(packed, index, axis=0, mode="clip"), -1, 0)
    c = channels4 // 4
    top_left, top_right, bottom_left, bottom_right = (
        jnp.moveaxis(corners[i * c : (i + 1) * c], 0, -1).astype(jnp.float32) for i in range(4)
    )
    top = top_left + (top_right - top_left) * wx
    bottom = bottom_left + (bottom_right - bottom_left) * wx
    return top + (bottom - top) * wy


def _mask_keep(
    masks: jax.Array, canvas_y: jax.Array, canvas_x: jax.Array, canvas_size: int
) -> jax.Array:
    """``float32 [B, K, V, V]``: 1 where the view's mask (``[B, K, M, M]``, canvas frame) is on."""
    mask_size = masks.shape[-1]
    scale = mask_size / canvas_size

    # Flat [B, K, V * V] coordinates here (unlike the canvas samples): with [B, K, V, V]
    # ones, the slot loop (lax.map) gave other views than the same slots warped one by one
    # outside a loop at ~1 % of the pixels on XLA:CPU, by up to 2.2 (normalised), while
    # those agree with the all-slots warp: a lowering or compiler fault not pinned down
    # (test_views.py catches it). Masks are off by default and cheap to sample either way.
    def to_mask(coord):
        flat = coord.reshape(*coord.shape[:2], -1)
        return jnp.clip((flat + 0.5) * scale - 0.5, 0.0, mask_size - 1.0)

    packed = _pack_neighbourhoods((masks > 0).astype(jnp.uint8)[..., None])
    sample = functools.partial(_bilinear, width=mask_size)
    sampled = jax.vmap(jax.vmap(sample))(packed, y=to_mask(canvas_y), x=to_mask(canvas_x))
    return (sampled[..., 0] > 0.5).astype(jnp.float32).reshape(canvas_y.shape)


def _grey(images: jax.Array) -> jax.Array:
    weights = jnp.asarray(_GREY_WEIGHTS, images.dtype)
    return jnp.sum(images * weights, axis=-1, keepdims=True)


def _blend(images: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    factor = factor[..., None, None, None]
    return jnp.clip(factor * images + (1.0 - factor) * other, 0.0, 1.0)


def _photometric(images: jax.Array, params: _ViewParams) -> jax.Array:
    """torchvision's ColorJitter formulas on ``[B, K, V, V, 3]`` in [0, 1], each clipped:
    ``x b``; ``c x + (1 - c) mean(grey(x))`` over the view; ``s x + (1 - s) grey(x)``; the
    hue rotated by ``h`` turns."""
    images = jnp.clip(images * params.brightness[..., None, None, None], 0.0, 1.0)
    mean_grey = jnp.mean(_grey(images), axis=(-3, -2, -1), keepdims=True)
    images = _blend(images, mean_grey, params.contrast)
    images = _blend(images, _grey(images), params.saturation)
    return _shift_hue(images, _per_pixel(params.hue))


def _shift_hue(images: jax.Array, shift: jax.Array) -> jax.Array:
    """Rotates the HSV hue of ``[..., 3]`` RGB in [0, 1] by ``shift`` turns; value (max) and
    chroma (max - min) are kept."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    value = jnp.max(images, axis=-1)
    chroma = value - jnp.min(images, axis=-1)
    safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
    rc, gc, bc = (value - r) / safe_chroma, (value - g) / safe_chroma, (value - b) / safe_chroma
    hue_sixths = jnp.where(value == r, bc - gc, jnp.where(value == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = jnp.mod(hue_sixths / 6.0 + shift, 1.0)
    # HSV -> RGB in closed form: channel n (R 5, G 3, B 1) is v - chroma clip(min(k, 4 - k), 0, 1)
    # with k = (n + 6 hue) mod 6; no branches over the six hue sectors.
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = jnp.mod(n + hue * 6.0, 6.0)
        channels.append(value - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
    return jnp.clip(jnp.stack(channels, axis=-1), 0.0, 1.0)


def fitted_size(height: int, width: int, canvas_size: int) -> tuple[int, int]:
    """``(h, w)`` of the image resized so its longer side is exactly ``canvas_size``: aspect
    kept, rounded half up, at least 1 pixel."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    longer = max(height, width)
    # Integer round-half-up of side * canvas_size / longer (no float error at the .5 edge).
    fit_h = max(1, (2 * height * canvas_size + longer) // (2 * longer))
    fit_w = max(1, (2 * width * canvas_size + longer) // (2 * longer))
    return fit_h, fit_w


def fit_image_to_canvas(image: np.ndarray, canvas_size: int) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> ``uint8 [S, S, 3]``: resized (PIL bilinear, which antialiases
    when shrinking) to :func:`fitted_size` at the top-left, zeros elsewhere."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"fit_image_to_canvas: expected a uint8 [H, W, 3] RGB image, got {image.dtype} "
            f"{image.shape}; convert grey/RGBA images to RGB first"
        )
    fit_h, fit_w = fitted_size(image.shape[0], image.shape[1], canvas_size)
    if (fit_h, fit_w) != image.shape[:2]:
        resized = Image.fromarray(image).resize((fit_w, fit_h), Image.Resampling.BILINEAR)
        image = np.asarray(resized)
    canvas = np.zeros((canvas_size, canvas_size, 3), np.uint8)
    canvas[:fit_h, :fit_w] = image
    return canvas


def fit_box_to_canvas(boxes: np.ndarray, height: int, width: int, canvas_size: int) -> np.ndarray:
    """Image-normalised yxyx boxes ``[..., 4]`` -> ``float32`` canvas-normalised, for the
    placement of :func:`fit_image_to_canvas` (the same rounded size, so pixel edges agree)."""
    fit_h, fit_w = fitted_size(height, width, canvas_size)
    scale = np.array([fit_h, fit_w, fit_h, fit_w], np.float64) / canvas_size
    return (np.asarray(boxes, np.float64) * scale).astype(np.float32)


def canvas_box_to_image(boxes: np.ndarray, height: int, width: int, canvas_size: int) -> np.ndarray:
    """Inverse of :func:`fit_box_to_canvas` (beyond 1 where a box reaches into the padding)."""
    fit_h, fit_w = fitted_size(height, width, canvas_size)
    scale = canvas_size / np.array([fit_h, fit_w, fit_h, fit_w], np.float64)
    return (np.asarray(boxes, np.float64) * scale).astype(np.float32)
