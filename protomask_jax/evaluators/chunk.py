"""A chunk of evaluated images, built once and read by every evaluator.

A :class:`Chunk` holds the model outputs of its ``n`` rows (``inference.EvalOutputs``) and, on
first use only (a family that needs no pixels costs none): ``top_ids [n, k]``, the
``k = min(5, P)`` most similar prototypes (docs/reference.md §7.4); ``maps``, the masks and
ground truth in the ``R x R`` frame (``frame.FrameMaps``); ``explanations [n, k, R, R]`` of the
top-k prototypes; ``object_sums``, their pixel sums against the object mask, once for every
complexity metric.

A chunk built with a ``run`` hook (the model, from ``evaluate``) also gives the same images
after a perturbation (:meth:`Chunk.perturbed`, for continuity and output completeness): a
chunk whose outputs come from the perturbed pass, with the clean chunk's top-k ids (or the
ones asked for) and frame maps, and its ``perturbation`` set, so that an explanation producer
that reruns the model can rebuild the same input.

Explanation maps pair a relevance map ``A >= 0`` with a region ``S``. ProtoMask explains by the
winning view's mask, so ``A = S``; a saliency method (PRP, ``inference.PrpExplainer``) gives
a float map per (image, prototype) in the same frame, post-processed as the reference does
(§6, §7.7). Either is the chunk's ``explain`` function; :meth:`Chunk.for_prototypes` asks it
about other prototypes of the same images.
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
    """``|m|``, ``|m ∩ G|`` float64 ``[N, M]`` of masks ``[N, M, R, R]``, regions ``[N, R, R]``."""
    masks, regions = np.asarray(masks) != 0, np.asarray(regions) != 0
    if masks.ndim != 4 or regions.shape != (masks.shape[0], *masks.shape[2:]):
        raise ValueError(
            f"masks must be [N, M, R, R] and regions [N, R, R]; got {masks.shape} and "
            f"{regions.shape}"
        )
    # A float32 matrix product counts exactly below 2**24 pixels and beats a masked copy.
    flat = masks.reshape(*masks.shape[:2], -1).astype(np.float32)
    region = regions.reshape(len(regions), -1, 1).astype(np.float32)
    return flat.sum(axis=-1, dtype=np.float64), (flat @ region)[..., 0].astype(np.float64)


def mask_index(winning_view, num_masks: np.ndarray, prototype_ids) -> np.ndarray:
    """int ``[N, k]``: the mask of each chosen prototype's winning view (cyclic padding: view
    ``v`` shows mask ``v % num_masks``)."""
    views = np.take_along_axis(np.asarray(winning_view), np.asarray(prototype_ids), axis=1)
    return views % np.asarray(num_masks)[:, None]


def explanation_masks(winning_view, masks, num_masks, prototype_ids) -> np.ndarray:
    """bool ``[N, k, R, R]`` of ``masks [N, K, R, R]``, ``num_masks [N]`` in ``[1, K]`` (§6)."""
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
    both ``[n, k, R, R]``; a saliency method's whole maps before post-processing, if any."""

    relevance: np.ndarray
    mask: np.ndarray
    maps: np.ndarray | None = None

    @classmethod
    def from_masks(cls, masks: np.ndarray) -> ExplanationMaps:
        return cls(relevance=masks, mask=masks)

    @classmethod
    def from_relevance(cls, maps: np.ndarray, percentile: float = 95.0) -> ExplanationMaps:
        """``S``: the pixels at or above the map's percentile; ``A``: the map on ``S``."""
        maps = np.asarray(maps, np.float32)
        threshold = np.percentile(maps, percentile, axis=(-2, -1), keepdims=True)
        mask = maps >= threshold
        return cls(relevance=np.where(mask, maps, 0.0), mask=mask, maps=maps)

    @property
    def binary(self) -> bool:
        return self.relevance is self.mask

    def take(self, rows) -> ExplanationMaps:
        if self.binary:
            return ExplanationMaps.from_masks(self.mask[rows])
        maps = None if self.maps is None else self.maps[rows]
        return ExplanationMaps(self.relevance[rows], self.mask[rows], maps)


@dataclasses.dataclass
class ObjectSums:
    """float64 ``[n, k]``: ``|S|``, ``|S ∩ G|``, ``|G|`` (``[n, 1]``); sum and nonzero count of
    ``A``, everywhere and inside ``G``; the peak of ``A``."""

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
    sums = (flat.sum(axis=-1), relevance_inside, support, support_inside, flat.max(axis=-1))
    return ObjectSums(size, inside, object_size, *sums)


def mask_explanations(chunk: Chunk) -> ExplanationMaps:
    outputs = chunk.outputs
    return ExplanationMaps.from_masks(
        explanation_masks(outputs.winning_view, chunk.maps.masks, outputs.num_masks, chunk.top_ids)
    )


@dataclasses.dataclass
class Chunk:
    outputs: Any  # inference.EvalOutputs of the chunk's rows
    render: Callable[[np.ndarray], frame.FrameMaps]  # record indices -> their frame maps
    explain: Callable[[Chunk], ExplanationMaps] = mask_explanations
    # (chunk, top_ids [n, k], perturbation) -> EvalOutputs of its images perturbed
    run: Callable[[Chunk, np.ndarray, Any], Any] | None = None
    perturbation: Any = None  # None: the clean pass
    split: str = ""  # where the images come from (for the families reading every split)

    @functools.cached_property
    def top_ids(self) -> np.ndarray:
        if getattr(self.outputs, "top_ids", None) is not None:  # chosen on the device
            return self.outputs.top_ids
        similarities = self.outputs.similarities
        return top_indices(similarities, min(TOP_K, similarities.shape[1]))

    def perturbed(self, perturbation, top_ids: np.ndarray | None = None) -> Chunk:
        """These images after ``perturbation``, explained for ``top_ids`` (default: ours)."""
        if self.run is None:
            raise ValueError("a perturbed pass needs the model: build the chunk with `run`")
        top_ids = self.top_ids if top_ids is None else np.asarray(top_ids)
        outputs = self.run(self, top_ids, perturbation)
        derived = Chunk(outputs, self.render, self.explain, None, perturbation, self.split)
        derived.__dict__.update(top_ids=top_ids, maps=self.maps)  # no second top-k, no render
        return derived

    def for_prototypes(self, top_ids: np.ndarray) -> Chunk:
        """These images (and perturbation) explained for the prototypes ``top_ids [n, j]``."""
        derived = dataclasses.replace(self)
        derived.__dict__.update(top_ids=np.asarray(top_ids), maps=self.maps)
        return derived

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
