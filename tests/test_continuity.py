"""Tests of the continuity and output-completeness families: the fixed image perturbation
against hand-computed values and per-pixel loops, the change metrics against the reference's
unit-test cases, both evaluators on hand-made chunks, the view noise and the perturbed passes
of a tiny trained run against an independent forward."""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import io
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from _trained_run import tiny_config, trained_workdir
from PIL import Image

from protomask_jax import evaluate, inference, steps
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from protomask_jax.evaluators import chunk, completeness, continuity
from protomask_jax.evaluators.contrastivity import activation_change

# ------------------------------------------------------------ the continuity perturbation


def test_brightness_and_contrast_truncate_like_albumentations():
    values = np.array([[[0, 0, 0], [100, 100, 100], [227, 227, 227], [255, 255, 255]]], np.uint8)
    # 100 * 1.125 = 112.5 -> 112; 227 * 1.125 = 255.375 -> 255.
    np.testing.assert_array_equal(continuity.brightness(values, 1.125)[0, :, 0], [0, 112, 255, 255])
    # Grey mean of (40, 41, 200) grey pixels = 281 / 3; v -> 1.125 v - 0.125 * 281/3.
    image = np.array([[[40] * 3, [41] * 3, [200] * 3]], np.uint8)
    offset = 0.125 * 281 / 3  # 11.708...
    expected = [int(1.125 * v - offset) for v in (40, 41, 200)]  # 33.29, 34.42, 213.29
    np.testing.assert_array_equal(continuity.contrast(image, 1.125)[0, :, 0], expected)


def test_grey_and_saturation_hand_case():
    # OpenCV grey of (100, 50, 0): 0.299 * 100 + 0.587 * 50 = 59.25 -> 59.
    pixel = np.array([[[100, 50, 0]]], np.uint8)
    assert continuity._grey(pixel)[0, 0] == 59
    # 1.125 x - 0.125 * 59: 105.125 -> 105, 48.875 -> 49, -7.375 -> 0.
    np.testing.assert_array_equal(continuity.saturation(pixel, 1.125)[0, 0], [105, 49, 0])
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 3))
    expected = [round(0.299 * r + 0.587 * g + 0.114 * b) for r, g, b in pixels]
    grey = continuity._grey(pixels.astype(np.uint8)[None])[0]
    assert np.abs(grey.astype(int) - expected).max() <= 1  # fixed point vs float at .5 edges
    assert np.mean(grey == expected) > 0.95


def test_hue_rotation_matches_colorsys():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (6, 7, 3)).astype(np.uint8)
    image[0, 0] = (90, 90, 90)  # grey: no hue, unchanged
    expected = np.zeros_like(image)
    for index in np.ndindex(image.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(image[index] / 255.0))
        rgb = colorsys.hsv_to_rgb((h + 0.05) % 1.0, s, v)
        expected[index] = np.clip(np.rint(np.array(rgb) * 255), 0, 255)
    shifted = continuity.hue(image, 0.05)
    assert np.abs(shifted.astype(int) - expected).max() <= 1
    np.testing.assert_array_equal(shifted[0, 0], [90, 90, 90])
    # pure red (hue 0) moves by 18 degrees: green = 255 * 18 / 60 = 76.5
    red, green, blue = continuity.hue(np.array([[[255, 0, 0]]], np.uint8), 0.05)[0, 0]
    assert (red, blue) == (255, 0) and green in (76, 77)


def test_box_blur_matches_loop_with_mirrored_borders():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (5, 6, 3)).astype(np.uint8)
    height, width = image.shape[:2]

    def mirror(i, n):  # ... c b | a b c ... : the edge pixel is not repeated
        return -i if i < 0 else 2 * (n - 1) - i if i >= n else i

    expected = np.zeros_like(image)
    for y in range(height):
        for x in range(width):
            for c in range(3):
                total = sum(
                    int(image[mirror(y + dy, height), mirror(x + dx, width), c])
                    for dy in (-1, 0, 1)
                    for dx in (-1, 0, 1)
                )
                expected[y, x, c] = round(total / 9)
    np.testing.assert_array_equal(continuity.box_blur(image), expected)


def test_gaussian_noise_has_variance_five_and_truncates():
    image = np.full((200, 200, 3), 128, np.uint8)
    noisy = continuity.gaussian_noise(image, np.random.default_rng(3), 5.0).astype(float)
    # x + N(0, 5) truncated towards 0: the mean drops by about half a grey level.
    assert noisy.mean() == pytest.approx(127.5, abs=0.05)
    assert noisy.std() == pytest.approx(np.sqrt(5 + 1 / 12), rel=0.03)  # + truncation's spread
    white = continuity.gaussian_noise(
        np.full((50, 50, 3), 255, np.uint8), np.random.default_rng(4), 5.0
    )
    assert white.max() == 255 and white.min() < 255


