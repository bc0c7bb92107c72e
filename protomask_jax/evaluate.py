r"""Evaluates a trained run: ``python -m protomask_jax.evaluate --config C --workdir DIR``.

One pass of the jitted evaluation forward over a split collects, per image, the logits, the
similarity of every prototype's nearest view and the index of that view (the explanation).
The images' masks are then decoded from the records and rendered into one ``R x R`` frame of
the whole image, together with whatever ground truth the records carry, and every metric of
``protomask_jax/metrics.py`` that the data allows is computed. The result goes to
``DIR/eval.json`` and a table on stdout; ``docs/explanations.md`` says how to read it.

Options: ``--split test|train`` (default test), ``--checkpoint best|latest`` (default best: the
checkpoint the run's test accuracy reports), ``--resolution R`` (the pixel frame of the mask
metrics; default 64 on CPU, 224 — the reference's frame — on accelerators). Any config value
can be overridden as in training (``--config.input.eval_batch_size=128``).

Ground truth, where present (``docs/design.md``, record schema):

* object mask: ``gt/object_mask``; otherwise the union of the parts of ``gt/part_map``;
  otherwise the union of the ``gt/object_boxes`` (Stanford Dogs and Cars ship only boxes);
* part keypoints: ``gt/keypoints``; otherwise one point per part of ``gt/part_map``: the part
  pixel farthest from the part's boundary (a point that always lies on the part, unlike the
  centroid of a forked tail);
* decisive parts: ``gt/part_map`` + ``gt/decisive_parts`` (the synthetic parts world), which
  enables the explanation-faithfulness metric.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image
from tqdm.auto import tqdm

from protomask_jax import config_checks
from protomask_jax import metrics as metrics_lib
from protomask_jax import sharding as sharding_lib
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from protomask_jax.models import protomask as model_lib

EVAL_FILE = "eval.json"
CONTRASTIVITY_K = 5  # reference: top-5 prototypes by similarity (§7.4, §7.7)
FAITHFULNESS_K = 3  # metrics.explanation_faithfulness default
TOP_CLASSES_K = 3  # top-3 accuracy
# Images whose masks are held at once by the pixel metrics: 128 x 11 masks at 224 px is
# ~70 MB as bool and ~280 MB in the float32 copies the pixel counts use.
_PIXEL_CHUNK = 128


def default_resolution() -> int:
    """The mask frame ``R``: 224 (the reference's frame) on accelerators, 64 on CPU."""
    return 64 if jax.default_backend() == "cpu" else 224


# ================================================================== model outputs


@dataclasses.dataclass
class EvalOutputs:
    """What one forward pass over a split gives, as host arrays in record order.

    Only real images (no filler rows). N images, C classes, P prototypes.

    Attributes:
      record_indices: int64 ``[N]`` indices into the split's :class:`~pipeline.RecordSet`.
      image_ids: int64 ``[N]``.
      labels: int64 ``[N]``.
      logits: float32 ``[N, C]``.
      min_distances: float32 ``[N, P]``.
      similarities: float32 ``[N, P]`` log-similarity of each prototype's nearest view.
      winning_view: int32 ``[N, P]`` index ``k`` of that view (it shows mask
        ``k % num_masks``).
      num_masks: int32 ``[N]`` masks the views showed (``min(masks/count, num_views)``).
    """

    record_indices: np.ndarray
    image_ids: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    min_distances: np.ndarray
    similarities: np.ndarray
    winning_view: np.ndarray
    num_masks: np.ndarray


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) global array as one numpy array."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_model(
    trained,
    record_set: pipeline.RecordSet,
    record_indices: Sequence[int] | np.ndarray | None = None,
    *,
    progress: bool = True,
) -> EvalOutputs:
    """One pass of the evaluation forward (no augmentation) over ``record_indices``.

    Args:
      trained: a :class:`~protomask_jax.trainer.TrainedModel`.
      record_set: the split's records.
      record_indices: which records (default: all), visited in the given order.
      progress: show a progress bar.

    Returns:
      :class:`EvalOutputs` in the order of ``record_indices``.
    """
    config = trained.config
    if record_indices is None:
        record_indices = record_set.good
    record_indices = np.asarray(record_indices, np.int64)
    if len(record_indices) == 0:
        raise ValueError(f"no images to evaluate in split '{record_set.split}'")
    sharding_lib.check_batch_divisible(
        config.input.eval_batch_size, trained.mesh, "input.eval_batch_size"
    )
    eval_fn = trained.eval_fn()
    state = trained.state
    collected: dict[str, list] = {
        key: []
        for key in ("logits", "min_distances", "winning_view", "label", "image_id", "weight")
    }
    collected["num_masks"] = []
    bar = tqdm(
        total=-(-len(record_indices) // config.input.eval_batch_size),
        desc=f"evaluating {record_set.split}",
        unit="batch",
        disable=not progress,
        leave=False,
    )
    try:
        for batch in trained.eval_batches(record_set, record_indices):
            outputs = eval_fn(state.params, state.batch_stats, state.constants, batch)
            collected["logits"].append(outputs.logits)
            collected["min_distances"].append(outputs.min_distances)
            collected["winning_view"].append(outputs.winning_view)
            for key in ("label", "image_id", "weight", "num_masks"):
                collected[key].append(batch[key])
            bar.update(1)
    finally:
        bar.close()
    host = {key: np.concatenate([to_host(x) for x in xs]) for key, xs in collected.items()}
    real = host["weight"] > 0
    image_ids = host["image_id"][real].astype(np.int64)
    expected_ids = record_set.image_ids[record_indices]
    if not np.array_equal(image_ids, expected_ids):
        raise RuntimeError(
            f"evaluation stream of {record_set.records_dir} returned images in an unexpected "
            f"order (first ids {image_ids[:5].tolist()}, expected {expected_ids[:5].tolist()})"
        )
    min_distances = host["min_distances"][real].astype(np.float32)
    similarities = np.asarray(
        model_lib.log_similarity(min_distances, config.model.similarity_eps), np.float32
    )
    return EvalOutputs(
        record_indices=record_indices,
        image_ids=image_ids,
        labels=host["label"][real].astype(np.int64),
        logits=host["logits"][real].astype(np.float32),
        min_distances=min_distances,
        similarities=similarities,
        winning_view=host["winning_view"][real].astype(np.int32),
        num_masks=host["num_masks"][real].astype(np.int32),
    )


@dataclasses.dataclass
class ModelArrays:
    """The trained head as host arrays.

    Attributes:
      last_layer: float32 ``W [C, P]`` (the model stores ``W^T``).
      prototypes: float32 ``[P, D]``.
      prototype_class: int32 ``[P]``.
    """

    last_layer: np.ndarray
    prototypes: np.ndarray
    prototype_class: np.ndarray


def model_arrays(trained) -> ModelArrays:
    """Last layer, prototypes and prototype classes of a restored model (host copies)."""
    params, constants = trained.state.params, trained.state.constants
    return ModelArrays(
        last_layer=to_host(params["last_layer"][...]).T.astype(np.float32),
        prototypes=to_host(params["prototypes"][...]).astype(np.float32),
        prototype_class=to_host(constants["prototype_class"][...]).astype(np.int32),
    )


# ====================================================================== pixel frame


def to_frame(mask: np.ndarray, resolution: int) -> np.ndarray:
    """Renders a full-resolution ``[H, W]`` bool mask into the ``R x R`` frame.

    Each frame pixel averages the image pixels it covers (PIL's box filter) and is set when
    at least half of them are, so a mask keeps its area up to rounding at any ``R``.

    Args:
      mask: bool ``[H, W]``.
      resolution: R.

    Returns:
      bool ``[R, R]``.
    """
    image = Image.fromarray(np.asarray(mask, np.uint8) * 255, mode="L")
    return np.asarray(image.resize((resolution, resolution), Image.BOX)) >= 128


def boxes_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """The union of normalised yxyx boxes as a bool ``[H, W]`` mask: a pixel is in a box when
    its centre is (half-open box edges, as the record's mask boxes).

    Args:
      boxes: ``[M, 4]`` normalised ``(y0, x0, y1, x1)``.
      height, width: H, W.

    Returns:
      bool ``[H, W]``.
    """
    rows = (np.arange(height) + 0.5) / height
    cols = (np.arange(width) + 0.5) / width
    mask = np.zeros((height, width), bool)
    for y0, x0, y1, x1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        mask |= ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]
    return mask


