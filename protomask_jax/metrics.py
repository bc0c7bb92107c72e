"""Evaluation metrics of ProtoMask, vectorised over images, prototypes, views and pixels.

The definitions follow the reference (``shared/reference/protomask-reference.md`` §1.7, §6, §7);
every function's docstring states the reference definition and any deliberate difference. One
metric is new: :func:`explanation_faithfulness` (see ``docs/metrics.md``).

Conventions (the evaluation driver must follow them):

* Arrays may be numpy or jax; everything is computed on the host in numpy (float64 for
  ratios, float32 matrix products for pixel counts, which are exact below 2**24 pixels).
* ``logits [N, C]`` float, ``labels [N]`` int (single-label) or ``[N, C]`` {0, 1}
  (multi-label), ``similarities [N, P]`` the log-similarity of each prototype's nearest view,
  ``winning_view [N, P]`` int (view index ``k``; with cyclic padding view ``k`` shows mask
  ``k % num_masks``), ``last_layer [C, P]`` the last-layer weight ``W``.
* Masks live in one common ``R x R`` frame of the whole image: ``masks [N, Kmax, R, R]``
  (bool or {0, 1}; slots ``>= num_masks[n]`` are ignored), largest first as in the records.
  ``num_masks[n]`` must count the masks the model's views showed: ``min(masks/count,
  input.num_views)`` when an image has more masks than views. ``object_masks [N, R, R]``,
  ``part_map [N, R, R]`` (0 background, ``p + 1`` part ``p``).
* ``keypoints [N, Q, 3]``: ``(y, x, visible)`` with ``y, x`` normalised to ``[0, 1]`` of the
  frame, row ``q`` = part id ``q``. A keypoint counts when ``visible > 0`` and ``y, x >= 0``;
  it lies on pixel ``(min(floor(y R), R - 1), min(floor(x R), R - 1))``.
* Scales follow the reference: accuracies, F1, sparsity, VLC, overlaps, IoU, part consistency
  and faithfulness are percentages; Intra/Inter PD, IOR, OIRR and NPR are raw values, mask
  consistency a fraction, the global explanation size a count.

The heavy pixel metrics have ``*_per_image`` / ``*_per_map`` forms so a driver can compute them
batch by batch and average at the end (each scalar form says how it reduces them).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

COMPACTNESS_EPSILON = 1e-3  # reference ε for global size, sparsity and NPR (§7.3)
COSINE_DISTANCE_FLOOR = 1e-5  # Intra PD: distances below this count as 0 (reference)
_NORM_EPSILON = 1e-8  # torch.cosine_similarity's guard against zero-length vectors


# ------------------------------------------------------------------------------------ helpers


def _labels_1d(labels: ArrayLike, num_samples: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != num_samples:
        raise ValueError(
            f"labels must be int [N={num_samples}] for single-label metrics, got shape "
            f"{labels.shape}; pass multi-hot [N, C] labels to the multilabel_* functions."
        )
    return labels.astype(np.int64)


def _logits_2d(logits: ArrayLike) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {logits.shape}")
    return logits


def _binary(masks: ArrayLike) -> np.ndarray:
    return np.asarray(masks) != 0


def _pixel_counts(masks: np.ndarray) -> np.ndarray:
    """Number of set pixels of each ``[..., R, R]`` mask, as float64 ``[...]``."""
    return np.count_nonzero(masks, axis=(-2, -1)).astype(np.float64)


def _flat_float(masks: np.ndarray) -> np.ndarray:
    """``[..., R, R]`` bool -> ``[..., R*R]`` float32, for pixel counts by matrix product."""
    return masks.reshape(*masks.shape[:-2], -1).astype(np.float32)


def _divide(numerator: np.ndarray, denominator: np.ndarray, empty_value: float) -> np.ndarray:
    """``numerator / denominator`` with ``empty_value`` where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    safe = np.where(denominator == 0, 1.0, denominator)
    return np.where(denominator == 0, empty_value, numerator / safe)


def _top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores per row, largest first; ties: lower index first."""
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k={k} must lie in [1, {scores.shape[1]}] (the number of prototypes)")
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def predict_labels(logits: ArrayLike) -> np.ndarray:
    """Single-label prediction: ``argmax`` of the logits (= argmax of the softmax).

    Args:
        logits: ``[N, C]``.

    Returns:
        int64 ``[N]``; ties go to the lowest class index.
    """
    return np.argmax(_logits_2d(logits), axis=1)


def balanced_sample_weights(labels: ArrayLike) -> np.ndarray:
    """The reference's "balanced" sample weights (§7.2): ``1 / freq(class)``.

    Single-label: ``w_n = N / n_{y_n}``. Multi-label (``labels [N, C]`` multi-hot):
    ``w_n = sum over positive classes c of N / n_c``. The reference adds 1e-8 to the frequency;
    we do not (only classes with ``n_c > 0`` ever receive weight, so it never divides by 0).

    Args:
        labels: int ``[N]`` or multi-hot ``[N, C]``.

    Returns:
        float64 ``[N]``.
    """
    labels = np.asarray(labels)
    num_samples = labels.shape[0]
    if labels.ndim == 1:
        counts = np.bincount(labels.astype(np.int64))
        return num_samples / counts[labels.astype(np.int64)].astype(np.float64)
    targets = (labels != 0).astype(np.float64)
    counts = targets.sum(axis=0)
    class_weights = _divide(num_samples, counts, 0.0)
    return targets @ class_weights


# ----------------------------------------------------------------------------- classification


def top1_accuracy(logits: ArrayLike, labels: ArrayLike, balanced: bool = False) -> float:
    """Top-1 accuracy in percent.

    Reference (§7.2): ``sklearn.accuracy_score`` on the argmax, with ``balanced=True`` sample
    weights ``1 / freq(class)`` in the reported numbers. With those weights the accuracy equals
    :func:`balanced_accuracy` (the mean recall over classes present in ``labels``) up to the
    reference's 1e-8 frequency offset, so the reference's "Accuracy" is the balanced accuracy.

    Args:
        logits: ``[N, C]``.
        labels: int ``[N]``.
        balanced: weight samples by :func:`balanced_sample_weights`.

    Returns:
        Accuracy in ``[0, 100]``.
    """
    logits = _logits_2d(logits)
    labels = _labels_1d(labels, logits.shape[0])
    correct = (np.argmax(logits, axis=1) == labels).astype(np.float64)
    weights = balanced_sample_weights(labels) if balanced else None
    return float(100.0 * np.average(correct, weights=weights))


def topk_accuracy(
    logits: ArrayLike, labels: ArrayLike, k: int = 3, balanced: bool = False
) -> float:
    """Top-k accuracy in percent: the true class is among the ``k`` highest logits.

    Reference (§7.2): ``sklearn.top_k_accuracy_score`` (k=3, balanced sample weights in the
    reported numbers). Difference: with tied logits a sample counts as correct when fewer than
    ``k`` classes score strictly higher than the true class (sklearn breaks ties by index).

    Args:
        logits: ``[N, C]``.
        labels: int ``[N]``.
        k: number of top classes.
        balanced: weight samples by :func:`balanced_sample_weights`.

    Returns:
        Accuracy in ``[0, 100]``.
    """
    logits = _logits_2d(logits)
    labels = _labels_1d(labels, logits.shape[0])
    true_logit = np.take_along_axis(logits, labels[:, None], axis=1)
    num_higher = np.count_nonzero(logits > true_logit, axis=1)
    hits = (num_higher < k).astype(np.float64)
    weights = balanced_sample_weights(labels) if balanced else None
    return float(100.0 * np.average(hits, weights=weights))


def balanced_accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Balanced accuracy in percent: mean over classes present in ``labels`` of the recall.

    Classes with no test sample are excluded (their recall is undefined), as in
    ``sklearn.balanced_accuracy_score``.

    Args:
        logits: ``[N, C]``.
        labels: int ``[N]``.

    Returns:
        Balanced accuracy in ``[0, 100]``.
    """
    logits = _logits_2d(logits)
    labels = _labels_1d(labels, logits.shape[0])
    num_classes = logits.shape[1]
    correct = np.argmax(logits, axis=1) == labels
    per_class_total = np.bincount(labels, minlength=num_classes)
    per_class_correct = np.bincount(labels, weights=correct, minlength=num_classes)
    present = per_class_total > 0
    return float(100.0 * np.mean(per_class_correct[present] / per_class_total[present]))


