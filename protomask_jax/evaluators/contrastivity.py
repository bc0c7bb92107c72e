"""Contrastivity (docs/reference.md §7.4): how different the explanations of one image are,
and how different the top-k prototypes (and the views they matched) of different classes are.

Per image and top-k prototype (``chunk.top_ids [N, k]``, ``k >= 2``): the explanation maps
``[N, k, R, R]`` (VLC, VAC), the winning view index (PLC: ProtoMask's "location"), the
similarity of every view ``[N, k, K]`` (PALC), the prototype vectors (Intra/Inter PD) and the
embeddings of the winning views ``[N, k, D]`` (Intra/Inter FD). Over the split: how spread
each prototype's similarities are (entropy) and how often each is in a top-k set (histogram).
"""

from __future__ import annotations

import numpy as np

from protomask_jax.evaluators.chunk import divide

COSINE_DISTANCE_FLOOR = 1e-5  # Intra PD: smaller distances count as 0 (reference)
_NORM_EPSILON = 1e-8  # torch.cosine_similarity's guard against zero-length vectors
ENTROPY_BINS = 10
ENTROPY_FLOOR = 1e-3  # histogram bins with a smaller share count as empty (reference)


def _mean_over_other_pairs(pairwise: np.ndarray) -> np.ndarray:
    """``[N, k, k]`` -> ``[N]``: mean over ordered pairs ``i != j``."""
    k = pairwise.shape[-1]
    if k < 2:
        raise ValueError(f"pairwise metrics need k >= 2 explanations per image, got k={k}")
    return (pairwise * ~np.eye(k, dtype=bool)).sum(axis=(1, 2)) / (k * (k - 1))


def min_max_view_masks(view_similarities) -> np.ndarray:
    """bool ``[..., K]``: the views whose similarity, min-max normalised over the ``K`` views,
    exceeds 0.5 (none when all are equal: the reference's 0/0)."""
    values = np.asarray(view_similarities, np.float64)
    low, high = values.min(axis=-1, keepdims=True), values.max(axis=-1, keepdims=True)
    return (high > low) & (values - low > 0.5 * (high - low))


def sorted_maps(explanations) -> np.ndarray:
    """float64 ``[n, k, M]``: each relevance map's values, largest first; a binary map (the
    mask explanation) as its size ``[n, k, 1]``, which gives the same overlaps below."""
    if explanations.binary:
        return np.count_nonzero(explanations.mask, axis=(-2, -1))[..., None].astype(np.float64)
    flat = np.asarray(explanations.relevance, np.float64)
    flat = flat.reshape(*flat.shape[:2], -1)
    return -np.sort(-flat, axis=-1)


def activation_change(first, second) -> np.ndarray:
    """``1 - sum(min) / sum(max)`` over the last axis of two sorted maps (``sorted_maps``):
    how much two value distributions differ regardless of where the values lie; 0 for two
    all-zero maps (the reference's 0/0). Sizes ``[..., 1]`` give ``1 - min / max``."""
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    low = np.minimum(first, second).sum(axis=-1)
    return 1.0 - divide(low, np.maximum(first, second).sum(axis=-1), 1.0)


def vac_per_image(sorted_values) -> np.ndarray:
    """float64 ``[N]``: mean activation change over ordered pairs of an image's maps."""
    k = sorted_values.shape[1]
    pairwise = np.zeros((len(sorted_values), k, k))
    for i in range(k):  # pairs, not images: [N, M] at a time instead of [N, k, k, M]
        for j in range(i + 1, k):
            change = activation_change(sorted_values[:, i], sorted_values[:, j])
            pairwise[:, i, j] = pairwise[:, j, i] = change
    return _mean_over_other_pairs(pairwise)


def plc_per_image(views) -> np.ndarray:
    """float64 ``[N]``: mean ``|v_i - v_j|`` over ordered pairs of winning views ``[N, k]``."""
    views = np.asarray(views, np.float64)
    return _mean_over_other_pairs(np.abs(views[:, :, None] - views[:, None, :]))


def vlc_per_image(masks) -> np.ndarray:
    """float64 ``[N]`` in ``[0, 1]``: mean ``1 - IoU`` over ordered pairs of an image's regions."""
    flat = (np.asarray(masks) != 0).reshape(*np.shape(masks)[:2], -1).astype(np.float32)
    intersection = (flat @ flat.transpose(0, 2, 1)).astype(np.float64)
    sizes = flat.sum(axis=-1, dtype=np.float64)
    union = sizes[:, :, None] + sizes[:, None, :] - intersection
    # Two empty regions count as identical (IoU 1; the reference divides 0 by 0).
    return _mean_over_other_pairs(1.0 - divide(intersection, union, 1.0))


def _unit_vectors(vectors) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), _NORM_EPSILON)


def intra_vector_distance_per_image(vectors, ids) -> np.ndarray:
    """float64 ``[N]``: mean cosine distance between an image's vectors ``vectors[ids[n]]``
    (``[T, D]``, ``[N, k]``; the prototypes, or the winning views' embeddings), ordered pairs."""
    units = _unit_vectors(vectors)[np.asarray(ids)]
    distance = 1.0 - units @ units.transpose(0, 2, 1)
    return _mean_over_other_pairs(np.where(distance < COSINE_DISTANCE_FLOOR, 0.0, distance))


