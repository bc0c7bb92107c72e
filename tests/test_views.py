"""Tests for protomask_jax.data.views: crop-and-resize, augmentation, masks, canvas geometry.

Expected values come from independent computations: a plain-numpy bilinear sampler, torch's
``interpolate``, torchvision's colour functions, skimage's rotation and homography estimate,
and hand-built images whose answer is known.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from protomask_jax.data import views

MEAN = np.asarray(views.IMAGENET_MEAN, np.float32)
STD = np.asarray(views.IMAGENET_STD, np.float32)


def to_unit(view_batch) -> np.ndarray:
    """Undoes the ImageNet normalisation: views -> [0, 1] values (float64)."""
    return np.asarray(view_batch, np.float64) * STD + MEAN


def random_canvas(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def pixel_box(rows: tuple[int, int], cols: tuple[int, int], size: int) -> list[float]:
    """Normalised yxyx box of canvas rows [r0, r1) and cols [c0, c1)."""
    return [rows[0] / size, cols[0] / size, rows[1] / size, cols[1] / size]


def numpy_crop_resize(canvas: np.ndarray, box, view_size: int) -> np.ndarray:
    """Bilinear view of ``box`` (normalised yxyx), written out per output pixel in float64.

    Output pixel (i, j) reads the canvas at box-relative ((i + .5) / V, (j + .5) / V), pixel
    centres at +0.5, clamped to the centres of the box's first and last pixel.
    """
    size = canvas.shape[0]
    y0, x0, y1, x1 = (float(b) * size for b in box)
    out = np.zeros((view_size, view_size, 3))
    for i in range(view_size):
        y = y0 + (i + 0.5) / view_size * (y1 - y0) - 0.5
        y = min(max(y, y0), max(y0, y1 - 1), size - 1)
        for j in range(view_size):
            x = x0 + (j + 0.5) / view_size * (x1 - x0) - 0.5
            x = min(max(x, x0), max(x0, x1 - 1), size - 1)
            ya, xa = math.floor(y), math.floor(x)
            yb, xb = min(ya + 1, size - 1), min(xa + 1, size - 1)
            wy, wx = y - ya, x - xa
            out[i, j] = (
                (1 - wy) * (1 - wx) * canvas[ya, xa]
                + (1 - wy) * wx * canvas[ya, xb]
                + wy * (1 - wx) * canvas[yb, xa]
                + wy * wx * canvas[yb, xb]
            )
    return out / 255.0


def random_views_inputs(batch: int, num_views: int, size: int, mask_size: int, seed: int,
                        side: float = 0.4):  # fmt: skip
    """uint8 canvases ``[B, S, S, 3]``, boxes ``[B, K, 4]`` of side ``side`` at random corners
    in the top-left half, random binary masks ``[B, K, M, M]``."""
    rng = np.random.default_rng(seed)
    canvas = random_canvas(batch, size, seed=seed)
    corner = rng.uniform(0.0, 0.5, (batch, num_views, 2))
    boxes = np.concatenate([corner, corner + side], -1).astype(np.float32)
    masks = rng.integers(0, 2, (batch, num_views, mask_size, mask_size), dtype=np.uint8)
    return canvas, boxes, masks


def make(canvas, boxes, key=None, view_size=16, augment=None, masks=None):
    """make_views with float32 output (exact comparisons) and numpy inputs."""
    return views.make_views(
        jnp.asarray(canvas),
        jnp.asarray(np.asarray(boxes, np.float32)),
        key,
        view_size=view_size,
        augment=augment,
        masks=None if masks is None else jnp.asarray(masks),
        dtype=jnp.float32,
    )


MEDIUM = views.AugmentConfig.from_config(common.get_base_config().input.augment)


# --------------------------------------------------------------------------- crop and resize


def test_crop_resize_matches_plain_numpy_bilinear():
    size, view_size = 40, 12
    canvas = random_canvas(1, size)
    boxes = [
        [0.13, 0.21, 0.77, 0.58],  # not pixel-aligned, downscale
        [0.0, 0.0, 1.0, 1.0],  # whole canvas
        pixel_box((30, 35), (2, 9), size),  # 5 x 7 px, upscale
        [0.6, 0.9, 1.0, 1.0],  # touches the bottom-right canvas edge
    ]
    got = to_unit(make(canvas, [boxes], view_size=view_size))[0]
    for k, box in enumerate(boxes):
        want = numpy_crop_resize(canvas[0], box, view_size)
        np.testing.assert_allclose(got[k], want, atol=2e-5, err_msg=f"box {k} {box}")


def test_crop_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    size, view_size = 48, 24
    canvas = random_canvas(1, size, seed=1)
    regions = [((5, 37), (10, 20)), ((0, 48), (0, 48)), ((40, 47), (30, 33)), ((7, 31), (3, 27))]
    boxes = [pixel_box(rows, cols, size) for rows, cols in regions]
    got = to_unit(make(canvas, [boxes], view_size=view_size))[0] * 255.0
    for k, ((r0, r1), (c0, c1)) in enumerate(regions):
        crop = torch.from_numpy(canvas[0, r0:r1, c0:c1].astype(np.float64)).permute(2, 0, 1)
        want = (
            torch.nn.functional.interpolate(
                crop[None],
                size=(view_size, view_size),
                mode="bilinear",
                align_corners=False,
                antialias=False,
            )[0]
            .permute(1, 2, 0)
            .numpy()
        )
        np.testing.assert_allclose(got[k], want, atol=2e-3, err_msg=f"region {regions[k]}")


def test_default_output_is_bfloat16_and_shape():
    canvas = random_canvas(2, 32)
    boxes = np.tile(np.asarray([[0.0, 0.0, 0.5, 0.5]], np.float32), (2, 3, 1))
    out = views.make_views(jnp.asarray(canvas), jnp.asarray(boxes), None, view_size=8)
    assert out.shape == (2, 3, 8, 8, 3) and out.dtype == jnp.bfloat16


def test_bad_inputs_raise_clear_errors():
    boxes = np.zeros((1, 2, 4), np.float32)
    with pytest.raises(ValueError, match="uint8"):
        views.make_views(jnp.zeros((1, 16, 16, 3)), boxes, None, view_size=8)
    with pytest.raises(ValueError, match=r"boxes must be \[B=1, K, 4\]"):
        views.make_views(jnp.zeros((1, 16, 16, 3), jnp.uint8), boxes[..., :3], None, view_size=8)
    with pytest.raises(ValueError, match="low <= high"):
        views.AugmentConfig(rotate_deg=(10.0, -10.0))
    with pytest.raises(KeyError, match="hue"):
        views.AugmentConfig.from_config({"flip": True})


# --------------------------------------------------------------------------- geometric


def test_from_config_gives_reference_medium_ranges():
    assert MEDIUM == views.AugmentConfig(
        flip_prob=0.5,
        rotate_deg=(-15.0, 15.0),
        shear_deg=(-15.0, 15.0),
        perspective_scale=(0.0, 0.05),
        brightness=(0.85, 1.15),
        contrast=(0.85, 1.15),
        saturation=(0.85, 1.15),
        hue=(-0.025, 0.025),
    )


def test_zero_strength_augmentation_is_identity():
    canvas = random_canvas(2, 32, seed=2)
    boxes = np.asarray([[[0.1, 0.2, 0.9, 0.7], [0.0, 0.0, 0.31, 0.45]]] * 2, np.float32)
    plain = make(canvas, boxes)
    # Runs the full augmentation path (grid, homography, wrap, jitter) with identity params.
    zero = make(canvas, boxes, jax.random.key(3), augment=views.NO_AUGMENT)
    # Equal up to float rounding: XLA fuses the two paths differently (FMA contraction).
    np.testing.assert_allclose(np.asarray(zero), np.asarray(plain), rtol=0, atol=1e-5)


def test_flip_with_probability_one_mirrors_the_view():
    canvas = random_canvas(1, 40, seed=4)
    boxes = [[[0.1, 0.15, 0.8, 0.9], pixel_box((3, 20), (5, 11), 40)]]
    plain = np.asarray(make(canvas, boxes))
    config = views.AugmentConfig(flip_prob=1.0)
    flipped = np.asarray(make(canvas, boxes, jax.random.key(0), augment=config))
    np.testing.assert_allclose(flipped, plain[:, :, :, ::-1], atol=1e-4)


@pytest.mark.parametrize("angle, turns", [(90.0, 1), (-90.0, -1)])
def test_quarter_rotation_equals_rot90_of_the_crop(angle, turns):
    size, view_size = 40, 16
    canvas = random_canvas(1, size, seed=5)
    r0, c0 = 7, 13  # a V x V pixel box: the unaugmented view is the crop itself
    box = pixel_box((r0, r0 + view_size), (c0, c0 + view_size), size)
    config = views.AugmentConfig(rotate_deg=(angle, angle))
    rotated = to_unit(make(canvas, [[box]], jax.random.key(1), view_size, config))[0, 0]
    crop = canvas[0, r0 : r0 + view_size, c0 : c0 + view_size] / 255.0
    np.testing.assert_allclose(rotated, np.rot90(crop, k=turns, axes=(0, 1)), atol=1e-4)


def test_rotation_matches_skimage_inside_the_crop():
    transform = pytest.importorskip("skimage.transform")
    size, view_size, angle = 48, 24, 30.0
    canvas = random_canvas(1, size, seed=6)
    r0, c0 = 10, 20
    box = pixel_box((r0, r0 + view_size), (c0, c0 + view_size), size)
    config = views.AugmentConfig(rotate_deg=(angle, angle))
    got = to_unit(make(canvas, [[box]], jax.random.key(2), view_size, config))[0, 0]
    crop = canvas[0, r0 : r0 + view_size, c0 : c0 + view_size] / 255.0
    # skimage: counter-clockwise, about the pixel-centre middle, bilinear.
    want = transform.rotate(crop, angle, order=1, mode="constant", cval=-1.0)
    # Compare where the source lies well inside the crop (a disc maps onto itself), away
    # from the wrap seam and the edge handling, which differ by design.
    centre = view_size / 2 - 0.5
    yy, xx = np.mgrid[:view_size, :view_size]
    inside = np.hypot(yy - centre, xx - centre) <= view_size / 2 - 2
    np.testing.assert_allclose(got[inside], want[inside], atol=1e-4)


def test_rotation_wraps_around_the_crop_border():
    # Crop: top half colour A, bottom half colour B. Rotated by 45 degrees, the top-left
    # output corner reads box-relative (x, y) ~ (0.5, -0.2); y wraps to the bottom half (B),
    # where clamping would give A and a zero border black.
    size, view_size = 48, 32
    canvas = np.zeros((1, size, size, 3), np.uint8)
    colour_a, colour_b = (200, 40, 40), (30, 60, 220)
    canvas[0, 8:24, 8:40] = colour_a
    canvas[0, 24:40, 8:40] = colour_b
    box = pixel_box((8, 40), (8, 40), size)
    config = views.AugmentConfig(rotate_deg=(45.0, 45.0))
    got = to_unit(make(canvas, [[box]], jax.random.key(0), view_size, config))[0, 0] * 255
    np.testing.assert_allclose(got[0, 0], colour_b, atol=1e-3)
    # And symmetrically the bottom-right corner reads y ~ 1.2 -> 0.2, the top half (A).
    np.testing.assert_allclose(got[-1, -1], colour_a, atol=1e-3)


def test_augmented_views_never_read_outside_the_crop():
    size, view_size, colour = 48, 16, (180, 70, 25)
    canvas = np.zeros((1, size, size, 3), np.uint8)
    canvas[0, 10:30, 12:40] = colour  # constant crop; everything around it is black
    box = pixel_box((10, 30), (12, 40), size)
    config = views.AugmentConfig(
        flip_prob=0.5,
        rotate_deg=(-60.0, 60.0),
        shear_deg=(-20.0, 20.0),
        perspective_scale=(0.0, 0.1),
    )
    got = to_unit(make(canvas, [[box] * 8], jax.random.key(4), view_size, config))[0] * 255
    np.testing.assert_allclose(got, np.broadcast_to(colour, got.shape), atol=1e-3)


def test_square_to_quad_homography_matches_skimage():
    transform = pytest.importorskip("skimage.transform")
    quads = np.asarray(
        [
            [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]],
            [[0.03, 0.01], [0.95, 0.04], [0.99, 0.9], [0.02, 0.97]],
            [[0.2, 0.1], [0.7, 0.3], [0.9, 0.8], [0.1, 0.6]],
        ],
        np.float32,
    )
    got = np.asarray(views._square_to_quad_homography(jnp.asarray(quads)))
    square = np.asarray([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    for quad, params in zip(quads, got, strict=True):
        fitted = transform.estimate_transform("projective", square, quad.astype(np.float64))
        want = fitted.params / fitted.params[2, 2]
        np.testing.assert_allclose(np.append(params, 1.0).reshape(3, 3), want, atol=1e-5)


# --------------------------------------------------------------------------- photometric


def colour_only(**ranges) -> views.AugmentConfig:
    return views.AugmentConfig(**{name: (value, value) for name, value in ranges.items()})


def test_colour_jitter_matches_torchvision():
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("torchvision.transforms.functional")
    canvas = random_canvas(1, 32, seed=7)
    boxes = [[[0.1, 0.1, 0.9, 0.8]]]
    base = to_unit(make(canvas, boxes))[0, 0]
    factors = dict(brightness=1.12, contrast=0.87, saturation=1.1, hue=0.02)
    got = to_unit(make(canvas, boxes, jax.random.key(0), augment=colour_only(**factors)))[0, 0]
    image = torch.from_numpy(base.astype(np.float32)).permute(2, 0, 1)
    image = functional.adjust_brightness(image, factors["brightness"])
    image = functional.adjust_contrast(image, factors["contrast"])
    image = functional.adjust_saturation(image, factors["saturation"])
    image = functional.adjust_hue(image, factors["hue"])
    np.testing.assert_allclose(got, image.permute(1, 2, 0).numpy(), atol=1e-5)


def test_brightness_is_a_clipped_scale():
    canvas = random_canvas(1, 32, seed=8)
    boxes = [[[0.0, 0.0, 1.0, 1.0]]]
    base = to_unit(make(canvas, boxes))
    got = to_unit(make(canvas, boxes, jax.random.key(0), augment=colour_only(brightness=1.3)))
    np.testing.assert_allclose(got, np.clip(base * 1.3, 0.0, 1.0), atol=1e-5)


def test_zero_saturation_gives_greyscale():
    canvas = random_canvas(1, 32, seed=9)
    boxes = [[[0.0, 0.0, 1.0, 1.0]]]
    base = to_unit(make(canvas, boxes))
    got = to_unit(make(canvas, boxes, jax.random.key(0), augment=colour_only(saturation=0.0)))
    grey = base @ np.asarray([0.2989, 0.587, 0.114])
    np.testing.assert_allclose(got, np.repeat(grey[..., None], 3, axis=-1), atol=1e-5)


def test_hue_shift_rotates_primaries_and_zero_shift_is_identity():
    size = 24
    canvas = np.zeros((1, size, size, 3), np.uint8)
    canvas[0, :, 0:8] = (255, 0, 0)
    canvas[0, :, 8:16] = (0, 255, 0)
    canvas[0, :, 16:24] = (0, 0, 255)
    boxes = [[pixel_box((0, size), (c, c + 8), size) for c in (0, 8, 16)]]
    third = to_unit(make(canvas, boxes, jax.random.key(0), 8, colour_only(hue=1 / 3)))[0] * 255
    # +120 degrees of hue: red -> green, green -> blue, blue -> red.
    for k, want in enumerate([(0, 255, 0), (0, 0, 255), (255, 0, 0)]):
        np.testing.assert_allclose(third[k], np.broadcast_to(want, third[k].shape), atol=1e-3)
    noisy = random_canvas(1, size, seed=10)
    base = to_unit(make(noisy, boxes, view_size=8))
    unshifted = to_unit(make(noisy, boxes, jax.random.key(0), 8, colour_only(hue=0.0)))
    np.testing.assert_allclose(unshifted, base, atol=1e-5)


# --------------------------------------------------------------------------- mask fill


def half_masked_example():
    """Canvas 32, box rows/cols 8..24, mask (16 x 16, canvas frame) on the box's left half.

    View column j of a 16 px view reads mask column 3.75 + j / 2, so the bilinear mask is
    > 0.5 exactly for j < 8.
    """
    size, mask_size = 32, 16
    canvas = random_canvas(1, size, seed=11)
    box = pixel_box((8, 24), (8, 24), size)
    masks = np.zeros((1, 1, mask_size, mask_size), np.uint8)
    masks[0, 0, 4:12, 4:8] = 255
    return canvas, [[box]], masks


def test_mask_fill_zeroes_outside_and_keeps_inside():
    canvas, boxes, masks = half_masked_example()
    original = np.asarray(make(canvas, boxes))[0, 0]
    filled = np.asarray(make(canvas, boxes, masks=masks))[0, 0]
    np.testing.assert_allclose(filled[:, :8], original[:, :8], rtol=0, atol=1e-5)
    np.testing.assert_allclose(filled[:, 8:], np.broadcast_to(-MEAN / STD, (16, 8, 3)), atol=1e-6)


def test_mask_fill_background_stays_zero_under_colour_jitter():
    canvas, boxes, masks = half_masked_example()
    config = colour_only(brightness=1.2, contrast=0.5)
    filled = np.asarray(make(canvas, boxes, jax.random.key(0), augment=config, masks=masks))
    background = filled[0, 0, :, 8:].reshape(-1, 3)
    assert np.all(background == background[0])  # one exact value ...
    np.testing.assert_allclose(background[0], -MEAN / STD, atol=1e-6)  # ... the normalised 0
    # Inside, contrast blends towards the grey mean of the masked (zero-filled) view, as the
    # reference's "zero" fill does.
    base = to_unit(make(canvas, boxes))[0, 0]
    base[:, 8:] = 0.0
    bright = np.clip(base * 1.2, 0.0, 1.0)
    mean_grey = (bright @ np.asarray([0.2989, 0.587, 0.114])).mean()
    want = np.clip(0.5 * bright + 0.5 * mean_grey, 0.0, 1.0)
    np.testing.assert_allclose(to_unit(filled)[0, 0, :, :8], want[:, :8], atol=1e-5)


# --------------------------------------------------------------------------- randomness, jit


def test_views_are_deterministic_per_key_and_independent_per_view():
    canvas = np.repeat(random_canvas(1, 32, seed=12), 2, axis=0)  # two identical images
    boxes = np.tile(np.asarray([[0.1, 0.1, 0.9, 0.9]], np.float32), (2, 3, 1))  # same box x3
    first = np.asarray(make(canvas, boxes, jax.random.key(5), augment=MEDIUM))
    again = np.asarray(make(canvas, boxes, jax.random.key(5), augment=MEDIUM))
    other = np.asarray(make(canvas, boxes, jax.random.key(6), augment=MEDIUM))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 0.05
    flat = first.reshape(6, -1)
    for a in range(6):
        for b in range(a + 1, 6):
            assert np.abs(flat[a] - flat[b]).mean() > 0.05, f"views {a} and {b} share params"


def test_make_views_compiles_once_for_fixed_shapes():
    size, view_size = 32, 8
    rng = np.random.default_rng(13)
    inputs = []
    for seed in range(3):
        canvas = jnp.asarray(random_canvas(2, size, seed=seed))
        corner = rng.uniform(0.0, 0.5, (2, 3, 2))
        boxes = jnp.asarray(np.concatenate([corner, corner + 0.4], -1).astype(np.float32))
        masks = jnp.asarray(rng.integers(0, 2, (2, 3, 16, 16), dtype=np.uint8))
        inputs.append((canvas, boxes, jax.random.key(seed), masks))

    traces = []

    @jax.jit
    def step(canvas, boxes, key, masks):
        traces.append(1)
        return views.make_views(
            canvas, boxes, key, view_size=view_size, augment=MEDIUM, masks=masks
        )

    for args in inputs:
        jax.block_until_ready(step(*args))
    assert len(traces) == 1

    # Called directly (its own jit), with an equal but separately built config: no new
    # compilation after the first call.
    config_copy = views.AugmentConfig.from_config(common.get_base_config().input.augment)
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    canvas, boxes, key, _ = inputs[0]
    jax.block_until_ready(views.make_views(canvas, boxes, key, view_size=view_size, augment=MEDIUM))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for canvas, boxes, key, _ in inputs[1:]:
            jax.block_until_ready(
                views.make_views(canvas, boxes, key, view_size=view_size, augment=config_copy)
            )
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_batch_sharded_over_a_mesh_gives_the_same_views():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py sets them up")
    sharding = jax.sharding.NamedSharding(
        jax.make_mesh((8,), ("data",)), jax.sharding.PartitionSpec("data")
    )
    canvas, boxes, masks = random_views_inputs(8, 3, 32, 16, seed=15)
    key = jax.random.key(7)
    local = make(canvas, boxes, key, 8, MEDIUM, masks)
    sharded = views.make_views(
        jax.device_put(canvas, sharding),
        jax.device_put(boxes, sharding),
        key,
        view_size=8,
        augment=MEDIUM,
        masks=jax.device_put(masks, sharding),
        dtype=jnp.float32,
    )
    assert sharded.sharding.spec[0] == "data"
    # Same random parameters per view whatever the layout (only float rounding differs).
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(local), atol=1e-5)


# --------------------------------------------------------------------------- canvas geometry


@pytest.mark.parametrize(
    "height, width, fitted",
    [(300, 500, (269, 448)), (500, 300, (448, 269)), (448, 448, (448, 448)), (1, 1000, (1, 448))],
)
def test_fitted_size_keeps_aspect_with_longer_side_on_the_canvas(height, width, fitted):
    assert views.fitted_size(height, width, 448) == fitted


def test_fit_image_to_canvas_places_top_left_and_pads_with_zero():
    image = np.full((10, 20, 3), (12, 200, 77), np.uint8)
    canvas = views.fit_image_to_canvas(image, 40)
    assert canvas.shape == (40, 40, 3) and canvas.dtype == np.uint8
    np.testing.assert_array_equal(canvas[:20], np.broadcast_to((12, 200, 77), (20, 40, 3)))
    assert not canvas[20:].any()


def test_fit_image_to_canvas_antialiases_when_shrinking():
    # One bright row in every four; shrinking 4x must average them (~255 / 4), where a
    # plain bilinear sample (rows 4k + 1.5) would miss every bright row.
    image = np.zeros((128, 128, 3), np.uint8)
    image[::4] = 255
    canvas = views.fit_image_to_canvas(image, 32)
    assert abs(canvas.mean() - 255 / 4) < 8


def test_box_fitting_follows_the_resized_pixels_and_inverts():
    # A 10 x 20 image into a 40 canvas is a 2x upscale: image rows 3..8, cols 5..15
    # (half-open) land on canvas rows 6..16, cols 10..30.
    box = np.asarray([3 / 10, 5 / 20, 8 / 10, 15 / 20], np.float32)
    canvas_box = views.fit_box_to_canvas(box, 10, 20, 40)
    np.testing.assert_allclose(canvas_box * 40, [6, 10, 16, 30], atol=1e-5)
    boxes = np.random.default_rng(14).uniform(0, 1, (5, 3, 4)).astype(np.float32)
    back = views.canvas_box_to_image(views.fit_box_to_canvas(boxes, 375, 500, 448), 375, 500, 448)
    np.testing.assert_allclose(back, boxes, atol=1e-6)


def test_warping_one_view_slot_at_a_time_gives_the_same_views(monkeypatch):
    """Large batches warp one view slot at a time (lax.map over K, for memory); the values
    equal the all-slots-at-once warp, masks and jitter included."""
    canvas, boxes, masks = random_views_inputs(2, 5, 24, 12, seed=21, side=0.45)
    key = jax.random.key(4)
    whole = make(canvas, boxes, key, 7, MEDIUM, masks)  # 2 x 5 x 7^2 views: all at once
    monkeypatch.setattr(views, "_WHOLE_BATCH_WARP_BYTES", 0)
    views.make_views.clear_cache()
    per_slot = make(canvas, boxes, key, 7, MEDIUM, masks)
    views.make_views.clear_cache()
    # Only float rounding differs (XLA fuses the loop body differently).
    np.testing.assert_allclose(np.asarray(per_slot), np.asarray(whole), rtol=0, atol=1e-5)


def test_bfloat16_unaugmented_views_are_the_float32_views_rounded():
    canvas = random_canvas(2, 40, seed=22)
    boxes = np.asarray([[[0.1, 0.2, 0.9, 0.7], [0.0, 0.0, 0.31, 0.45]]] * 2, np.float32)
    exact = np.asarray(make(canvas, boxes, view_size=11))
    low = views.make_views(jnp.asarray(canvas), jnp.asarray(boxes), None, view_size=11)
    assert low.dtype == jnp.bfloat16
    # bfloat16 keeps 8 significant bits: at most half a unit in the last place apart.
    np.testing.assert_allclose(np.asarray(low, np.float32), exact, rtol=2.0**-8, atol=1e-6)


def test_packed_bilinear_samples_match_numpy_with_clamped_edges():
    """The augmented path's sampler: one gathered row per pixel (itself, right, below,
    below-right, edge-clamped) interpolated as plain numpy does, up to the last row and
    column, where the missing neighbours repeat the edge."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    y = np.array([0.0, 0.25, 3.5, 4.0, 4.0, 3.75, 2.0], np.float32)
    x = np.array([0.0, 6.0, 5.5, 0.5, 6.0, 6.0, 3.25], np.float32)
    padded = np.pad(image.astype(np.float64), ((0, 1), (0, 1), (0, 0)), mode="edge")
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    wy, wx = (y - y0)[:, None], (x - x0)[:, None]
    want = (
        padded[y0, x0] * (1 - wy) * (1 - wx)
        + padded[y0, x0 + 1] * (1 - wy) * wx
        + padded[y0 + 1, x0] * wy * (1 - wx)
        + padded[y0 + 1, x0 + 1] * wy * wx
    )
    packed = views._pack_neighbourhoods(jnp.asarray(image))
    assert packed.shape == (5 * 7, 12)
    got = views._bilinear(packed, 7, jnp.asarray(y), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