def macro_f1(logits: ArrayLike, labels: ArrayLike, balanced: bool = False) -> float:
    """Macro-averaged F1 in percent.

    ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``, averaged over the classes that occur in
    ``labels`` or in the predictions; classes absent from both are excluded (they have no F1),
    classes present in only one of them score 0. This is ``sklearn.f1_score(average="macro",
    zero_division=0)``, which the reference uses (§7.2). With ``balanced=True`` every sample adds
    its weight (:func:`balanced_sample_weights`, by its *true* class) instead of 1 to TP, FP and
    FN, as the reference's reported F1 does.

    Args:
        logits: ``[N, C]``.
        labels: int ``[N]``.
        balanced: weight samples by :func:`balanced_sample_weights`.

    Returns:
        Macro F1 in ``[0, 100]``.
    """
    logits = _logits_2d(logits)
    labels = _labels_1d(labels, logits.shape[0])
    num_classes = logits.shape[1]
    predictions = np.argmax(logits, axis=1)
    weights = balanced_sample_weights(labels) if balanced else np.ones(labels.shape[0])
    confusion = np.bincount(
        labels * num_classes + predictions, weights=weights, minlength=num_classes**2
    ).reshape(num_classes, num_classes)
    true_positive = np.diag(confusion)
    false_positive = confusion.sum(axis=0) - true_positive
    false_negative = confusion.sum(axis=1) - true_positive
    f1 = _divide(2 * true_positive, 2 * true_positive + false_positive + false_negative, 0.0)
    occurring = (np.bincount(labels, minlength=num_classes) > 0) | (
        np.bincount(predictions, minlength=num_classes) > 0
    )
    return float(100.0 * np.mean(f1[occurring]))


def multilabel_threshold(logits: ArrayLike, labels: ArrayLike) -> float:
    """The reference's multi-label decision threshold (§7.2, ``threshold`` technique).

    ``(mean TP logit + mean TN logit) / 2`` where the mean TP logit is the mean over samples of
    the mean logit of the sample's positive classes, and the mean TN logit the same over its
    negative classes. Difference: samples without positives (resp. negatives) are left out of
    that mean; the reference instead adds 1 to *every* sample's positive count as soon as one
    sample has none.

    Args:
        logits: ``[N, C]``.
        labels: multi-hot ``[N, C]``.

    Returns:
        The threshold; predict class ``c`` when ``logit > threshold``.
    """
    logits = _logits_2d(logits)
    targets = np.asarray(labels) != 0
    if targets.shape != logits.shape:
        raise ValueError(f"labels must be multi-hot {logits.shape}, got {targets.shape}")
    num_positive = targets.sum(axis=1)
    num_negative = targets.shape[1] - num_positive
    positive_mean = _divide(np.where(targets, logits, 0.0).sum(axis=1), num_positive, 0.0)
    negative_mean = _divide(np.where(targets, 0.0, logits).sum(axis=1), num_negative, 0.0)
    if not (num_positive > 0).any() or not (num_negative > 0).any():
        raise ValueError("multilabel_threshold needs at least one positive and one negative label")
    mean_tp = positive_mean[num_positive > 0].mean()
    mean_tn = negative_mean[num_negative > 0].mean()
    return float((mean_tp + mean_tn) / 2)


def multilabel_samples_f1(
    logits: ArrayLike, labels: ArrayLike, threshold: float, balanced: bool = False
) -> float:
    """Samples-averaged F1 of multi-label predictions ``logit > threshold``, in percent.

    Per sample ``F1_n = 2 |T_n ∩ P_n| / (|T_n| + |P_n|)``, 0 when both sets are empty (sklearn
    ``average="samples", zero_division=0``, as the reference); mean over samples, weighted by
    :func:`balanced_sample_weights` when ``balanced``.

    Args:
        logits: ``[N, C]``.
        labels: multi-hot ``[N, C]``.
        threshold: e.g. :func:`multilabel_threshold` of the validation set.
        balanced: weight samples as the reference's reported numbers do.

    Returns:
        F1 in ``[0, 100]``.
    """
    logits = _logits_2d(logits)
    targets = np.asarray(labels) != 0
    predictions = logits > threshold
    overlap = np.count_nonzero(targets & predictions, axis=1)
    size = np.count_nonzero(targets, axis=1) + np.count_nonzero(predictions, axis=1)
    f1 = _divide(2 * overlap, size, 0.0)
    weights = balanced_sample_weights(targets) if balanced else None
    return float(100.0 * np.average(f1, weights=weights))


