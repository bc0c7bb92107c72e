"""A chunk of evaluated images: built once, read by every evaluator.

``evaluate.compute_metrics`` walks a split in chunks of images. A chunk carries

* ``outputs``: the model outputs of its ``n`` rows (``evaluate.EvalOutputs``: logits
  ``[n, C]``, similarities and winning views ``[n, P]``, ``num_masks [n]``, labels);
* ``top_ids`` int64 ``[n, k]``: the ``k = min(5, P)`` most similar prototypes, most similar
  first (docs/reference.md §7.4, §7.7);

and, computed on first use only, so a family that needs no pixels costs none:

* ``maps``: the images' masks and ground truth in the ``R x R`` frame (``frame.FrameMaps``);
* ``explanations``: the :class:`ExplanationMaps` of the top-k prototypes ``[n, k, R, R]``;
* ``object_sums``: their pixel sums against the object mask (:class:`ObjectSums`), for the
  rows that have one.

Explanation maps are a pair: a relevance map ``A >= 0`` and a binary region ``S``. ProtoMask's
own explanation is the winning view's mask, so ``A = S`` (:meth:`ExplanationMaps.from_masks`).
A saliency method (PRP) gives a float map per (image, prototype) in the same frame and is
post-processed as the reference does (:meth:`ExplanationMaps.from_relevance`); it plugs in as
the chunk's ``explain`` function.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from protomask_jax.evaluators import frame

TOP_K = 5  # prototypes explained per image (docs/reference.md §7.4, §7.7)


def divide(numerator, denominator, empty_value: float) -> np.ndarray:
    """``numerator / denominator`` in float64, ``empty_value`` where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    safe = np.where(denominator == 0, 1.0, denominator)
    return np.where(denominator == 0, empty_value, numerator / safe)


