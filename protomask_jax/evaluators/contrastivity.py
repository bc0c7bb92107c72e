"""Contrastivity (docs/reference.md §7.4): how different the explanations of one image are
(VLC on the top-k explanation regions ``S [N, k, R, R]``, Intra PD on the top-k prototype
vectors) and how different the top-k prototypes of different classes are (Inter PD).
``prototypes [P, D]``, ``prototype_ids [N, k]``, ``k >= 2``.
"""

from __future__ import annotations

import numpy as np

from protomask_jax.evaluators.chunk import divide

COSINE_DISTANCE_FLOOR = 1e-5  # Intra PD: smaller distances count as 0 (reference)
_NORM_EPSILON = 1e-8  # torch.cosine_similarity's guard against zero-length vectors


def _mean_over_other_pairs(pairwise: np.ndarray) -> np.ndarray:
    """``[N, k, k]`` -> ``[N]``: mean over ordered pairs ``i != j``."""
    k = pairwise.shape[-1]
    if k < 2:
        raise ValueError(f"pairwise metrics need k >= 2 explanations per image, got k={k}")
    return (pairwise * ~np.eye(k, dtype=bool)).sum(axis=(1, 2)) / (k * (k - 1))


def vlc_per_image(masks) -> np.ndarray:
    """float64 ``[N]`` in ``[0, 1]``: mean ``1 - IoU`` over ordered pairs of an image's regions."""
    flat = (np.asarray(masks) != 0).reshape(*np.shape(masks)[:2], -1).astype(np.float32)
    intersection = (flat @ flat.transpose(0, 2, 1)).astype(np.float64)
    sizes = flat.sum(axis=-1, dtype=np.float64)
    union = sizes[:, :, None] + sizes[:, None, :] - intersection
    # Two empty regions count as identical (IoU 1; the reference divides 0 by 0).
    return _mean_over_other_pairs(1.0 - divide(intersection, union, 1.0))


def _unit_vectors(prototypes) -> np.ndarray:
    vectors = np.asarray(prototypes, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), _NORM_EPSILON)


def intra_prototype_distance_per_image(prototypes, prototype_ids) -> np.ndarray:
    """float64 ``[N]``: mean cosine distance between an image's top prototypes (ordered pairs)."""
    units = _unit_vectors(prototypes)[np.asarray(prototype_ids)]
    distance = 1.0 - units @ units.transpose(0, 2, 1)
    return _mean_over_other_pairs(np.where(distance < COSINE_DISTANCE_FLOOR, 0.0, distance))


def inter_prototype_distance_per_class(prototypes, prototype_ids, labels, num_classes: int):
    """float64 ``[C]``: per class, the mean over its images ``a`` and the others ``b`` of
    ``mean_r 1 - cos(v[a, r], v[b, r])``, rank against rank; 0 for absent classes, a lone class
    and a class on every image (multi-hot labels)."""
    prototype_ids, labels = np.asarray(prototype_ids), np.asarray(labels)
    if labels.ndim == 1:
        membership = np.zeros((len(labels), num_classes))
        membership[np.arange(len(labels)), labels.astype(np.int64)] = 1.0
    else:
        membership = (labels != 0).astype(np.float64)
    if membership.shape != (len(prototype_ids), num_classes):
        raise ValueError(
            f"labels must be [N={len(prototype_ids)}] or [N, C={num_classes}], got {labels.shape}"
        )
    units = _unit_vectors(prototypes)
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


class Evaluator:
    name = "contrastivity"
    title = "Contrastivity (top-{k} prototypes per image)"
    rows = (
        ("vlc", "VLC (mask)", "%"),
        ("intra_prototype_distance", "intra prototype distance", "1 - cos"),
        ("inter_prototype_distance", "inter prototype distance", "1 - cos"),
    )

    def __init__(self, model):
        self.prototypes = model.prototypes
        self.num_classes = model.last_layer.shape[0]
        self.vlc, self.ids, self.labels = [], [], []

    def update(self, chunk) -> None:
        self.ids.append(chunk.top_ids)
        self.labels.append(chunk.outputs.labels)
        if chunk.top_ids.shape[1] >= 2:
            self.vlc.append(vlc_per_image(chunk.explanations.mask))

    def result(self) -> dict:
        ids, labels = np.concatenate(self.ids), np.concatenate(self.labels)
        group = {"k": ids.shape[1]}
        if ids.shape[1] >= 2:
            group["vlc"] = float(100.0 * np.concatenate(self.vlc).mean())
            intra = intra_prototype_distance_per_image(self.prototypes, ids)
            inter = inter_prototype_distance_per_class(
                self.prototypes, ids, labels, self.num_classes
            )
            group.update(intra_prototype_distance=float(intra.mean()))
            group.update(inter_prototype_distance=float(inter.mean()))
        return group