def test_image_perturbation_composes_the_steps_reproducibly():
    rng = np.random.default_rng(5)
    image = np.clip(rng.normal(120, 40, (24, 32, 3)), 0, 255).astype(np.uint8)
    perturb = continuity.ImagePerturbation(seed=7)
    out = perturb(image, 3)
    np.testing.assert_array_equal(out, perturb(image.copy(), 3))  # same seed and id
    assert not np.array_equal(out, perturb(image, 4))  # another image draws other noise
    # The same steps by hand: the jitter in the drawn order, noise, blur, JPEG at 90.
    draws = np.random.default_rng((7, 3))
    steps_in_order = [
        lambda x: continuity.brightness(x, 1.125),
        lambda x: continuity.contrast(x, 1.125),
        lambda x: continuity.saturation(x, 1.125),
        lambda x: continuity.hue(x, 0.05),
    ]
    expected = image
    for index in draws.permutation(4):
        expected = steps_in_order[index](expected)
    expected = continuity.box_blur(continuity.gaussian_noise(expected, draws, 5.0))
    buffer = io.BytesIO()
    Image.fromarray(expected).save(buffer, format="JPEG", quality=90)
    np.testing.assert_array_equal(out, np.asarray(Image.open(buffer)))
    # small, as meant: brighter by about 1/8 on average, no more
    assert 0 < out.astype(float).mean() - image.mean() < 0.2 * image.mean()