def inter_vector_distance_per_class(vectors, ids, labels, num_classes: int):
    """float64 ``[C]``: per class, the mean over its images ``a`` and the others ``b`` of
    ``mean_r 1 - cos(v[a, r], v[b, r])`` with ``v[a, r] = vectors[ids[a, r]]``, rank against
    rank; 0 for absent classes, a lone class and a class on every image (multi-hot labels)."""
    prototype_ids, labels = np.asarray(ids), np.asarray(labels)
    if labels.ndim == 1:
        membership = np.zeros((len(labels), num_classes))
        membership[np.arange(len(labels)), labels.astype(np.int64)] = 1.0
    else:
        membership = (labels != 0).astype(np.float64)
    if membership.shape != (len(prototype_ids), num_classes):
        raise ValueError(
            f"labels must be [N={len(prototype_ids)}] or [N, C={num_classes}], got {labels.shape}"
        )
    units = _unit_vectors(vectors)
    members = membership.sum(axis=0)
    others = len(prototype_ids) - members
    # With unit vectors the double mean is 1 - mean_r S_r . O_r / (|A| |B|), S_r and O_r the
    # sums of the rank-r vectors over the class and over the others: no loop over images.
    mean_similarity = np.zeros(num_classes)
    for rank in range(prototype_ids.shape[1]):  # [N, D] per rank, not [N, k, D] at once
        rank_units = units[prototype_ids[:, rank]]
        class_sums = membership.T @ rank_units
        other_sums = (1.0 - membership).T @ rank_units
        mean_similarity += np.einsum("cd,cd->c", class_sums, other_sums)
    mean_similarity /= prototype_ids.shape[1]
    valid = (members > 0) & (others > 0) & (np.count_nonzero(members) > 1)
    return np.where(valid, 1.0 - divide(mean_similarity, members * others, 0.0), 0.0)


def _as_table(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[N, k, D]`` as a table ``[N k, D]`` and its ids ``[N, k]``."""
    n, k, d = vectors.shape
    return vectors.reshape(n * k, d), np.arange(n * k).reshape(n, k)


def prototype_entropy(similarities, bins: int = ENTROPY_BINS) -> np.ndarray:
    """float64 ``[P]``: base-2 entropy, clipped to [0, 1], of the histogram (``bins`` equal
    bins on [0, 1]) of each prototype's similarities over the images ``[N, P]`` divided by
    its largest; bins holding under 0.1 % of the images count as empty (the reference)."""
    values = np.asarray(similarities, np.float64)
    normalised = divide(values, values.max(axis=0), np.nan)
    inside = (normalised >= 0) & (normalised <= 1)
    index = np.minimum(np.floor(np.where(inside, normalised, 0) * bins), bins - 1).astype(int)
    slots = np.arange(values.shape[1]) * bins + index
    counts = np.bincount(slots[inside], minlength=values.shape[1] * bins).reshape(-1, bins)
    probability = divide(counts, counts.sum(axis=1, keepdims=True), 0.0)
    probability = np.where(probability < ENTROPY_FLOOR, 0.0, probability)
    terms = probability * np.log2(np.where(probability > 0, probability, 1.0))
    return np.clip(-terms.sum(axis=1), 0.0, 1.0)


class Evaluator:
    name = "contrastivity"

    def __init__(self, model):
        self.prototypes = model.prototypes
        self.num_classes = model.last_layer.shape[0]
        self.per_image: dict[str, list] = {}
        self.ids, self.labels, self.similarities, self.embeddings = [], [], [], []

    def _add(self, name: str, values: np.ndarray) -> None:
        self.per_image.setdefault(name, []).append(values)

    def update(self, chunk) -> None:
        outputs, ids = chunk.outputs, chunk.top_ids
        self.ids.append(ids)
        self.labels.append(outputs.labels)
        self.similarities.append(outputs.similarities)
        if ids.shape[1] < 2:
            return
        self._add("vlc", vlc_per_image(chunk.explanations.mask))
        self._add("vac", vac_per_image(sorted_maps(chunk.explanations)))
        views = np.take_along_axis(outputs.winning_view, ids, axis=1)
        self._add("plc", plc_per_image(views % outputs.num_masks[:, None]))  # repeats: one view
        self._add("intra_prototype_distance", intra_vector_distance_per_image(self.prototypes, ids))
        if getattr(outputs, "top_view_similarities", None) is not None:
            self._add("palc", vlc_per_image(min_max_view_masks(outputs.top_view_similarities)))
        if getattr(outputs, "top_embeddings", None) is not None:
            self.embeddings.append(outputs.top_embeddings)
            distance = intra_vector_distance_per_image(*_as_table(outputs.top_embeddings))
            self._add("intra_feature_distance", distance)

    def result(self) -> dict:
        ids, labels = np.concatenate(self.ids), np.concatenate(self.labels)
        counts = np.bincount(ids.ravel(), minlength=self.prototypes.shape[0])
        entropy = prototype_entropy(np.concatenate(self.similarities))
        group = {
            "k": ids.shape[1],
            "prototype_entropy": float(entropy[counts > 0].mean()),
            "prototypes_used": int(np.count_nonzero(counts)),
            "prototype_histogram": {str(j): int(counts[j]) for j in np.flatnonzero(counts)},
        }
        if ids.shape[1] < 2:
            return group
        percent = {"vlc", "vac", "palc"}
        for name, parts in self.per_image.items():
            group[name] = float((100.0 if name in percent else 1.0) * np.concatenate(parts).mean())
        inter = inter_vector_distance_per_class(self.prototypes, ids, labels, self.num_classes)
        group["inter_prototype_distance"] = float(inter.mean())
        if self.embeddings:
            table, flat_ids = _as_table(np.concatenate(self.embeddings))
            inter = inter_vector_distance_per_class(table, flat_ids, labels, self.num_classes)
            group["inter_feature_distance"] = float(inter.mean())
        return group