def multilabel_subset_accuracy(
    logits: ArrayLike, labels: ArrayLike, threshold: float, balanced: bool = False
) -> float:
    """Exact-match accuracy of multi-label predictions ``logit > threshold``, in percent.

    This is what ``sklearn.accuracy_score`` (the reference's "Accuracy") computes on multi-hot
    targets: a sample counts only when every class is predicted right.

    Args:
        logits: ``[N, C]``.
        labels: multi-hot ``[N, C]``.
        threshold: decision threshold.
        balanced: weight samples by :func:`balanced_sample_weights`.

    Returns:
        Accuracy in ``[0, 100]``.
    """
    logits = _logits_2d(logits)
    targets = np.asarray(labels) != 0
    exact = np.all(targets == (logits > threshold), axis=1).astype(np.float64)
    weights = balanced_sample_weights(targets) if balanced else None
    return float(100.0 * np.average(exact, weights=weights))


# -------------------------------------------------------------------------------- compactness


def global_explanation_size(last_layer: ArrayLike, epsilon: float = COMPACTNESS_EPSILON) -> int:
    """Number of prototypes with a positive connection ``W[c, j] > ε`` to some class (§7.3).

    Args:
        last_layer: ``W [C, P]``.
        epsilon: the reference uses 1e-3.

    Returns:
        A count in ``[0, P]``.
    """
    weights = np.asarray(last_layer)
    return int(np.count_nonzero((weights > epsilon).any(axis=0)))


def classification_sparsity(last_layer: ArrayLike, epsilon: float = COMPACTNESS_EPSILON) -> float:
    """Percentage of last-layer weights with ``|W| <= ε`` (§7.3).

    Args:
        last_layer: ``W [C, P]``.
        epsilon: the reference uses 1e-3.

    Returns:
        Sparsity in ``[0, 100]``.
    """
    weights = np.asarray(last_layer)
    return float(100.0 * np.count_nonzero(np.abs(weights) <= epsilon) / weights.size)


def negative_positive_reasoning_ratio(
    last_layer: ArrayLike, epsilon: float = COMPACTNESS_EPSILON
) -> float:
    """``#(W < -ε) / #(W > ε)`` (§7.3).

    Without positive weights the reference divides by zero (nan or inf); we return 0 when there
    are no negative weights either and ``inf`` otherwise.

    Args:
        last_layer: ``W [C, P]``.
        epsilon: the reference uses 1e-3.

    Returns:
        The ratio (>= 0).
    """
    weights = np.asarray(last_layer)
    num_negative = np.count_nonzero(weights < -epsilon)
    num_positive = np.count_nonzero(weights > epsilon)
    if num_positive == 0:
        return 0.0 if num_negative == 0 else float("inf")
    return float(num_negative / num_positive)


# ------------------------------------------------------------------- explanations (ProtoMask)


def top_prototypes(similarities: ArrayLike, k: int = 5) -> np.ndarray:
    """The ``k`` most similar prototypes per image, most similar first (§7.4).

    For ProtoMask the reference's "max of the similarity map" over the ``K x 1`` map is the
    similarity of the nearest view, i.e. ``similarities``. Ties: lower prototype index first.

    Args:
        similarities: ``[N, P]``.
        k: 5 in the reference's contrastivity and complexity evaluations.

    Returns:
        int64 ``[N, k]`` prototype indices.
    """
    return _top_indices(np.asarray(similarities, dtype=np.float64), k)


def explanation_masks(
    winning_view: ArrayLike, masks: ArrayLike, num_masks: ArrayLike, prototype_ids: ArrayLike
) -> np.ndarray:
    """The mask explanation of chosen prototypes (reference §6 "Mask explanation").

    Prototype ``j`` of image ``n`` is explained by the segmentation mask of its winning view;
    with cyclic padding view ``k`` shows mask ``k % num_masks[n]``.

    Args:
        winning_view: int ``[N, P]``.
        masks: ``[N, Kmax, R, R]`` bool/{0, 1}, the image's masks in the common frame.
        num_masks: int ``[N]``, ``1 <= num_masks[n] <= Kmax``: the masks the views showed
            (``min(masks/count, num_views)``).
        prototype_ids: int ``[N, k]``, e.g. :func:`top_prototypes`.

    Returns:
        bool ``[N, k, R, R]``.
    """
    masks = _binary(masks)
    num_masks = _checked_num_masks(num_masks, masks)
    views = np.take_along_axis(np.asarray(winning_view), np.asarray(prototype_ids), axis=1)
    mask_index = views % num_masks[:, None]
    return masks[np.arange(masks.shape[0])[:, None], mask_index]


def _checked_num_masks(num_masks: ArrayLike, masks: np.ndarray) -> np.ndarray:
    num_masks = np.asarray(num_masks, dtype=np.int64)
    if masks.ndim != 4 or num_masks.shape != (masks.shape[0],):
        raise ValueError(
            f"masks must be [N, Kmax, R, R] and num_masks [N]; got {masks.shape} and "
            f"{num_masks.shape}"
        )
    if (num_masks < 1).any() or (num_masks > masks.shape[1]).any():
        raise ValueError(
            f"num_masks must lie in [1, Kmax={masks.shape[1]}]; got min {num_masks.min()}, "
            f"max {num_masks.max()}"
        )
    return num_masks


def mask_boxes(masks: ArrayLike) -> np.ndarray:
    """Tight boxes of masks, half-open pixel ``(y0, x0, y1, x1)``; an empty mask gives zeros.

    The reference's inclusive ``(x0, y0, x1, y1)`` box of the same mask is
    ``(x0, y0, x1 - 1, y1 - 1)`` in our terms.

    Args:
        masks: ``[..., R, R]``.

    Returns:
        float64 ``[..., 4]``.
    """
    masks = _binary(masks)
    rows = masks.any(axis=-1)
    cols = masks.any(axis=-2)
    height, width = masks.shape[-2:]
    y0 = np.argmax(rows, axis=-1)
    y1 = height - np.argmax(rows[..., ::-1], axis=-1)
    x0 = np.argmax(cols, axis=-1)
    x1 = width - np.argmax(cols[..., ::-1], axis=-1)
    boxes = np.stack([y0, x0, y1, x1], axis=-1).astype(np.float64)
    return np.where(rows.any(axis=-1)[..., None], boxes, 0.0)