def test_fit_record_applies_the_image_transform_to_the_fitted_image_only():
    image = np.full((20, 40, 3), 100, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    record = records_lib.ImageRecord(
        image_id=9,
        image_bytes=buffer.getvalue(),
        image_format="png",
        height=20,
        width=40,
        filename="x.png",
        label=0,
        boxes=np.array([[0, 0, 1, 1]], np.float32),
        areas=np.ones(1, np.float32),
        mask_pngs=[records_lib.encode_mask_png(np.ones((20, 40), bool))],
    )
    seen = []

    def transform(fitted, image_id):
        seen.append((fitted.shape, image_id))
        return fitted + 1

    spec = pipeline.PipelineSpec(canvas_size=16, num_views=2, image_transform=transform)
    canvas = pipeline.fit_record(record, spec, "test")["canvas"]
    assert seen == [((8, 16, 3), 9)]  # the 20 x 40 image fitted into 16 px: 8 x 16
    assert (canvas[:8] == 101).all() and (canvas[8:] == 0).all()  # padding untouched


# ------------------------------------------------------- change metrics (reference's cases)


def test_classification_changes_golden_cases():
    first = np.array([[0.1, 0.2, 1.0], [0.2, 0.4, 0.5]])
    second = np.array([[0.2, 0.4, 0.5], [0.1, 0.2, 1.0]])
    # CAC: sorted (1, .2, .1) vs (.5, .4, .2): 1 - .8 / 1.6 = 1/2, both rows.
    sort = lambda x: -np.sort(-x, axis=1)  # noqa: E731
    np.testing.assert_allclose(activation_change(sort(first), sort(second)), [0.5, 0.5])
    # CRC: the predicted class 2 falls to rank 2; unchanged logits keep rank 0.
    after = np.array([[1.0, 0.2, 0.1], [0.2, 0.4, 0.5]])
    prediction = np.argmax(first, axis=1)[:, None]
    np.testing.assert_array_equal(continuity.rank_of(after, prediction)[:, 0], [2, 0])


def test_prototype_changes_golden_cases():
    # PRC: the reference's table; rows are three perturbed score vectors, prototypes 0, 1, 2
    # were ranks 0, 1, 2.
    scores = np.array([[1.0, 0.2, 0.1, 0.3], [0.2, 0.4, 0.5, 0.3], [0.1, 0.2, 1.0, 0.3]])
    ranks = continuity.rank_of(scores, np.tile([0, 1, 2], (3, 1)))
    np.testing.assert_array_equal(np.abs(np.arange(3) - ranks), [[0, 1, 1], [3, 0, 2], [3, 1, 2]])
    # ties go to the lower index
    np.testing.assert_array_equal(
        continuity.rank_of(np.array([[1.0, 2.0, 2.0]]), [[2, 1]]), [[1, 0]]
    )
    # VLC and VAC between two passes (the reference's maps)
    a = np.zeros((1, 2, 4, 4))
    b = np.zeros((1, 2, 4, 4))
    a[0, 0, :2, :2] = 2
    a[0, 0, 2, 2] = 5
    b[0, 0, :2, :2] = 1
    b[0, 0, 2, 2] = 2.5
    a[0, 1].flat[[0, 2, 3, 6, 7]] = [5, 1, 1, 1, 1]
    before = {"mask": a > 0, "values": -np.sort(-a.reshape(1, 2, -1), axis=-1)}
    after = {"mask": b > 0, "values": -np.sort(-b.reshape(1, 2, -1), axis=-1)}
    for state, scores_, views, rank in (
        (before, [5.0, 2.5], [3, 1], [0, 1]),
        (after, [2.5, 10.0], [0, 4], [0, 1]),
    ):
        state.update(score=np.array([scores_]), view=np.array([views]), rank=np.array([rank]))
    terms = continuity.changes(before, after)
    np.testing.assert_allclose(terms["vac"], [[0.5, 1.0]])  # 1 - 6.5/13; all-zero second -> 1
    np.testing.assert_allclose(terms["vlc"], [[0.0, 1.0]])  # same 5 pixels; one side empty
    np.testing.assert_allclose(terms["psc"], [[0.5, 3.0]])  # |5 - 2.5| / 5, |2.5 - 10| / 2.5
    np.testing.assert_allclose(terms["plc"], [[3.0, 3.0]])
    np.testing.assert_allclose(terms["prc"], [[0.0, 0.0]])
    assert "palc" not in terms  # no view similarities given


def test_stability_golden_case():
    # The reference's 7 x 7 maps and part locations (x, y), as normalised (y, x, visible).
    first = np.zeros((1, 3, 7, 7), bool)
    second = np.zeros((1, 3, 7, 7), bool)
    first[0, 0, :5, :6] = second[0, 0, :5, :6] = True
    first[0, 1, 2:5, 1:6] = True
    second[0, 1, 4:7, 1:6] = second[0, 2, 4:7, 1:6] = True
    first[0, 2, 2:7, 1:6] = True
    points = [(3, 1), (3, 3), (0, 3), (6, 3), (3, 5)]
    keypoints = np.array([[((y + 0.5) / 7, (x + 0.5) / 7, 1.0) for x, y in points]])
    # map 0: the same three parts in both -> 1; map 1: (3, 3) then (3, 5) -> 0;
    # map 2: {(3, 3), (3, 5)} then {(3, 5)} -> 1 - 1/2.
    np.testing.assert_allclose(continuity.stability(first, second, keypoints), [[1.0, 0.0, 0.5]])
    # no part in either region: undefined (left out of the mean)
    assert np.isnan(continuity.stability(first * 0, second * 0, keypoints)).all()


def test_region_boxes_are_tight_and_half_open():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:5, 3] = True
    masks[0, 6, 1] = True
    np.testing.assert_allclose(
        completeness.region_boxes(masks), [[2 / 8, 1 / 8, 7 / 8, 4 / 8], [0, 0, 0, 0]]
    )


# -------------------------------------------------------------- evaluators on hand-made chunks


def _hand_chunk(run):
    """2 images, P = 3, K = 3 views of 3 masks, k = 2, 4 x 4 frame, keypoints on rows 0, 3."""
    masks = np.zeros((2, 3, 4, 4), bool)
    masks[:, 0, 0] = True  # row 0
    masks[:, 1, :, 0] = True  # column 0
    masks[:, 2, 3] = True  # row 3
    maps = SimpleNamespace(
        masks=masks,
        has_keypoints=np.array([True, True]),
        keypoints=np.array([[[0.1, 0.9, 1.0], [0.9, 0.9, 1.0]]] * 2),  # pixels (0, 3), (3, 3)
        sizes=np.array([[40, 40], [40, 40]]),
    )
    outputs = SimpleNamespace(
        record_indices=np.arange(2),
        labels=np.array([0, 1]),
        logits=np.array([[2.0, 1.0], [1.0, 3.0]]),
        similarities=np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 4.0]]),
        winning_view=np.array([[0, 1, 2], [2, 2, 0]]),
        num_masks=np.array([3, 3]),
        top_ids=np.array([[0, 1], [2, 1]]),  # as the device would choose with k = 2
        top_view_similarities=np.array([[[3, 1, 1], [1, 2, 1.0]], [[1, 1, 4], [1, 1, 2.0]]]),
    )
    return chunk.Chunk(outputs, lambda indices: maps, run=run)


