"""Tests of the evaluation driver: pixel frame, keypoints, metrics on hand-built records, the
PRP producer against PRP on hand-made views, and eval.json of a tiny trained run against
metrics computed from independently collected arrays (and against main's, with masks)."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _trained_run import (
    independent_outputs,
    results_json,
    run_module,
    tiny_config,
    trained_workdir,
    write_config_file,
)
from PIL import Image

from protomask_jax import evaluate, inference, prp
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from protomask_jax.data import views as views_lib
from protomask_jax.evaluators import (
    chunk,
    classification,
    compactness,
    complexity,
    continuity,
    contrastivity,
    faithfulness,
    frame,
)

GOLDEN = Path(__file__).parent / "golden"

# ------------------------------------------------------------------------ pixel frame


def test_to_frame_is_the_majority_of_each_pixel_block():
    rng = np.random.default_rng(0)
    mask = rng.random((80, 48)) < 0.45
    rendered = frame.to_frame(mask, 16)  # blocks of 5 x 3 = 15 pixels: never exactly half
    block_fraction = mask.reshape(16, 5, 16, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(rendered, block_fraction > 0.5)
    assert 0 < rendered.sum() < rendered.size


def test_to_frame_keeps_a_mask_at_its_own_size():
    mask = np.zeros((24, 24), bool)
    mask[3:9, 5:20] = True
    np.testing.assert_array_equal(frame.to_frame(mask, 24), mask)


def test_part_keypoints_lie_on_the_part_even_when_its_centroid_does_not():
    part_map = np.zeros((20, 30), np.uint8)
    # Part 0: a U shape whose centroid (row ~11, col 15) lies in the empty middle.
    part_map[4:18, 4:8] = 1
    part_map[4:18, 22:26] = 1
    part_map[14:18, 4:26] = 1
    # Part 2: a 5 x 5 square at rows 1..5, cols 10..14: only its centre is 3 px deep.
    part_map[1:6, 10:15] = 3
    keypoints = frame.part_keypoints(part_map, num_parts=4)
    assert keypoints.shape == (4, 3)
    rows, cols = np.floor(keypoints[:, 0] * 20).astype(int), np.floor(keypoints[:, 1] * 30)
    cols = cols.astype(int)
    assert part_map[rows[0], cols[0]] == 1
    centroid = np.argwhere(part_map == 1).mean(axis=0).round().astype(int)
    assert part_map[tuple(centroid)] == 0  # the case the deepest pixel is for
    np.testing.assert_allclose(keypoints[2], [3.5 / 20, 12.5 / 30, 1.0])
    # Parts 1 and 3 are absent: invisible, padded with -1.
    np.testing.assert_allclose(keypoints[[1, 3]], [[-1, -1, 0], [-1, -1, 0]])


def test_boxes_mask_takes_the_pixels_whose_centres_lie_in_a_box():
    # 8 x 10 image. Rows [0.2, 0.7) of 8: centres r + 0.5 in [1.6, 5.6) -> r = 2..5; columns
    # [0.12, 0.52) of 10: centres c + 0.5 in [1.2, 5.2) -> c = 1..4.
    expected = np.zeros((8, 10), bool)
    expected[2:6, 1:5] = True
    np.testing.assert_array_equal(
        frame.boxes_mask(np.array([[0.2, 0.12, 0.7, 0.52]]), 8, 10), expected
    )
    # two boxes in opposite corners: their union, 2 x 2 pixels each
    two = frame.boxes_mask(np.array([[0.0, 0.0, 0.25, 0.2], [0.75, 0.8, 1.0, 1.0]]), 8, 10)
    expected = np.zeros((8, 10), bool)
    expected[:2, :2] = expected[6:, 8:] = True
    np.testing.assert_array_equal(two, expected)


# ------------------------------------------------- metrics on hand-built records (24 px)

SIZE = 24


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _rect(r0, r1, c0, c1) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[r0:r1, c0:c1] = True
    return mask


BODY = _rect(0, 12, 0, 24)  # part 0 (part map value 1), 288 px
HEAD = _rect(12, 24, 0, 12)  # part 1 (value 2), 144 px
HALF_ON_HEAD = _rect(12, 24, 6, 18)  # 72 px on the head, 72 on the background


def _tight_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], np.float64)


def _hand_records(directory: Path) -> pipeline.RecordSet:
    part_map = np.zeros((SIZE, SIZE), np.uint8)
    part_map[BODY] = 1
    part_map[HEAD] = 2
    images = [  # (masks, label, decisive part)
        ([BODY, HEAD, HALF_ON_HEAD], 0, 1),
        ([BODY, HEAD], 1, 0),
    ]
    payloads = []
    for i, (masks, label, decisive) in enumerate(images):
        boxes = np.array([_tight_box(m) / SIZE for m in masks], np.float32)
        payloads.append(
            records_lib.ImageRecord(
                image_id=10 + i,
                image_bytes=_png(np.full((SIZE, SIZE, 3), 90, np.uint8)),
                image_format="png",
                height=SIZE,
                width=SIZE,
                filename=f"{i}.png",
                label=label,
                boxes=boxes,
                areas=np.array([m.mean() for m in masks], np.float32),
                mask_pngs=[records_lib.encode_mask_png(m) for m in masks],
                part_map_png=records_lib.encode_label_map_png(part_map),
                decisive_parts=np.array([decisive], np.int64),
            ).to_bytes()
        )
    records_lib.write_shard(directory / records_lib.shard_name("test", 0, 1), payloads)
    return pipeline.RecordSet(directory, "test")


def _rewritten(record_set, directory: Path, edit) -> Path:
    """Copies ``record_set`` into ``directory`` without its part map and decisive parts,
    after ``edit(i, record)``; returns ``directory``."""
    payloads = []
    for i in range(len(record_set)):
        record = records_lib.ImageRecord.from_bytes(record_set.reader[i])
        record.part_map_png = None
        record.decisive_parts = None
        edit(i, record)
        payloads.append(record.to_bytes())
    directory.mkdir()
    records_lib.write_shard(directory / records_lib.shard_name("test", 0, 1), payloads)
    return directory


def _outputs(logits, similarities, winning_view) -> inference.EvalOutputs:
    """Model outputs of the two hand-built records (labels 0, 1; 3 and 2 masks)."""
    return inference.EvalOutputs(
        record_indices=np.arange(2),
        image_ids=np.array([10, 11]),
        labels=np.array([0, 1]),
        logits=np.asarray(logits, np.float32),
        min_distances=np.zeros(np.shape(similarities), np.float32),
        similarities=np.asarray(similarities, np.float32),
        winning_view=np.asarray(winning_view, np.int32),
        num_masks=np.array([3, 2], np.int32),
    )


def test_compute_metrics_on_hand_built_records(tmp_path):
    """Every number below is worked out by hand from the masks and scores in the comments."""
    record_set = _hand_records(tmp_path)
    # P = 4 prototypes, classes [0, 0, 1, 1]; W [C=2, P=4].
    last_layer = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], np.float32)
    similarities = np.array([[3.0, 2.0, 1.0, 0.5], [1.0, 0.0, 2.0, 4.0]], np.float32)
    # Image 0 (3 masks): views 1, 2, 3, 0 -> masks HEAD, HALF, BODY (3 % 3), BODY.
    # Image 1 (2 masks): views 0, 1, 1, 2 -> masks BODY, HEAD, HEAD, BODY (2 % 2).
    winning_view = np.array([[1, 2, 3, 0], [0, 1, 1, 2]], np.int32)
    # logits [5, 1.5] -> 0 (right); [1, 6] -> 1 (right)
    outputs = _outputs(similarities @ last_layer.T, similarities, winning_view)
    arrays = inference.ModelArrays(
        last_layer=last_layer,
        prototypes=np.eye(4, 3, dtype=np.float32),
        prototype_class=np.array([0, 0, 1, 1], np.int32),
    )
    results = evaluate.compute_metrics(
        outputs, arrays, record_set, num_views=4, resolution=SIZE, num_parts=2, progress=False
    )
    assert results["classification"]["top1_accuracy"] == 100.0

    # Faithfulness, top-3 by contribution to the predicted class:
    # image 0 (decisive HEAD): prototypes 0 (3), 1 (2), 2 (0; tie with 3 -> lower index)
    #   -> HEAD (fraction on head 1: hit), HALF (0.5: no hit), BODY (0) -> rate 1/3, overlap 1/2
    #   chance: masks BODY 0, HEAD 1, HALF 0.5 -> rate 1/3, overlap 1/2
    # image 1 (decisive BODY): prototypes 3 (4), 2 (2), 0 (0; tie with 1)
    #   -> BODY (hit), HEAD (0), BODY (hit) -> rate 2/3, overlap 2/3; chance 1/2, 1/2
    faithfulness = results["faithfulness"]
    assert faithfulness["k"] == 3 and faithfulness["num_images"] == 2
    assert faithfulness["rate"] == pytest.approx(100 * (1 / 3 + 2 / 3) / 2)
    assert faithfulness["chance_rate"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)
    assert faithfulness["overlap"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert faithfulness["chance_overlap"] == pytest.approx(50.0)
    assert faithfulness["rate_correct"] == pytest.approx(50.0)
    assert faithfulness["num_correct"] == 2

    # Top-4 prototypes by similarity: image 0 -> 0, 1, 2, 3 -> HEAD, HALF, BODY, BODY;
    # image 1 -> 3, 2, 0, 1 -> BODY, HEAD, BODY, HEAD. Object = BODY | HEAD (432 px).
    complexity = results["complexity"]
    assert complexity["k"] == 4 and complexity["num_images"] == 2
    # |S n G| / |G|: image 0 (144 + 72 + 288 + 288) / 432 / 4 = 11/24; image 1: 1/2.
    assert complexity["object_overlap"] == pytest.approx(100 * (11 / 24 + 1 / 2) / 2)
    # 1 - |S n G| / |S|: only HALF leaves the object (by half): (0.5 / 4) / 2.
    assert complexity["background_overlap"] == pytest.approx(100 * 0.5 / 4 / 2)
    # IOR of a binary map: [S n G nonempty] - [S \ G nonempty]: HALF 0, the rest 1.
    assert complexity["ior"] == pytest.approx((3 / 4 + 1) / 2)
    # IoU: image 0 HEAD 144/432, HALF 72/504, BODY 288/432 twice; image 1 2/3, 1/3 twice.
    iou_0, iou_1 = (1 / 3 + 1 / 7 + 4 / 3) / 4, (2 / 3 + 1 / 3) / 2
    assert complexity["iou"] == pytest.approx(100 * (iou_0 + iou_1) / 2)
    # OIRR (mean outside / mean inside): HALF 1, every other map lies inside the object: 0.
    assert complexity["oirr"] == pytest.approx(1 / 8)
    # Keypoints (deepest part pixels): body (5, 5), head (17, 5); HALF covers neither.
    # Parts seen per prototype over its 2 top-4 sets: 0 {head, body} -> 1/2; 1 {head} -> 1/2;
    # 2 {body, head} -> 1/2; 3 {body twice} -> 1 => mean 5/8.
    assert complexity["part_consistency"] == pytest.approx(62.5)
    assert complexity["num_images_with_keypoints"] == 2
    # VLC: image 0 pairs of {HEAD, HALF, BODY, BODY}: 1 - IoU(HEAD, HALF) = 2/3, four pairs
    # with BODY = 1, BODY-BODY = 0 -> 14/3 / 6 = 7/9; image 1 {BODY, HEAD} x 2 -> 4/6.
    assert results["contrastivity"]["vlc"] == pytest.approx(100 * (7 / 9 + 2 / 3) / 2)


def test_compute_metrics_without_ground_truth_reports_no_gt_groups(tmp_path):
    # Same records, but metrics that need no ground truth only: drop it by rewriting.
    bare = _rewritten(_hand_records(tmp_path), tmp_path / "bare", lambda i, record: None)
    similarities = [[3.0, 2.0, 1.0, 0.5], [1.0, 0.0, 2.0, 4.0]]
    outputs = _outputs([[1.0, 0.0], [1.0, 0.0]], similarities, np.zeros((2, 4)))
    arrays = inference.ModelArrays(
        np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], np.float32),
        np.eye(4, 3, dtype=np.float32),
        np.array([0, 0, 1, 1], np.int32),
    )
    results = evaluate.compute_metrics(
        outputs,
        arrays,
        pipeline.RecordSet(bare, "test"),
        num_views=4,
        resolution=SIZE,
        num_parts=2,
        progress=False,
    )
    assert "complexity" not in results and "faithfulness" not in results
    assert results[evaluate.NOT_COMPUTED] == {
        "complexity": complexity.Evaluator.missing,
        "faithfulness": faithfulness.Evaluator.missing,
    }
    assert not frame.render_frame_maps(
        pipeline.RecordSet(bare, "test"), np.arange(2), 4, SIZE
    ).has_object.any()
    assert results["classification"]["top1_accuracy"] == 50.0
    # All four winning views are view 0 -> the same mask each time: VLC 0.
    assert results["contrastivity"]["vlc"] == 0.0
    assert results["compactness"]["global_explanation_size"] == 4


def test_faithfulness_without_deciding_parts_is_recorded_as_not_computed(tmp_path):
    """CUB's records: a bird mask and keypoints, no part map, so nothing decides the class."""
    from protomask_jax.report import html

    def as_cub(i, record):
        record.object_mask_png = records_lib.encode_mask_png(BODY | HEAD)
        record.keypoints = np.array([[0.25, 0.5, 1.0], [0.75, 0.25, 1.0]], np.float32)

    cub_like = _rewritten(_hand_records(tmp_path), tmp_path / "cub_like", as_cub)
    outputs = _outputs([[1.0, 0.0], [0.0, 1.0]], [[3.0, 2.0], [1.0, 4.0]], [[1, 2], [0, 1]])
    arrays = inference.ModelArrays(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), [0, 1])
    metrics = evaluate.compute_metrics(
        outputs,
        arrays,
        pipeline.RecordSet(cub_like, "test"),
        num_views=4,
        resolution=SIZE,
        techniques=["classification", "complexity", "faithfulness"],
        progress=False,
    )
    assert metrics[evaluate.NOT_COMPUTED] == {"faithfulness": faithfulness.Evaluator.missing}
    assert "gt/decisive_parts" in faithfulness.Evaluator.missing
    assert "faithfulness" not in metrics
    # The bird mask G = BODY | HEAD (432 px) is the object. Top-2 by similarity: image 0
    # prototypes 0, 1 -> views 1, 2 -> HEAD, HALF: |S n G| / |G| = (144 + 72) / 432 / 2;
    # image 1 prototypes 1, 0 -> views 1, 0 -> HEAD, BODY: (144 + 288) / 432 / 2.
    assert metrics["complexity"]["object_mask"] == frame.OBJECT_FROM_FIELD
    assert metrics["complexity"]["object_overlap"] == pytest.approx(100 * (1 / 4 + 1 / 2) / 2)
    assert metrics["classification"]["top1_accuracy"] == 100.0

    results = {
        "dataset": "cub200",
        "split": "test",
        "num_images": 2,
        "num_prototypes": 2,
        "checkpoint": "best_finetune step 3",
        "resolution": SIZE,
        **metrics,
    }
    reason = f"not computed: {faithfulness.Evaluator.missing}"
    (line,) = [line for line in evaluate.format_table(results).splitlines() if reason in line]
    assert line.strip() == reason
    table = evaluate.format_table(results)
    assert "Explanation faithfulness (top-k contributions to the prediction)" in table
    section = html.metrics_section(results, tmp_path)
    assert "<caption>Explanation faithfulness (top-k contributions" in section.body
    assert html.e(reason) in section.body