def part_keypoints(part_map: np.ndarray, num_parts: int) -> np.ndarray:
    """One keypoint per part of a label map, for datasets with part maps but no keypoints.

    The point of part ``p`` is the pixel of ``p`` farthest from the part's boundary (the
    maximum of its Euclidean distance transform; first such pixel in row-major order). Unlike
    the centroid it always lies on the part, also for non-convex parts.

    Args:
      part_map: uint8 ``[H, W]``, 0 background, ``p + 1`` for part ``p``.
      num_parts: Q.

    Returns:
      float32 ``[Q, 3]``: ``(y, x, visible)`` with ``y, x`` the pixel centre normalised to
      ``[0, 1]``; ``(-1, -1, 0)`` for parts absent from the map.
    """
    from scipy import ndimage

    height, width = part_map.shape
    keypoints = np.tile(np.array([-1.0, -1.0, 0.0], np.float32), (num_parts, 1))
    for part in np.unique(part_map):
        part_id = int(part) - 1
        if part_id < 0 or part_id >= num_parts:
            continue
        # Pad so a part touching the image edge has its boundary there too.
        inside = np.pad(part_map == part, 1)
        depth = ndimage.distance_transform_edt(inside)[1:-1, 1:-1]
        row, col = np.unravel_index(np.argmax(depth), depth.shape)
        keypoints[part_id] = ((row + 0.5) / height, (col + 0.5) / width, 1.0)
    return keypoints