# ------------------------------------------------------------------------------ contrastivity


def _mean_over_other_pairs(pairwise: np.ndarray) -> np.ndarray:
    """``[N, k, k]`` -> ``[N]``: mean over ordered pairs ``i != j``."""
    k = pairwise.shape[-1]
    if k < 2:
        raise ValueError(f"pairwise metrics need k >= 2 explanations per image, got k={k}")
    off_diagonal = ~np.eye(k, dtype=bool)
    return (pairwise * off_diagonal).sum(axis=(1, 2)) / (k * (k - 1))


def vlc_per_image(explanation_masks: ArrayLike) -> np.ndarray:
    """Visual location change of each image's ``k`` explanation masks, in ``[0, 1]``.

    Reference (§7.4, ``intra_mask_location_change``): mean over ordered pairs ``i != j`` of
    ``1 - IoU(m_i, m_j)``. Difference: two empty masks count as identical (IoU 1); the reference
    divides 0 by 0 (nan). An empty and a non-empty mask have IoU 0.

    Args:
        explanation_masks: ``[N, k, R, R]`` (see :func:`explanation_masks`), ``k >= 2``.

    Returns:
        float64 ``[N]``.
    """
    masks = _binary(explanation_masks)
    flat = _flat_float(masks)
    intersection = (flat @ flat.transpose(0, 2, 1)).astype(np.float64)
    sizes = _pixel_counts(masks)
    union = sizes[:, :, None] + sizes[:, None, :] - intersection
    iou = _divide(intersection, union, 1.0)
    return _mean_over_other_pairs(1.0 - iou)


def vlc(explanation_masks: ArrayLike) -> float:
    """VLC as reported by the reference for ProtoMask: ``100 * mean`` of :func:`vlc_per_image`.

    The reference averages batch means (equal to the image mean when all batches are full).

    Args:
        explanation_masks: ``[N, k, R, R]``.

    Returns:
        VLC in ``[0, 100]``.
    """
    return float(100.0 * vlc_per_image(explanation_masks).mean())