def _outputs_like(clean, **changes):
    fields = vars(clean).copy()
    fields.update(changes)
    return SimpleNamespace(**fields)


def test_continuity_of_an_unchanged_pass_is_perfect():
    calls = []

    def run(source, top_ids, perturbation):
        calls.append((top_ids.copy(), perturbation))
        return _outputs_like(source.outputs, top_ids=top_ids)

    evaluator = continuity.Evaluator(None)
    evaluator.update(_hand_chunk(run))
    group = evaluator.result()
    np.testing.assert_array_equal(calls[0][0], [[0, 1], [2, 1]])  # the clean top-2
    assert isinstance(calls[0][1], continuity.ImagePerturbation)
    for name in ("vlc", "vac", "plc", "psc", "prc", "palc", "pac", "cac", "crc"):
        assert group[name] == 0.0, name
    assert group["stability"] == 100.0 and group["k"] == 2 and group["num_images"] == 2


def test_continuity_reads_any_explanation_type():
    """A float producer (as PRP will be): maps from the outputs, post-processed at the 95th
    percentile; an unchanged pass changes nothing, a changed one moves VLC and VAC."""

    def relevance(source):  # the peak moves and grows with the winning view
        views = np.take_along_axis(source.outputs.winning_view, source.top_ids, axis=1)
        views = views[..., None, None]
        maps = np.mod(np.arange(16.0).reshape(4, 4) + 5 * views, 16) * (1 + views)
        return chunk.ExplanationMaps.from_relevance(maps)

    def unchanged(source, top_ids, perturbation):
        return _outputs_like(source.outputs, top_ids=top_ids)

    def moved(source, top_ids, perturbation):
        return _outputs_like(source.outputs, winning_view=source.outputs.winning_view + 1)

    for run, changed in ((unchanged, False), (moved, True)):
        hand = _hand_chunk(run)
        hand.explain = relevance
        evaluator = continuity.Evaluator(None)
        evaluator.update(hand)
        group = evaluator.result()
        assert (group["vlc"] > 0) == changed and (group["vac"] > 0) == changed


def test_continuity_hand_case():
    def run(source, top_ids, perturbation):
        return _outputs_like(
            source.outputs,
            logits=np.array([[1.0, 2.0], [1.0, 3.0]]),  # image 0's prediction drops to rank 1
            similarities=np.array([[1.5, 2.0, 1.0], [1.0, 2.0, 4.0]]),
            winning_view=np.array([[2, 1, 2], [2, 2, 0]]),  # image 0, prototype 0: view 0 -> 2
            top_view_similarities=np.array([[[1, 1, 1.5], [1, 2, 1.0]], [[1, 1, 4], [1, 1, 2.0]]]),
        )

    evaluator = continuity.Evaluator(None)
    evaluator.update(_hand_chunk(run))
    group = evaluator.result()
    # Only (image 0, prototype 0) changes among the 4 explanations: its mask row 0 -> row 3.
    assert group["vlc"] == pytest.approx(100 / 4)  # disjoint rows: 1, the rest 0
    assert group["vac"] == 0.0  # both masks have 4 pixels
    assert group["plc"] == pytest.approx(2 / 4)  # view 0 -> 2
    assert group["psc"] == pytest.approx(100 * (1.5 / 3) / 4)  # |3 - 1.5| / 3
    # prototype 0 in image 0: rank 0 -> 1 (1.5 < 2.0); prototype 1: rank 1 -> 0.
    assert group["prc"] == pytest.approx(2 / 4)
    # view sets {0} -> {2}: 1; sorted (3, 1, 1) vs (1.5, 1, 1): 1 - 3.5 / 5.
    assert group["palc"] == pytest.approx(100 / 4)
    assert group["pac"] == pytest.approx(100 * (1 - 3.5 / 5) / 4)
    # logits sorted (2, 1) vs (2, 1) -> 0 in both images; CRC: image 0's class 0 -> rank 1.
    assert group["cac"] == 0.0
    assert group["crc"] == pytest.approx(0.5)
    # keypoints (0, 3) and (3, 3): row 0 holds the first, row 3 the second -> 1 - 2/2 = 0 for
    # that explanation; prototype 1's column 0 holds none in either pass (left out); image 1:
    # prototype 2 (view 0, row 0) keeps the first -> 1; prototype 1 (view 2, row 3) -> 1.
    assert group["stability"] == pytest.approx(100 * 2 / 3)