@dataclasses.dataclass
class FrameMaps:
    """Masks and ground truth of N images in the common ``R x R`` frame.

    Attributes:
      masks: bool ``[N, K, R, R]``: the first ``num_masks[n]`` slots hold the masks the
        views showed (largest first); later slots are empty.
      object_masks: bool ``[N, R, R]`` (empty where ``has_object`` is False).
      decisive_masks: bool ``[N, R, R]`` (empty where ``has_decisive`` is False).
      keypoints: float32 ``[N, Q, 3]`` ``(y, x, visible)`` (all invisible where
        ``has_keypoints`` is False).
      has_object, has_decisive, has_keypoints: bool ``[N]``.
      object_sources, keypoint_sources: which record fields the ground truth came from.
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


OBJECT_FROM_FIELD = "gt/object_mask"
OBJECT_FROM_PARTS = "union of the parts of gt/part_map"
OBJECT_FROM_BOXES = "union of the gt/object_boxes"
KEYPOINTS_FROM_FIELD = "gt/keypoints"
KEYPOINTS_FROM_PARTS = "one point per part of gt/part_map (deepest part pixel)"


def render_frame_maps(
    record_set: pipeline.RecordSet,
    record_indices: np.ndarray,
    num_views: int,
    resolution: int,
    num_parts: int = 0,
) -> FrameMaps:
    """Decodes records and renders their masks and ground truth into the ``R x R`` frame.

    Args:
      record_set: the split's records.
      record_indices: int ``[N]`` which records.
      num_views: K (``input.num_views``): an image with more masks showed only the first K.
      resolution: R.
      num_parts: Q for keypoints derived from part maps (``part_names`` of the dataset
        info); records with ``gt/keypoints`` define their own Q. Padded to the largest Q.

    Returns:
      :class:`FrameMaps`.
    """
    count = len(record_indices)
    frame = (resolution, resolution)
    masks = np.zeros((count, num_views, *frame), bool)
    object_masks = np.zeros((count, *frame), bool)
    decisive_masks = np.zeros((count, *frame), bool)
    has_object, has_decisive, has_keypoints = (np.zeros(count, bool) for _ in range(3))
    keypoint_rows: list[np.ndarray | None] = []
    object_sources: set[str] = set()
    keypoint_sources: set[str] = set()
    for n, index in enumerate(np.asarray(record_indices)):
        path, offset = record_set.reader.locate(int(index))
        where = f"{path} at byte offset {offset}"
        record = records_lib.ImageRecord.from_bytes(record_set.reader[int(index)], where)
        if len(record.mask_pngs) < min(record.num_masks, num_views):
            raise records_lib.RecordError(
                f"{where} (image id {record.image_id}): the record has no mask images "
                "(masks/encoded); re-export the dataset to evaluate explanations."
            )
        for k in range(min(record.num_masks, num_views)):
            masks[n, k] = to_frame(records_lib.decode_mask_png(record.mask_pngs[k]), resolution)
        part_map = (
            None
            if record.part_map_png is None
            else records_lib.decode_label_map_png(record.part_map_png)
        )
        if record.object_mask_png is not None:
            object_masks[n] = to_frame(
                records_lib.decode_mask_png(record.object_mask_png), resolution
            )
            has_object[n] = True
            object_sources.add(OBJECT_FROM_FIELD)
        elif part_map is not None:
            object_masks[n] = to_frame(part_map > 0, resolution)
            has_object[n] = True
            object_sources.add(OBJECT_FROM_PARTS)
        elif record.object_boxes is not None and len(record.object_boxes):
            # The frame is the whole image squashed to R x R, so the image's own size only
            # decides which pixels the box edges cut (records without a size: the frame's).
            height, width = (record.height, record.width) if record.height else frame
            object_masks[n] = to_frame(boxes_mask(record.object_boxes, height, width), resolution)
            has_object[n] = True
            object_sources.add(OBJECT_FROM_BOXES)
        if part_map is not None and record.decisive_parts is not None:
            decisive = metrics_lib.decisive_part_masks(
                part_map[None], np.asarray(record.decisive_parts)[None]
            )[0]
            decisive_masks[n] = to_frame(decisive, resolution)
            has_decisive[n] = True
        if record.keypoints is not None:
            keypoint_rows.append(np.asarray(record.keypoints, np.float32).reshape(-1, 3))
            keypoint_sources.add(KEYPOINTS_FROM_FIELD)
        elif part_map is not None and num_parts > 0:
            keypoint_rows.append(part_keypoints(part_map, num_parts))
            keypoint_sources.add(KEYPOINTS_FROM_PARTS)
        else:
            keypoint_rows.append(None)
        has_keypoints[n] = keypoint_rows[-1] is not None
    num_points = max([len(row) for row in keypoint_rows if row is not None], default=0)
    keypoints = np.tile(np.array([-1.0, -1.0, 0.0], np.float32), (count, num_points, 1))
    for n, row in enumerate(keypoint_rows):
        if row is not None:
            keypoints[n, : len(row)] = row
    return FrameMaps(
        masks=masks,
        object_masks=object_masks,
        decisive_masks=decisive_masks,
        keypoints=keypoints,
        has_object=has_object,
        has_decisive=has_decisive,
        has_keypoints=has_keypoints,
        object_sources=object_sources,
        keypoint_sources=keypoint_sources,
    )


# ========================================================================== metrics


def _nan_to_none(value: Any) -> Any:
    """JSON has no nan/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(v) for key, v in value.items()}
    return value