def top_indices(scores, k: int) -> np.ndarray:
    """int64 ``[N, k]``: the ``k`` largest scores per row, largest first, ties to lower index."""
    scores = np.asarray(scores, dtype=np.float64)
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k={k} must lie in [1, {scores.shape[1]}] (the number of prototypes)")
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def inside_counts(masks: np.ndarray, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``|m|`` and ``|m ∩ G|`` float64 ``[N, M]`` of masks ``[N, M, R, R]``, regions ``[N, R, R]``.

    A float32 matrix product counts exactly below 2**24 pixels and beats a masked copy.
    """
    masks, regions = np.asarray(masks) != 0, np.asarray(regions) != 0
    if masks.ndim != 4 or regions.shape != (masks.shape[0], *masks.shape[2:]):
        raise ValueError(
            f"masks must be [N, M, R, R] and regions [N, R, R]; got {masks.shape} and "
            f"{regions.shape}"
        )
    flat = masks.reshape(*masks.shape[:2], -1).astype(np.float32)
    region = regions.reshape(len(regions), -1, 1).astype(np.float32)
    return flat.sum(axis=-1, dtype=np.float64), (flat @ region)[..., 0].astype(np.float64)


def mask_index(winning_view, num_masks: np.ndarray, prototype_ids) -> np.ndarray:
    """int ``[N, k]``: the mask each chosen prototype's winning view showed.

    Views are padded cyclically, so view ``v`` of image ``n`` shows mask ``v % num_masks[n]``.
    """
    views = np.take_along_axis(np.asarray(winning_view), np.asarray(prototype_ids), axis=1)
    return views % np.asarray(num_masks)[:, None]


def explanation_masks(winning_view, masks, num_masks, prototype_ids) -> np.ndarray:
    """bool ``[N, k, R, R]``: the masks of the chosen prototypes' winning views (§6).

    ``masks [N, K, R, R]``; ``num_masks [N]`` in ``[1, K]`` counts the masks the views showed.
    """
    masks = np.asarray(masks) != 0
    num_masks = np.asarray(num_masks, dtype=np.int64)
    if masks.ndim != 4 or num_masks.shape != (masks.shape[0],):
        raise ValueError(
            f"masks must be [N, K, R, R] and num_masks [N]; got {masks.shape} and {num_masks.shape}"
        )
    if (num_masks < 1).any() or (num_masks > masks.shape[1]).any():
        raise ValueError(
            f"num_masks must lie in [1, K={masks.shape[1]}]; got min {num_masks.min()}, "
            f"max {num_masks.max()}"
        )
    index = mask_index(winning_view, num_masks, prototype_ids)
    return masks[np.arange(masks.shape[0])[:, None], index]


@dataclasses.dataclass
class ExplanationMaps:
    """Relevance ``A`` (float ``>= 0``, or the bool region itself) and region ``S`` (bool),
    both ``[n, k, R, R]``."""

    relevance: np.ndarray
    mask: np.ndarray

    @classmethod
    def from_masks(cls, masks: np.ndarray) -> ExplanationMaps:
        return cls(relevance=masks, mask=masks)

    @classmethod
    def from_relevance(cls, maps: np.ndarray, percentile: float = 95.0) -> ExplanationMaps:
        """The reference's post-processing of saliency maps (§6, §7.7): ``S`` = the pixels at
        or above the map's percentile, ``A`` = the map on ``S``."""
        maps = np.asarray(maps, np.float32)
        threshold = np.percentile(maps, percentile, axis=(-2, -1), keepdims=True)
        mask = maps >= threshold
        return cls(relevance=np.where(mask, maps, 0.0), mask=mask)

    @property
    def binary(self) -> bool:
        return self.relevance is self.mask

    def take(self, rows) -> ExplanationMaps:
        if self.binary:
            return ExplanationMaps.from_masks(self.mask[rows])
        return ExplanationMaps(self.relevance[rows], self.mask[rows])


@dataclasses.dataclass
class ObjectSums:
    """Explanations against the object mask ``G``, float64 ``[n, k]``: ``|S|``, ``|S ∩ G|``,
    ``|G|`` (``[n, 1]``); the sum of ``A`` and the count of its nonzero pixels, everywhere and
    inside ``G``; the peak of ``A``."""

    size: np.ndarray
    inside: np.ndarray
    object_size: np.ndarray
    relevance: np.ndarray
    relevance_inside: np.ndarray
    support: np.ndarray
    support_inside: np.ndarray
    peak: np.ndarray


def object_sums(explanations: ExplanationMaps, objects: np.ndarray) -> ObjectSums:
    objects = np.asarray(objects) != 0
    size, inside = inside_counts(explanations.mask, objects)
    object_size = np.count_nonzero(objects, axis=(-2, -1)).astype(np.float64)[:, None]
    if explanations.binary:  # A = S: one product serves every sum
        peak = (size > 0).astype(np.float64)
        return ObjectSums(size, inside, object_size, size, inside, size, inside, peak)
    relevance = np.asarray(explanations.relevance, np.float64)
    flat = relevance.reshape(*relevance.shape[:2], -1)
    relevance_inside = (flat @ objects.reshape(len(objects), -1, 1).astype(np.float64))[..., 0]
    support, support_inside = inside_counts(relevance != 0, objects)
    return ObjectSums(
        size,
        inside,
        object_size,
        flat.sum(axis=-1),
        relevance_inside,
        support,
        support_inside,
        flat.max(axis=-1),
    )


def mask_explanations(chunk: Chunk) -> ExplanationMaps:
    """ProtoMask's explanation (§6): the mask of each top prototype's winning view."""
    outputs = chunk.outputs
    return ExplanationMaps.from_masks(
        explanation_masks(outputs.winning_view, chunk.maps.masks, outputs.num_masks, chunk.top_ids)
    )


@dataclasses.dataclass
class Chunk:
    outputs: Any  # evaluate.EvalOutputs of the chunk's rows
    render: Callable[[np.ndarray], frame.FrameMaps]  # record indices -> their frame maps
    explain: Callable[[Chunk], ExplanationMaps] = mask_explanations

    @functools.cached_property
    def top_ids(self) -> np.ndarray:
        similarities = self.outputs.similarities
        return top_indices(similarities, min(TOP_K, similarities.shape[1]))

    @functools.cached_property
    def maps(self) -> frame.FrameMaps:
        return self.render(self.outputs.record_indices)

    @functools.cached_property
    def explanations(self) -> ExplanationMaps:
        return self.explain(self)

    @functools.cached_property
    def object_sums(self) -> ObjectSums:
        rows = self.maps.has_object
        return object_sums(self.explanations.take(rows), self.maps.object_masks[rows])