def test_object_boxes_are_the_object_region_when_there_is_no_mask(tmp_path):
    """Stanford Dogs / Cars records carry only boxes: their union is the object."""

    def add_boxes(i, record):
        # rows 6..17 and columns 0..11, plus rows 0..5 of columns 18..23 in the second image
        record.object_boxes = np.array([[0.25, 0.0, 0.75, 0.5]] + [[0.0, 0.75, 0.25, 1.0]] * i)

    boxed = _rewritten(_hand_records(tmp_path), tmp_path / "boxed", add_boxes)
    maps = frame.render_frame_maps(pipeline.RecordSet(boxed, "test"), np.arange(2), 4, SIZE)
    assert maps.has_object.all()
    first, second = _rect(6, 18, 0, 12), _rect(6, 18, 0, 12) | _rect(0, 6, 18, 24)
    np.testing.assert_array_equal(maps.object_masks, np.stack([first, second]))
    # at half the resolution each frame pixel is a 2 x 2 block of the image
    half = frame.render_frame_maps(pipeline.RecordSet(boxed, "test"), [0], 4, SIZE // 2)
    np.testing.assert_array_equal(half.object_masks[0], first[::2, ::2])


# ------------------------------------------------------------------ tiny trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_records):
    return tiny_records, trained_workdir(tmp_path_factory, tiny_records)


def _with(config, **explain):
    config.unlock()
    config.explain.update(explain)
    config.lock()
    return config


def _independent(restored, test_set):
    """``independent_outputs`` and the log-similarities ``[N, P]`` of their distances."""
    independent = independent_outputs(restored, test_set)
    eps = restored.config.model.similarity_eps
    distances = independent["min_distances"].astype(np.float64)
    return independent, np.log((distances + 1) / (distances + eps))


@pytest.mark.slow
def test_eval_json_matches_metrics_of_independently_collected_arrays(trained):

    records_dir, workdir = trained
    config = _with(tiny_config(records_dir), explanation_type="mask")
    results = evaluate.evaluate(config, workdir, resolution=64, progress=False)
    assert results["explanation_type"] == "mask" and "prp_rule" not in results
    assert json.loads((workdir / "eval.json").read_text()) == results

    # The same checkpoint the trainer reported: the same test accuracy.
    run = results_json(workdir)
    assert results["checkpoint"] == f"best_finetune step {run['best']['step']}"
    assert results["classification"]["top1_accuracy"] == pytest.approx(100 * run["test_accuracy"])

    # Arrays collected without the evaluation driver; masks decoded straight from the
    # records (the images are 64 px, so the 64 px frame is the image itself).
    test_set = pipeline.RecordSet(records_dir, "test")
    restored = inference.restore_trained(config, workdir)
    independent, similarities = _independent(restored, test_set)
    logits, labels = independent["logits"], independent["labels"]
    last_layer = np.asarray(restored.state.params["last_layer"][...]).T
    prototypes = np.asarray(restored.state.params["prototypes"][...])
    masks, decisive, objects = [], [], []
    for i in range(len(test_set)):
        record = records_lib.ImageRecord.from_bytes(test_set.reader[i])
        assert (record.height, record.width) == (64, 64)
        stack = np.zeros((4, 64, 64), bool)
        for k in range(min(record.num_masks, 4)):
            stack[k] = records_lib.decode_mask_png(record.mask_pngs[k])
        masks.append(stack)
        part_map = records_lib.decode_label_map_png(record.part_map_png)
        objects.append(part_map > 0)
        decisive.append(np.isin(part_map, np.asarray(record.decisive_parts) + 1))
    masks, decisive, objects = np.stack(masks), np.stack(decisive), np.stack(objects)
    num_masks = independent["num_masks"]

    group = results["classification"]
    assert group["top1_accuracy"] == pytest.approx(classification.top1_accuracy(logits, labels))
    assert group["top3_accuracy"] == pytest.approx(classification.topk_accuracy(logits, labels))
    assert group["macro_f1"] == pytest.approx(classification.macro_f1(logits, labels))
    assert group["balanced_accuracy"] == pytest.approx(
        classification.balanced_accuracy(logits, labels)
    )
    assert results["compactness"]["negative_positive_ratio"] == pytest.approx(
        compactness.negative_positive_reasoning_ratio(last_layer)
    )
    top5 = chunk.top_indices(similarities, 5)
    explanations = chunk.explanation_masks(independent["winning_view"], masks, num_masks, top5)
    group = results["contrastivity"]
    assert group["vlc"] == pytest.approx(100 * contrastivity.vlc_per_image(explanations).mean())
    assert group["inter_prototype_distance"] == pytest.approx(
        contrastivity.inter_vector_distance_per_class(prototypes, top5, labels, 4).mean()
    )
    sums = chunk.object_sums(chunk.ExplanationMaps.from_masks(explanations), objects)
    for name, values in complexity.object_metrics(sums).items():
        if name != "oirr":
            scale = 1 if name == "ior" else 100
            assert results["complexity"][name] == pytest.approx(scale * values.mean()), name
    outputs = SimpleNamespace(similarities=similarities, **independent)
    expected = faithfulness.summarize(
        faithfulness.faithfulness_per_image(outputs, last_layer, masks, decisive)
    )
    for name in ("rate", "chance_rate", "overlap", "chance_overlap", "num_correct"):
        assert results["faithfulness"][name] == pytest.approx(expected[name]), name


@pytest.mark.slow
def test_evaluate_command_line_prints_the_table_and_writes_eval_json(trained, tmp_path):
    records_dir, workdir = trained
    config_file = write_config_file(tmp_path / "tiny_config.py", records_dir)
    (workdir / "eval.json").unlink(missing_ok=True)
    completed = run_module(
        "protomask_jax.evaluate",
        f"--config={config_file}",
        f"--workdir={workdir}",
        "--resolution=32",
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    written = json.loads((workdir / "eval.json").read_text())
    assert written["resolution"] == 32 and written["config"] == str(config_file)
    for line in ("top-1 accuracy", "explanations on the deciding part", "part consistency"):
        assert line in completed.stdout
    accuracy = written["classification"]["top1_accuracy"]
    assert f"{accuracy:.2f}" in completed.stdout


def test_techniques_select_the_groups_and_unknown_ones_are_refused(tmp_path):
    record_set = _hand_records(tmp_path)
    outputs = _outputs([[1.0, 0.0], [1.0, 0.0]], np.eye(2), [[0, 2], [1, 0]])
    arrays = inference.ModelArrays(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), [0, 1])
    results = evaluate.compute_metrics(
        outputs,
        arrays,
        record_set,
        num_views=4,
        resolution=SIZE,
        techniques=["faithfulness", "classification"],
        progress=False,
    )
    assert list(results) == ["classification", "faithfulness"]  # in the families' order
    assert results["classification"]["top1_accuracy"] == 50.0
    # k = min(3, P=2), both predicted 0, W = I: image 0 ranks prototypes 0, 1 -> views 0, 2
    # -> BODY, HALF on the decisive HEAD: no hit; image 1 (tie) 0, 1 -> views 1, 0 -> HEAD,
    # BODY on the decisive BODY: 1 of 2.
    assert results["faithfulness"]["k"] == 2 and results["faithfulness"]["rate"] == 25.0
    with pytest.raises(ValueError, match=r"unknown \['bogus'\]"):
        evaluate.evaluate(tiny_config(tmp_path), tmp_path / "no_run", techniques=["bogus"])


def test_table_shows_missing_values_as_na_and_skips_absent_groups():
    results = {
        "dataset": "d",
        "split": "test",
        "num_images": 3,
        "num_prototypes": 4,
        "checkpoint": "best_finetune step 7",
        "resolution": 64,
        "classification": {"top1_accuracy": 12.345, "macro_f1": 50.0},
        "faithfulness": {"k": 3, "rate": 40.0, "chance_rate": 25.0, "rate_correct": None},
    }
    table = evaluate.format_table(results)
    assert "top-1 accuracy" in table and "12.35 %" in table
    assert "Explanation faithfulness (top-3" in table
    (correct_line,) = [line for line in table.splitlines() if "correctly classified" in line]
    assert correct_line.split()[-2:] == ["n/a", "%"]
    assert "Compactness" not in table and "Ground truth" not in table


_HEADER = {
    "split": "test",
    "checkpoint": "best_finetune step 7",
    "config": "c.py",
    "dataset": "d",
    "num_images": 3,
    "num_classes": 2,
    "num_prototypes": 4,
    "resolution": 64,
    "explanation_type": "mask",
}


def test_merge_replaces_the_families_evaluated_again_and_keeps_the_others():
    old = _HEADER | {
        "classification": {"top1_accuracy": 75.0},
        "faithfulness": {"k": 3, "rate": 40.0},
        evaluate.NOT_COMPUTED: {"complexity": "no object"},
    }
    topk = {"k": 2, "own_class_test": 50.0}
    merged = evaluate.merge_eval(old, _HEADER | {"config": "other.py", "topk": topk})
    assert merged == old | {"config": "other.py", "topk": topk}
    # A family evaluated again replaces its group; one now without ground truth loses it.
    again = _HEADER | {
        "classification": {"top1_accuracy": 50.0},
        evaluate.NOT_COMPUTED: {"faithfulness": "no parts"},
    }
    merged = evaluate.merge_eval(merged, again)
    assert merged["classification"] == {"top1_accuracy": 50.0} and merged["topk"] == topk
    assert "faithfulness" not in merged
    assert merged[evaluate.NOT_COMPUTED] == {"complexity": "no object", "faithfulness": "no parts"}
    # ... and a family computed now drops its old reason.
    merged = evaluate.merge_eval(merged, _HEADER | {"complexity": {"k": 5, "iou": 1.0}})
    assert merged[evaluate.NOT_COMPUTED] == {"faithfulness": "no parts"}
    # Another checkpoint, split or frame: nothing to merge with.
    for key, value in (("checkpoint", "latest step 9"), ("split", "train"), ("resolution", 32)):
        assert evaluate.merge_eval(old, _HEADER | {key: value, "topk": topk}) is None


def test_write_eval_keeps_an_eval_json_of_another_evaluation_beside_it(tmp_path):
    first = _HEADER | {"classification": {"top1_accuracy": 75.0}}
    assert evaluate.write_eval(tmp_path, first) == first
    merged = evaluate.write_eval(tmp_path, _HEADER | {"compactness": {"epsilon": 0.001}})
    assert merged == first | {"compactness": {"epsilon": 0.001}}
    assert json.loads((tmp_path / "eval.json").read_text()) == merged

    other = _HEADER | {"resolution": 32, "classification": {"top1_accuracy": 10.0}}
    assert evaluate.write_eval(tmp_path, other) == other
    assert json.loads((tmp_path / "eval.json").read_text()) == other
    (kept,) = tmp_path.glob("eval.replaced-*.json")
    assert json.loads(kept.read_text()) == merged

    (tmp_path / "eval.json").write_text('{"split": "te')  # a damaged file is kept too
    assert evaluate.write_eval(tmp_path, first) == first
    kept = sorted(tmp_path.glob("eval.replaced-*.json"))
    assert len(kept) == 2 and '{"split": "te' in {path.read_text() for path in kept}
    (tmp_path / "eval.json").write_text("[1, 2]")  # JSON, but no eval.json
    assert evaluate.write_eval(tmp_path, first) == first
    assert "[1, 2]" in {path.read_text() for path in tmp_path.glob("eval.replaced-*.json")}


@pytest.mark.slow
def test_evaluations_merge_and_the_report_keeps_the_accuracy(trained):
    """The report's hint (evaluate --techniques topk, then re-run the report) must not cost
    the metrics of the default evaluation."""
    from protomask_jax import explain

    records_dir, workdir = trained
    config = _with(tiny_config(records_dir), explanation_type="mask")
    (workdir / "eval.json").unlink(missing_ok=True)
    techniques = ["classification", "compactness"]
    first = evaluate.evaluate(config, workdir, techniques=techniques, resolution=32, progress=False)
    second = evaluate.evaluate(config, workdir, techniques=["topk"], resolution=32, progress=False)
    written = json.loads((workdir / "eval.json").read_text())
    assert written == second
    assert written["classification"] == first["classification"]
    assert written["compactness"] == first["compactness"]
    assert "topk" in written and "topk" not in first
    accuracy = 100 * results_json(workdir)["test_accuracy"]  # the trainer's own count
    assert written["classification"]["top1_accuracy"] == pytest.approx(accuracy)

    page = explain.explain(config, workdir, num_images=2, progress=False).read_text()
    assert f'<div class="label">test accuracy</div><div class="value">{accuracy:.1f}%' in page
    assert "<caption>Classification</caption>" in page
    assert "<caption>Top-" in page  # topk's table beside the first evaluation's


# ----------------------------------------------------------------------- PRP explanations


def test_frame_maps_carry_each_views_box_with_cyclic_padding(tmp_path):
    record_set = _hand_records(tmp_path)
    maps = frame.render_frame_maps(record_set, np.arange(2), num_views=5, resolution=SIZE)
    for n, masks in enumerate(([BODY, HEAD, HALF_ON_HEAD], [BODY, HEAD])):
        boxes = [_tight_box(m) / SIZE for m in masks]
        expected = [boxes[k % len(masks)] for k in range(5)]  # view k shows mask k % n
        np.testing.assert_allclose(maps.view_boxes[n], expected, rtol=1e-6)


def test_relevance_terms_share_of_each_maps_mass_on_the_part():
    rng = np.random.default_rng(3)
    maps = rng.uniform(0, 1, (3, 2, 6, 6)) * (rng.uniform(size=(3, 2, 6, 6)) > 0.5)
    maps[2, 1] = 0.0  # an all-zero map has no mass on the part
    parts = rng.uniform(size=(3, 6, 6)) > 0.6
    shares = np.zeros((3, 2))
    for n in range(3):
        for j in range(2):
            total = maps[n, j].sum()
            shares[n, j] = maps[n, j][parts[n]].sum() / total if total else 0.0
    terms = faithfulness.relevance_terms(maps, parts)
    np.testing.assert_allclose(terms["relevance_mass"], shares.mean(axis=1))
    np.testing.assert_array_equal(terms["relevance_rate"], (shares > 0.5).mean(axis=1))


def test_explain_config_values_are_checked():
    from protomask_jax import config_checks

    for key, value in (("explanation_type", "saliency"), ("prp_rule", "broadcast")):
        config = _with(tiny_config(Path("unused")), **{key: value})
        with pytest.raises(config_checks.ConfigError, match=f"config.explain.{key}: must be"):
            inference.check_explain_config(config)


def test_table_is_unchanged_by_the_one_label_table():
    """main's table of every family (before the labels moved into one table)."""
    results = json.loads((GOLDEN / "tiny_eval_main.json").read_text())["eval"]
    results["classification"].update(  # the multi-label rows too
        threshold=0.5,
        subset_accuracy=10.0,
        samples_f1=20.0,
        top2_accuracy=30.0,
        balanced_top2_accuracy=40.0,
    )
    assert evaluate.format_table(results) == (GOLDEN / "table_main.txt").read_text()


def _independent_prp(restored, record_set, ids, resolution, spec=None):
    """PRP frame maps ``[N, j, R, R]`` of ``ids [N, j]`` and the winning views ``[N, j]``,
    record by record: views made by hand (``fit_record`` + ``make_views``), then
    ``prp.relevance_maps`` and ``prp.paste_into_frame`` at the record's own box of the winning
    view (view k shows mask k % masks/count)."""
    import jax

    state = jax.device_get(restored.state)
    model = prp.canonize((restored.graphdef, state.params, state.batch_stats, state.constants))
    frames, winners = [], []
    for i in range(len(record_set)):
        record = records_lib.ImageRecord.from_bytes(record_set.reader[i])
        example = pipeline.fit_record(record, spec or restored.spec, f"record {i}")
        views = views_lib.make_views(
            example["canvas"][None],
            example["boxes"][None],
            None,
            view_size=restored.config.input.view_size,
            dtype=np.float32,
        )
        maps, won = prp.relevance_maps(model, views, ids[i][None], example["valid"][None])
        boxes = np.asarray(record.boxes)[np.asarray(won)[0] % record.num_masks]
        frames.append(np.asarray(prp.paste_into_frame(maps, boxes[None], resolution))[0])
        winners.append(np.asarray(won)[0])
    return np.stack(frames), np.stack(winners)


def _box_pixels(box, resolution: int) -> tuple[slice, slice]:
    """The frame rows and columns a box covers when pasted (Python's rounding, docs/prp.md)."""
    y0, x0, y1, x1 = (float(v) for v in box)
    top, left = round(y0 * resolution), round(x0 * resolution)
    rows = slice(top, top + round((y1 - y0) * resolution))
    return rows, slice(left, left + round((x1 - x0) * resolution))


@pytest.mark.slow
def test_prp_producer_equals_prp_on_hand_made_views(trained):

    records_dir, workdir = trained
    config = tiny_config(records_dir)
    config.unlock()
    config.input.num_views = 8  # 4-6 masks per image: cyclic repeats in every image
    config.lock()
    restored = inference.restore_trained(config, workdir)
    test_set = pipeline.RecordSet(records_dir, "test")
    outputs = inference.run_model(restored, test_set, progress=False)
    resolution = 40
    producer = inference.PrpExplainer(restored, test_set, resolution).chunk_maps
    render = functools.partial(
        frame.render_frame_maps, test_set, num_views=8, resolution=resolution
    )
    run = functools.partial(
        inference.run_perturbed, restored, test_set, inference.eval_forward(restored)
    )
    clean = chunk.Chunk(outputs, render, producer, run)
    assert (outputs.num_masks < 8).all()

    expected, winners = _independent_prp(restored, test_set, outputs.top_ids, resolution)
    ours = clean.explanations
    assert ours.maps.shape == (8, 5, resolution, resolution)
    scale = expected.max()
    np.testing.assert_allclose(ours.maps, expected, atol=1e-5 * scale, rtol=1e-4)
    np.testing.assert_array_equal(ours.mask, chunk.ExplanationMaps.from_relevance(expected).mask)
    for n in range(8):
        record = records_lib.ImageRecord.from_bytes(test_set.reader[n])
        for j in range(5):
            rows, cols = _box_pixels(record.boxes[winners[n, j] % record.num_masks], resolution)
            outside = np.ones((resolution, resolution), bool)
            outside[rows, cols] = False
            assert not ours.maps[n, j][outside].any() and ours.maps[n, j][rows, cols].any()

    # The same images after the continuity perturbation: PRP on the perturbed views.
    perturbation = continuity.ImagePerturbation()
    perturbed = clean.perturbed(perturbation).explanations
    spec = dataclasses.replace(restored.spec, image_transform=perturbation)
    expected, _ = _independent_prp(restored, test_set, outputs.top_ids, resolution, spec)
    np.testing.assert_allclose(perturbed.maps, expected, atol=1e-5 * expected.max(), rtol=1e-4)
    assert not np.allclose(perturbed.maps, ours.maps)


@pytest.mark.slow
def test_eval_json_with_prp_matches_metrics_of_independent_maps(trained):

    records_dir, workdir = trained
    config = tiny_config(records_dir)  # explanation_type "prp", rule "reference": the default
    resolution = 32
    results = evaluate.evaluate(config, workdir, resolution=resolution, progress=False)
    assert (results["explanation_type"], results["prp_rule"]) == ("prp", "reference")
    test_set = pipeline.RecordSet(records_dir, "test")
    restored = inference.restore_trained(config, workdir)
    independent, similarities = _independent(restored, test_set)
    top5 = chunk.top_indices(similarities, 5)
    maps, _ = _independent_prp(restored, test_set, top5, resolution)
    explanations = chunk.ExplanationMaps.from_relevance(maps)
    objects, decisive = [], []
    for i in range(len(test_set)):
        record = records_lib.ImageRecord.from_bytes(test_set.reader[i])
        part_map = records_lib.decode_label_map_png(record.part_map_png)
        objects.append(frame.to_frame(part_map > 0, resolution))
        parts = np.isin(part_map, np.asarray(record.decisive_parts) + 1)
        decisive.append(frame.to_frame(parts, resolution))
    objects, decisive = np.stack(objects), np.stack(decisive)

    sums = chunk.object_sums(explanations, objects)
    for name, values in complexity.object_metrics(sums).items():
        if name != "oirr":
            scale = 1 if name == "ior" else 100
            assert results["complexity"][name] == pytest.approx(scale * values.mean()), name
    whole_frame = explanations.mask.all(axis=(-2, -1)).mean()
    assert results["complexity"]["whole_frame_regions"] == pytest.approx(100 * whole_frame)
    group = results["contrastivity"]
    assert group["vlc"] == pytest.approx(
        100 * contrastivity.vlc_per_image(explanations.mask).mean()
    )
    vac = contrastivity.vac_per_image(contrastivity.sorted_maps(explanations))
    assert group["vac"] == pytest.approx(100 * vac.mean())
    # Faithfulness: the whole maps of the 3 largest contributions against the deciding part.
    last_layer = np.asarray(restored.state.params["last_layer"][...]).T
    outputs = SimpleNamespace(similarities=similarities, **independent)
    top3 = faithfulness.contribution_ids(outputs, last_layer, 3)
    maps, _ = _independent_prp(restored, test_set, top3, resolution)
    expected = faithfulness.relevance_terms(maps, decisive)
    for name, values in expected.items():
        assert results["faithfulness"][name] == pytest.approx(100 * values.mean()), name
    # The mask-based numbers do not depend on the explanation type.
    mask_terms = faithfulness.faithfulness_per_image(outputs, last_layer, *_masks(test_set))
    assert results["faithfulness"]["rate"] == pytest.approx(100 * mask_terms["hit_rate"].mean())
    assert results["complexity"]["ior"] != 1.0  # the mask explanation's IOR is exactly 1


def _masks(test_set, num_views=4, resolution=32):
    maps = frame.render_frame_maps(
        test_set, np.arange(len(test_set)), num_views=num_views, resolution=resolution
    )
    return maps.masks, maps.decisive_masks