def compute_metrics(
    outputs: EvalOutputs,
    arrays: ModelArrays,
    record_set: pipeline.RecordSet,
    *,
    num_views: int,
    resolution: int,
    num_parts: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Every metric the data allows, from one pass's outputs and the split's records.

    Pixel metrics run over chunks of images (their masks are rendered, used and dropped)
    and are reduced at the end exactly as the metric functions reduce whole arrays.

    Args:
      outputs: from :func:`run_model`.
      arrays: from :func:`model_arrays`.
      record_set: the split the outputs came from.
      num_views: K.
      resolution: R of the mask frame.
      num_parts: Q for keypoints derived from part maps.
      progress: show a progress bar.

    Returns:
      A dict of metric groups (see ``docs/explanations.md``); groups whose ground truth is
      missing are absent.
    """
    logits, labels = outputs.logits, outputs.labels
    num_images, num_classes = logits.shape
    num_prototypes = arrays.last_layer.shape[1]
    results: dict[str, Any] = {
        "classification": {
            "top1_accuracy": metrics_lib.top1_accuracy(logits, labels),
            f"top{min(TOP_CLASSES_K, num_classes)}_accuracy": metrics_lib.topk_accuracy(
                logits, labels, k=min(TOP_CLASSES_K, num_classes)
            ),
            "balanced_accuracy": metrics_lib.balanced_accuracy(logits, labels),
            "macro_f1": metrics_lib.macro_f1(logits, labels),
        },
        "compactness": {
            "epsilon": metrics_lib.COMPACTNESS_EPSILON,
            "global_explanation_size": metrics_lib.global_explanation_size(arrays.last_layer),
            "classification_sparsity": metrics_lib.classification_sparsity(arrays.last_layer),
            "negative_positive_ratio": metrics_lib.negative_positive_reasoning_ratio(
                arrays.last_layer
            ),
        },
    }
    top_k = min(CONTRASTIVITY_K, num_prototypes)
    top_ids = metrics_lib.top_prototypes(outputs.similarities, top_k)
    faithful_k = min(FAITHFULNESS_K, num_prototypes)

    vlc, object_maps, decisive_rows = [], [], []
    overlaps = {name: [] for name in ("object_overlap", "background_overlap", "iou", "ior", "oirr")}
    part_ids, part_hits = [], []
    faithfulness_terms: list[dict[str, np.ndarray]] = []
    object_sources: set[str] = set()
    keypoint_sources: set[str] = set()
    starts = range(0, num_images, _PIXEL_CHUNK)
    for start in tqdm(starts, desc="mask metrics", unit="chunk", disable=not progress, leave=False):
        rows = slice(start, start + _PIXEL_CHUNK)
        maps = render_frame_maps(
            record_set, outputs.record_indices[rows], num_views, resolution, num_parts
        )
        object_sources |= maps.object_sources
        keypoint_sources |= maps.keypoint_sources
        explanations = metrics_lib.explanation_masks(
            outputs.winning_view[rows], maps.masks, outputs.num_masks[rows], top_ids[rows]
        )
        if top_k >= 2:
            vlc.append(metrics_lib.vlc_per_image(explanations))
        with_object = maps.has_object
        if with_object.any():
            shown, regions = explanations[with_object], maps.object_masks[with_object]
            overlaps["object_overlap"].append(metrics_lib.object_overlap_per_map(shown, regions))
            overlaps["background_overlap"].append(
                metrics_lib.background_overlap_per_map(shown, regions)
            )
            overlaps["iou"].append(metrics_lib.iou_per_map(shown, regions))
            overlaps["ior"].append(metrics_lib.inside_outside_relevance_per_map(shown, regions))
            overlaps["oirr"].append(
                metrics_lib.outside_inside_relevance_ratio_per_map(shown, regions)
            )
            object_maps.append(int(with_object.sum()))
        with_points = maps.has_keypoints
        if with_points.any():
            part_ids.append(top_ids[rows][with_points])
            part_hits.append(
                metrics_lib.keypoints_on_masks(
                    explanations[with_points], maps.keypoints[with_points]
                )
            )
        with_decisive = maps.has_decisive
        if with_decisive.any():
            chunk = np.flatnonzero(with_decisive)
            picked = np.arange(num_images)[rows][chunk]
            faithfulness_terms.append(
                metrics_lib.faithfulness_per_image(
                    outputs.similarities[picked],
                    arrays.last_layer,
                    logits[picked],
                    labels[picked],
                    outputs.winning_view[picked],
                    maps.masks[chunk],
                    outputs.num_masks[picked],
                    maps.decisive_masks[chunk],
                    k=faithful_k,
                )
            )
            decisive_rows.append(len(chunk))

    contrastivity: dict[str, Any] = {"k": top_k}
    if top_k >= 2:
        contrastivity["vlc"] = float(100.0 * np.concatenate(vlc).mean())
        contrastivity["intra_prototype_distance"] = metrics_lib.intra_prototype_distance(
            arrays.prototypes, top_ids
        )
        contrastivity["inter_prototype_distance"] = metrics_lib.inter_prototype_distance(
            arrays.prototypes, top_ids, labels, num_classes
        )
    results["contrastivity"] = contrastivity

    if object_maps or part_ids:
        complexity: dict[str, Any] = {"k": top_k}
        if object_maps:
            values = {name: np.concatenate(parts) for name, parts in overlaps.items()}
            finite_oirr = values["oirr"][np.isfinite(values["oirr"])]
            complexity.update(
                {
                    "num_images": sum(object_maps),
                    "object_mask": " + ".join(sorted(object_sources)),
                    "object_overlap": float(100.0 * values["object_overlap"].mean()),
                    "background_overlap": float(100.0 * values["background_overlap"].mean()),
                    "iou": float(100.0 * values["iou"].mean()),
                    "ior": float(values["ior"].mean()),
                    "oirr": float(finite_oirr.mean()) if finite_oirr.size else float("nan"),
                }
            )
        if part_ids:
            complexity["part_consistency"] = metrics_lib.part_consistency(
                np.concatenate(part_ids), np.concatenate(part_hits), num_prototypes
            )
            complexity["keypoints"] = " + ".join(sorted(keypoint_sources))
            complexity["num_images_with_keypoints"] = int(sum(len(ids) for ids in part_ids))
        results["complexity"] = complexity

    if faithfulness_terms:
        terms = {
            key: np.concatenate([t[key] for t in faithfulness_terms])
            for key in faithfulness_terms[0]
        }
        results["faithfulness"] = {
            "k": faithful_k,
            "num_images": sum(decisive_rows),
            **metrics_lib.summarize_faithfulness(terms),
        }
    return results


# ======================================================================== the driver


def require_single_label(config) -> None:
    """Evaluation and explanations are single-label (the host pipeline feeds the first label
    of a multi-label record); refuse multi-label configs with a clear message."""
    if config.dataset.multi_label:
        raise config_checks.ConfigError(
            "config.dataset.multi_label: evaluation and explanations support single-label "
            "datasets only (the host pipeline feeds the first label of a multi-label record)."
        )


def evaluate(
    config,
    workdir: str | Path,
    *,
    split: str = "test",
    checkpoint: str = "best",
    resolution: int | None = None,
    config_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluates the model a run left in ``workdir`` and writes ``workdir/eval.json``.

    Args:
      config: the run's config.
      workdir: the run's output folder.
      split: which split of ``config.dataset.records_dir`` to evaluate.
      checkpoint: ``"best"`` (best on validation, as the run's test accuracy) or ``"latest"``.
      resolution: R of the mask frame (default :func:`default_resolution`).
      config_name: recorded in eval.json (e.g. the config file's path).
      progress: show progress bars.

    Returns:
      The dict written to eval.json (nan/inf written as null).
    """
    from protomask_jax import trainer

    require_single_label(config)
    workdir = Path(workdir)
    resolution = default_resolution() if resolution is None else int(resolution)
    if resolution < 4:
        raise ValueError(f"--resolution must be >= 4 pixels, got {resolution}")
    info = records_lib.load_dataset_info(config.dataset.records_dir)
    config_checks.check_dataset_info(config, info)
    trained = trainer.restore_trained(config, workdir, which=checkpoint)
    record_set = pipeline.RecordSet(
        config.dataset.records_dir, split, skip_bad_records=config.input.skip_bad_records
    )
    outputs = run_model(trained, record_set, progress=progress)
    arrays = model_arrays(trained)
    metrics = compute_metrics(
        outputs,
        arrays,
        record_set,
        num_views=config.input.num_views,
        resolution=resolution,
        num_parts=len(info.get("part_names") or []),
        progress=progress,
    )
    results = {
        "split": split,
        "checkpoint": trained.checkpoint,
        "config": config_name or "",
        "dataset": info.get("dataset", config.dataset.name),
        "num_images": int(len(outputs.labels)),
        "num_classes": int(config.dataset.num_classes),
        "num_prototypes": int(arrays.last_layer.shape[1]),
        "resolution": resolution,
        **metrics,
    }
    results = _nan_to_none(results)
    if jax.process_index() == 0:
        records_lib.write_json_atomic(workdir / EVAL_FILE, results)
    return results


def load_eval(workdir: str | Path) -> dict[str, Any] | None:
    """``workdir/eval.json`` if it exists."""
    path = Path(workdir) / EVAL_FILE
    return json.loads(path.read_text()) if path.exists() else None


# (key in the results, label, unit) per section, in display order.
_TABLE = (
    (
        "classification",
        "Classification",
        (
            ("top1_accuracy", "top-1 accuracy", "%"),
            ("top3_accuracy", "top-3 accuracy", "%"),
            ("top2_accuracy", "top-2 accuracy", "%"),
            ("balanced_accuracy", "balanced accuracy", "%"),
            ("macro_f1", "macro F1", "%"),
        ),
    ),
    (
        "compactness",
        "Compactness (epsilon = {epsilon})",
        (
            ("global_explanation_size", "global explanation size", "prototypes"),
            ("classification_sparsity", "classification sparsity", "%"),
            ("negative_positive_ratio", "negative/positive reasoning ratio", ""),
        ),
    ),
    (
        "contrastivity",
        "Contrastivity (top-{k} prototypes per image)",
        (
            ("vlc", "VLC (mask)", "%"),
            ("intra_prototype_distance", "intra prototype distance", "1 - cos"),
            ("inter_prototype_distance", "inter prototype distance", "1 - cos"),
        ),
    ),
    (
        "complexity",
        "Ground truth (top-{k} prototypes per image)",
        (
            ("object_overlap", "object overlap", "%"),
            ("background_overlap", "background overlap", "%"),
            ("iou", "IoU with the object", "%"),
            ("ior", "inside-outside relevance (IOR)", ""),
            ("oirr", "outside/inside relevance ratio", ""),
            ("part_consistency", "part consistency", "%"),
        ),
    ),
    (
        "faithfulness",
        "Explanation faithfulness (top-{k} contributions to the prediction)",
        (
            ("rate", "explanations on the deciding part", "%"),
            ("chance_rate", "  chance level (a random mask)", "%"),
            ("rate_correct", "  on correctly classified images", "%"),
            ("overlap", "mean overlap with the deciding part", "%"),
            ("chance_overlap", "  chance level (a random mask)", "%"),
        ),
    ),
)


def table_rows(results: dict[str, Any]) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The metrics of :func:`evaluate` as ``(section title, [(label, value, unit)])``.

    Sections whose metrics are absent (no ground truth) are left out; missing values
    (nan in the computation, null in eval.json) read ``n/a``.
    """
    sections = []
    for key, title, rows in _TABLE:
        group = results.get(key)
        if not group:
            continue
        formatted = []
        for name, label, unit in rows:
            if name not in group:
                continue
            value = group[name]
            if value is None:
                text = "n/a"
            elif isinstance(value, int):
                text = f"{value:d}"
            else:
                text = f"{value:.2f}" if unit == "%" else f"{value:.4f}"
            formatted.append((label, text, unit))
        if formatted:
            sections.append((title.format(**group), formatted))
    return sections


def format_table(results: dict[str, Any]) -> str:
    """The metrics of :func:`evaluate` as an aligned text table for a person."""
    lines = [
        f"{results.get('dataset', '')} / {results['split']}: {results['num_images']} images, "
        f"{results['num_prototypes']} prototypes, {results['checkpoint']}, "
        f"mask frame {results['resolution']}x{results['resolution']}"
    ]
    for title, rows in table_rows(results):
        lines += ["", title, "-" * 64]
        lines += [f"  {label:<44}{text:>10} {unit}" for label, text, unit in rows]
    complexity = results.get("complexity") or {}
    if "object_mask" in complexity:
        lines.append(f"  object mask: {complexity['object_mask']}")
    if "keypoints" in complexity:
        lines.append(f"  keypoints: {complexity['keypoints']}")
    return "\n".join(lines)


# ============================================================================= CLI


def main(argv: list[str]) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/demo.py")
    if not flags.FLAGS.workdir:
        raise app.UsageError("--workdir is required (the training run's output folder)")
    from protomask_jax.logs import setup_cli_logging

    setup_cli_logging()
    try:
        results = evaluate(
            config,
            flags.FLAGS.workdir,
            split=flags.FLAGS.split,
            checkpoint=flags.FLAGS.checkpoint,
            resolution=flags.FLAGS.resolution or None,
            config_name=config_flags.get_config_filename(flags.FLAGS["config"]),
        )
    except (FileNotFoundError, ValueError) as e:  # ConfigError, RecordError, bad batch size
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(f"\nwritten: {Path(flags.FLAGS.workdir) / EVAL_FILE}")
    return 0


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file of the run, e.g. configs/demo.py.", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "The training run's output folder.")
    flags.DEFINE_enum("split", "test", ["test", "train"], "Split to evaluate.")
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Checkpoint to evaluate.")
    flags.DEFINE_integer(
        "resolution", 0, "Mask frame R for the pixel metrics (0: 64 on CPU, 224 otherwise)."
    )


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