def vlc_bbox_per_image(boxes: ArrayLike) -> np.ndarray:
    """Bounding-box VLC of each image: mean over ordered pairs ``i != j`` of ``1 - IoU``.

    Reference (§7.4, ``intra_bb_location_change``) with two deliberate differences: boxes are
    half-open (area = pixel count, where the reference's ``(x1 - x0)(y1 - y0)`` on inclusive
    corners loses a row and a column), and two empty boxes count as identical (IoU 1). In the
    reference the boxes come from a 95th-percentile threshold of the saliency map, which for a
    binary mask smaller than 5 % of the image selects the whole image; pass the tight boxes of
    the explanation masks (:func:`mask_boxes`) or the record's view boxes instead.

    Args:
        boxes: ``[N, k, 4]`` half-open ``(y0, x0, y1, x1)`` in any one unit.

    Returns:
        float64 ``[N]``.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    a = boxes[:, :, None, :]
    b = boxes[:, None, :, :]
    overlap_y = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    overlap_x = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    intersection = np.clip(overlap_y, 0, None) * np.clip(overlap_x, 0, None)
    area = np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(
        boxes[..., 3] - boxes[..., 1], 0, None
    )
    union = area[:, :, None] + area[:, None, :] - intersection
    iou = _divide(intersection, union, 1.0)
    return _mean_over_other_pairs(1.0 - iou)


def vlc_bbox(boxes: ArrayLike) -> float:
    """``100 * mean`` of :func:`vlc_bbox_per_image`.

    Args:
        boxes: ``[N, k, 4]`` half-open ``(y0, x0, y1, x1)``.

    Returns:
        Box VLC in ``[0, 100]``.
    """
    return float(100.0 * vlc_bbox_per_image(boxes).mean())


def _unit_vectors(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, _NORM_EPSILON)


def intra_prototype_distance_per_image(
    prototypes: ArrayLike, prototype_ids: ArrayLike
) -> np.ndarray:
    """Intra PD of each image: mean cosine distance between its top prototypes (§7.4).

    For every ordered pair ``i != j`` of the image's ``k`` prototypes ``d = 1 - cos(p_i, p_j)``,
    with ``d < 1e-5`` set to 0 (as the reference); mean over pairs. A zero vector has cosine 0
    with everything (torch's ``eps`` guard).

    Args:
        prototypes: ``[P, D]`` prototype vectors.
        prototype_ids: int ``[N, k]``, ``k >= 2`` (e.g. :func:`top_prototypes` with k=5).

    Returns:
        float64 ``[N]``.
    """
    units = _unit_vectors(np.asarray(prototypes, dtype=np.float64))[np.asarray(prototype_ids)]
    distance = 1.0 - units @ units.transpose(0, 2, 1)
    distance = np.where(distance < COSINE_DISTANCE_FLOOR, 0.0, distance)
    return _mean_over_other_pairs(distance)


def intra_prototype_distance(prototypes: ArrayLike, prototype_ids: ArrayLike) -> float:
    """Intra PD as reported by the reference: mean of :func:`intra_prototype_distance_per_image`.

    Args:
        prototypes: ``[P, D]``.
        prototype_ids: int ``[N, k]``.

    Returns:
        Mean cosine distance in ``[0, 2]`` (not a percentage, as in the reference).
    """
    return float(intra_prototype_distance_per_image(prototypes, prototype_ids).mean())


def inter_prototype_distance_per_class(
    prototypes: ArrayLike, prototype_ids: ArrayLike, labels: ArrayLike, num_classes: int
) -> np.ndarray:
    """Inter PD of every class (reference §7.4, ``inter_class_vector_distance``).

    Image ``n`` carries the ranked vectors ``v[n, r] = prototypes[prototype_ids[n, r]]``. For a
    class ``c`` present among the labels, with members ``A_c`` and the other images ``B_c``
    (images not labelled ``c``)::

        D_c = mean_{a in A_c} mean_{b in B_c} mean_r (1 - cos(v[a, r], v[b, r]))

    i.e. rank ``r`` is compared only with rank ``r``. No 1e-5 floor here (the reference applies
    it to Intra PD only). Absent classes get 0; if only one class is present every entry is 0
    (both as the reference). A class labelled on every image (possible only with multi-label
    labels) has no other images; the reference returns nan, we return 0.

    Computed without any loop over images or classes: with unit vectors ``u``, the double mean
    is ``1 - mean_r (S_c,r . O_c,r) / (|A_c| |B_c|)`` where ``S_c,r`` and ``O_c,r`` are the sums
    of ``u[., r]`` over ``A_c`` and ``B_c``.

    Args:
        prototypes: ``[P, D]``.
        prototype_ids: int ``[N, k]``.
        labels: int ``[N]`` or multi-hot ``[N, num_classes]``.
        num_classes: C.

    Returns:
        float64 ``[C]``.
    """
    prototype_ids = np.asarray(prototype_ids)
    labels = np.asarray(labels)
    if labels.ndim == 1:
        membership = np.zeros((labels.shape[0], num_classes))
        membership[np.arange(labels.shape[0]), labels.astype(np.int64)] = 1.0
    else:
        membership = (labels != 0).astype(np.float64)
    if membership.shape != (prototype_ids.shape[0], num_classes):
        raise ValueError(
            f"labels must be [N={prototype_ids.shape[0]}] or [N, C={num_classes}], got "
            f"{labels.shape}"
        )
    units = _unit_vectors(np.asarray(prototypes, dtype=np.float64))
    members = membership.sum(axis=0)
    others = prototype_ids.shape[0] - members
    # Loop over the k ranks only (k = 5): [N, D] per rank instead of [N, k, D] at once.
    mean_similarity = np.zeros(num_classes)
    for rank in range(prototype_ids.shape[1]):
        rank_units = units[prototype_ids[:, rank]]
        class_sums = membership.T @ rank_units
        other_sums = (1.0 - membership).T @ rank_units
        mean_similarity += np.einsum("cd,cd->c", class_sums, other_sums)
    mean_similarity /= prototype_ids.shape[1]
    valid = (members > 0) & (others > 0) & (np.count_nonzero(members) > 1)
    return np.where(valid, 1.0 - _divide(mean_similarity, members * others, 0.0), 0.0)


def inter_prototype_distance(
    prototypes: ArrayLike, prototype_ids: ArrayLike, labels: ArrayLike, num_classes: int
) -> float:
    """Inter PD as reported by the reference: the mean over all ``num_classes`` classes of
    :func:`inter_prototype_distance_per_class` (absent classes count as 0).

    Args:
        prototypes: ``[P, D]``.
        prototype_ids: int ``[N, k]``.
        labels: int ``[N]`` or multi-hot ``[N, C]``.
        num_classes: C.

    Returns:
        Mean cosine distance (not a percentage, as in the reference).
    """
    return float(
        inter_prototype_distance_per_class(prototypes, prototype_ids, labels, num_classes).mean()
    )


# --------------------------------------------------------------------------------- complexity


def binarize_min_max(maps: ArrayLike, threshold: float = 0.5) -> np.ndarray:
    """``(m - min) / (max - min) > threshold`` per ``[R, R]`` map (reference ``min_max_norm_mask``).

    The reference binarises CUB's soft object masks this way before the complexity metrics. A
    constant map gives an empty mask.

    Args:
        maps: ``[..., R, R]``.
        threshold: 0.5 in the reference.

    Returns:
        bool ``[..., R, R]``.
    """
    maps = np.asarray(maps, dtype=np.float64)
    low = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - low
    return _divide(maps - low, np.broadcast_to(span, maps.shape), 0.0) > threshold


def _overlap_counts(explanations: np.ndarray, object_masks: np.ndarray):
    """``|S ∩ G| [N, k]``, ``|S| [N, k]`` and ``|G| [N, 1]`` as float64."""
    if explanations.ndim != 4 or object_masks.shape != (
        explanations.shape[0],
        *explanations.shape[2:],
    ):
        raise ValueError(
            f"explanation masks must be [N, k, R, R] and object masks [N, R, R]; got "
            f"{explanations.shape} and {object_masks.shape}"
        )
    intersection = (_flat_float(explanations) @ _flat_float(object_masks)[:, :, None])[..., 0]
    intersection = intersection.astype(np.float64)
    return intersection, _pixel_counts(explanations), _pixel_counts(object_masks)[:, None]


def _mask_overlaps(explanation_masks: ArrayLike, object_masks: ArrayLike) -> dict:
    """Object overlap, background overlap and IoU ``[N, k]`` from one pass over the pixels."""
    intersection, explanation_size, object_size = _overlap_counts(
        _binary(explanation_masks), _binary(object_masks)
    )
    on_object = _divide(intersection, explanation_size, 0.0)
    return {
        "object_overlap": _divide(intersection, np.broadcast_to(object_size, on_object.shape), 0.0),
        "background_overlap": np.where(explanation_size == 0, 0.0, 1.0 - on_object),
        "iou": _divide(intersection, explanation_size + object_size - intersection, 0.0),
    }


def object_overlap_per_map(explanation_masks: ArrayLike, object_masks: ArrayLike) -> np.ndarray:
    """``|S ∩ G| / |G|`` (reference §7.7 "object overlap"); 0 when ``G`` is empty (reference).

    Args:
        explanation_masks: ``S [N, k, R, R]``.
        object_masks: ``G [N, R, R]``.

    Returns:
        float64 ``[N, k]`` in ``[0, 1]``.
    """
    return _mask_overlaps(explanation_masks, object_masks)["object_overlap"]


def background_overlap_per_map(explanation_masks: ArrayLike, object_masks: ArrayLike) -> np.ndarray:
    """``1 - |S ∩ G| / |S|`` (reference §7.7); 0 when ``S`` is empty (reference).

    Args:
        explanation_masks: ``S [N, k, R, R]``.
        object_masks: ``G [N, R, R]``.

    Returns:
        float64 ``[N, k]`` in ``[0, 1]``.
    """
    return _mask_overlaps(explanation_masks, object_masks)["background_overlap"]


def iou_per_map(explanation_masks: ArrayLike, object_masks: ArrayLike) -> np.ndarray:
    """``|S ∩ G| / |S ∪ G|`` (reference §7.7); 0 when both are empty (reference).

    Args:
        explanation_masks: ``S [N, k, R, R]``.
        object_masks: ``G [N, R, R]``.

    Returns:
        float64 ``[N, k]`` in ``[0, 1]``.
    """
    return _mask_overlaps(explanation_masks, object_masks)["iou"]


def _relevance_inside_outside(relevance_maps: ArrayLike, object_masks: ArrayLike):
    """IOR and OIRR ``[N, k]`` from one pass: nonzero-relevance means inside / outside ``G``."""
    relevance = np.asarray(relevance_maps, dtype=np.float64)
    regions = _binary(object_masks)
    if relevance.ndim != 4 or regions.shape != (relevance.shape[0], *relevance.shape[2:]):
        raise ValueError(
            f"relevance maps must be [N, k, R, R] and object masks [N, R, R]; got "
            f"{relevance.shape} and {regions.shape}"
        )
    # Sums and counts by matrix products against G instead of masked copies of the maps.
    flat = relevance.reshape(*relevance.shape[:2], -1)
    region = regions.reshape(regions.shape[0], -1, 1)
    inside_sum = (flat @ region.astype(np.float64))[..., 0]
    nonzero = (flat != 0).astype(np.float32)
    inside_count = (nonzero @ region.astype(np.float32))[..., 0].astype(np.float64)
    outside_sum = flat.sum(axis=-1) - inside_sum
    outside_count = nonzero.sum(axis=-1, dtype=np.float64) - inside_count
    inside_mean = _divide(inside_sum, inside_count, 0.0)
    outside_mean = _divide(outside_sum, outside_count, 0.0)
    # Dividing a map by its peak (IOR) scales both means and leaves the nonzero counts alone.
    ior = _divide(inside_mean - outside_mean, flat.max(axis=-1), 0.0)
    oirr = np.where(inside_count == 0, np.inf, _divide(outside_mean, inside_mean, np.inf))
    return ior, oirr


def inside_outside_relevance_per_map(
    relevance_maps: ArrayLike, object_masks: ArrayLike
) -> np.ndarray:
    """IOR (reference §7.7): after dividing each map by its maximum (an all-zero map stays
    zero), the mean of the nonzero values inside ``G`` minus the mean of the nonzero values
    outside ``G``; a side without nonzero values has mean 0. In ``[-1, 1]`` for maps >= 0.

    For ProtoMask the relevance map is the binary explanation mask itself, so
    ``IOR = [S ∩ G != ∅] - [S \\ G != ∅]``.

    Args:
        relevance_maps: ``A [N, k, R, R]`` (float, or the bool explanation masks).
        object_masks: ``G [N, R, R]``.

    Returns:
        float64 ``[N, k]``.
    """
    return _relevance_inside_outside(relevance_maps, object_masks)[0]


def outside_inside_relevance_ratio_per_map(
    relevance_maps: ArrayLike, object_masks: ArrayLike
) -> np.ndarray:
    """OIRR (reference §7.7): mean nonzero relevance outside ``G`` / mean nonzero inside.

    As the reference: ``inf`` when there is no nonzero relevance inside ``G`` (also for an
    all-zero map), 0 when there is relevance inside but none outside.

    Args:
        relevance_maps: ``A [N, k, R, R]``.
        object_masks: ``G [N, R, R]``.

    Returns:
        float64 ``[N, k]``.
    """
    return _relevance_inside_outside(relevance_maps, object_masks)[1]


def complexity(
    explanation_masks: ArrayLike,
    object_masks: ArrayLike,
    relevance_maps: ArrayLike | None = None,
) -> dict[str, float]:
    """The reference's complexity metrics (§7.7) averaged over all ``N * k`` explanations.

    Returns ``object_overlap``, ``background_overlap`` and ``iou`` in percent, ``ior`` and
    ``oirr`` raw. Differences: means run over explanations, not over batch means; ``oirr`` is the
    mean over explanations with relevance inside ``G`` only (nan if there are none), since the
    reference's mean becomes ``inf`` as soon as one explanation misses the object.

    Args:
        explanation_masks: ``S [N, k, R, R]``.
        object_masks: ``G [N, R, R]``.
        relevance_maps: ``A [N, k, R, R]``; default: ``S`` (ProtoMask's mask explanation).

    Returns:
        Dict of floats.
    """
    overlaps = _mask_overlaps(explanation_masks, object_masks)
    relevance = explanation_masks if relevance_maps is None else relevance_maps
    ior, oirr = _relevance_inside_outside(relevance, object_masks)
    finite = np.isfinite(oirr)
    return {
        **{name: float(100.0 * values.mean()) for name, values in overlaps.items()},
        "ior": float(ior.mean()),
        "oirr": float(oirr[finite].mean()) if finite.any() else float("nan"),
    }


def keypoints_on_masks(masks: ArrayLike, keypoints: ArrayLike) -> np.ndarray:
    """Which parts' keypoints lie on which mask.

    Fixes the reference's keypoint handling (§9.13): a part counts only when it is visible and
    its coordinates are not negative (the reference pads missing parts with ``(-1, -1)``, which
    indexes the last pixel and can put a phantom part on a mask); the answer is indexed by part
    id, not by position in a list of visible parts.

    Args:
        masks: ``[N, M, R, R]`` (explanation masks ``[N, k, R, R]`` or all masks of the image).
        keypoints: ``[N, Q, 3]`` ``(y, x, visible)``, ``y, x`` in ``[0, 1]``.

    Returns:
        bool ``[N, M, Q]``: part ``q``'s keypoint lies on mask ``m``.
    """
    masks = _binary(masks)
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.ndim != 3 or keypoints.shape[0] != masks.shape[0] or keypoints.shape[2] != 3:
        raise ValueError(f"keypoints must be [N={masks.shape[0]}, Q, 3], got {keypoints.shape}")
    height, width = masks.shape[-2:]
    y, x, visible = keypoints[..., 0], keypoints[..., 1], keypoints[..., 2]
    usable = (visible > 0) & (y >= 0) & (x >= 0)
    rows = np.clip(np.floor(y * height), 0, height - 1).astype(np.int64)
    cols = np.clip(np.floor(x * width), 0, width - 1).astype(np.int64)
    images = np.arange(masks.shape[0])[:, None, None]
    mask_ids = np.arange(masks.shape[1])[None, :, None]
    on_mask = masks[images, mask_ids, rows[:, None, :], cols[:, None, :]]
    return on_mask & usable[:, None, :]


def part_consistency(prototype_ids: ArrayLike, part_hits: ArrayLike, num_prototypes: int) -> float:
    """The reference's consistency (§7.7), in percent.

    Over all top-k sets: ``times[j]`` = how often prototype ``j`` is in one,
    ``count[j, q]`` = how often part ``q`` lay on its explanation mask then. Per activated
    prototype (``times[j] > 0``): the mean over its observed parts (``count[j, q] > 0``) of
    ``count[j, q] / times[j]``, 0 when it never covered a part; then the mean over activated
    prototypes.

    Args:
        prototype_ids: int ``[N, k]`` (the top-k sets).
        part_hits: bool ``[N, k, Q]``, e.g. ``keypoints_on_masks(explanations, keypoints)``.
        num_prototypes: P.

    Returns:
        Consistency in ``[0, 100]``; 0 when ``N == 0``.
    """
    prototype_ids = np.asarray(prototype_ids, dtype=np.int64)
    part_hits = np.asarray(part_hits) != 0
    num_parts = part_hits.shape[-1]
    times = np.bincount(prototype_ids.ravel(), minlength=num_prototypes)
    slots = prototype_ids[..., None] * num_parts + np.arange(num_parts)
    counts = np.bincount(
        slots.ravel(), weights=part_hits.ravel(), minlength=num_prototypes * num_parts
    ).reshape(num_prototypes, num_parts)
    observed = counts > 0
    coverage = _divide(counts, np.broadcast_to(times[:, None], counts.shape), 0.0)
    per_prototype = _divide((coverage * observed).sum(axis=1), observed.sum(axis=1), 0.0)
    activated = times > 0
    if not activated.any():
        return 0.0
    return float(100.0 * per_prototype[activated].mean())


# ------------------------------------------------------------------------- mask consistency


def mask_part_codes(masks: ArrayLike, num_masks: ArrayLike, keypoints: ArrayLike) -> np.ndarray:
    """Bit code of the parts on each mask (reference §1.7): ``sum over parts q on it of 2**q``.

    Fix (§9.13): bit ``q`` is part id ``q`` (the reference uses the position in the list of
    visible parts, so one code means different parts in different images), and missing parts
    never count (see :func:`keypoints_on_masks`).

    Args:
        masks: ``[N, Kmax, R, R]``.
        num_masks: int ``[N]``.
        keypoints: ``[N, Q, 3]``, ``Q <= 62``.

    Returns:
        int64 ``[N, Kmax]``; -1 in padded slots (``>= num_masks``).
    """
    masks = _binary(masks)
    num_masks = _checked_num_masks(num_masks, masks)
    hits = keypoints_on_masks(masks, keypoints)
    if hits.shape[-1] > 62:
        raise ValueError(f"at most 62 parts fit an int64 code, got Q={hits.shape[-1]}")
    codes = hits.astype(np.int64) @ (np.int64(1) << np.arange(hits.shape[-1], dtype=np.int64))
    valid = np.arange(masks.shape[1])[None, :] < num_masks[:, None]
    return np.where(valid, codes, -1)


def mask_consistency(
    part_codes: ArrayLike, labels: ArrayLike, num_classes: int
) -> tuple[float, float]:
    """Mask consistency of a segmentation (reference §1.7 / §7.8).

    Per class: for every code (:func:`mask_part_codes`) that occurs in the class, the fraction of
    the class's images having a mask with that code (each image counts a code once; code 0, a
    mask without parts, is a code as in the reference). Per class the mean and the population
    std of those fractions; the result is their mean over classes. Difference: classes without
    images are excluded (the reference's mean over an empty histogram is nan).

    Args:
        part_codes: int ``[N, Kmax]``, -1 for padded slots.
        labels: int ``[N]``.
        num_classes: C.

    Returns:
        ``(mean consistency, mean std)``, both fractions in ``[0, 1]``.
    """
    part_codes = np.asarray(part_codes, dtype=np.int64)
    labels = _labels_1d(labels, part_codes.shape[0])
    images = np.broadcast_to(np.arange(part_codes.shape[0])[:, None], part_codes.shape)
    valid = part_codes >= 0
    image_code = np.unique(np.stack([images[valid], part_codes[valid]], axis=1), axis=0)
    class_code, images_with_code = np.unique(
        np.stack([labels[image_code[:, 0]], image_code[:, 1]], axis=1), axis=0, return_counts=True
    )
    class_of_bin = class_code[:, 0]
    fraction = images_with_code / np.bincount(labels, minlength=num_classes)[class_of_bin]
    bins = np.bincount(class_of_bin, minlength=num_classes).astype(np.float64)
    mean = _divide(np.bincount(class_of_bin, weights=fraction, minlength=num_classes), bins, 0.0)
    deviation = fraction - mean[class_of_bin]
    variance = _divide(
        np.bincount(class_of_bin, weights=deviation**2, minlength=num_classes), bins, 0.0
    )
    std = np.sqrt(variance)
    present = bins > 0
    return float(mean[present].mean()), float(std[present].mean())


# ---------------------------------------------------------------------- explanation faithfulness


def decisive_part_masks(part_map: ArrayLike, decisive_parts: ArrayLike) -> np.ndarray:
    """``G_b``: the pixels of the parts that decide image ``b``'s class.

    Args:
        part_map: int ``[N, R, R]``, 0 background, ``p + 1`` for part ``p``.
        decisive_parts: int ``[N, M]`` part ids, padded with -1.

    Returns:
        bool ``[N, R, R]``.
    """
    part_ids = np.asarray(part_map, dtype=np.int64) - 1  # background -> -1
    decisive = np.asarray(decisive_parts, dtype=np.int64)
    if decisive.ndim == 1:
        decisive = decisive[:, None]
    # -1 padding must not match background, which is also -1 after the shift.
    decisive = np.where(decisive < 0, -2, decisive)
    return (part_ids[:, None] == decisive[:, :, None, None]).any(axis=1)


def _fraction_on(masks: np.ndarray, decisive_masks: np.ndarray) -> np.ndarray:
    """``|m ∩ G| / |m|`` for ``masks [N, M, R, R]``, ``G [N, R, R]``; 0 for an empty mask."""
    intersection, size, _ = _overlap_counts(masks, decisive_masks)
    return _divide(intersection, size, 0.0)


def faithfulness_per_image(
    similarities: ArrayLike,
    last_layer: ArrayLike,
    logits: ArrayLike,
    labels: ArrayLike,
    winning_view: ArrayLike,
    masks: ArrayLike,
    num_masks: ArrayLike,
    decisive_masks: ArrayLike,
    k: int = 3,
) -> dict[str, np.ndarray]:
    """Per-image terms of :func:`explanation_faithfulness` (concatenate over batches, then
    :func:`summarize_faithfulness`).

    Args:
        similarities: ``s [N, P]``.
        last_layer: ``W [C, P]``.
        logits: ``[N, C]`` (the prediction is their argmax).
        labels: int ``[N]``.
        winning_view: int ``[N, P]``.
        masks: ``[N, Kmax, R, R]``.
        num_masks: int ``[N]``, the masks the views showed (``min(masks/count, num_views)``):
            the chance level draws from these.
        decisive_masks: ``G [N, R, R]`` (:func:`decisive_part_masks`).
        k: prototypes per image.

    Returns:
        Dict of float64 ``[N]`` arrays: ``hit_rate`` (mean hit of the k chosen views),
        ``overlap`` (their mean ``|m ∩ G| / |m|``), ``chance_hit_rate``, ``chance_overlap``
        (means over the image's ``num_masks`` masks) and ``correct`` (0/1).
    """
    similarities = np.asarray(similarities, dtype=np.float64)
    weights = np.asarray(last_layer, dtype=np.float64)
    masks = _binary(masks)
    decisive = _binary(decisive_masks)
    num_masks = _checked_num_masks(num_masks, masks)
    predictions = predict_labels(logits)
    labels = _labels_1d(labels, predictions.shape[0])
    contributions = similarities * weights[predictions]
    chosen = explanation_masks(winning_view, masks, num_masks, _top_indices(contributions, k))
    chosen_overlap = _fraction_on(chosen, decisive)
    all_overlap = _fraction_on(masks, decisive)
    original = np.arange(masks.shape[1])[None, :] < num_masks[:, None]
    return {
        "hit_rate": (chosen_overlap > 0.5).mean(axis=1),
        "overlap": chosen_overlap.mean(axis=1),
        "chance_hit_rate": ((all_overlap > 0.5) & original).sum(axis=1) / num_masks,
        "chance_overlap": np.where(original, all_overlap, 0.0).sum(axis=1) / num_masks,
        "correct": (predictions == labels).astype(np.float64),
    }


def summarize_faithfulness(per_image: dict[str, np.ndarray]) -> dict[str, float]:
    """Means of :func:`faithfulness_per_image`'s terms, in percent.

    Args:
        per_image: the dict of ``[N]`` arrays (possibly concatenated over batches).

    Returns:
        ``rate``, ``chance_rate``, ``overlap``, ``chance_overlap``, ``rate_correct`` (the rate
        over correctly classified images; nan when there is none) and ``num_correct``.
    """
    correct = np.asarray(per_image["correct"]) > 0
    hit_rate = np.asarray(per_image["hit_rate"], dtype=np.float64)
    return {
        "rate": float(100.0 * hit_rate.mean()),
        "chance_rate": float(100.0 * np.mean(per_image["chance_hit_rate"])),
        "overlap": float(100.0 * np.mean(per_image["overlap"])),
        "chance_overlap": float(100.0 * np.mean(per_image["chance_overlap"])),
        "rate_correct": float(100.0 * hit_rate[correct].mean()) if correct.any() else float("nan"),
        "num_correct": int(correct.sum()),
    }


def explanation_faithfulness(
    similarities: ArrayLike,
    last_layer: ArrayLike,
    logits: ArrayLike,
    labels: ArrayLike,
    winning_view: ArrayLike,
    masks: ArrayLike,
    num_masks: ArrayLike,
    decisive_masks: ArrayLike,
    k: int = 3,
) -> dict[str, float]:
    """Do the explanations of a decision point at the part that decides the class?

    New metric for datasets with a known class-deciding part (``docs/metrics.md``). For test
    image ``b`` with masks ``m_1..m_n`` and decisive-part mask ``G_b``, a mask *hits* when more
    than half of it lies on the deciding part: ``h(m) = [|m ∩ G_b| / |m| > 0.5]`` (an empty mask
    has fraction 0, so it never hits). Take the ``k`` prototypes with the largest contribution
    ``s[b, j] * W[pred_b, j]`` to the predicted class's logit (ties: lower index) and their
    winning views' masks (view ``v`` -> mask ``v % n_b``).

    * ``rate``: mean over images and those ``k`` prototypes of ``h``;
    * ``chance_rate``: mean over images of ``(1 / n_b) sum_i h(m_i)``, the rate of a uniformly
      random one of the image's masks;
    * ``overlap`` / ``chance_overlap``: the same with ``|m ∩ G_b| / |m|`` in place of ``h``;
    * ``rate_correct``: ``rate`` over the correctly classified images (nan if none).

    All in percent. Images with an empty ``G_b`` stay in every mean and contribute 0.

    Args:
        similarities: ``s [N, P]``.
        last_layer: ``W [C, P]``.
        logits: ``[N, C]``.
        labels: int ``[N]``.
        winning_view: int ``[N, P]``.
        masks: ``[N, Kmax, R, R]``.
        num_masks: int ``[N]``.
        decisive_masks: ``G [N, R, R]``.
        k: prototypes per image (3).

    Returns:
        Dict of floats, see :func:`summarize_faithfulness`.
    """
    return summarize_faithfulness(
        faithfulness_per_image(
            similarities,
            last_layer,
            logits,
            labels,
            winning_view,
            masks,
            num_masks,
            decisive_masks,
            k,
        )
    )