def test_completeness_noises_outside_each_explanation_in_turn():
    calls = []

    def run(source, top_ids, perturbation):
        calls.append((top_ids.copy(), perturbation))
        changed = source.outputs.similarities.copy()
        changed[0, top_ids[0, 0]] /= 2  # image 0's explained prototype halves
        return _outputs_like(source.outputs, similarities=changed, top_view_similarities=None)

    evaluator = completeness.Evaluator(None)
    evaluator.update(_hand_chunk(run))
    group = evaluator.result()
    # Rank 0: prototype 0 of image 0 and 2 of image 1, both explained by view 0 (row 0);
    # rank 1: prototype 1, by view 1 (column 0) in image 0 and view 2 (row 3) in image 1.
    assert [ids.tolist() for ids, _ in calls] == [[[0], [2]], [[1], [1]]]
    np.testing.assert_allclose(calls[0][1].boxes, [[0, 0, 0.25, 1], [0, 0, 0.25, 1]])
    np.testing.assert_allclose(calls[1][1].boxes, [[0, 0, 1, 0.25], [0.75, 0, 1, 1]])
    assert [p.seed for _, p in calls] == [0, 1] and calls[0][1].std == 0.05
    # PSC: image 0 rank 0: 3 -> 1.5 (1/2), rank 1: 2 -> 1 (1/2); image 1 unchanged.
    assert group["psc"] == pytest.approx(100 * 1 / 4)
    # PRC: image 0's prototype 0 at 1.5 falls behind prototype 1 (2.0): rank 0 -> 1;
    # prototype 1 at 1.0 ties with prototype 2 and keeps rank 1 (ties: lower index first).
    assert group["prc"] == pytest.approx(1 / 4)
    assert group["vlc"] == group["plc"] == 0.0 and "palc" not in group
    assert group["k"] == 2 and group["std"] == 0.05


def test_a_chunk_without_a_model_refuses_perturbed_passes():
    with pytest.raises(ValueError, match="needs the model"):
        _hand_chunk(None).perturbed(continuity.ImagePerturbation())


# ------------------------------------------------------------------------ device view noise


def test_view_noise_lands_exactly_outside_the_box():
    views = np.zeros((2, 2, 8, 8, 3), np.float32)
    batch = {
        # image 0: view 0 the whole canvas, view 1 its top-left quarter; image 1: one mask
        # (its box) shown twice
        "boxes": np.array(
            [[[0, 0, 1, 1], [0, 0, 0.5, 0.5]], [[0.5, 0.5, 1, 1], [0.5, 0.5, 1, 1]]], np.float32
        ),
        "noise_box": np.array([[0.25, 0.25, 0.75, 1.0], [0, 0, 0, 0]], np.float32),
        "image_id": np.array([3, 4], np.int32),
        "num_masks": np.array([2, 1], np.int32),
    }
    noise = jax.jit(inference._noise_outside)
    noisy = np.asarray(noise(views, batch, 0.05, 1))
    for b, v, i, j in np.ndindex(2, 2, 8, 8):
        y0, x0, y1, x1 = batch["boxes"][b, v]
        y, x = y0 + (i + 0.5) / 8 * (y1 - y0), x0 + (j + 0.5) / 8 * (x1 - x0)
        e0, f0, e1, f1 = batch["noise_box"][b]
        inside = e0 <= y < e1 and f0 <= x < f1
        assert (noisy[b, v, i, j] == 0).all() == inside, (b, v, i, j)
    assert noisy[1].std() == pytest.approx(0.05, rel=0.1)  # an empty box: noise everywhere
    np.testing.assert_array_equal(noisy[1, 0], noisy[1, 1])  # a repeated mask: the same view
    assert not np.array_equal(noisy[0, 0], noisy[0, 1])
    np.testing.assert_array_equal(noisy, noise(views, batch, 0.05, 1))  # (seed, image, mask)
    assert not np.array_equal(noisy, noise(views, batch, 0.05, 2))


# ------------------------------------------------------------------------ tiny trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_records):

    workdir = trained_workdir(tmp_path_factory, tiny_records)
    config = tiny_config(tiny_records)
    restored = inference.restore_trained(config, workdir)
    return restored, pipeline.RecordSet(tiny_records, "test")


def _independent(trained, record_set, spec, ids=None):
    """Logits, similarities, winning views and per-view distances ``[N, K, P]`` of every
    record, decoded one by one and run eagerly as one batch (no grain, no sharding)."""
    examples = [
        pipeline.fit_record(records_lib.ImageRecord.from_bytes(record_set.reader[i]), spec, "")
        for i in range(len(record_set))
    ]
    batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
    eval_step = steps.make_eval_step(trained.graphdef, trained.step_config, return_views=True)
    state = jax.device_get(trained.state)
    out = eval_step(state.params, state.batch_stats, state.constants, batch)
    return {name: np.asarray(getattr(out, name)) for name in out._fields}


@pytest.mark.slow
def test_forward_gathers_what_an_independent_forward_computes(trained):
    trained, record_set = trained
    outputs = inference.run_model(trained, record_set, progress=False)
    independent = _independent(trained, record_set, trained.spec)
    eps = trained.config.model.similarity_eps
    similarities = np.log1p((1 - eps) / (independent["min_distances"].astype(np.float64) + eps))
    np.testing.assert_array_equal(outputs.top_ids, chunk.top_indices(similarities, 5))
    for n, row in enumerate(outputs.top_ids):
        for r, j in enumerate(row):
            distances = independent["view_distances"][n, :, j]
            np.testing.assert_allclose(
                outputs.top_view_similarities[n, r],
                np.log1p((1 - eps) / (distances + eps)),
                rtol=1e-4,  # jitted vs eager: distances are differences of large numbers
            )
            view = independent["winning_view"][n, j]
            np.testing.assert_allclose(
                outputs.top_embeddings[n, r], independent["embeddings"][n, view], rtol=1e-5
            )


@pytest.mark.slow
def test_perturbed_passes_match_an_independent_forward(trained):
    trained, record_set = trained
    outputs = inference.run_model(trained, record_set, progress=False)
    render = lambda indices: SimpleNamespace(sizes=np.full((len(indices), 2), 64))  # noqa: E731
    run = functools.partial(
        inference.run_perturbed, trained, record_set, inference.eval_forward(trained)
    )
    clean = chunk.Chunk(outputs, render, run=run)
    # The continuity pass equals the model on records fitted with the perturbation.
    perturbation = continuity.ImagePerturbation()
    perturbed = clean.perturbed(perturbation)
    spec = dataclasses.replace(trained.spec, image_transform=perturbation)
    independent = _independent(trained, record_set, spec)
    np.testing.assert_allclose(
        perturbed.outputs.logits, independent["logits"], rtol=1e-4, atol=1e-5
    )
    np.testing.assert_array_equal(perturbed.outputs.winning_view, independent["winning_view"])
    np.testing.assert_array_equal(perturbed.outputs.top_ids, outputs.top_ids)  # the clean ids
    assert not np.allclose(perturbed.outputs.logits, outputs.logits)
    # Noise outside a box covering every image changes nothing; with an empty box it does.
    n = len(outputs.labels)
    whole = clean.perturbed(
        completeness.OutsideBoxNoise(np.tile([0.0, 0, 1, 1], (n, 1))), outputs.top_ids[:, :1]
    )
    # Equal up to float rounding: the noise pass is another program, whose crop matmuls XLA
    # may split and sum in another order.
    np.testing.assert_allclose(whole.outputs.logits, outputs.logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(whole.outputs.top_ids, outputs.top_ids[:, :1])
    everywhere = clean.perturbed(
        completeness.OutsideBoxNoise(np.zeros((n, 4))), outputs.top_ids[:, :1]
    )
    assert not np.allclose(everywhere.outputs.min_distances, outputs.min_distances)


@pytest.mark.slow
def test_evaluate_runs_every_family_on_request(trained, tmp_path_factory, tiny_records):
    workdir = trained_workdir(tmp_path_factory, tiny_records)
    config = tiny_config(tiny_records)
    results = evaluate.evaluate(
        config,
        workdir,
        resolution=32,
        progress=False,
        techniques=["general", "contrastivity", "continuity", "output_completeness"],
    )
    assert {"classification", "contrastivity", "continuity", "completeness"} <= set(results)
    assert "complexity" not in results
    group = results["continuity"]
    assert group["k"] == 5 and group["num_images"] == 8
    for name in ("vlc", "vac", "psc", "palc", "pac", "cac", "stability"):
        assert 0.0 <= group[name] <= 100.0, name
    assert set(results["completeness"]) >= {"vlc", "vac", "plc", "psc", "prc", "palc", "pac"}
    table = evaluate.format_table(results)
    assert "Continuity" in table and "Output completeness" in table
    Path(workdir, "eval.json").unlink()
