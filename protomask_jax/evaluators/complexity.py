"""Complexity (docs/reference.md §7.7): the top-k explanations against the ground truth.

Per explanation (region ``S``, relevance ``A``, object mask ``G``; ``chunk.ObjectSums``):
object overlap ``|S ∩ G| / |G|``, background overlap ``1 - |S ∩ G| / |S|``, IoU, and the
inside-outside relevance IOR / OIRR; over the whole split, how consistently each prototype's
explanations cover the same parts (keypoints ``[N, Q, 3]`` ``(y, x, visible)``, normalised).
Mask consistency (§1.7, §7.8) rates a segmentation the same way: how consistently a class's
masks cover the same parts.
"""

from __future__ import annotations

import numpy as np

from protomask_jax.evaluators.chunk import TOP_K, ObjectSums, divide


def object_metrics(sums: ObjectSums) -> dict[str, np.ndarray]:
    """float64 ``[n, k]`` per explanation; every empty case as the reference, except OIRR.

    IOR: mean nonzero relevance inside ``G`` minus outside, over the map's peak (a side
    without nonzero relevance has mean 0); for a binary map ``[S ∩ G != ∅] - [S \\ G != ∅]``.
    OIRR: mean outside / mean inside, inf when nothing is inside (the reference's mean then
    becomes inf; the evaluator averages the finite ones).
    """
    on_object = divide(sums.inside, sums.size, 0.0)
    inside_mean = divide(sums.relevance_inside, sums.support_inside, 0.0)
    outside_mean = divide(
        sums.relevance - sums.relevance_inside, sums.support - sums.support_inside, 0.0
    )
    return {
        "object_overlap": divide(sums.inside, sums.object_size, 0.0),
        "background_overlap": np.where(sums.size == 0, 0.0, 1.0 - on_object),
        "iou": divide(sums.inside, sums.size + sums.object_size - sums.inside, 0.0),
        "ior": divide(inside_mean - outside_mean, sums.peak, 0.0),
        "oirr": np.where(
            sums.support_inside == 0, np.inf, divide(outside_mean, inside_mean, np.inf)
        ),
    }


def binarize_min_max(maps, threshold: float = 0.5) -> np.ndarray:
    """``(m - min) / (max - min) > threshold`` per ``[R, R]`` map: how the reference binarises
    CUB's soft object masks. A constant map gives an empty mask."""
    maps = np.asarray(maps, dtype=np.float64)
    low = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - low
    return divide(maps - low, span, 0.0) > threshold


def keypoints_on_masks(masks, keypoints) -> np.ndarray:
    """bool ``[N, M, Q]``: part ``q``'s keypoint lies on mask ``m`` (``masks [N, M, R, R]``).

    Fixes the reference (§9.13): only visible points with ``y, x >= 0`` count (its ``(-1, -1)``
    padding indexes the last pixel), and the answer is indexed by part id. ``y, x`` land on
    pixel ``min(floor(y R), R - 1)``.
    """
    masks = np.asarray(masks) != 0
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.ndim != 3 or keypoints.shape[0] != masks.shape[0] or keypoints.shape[2] != 3:
        raise ValueError(f"keypoints must be [N={masks.shape[0]}, Q, 3], got {keypoints.shape}")
    height, width = masks.shape[-2:]
    y, x, visible = keypoints[..., 0], keypoints[..., 1], keypoints[..., 2]
    rows = np.clip(np.floor(y * height), 0, height - 1).astype(np.int64)
    cols = np.clip(np.floor(x * width), 0, width - 1).astype(np.int64)
    images = np.arange(masks.shape[0])[:, None, None]
    on_mask = masks[images, np.arange(masks.shape[1])[None, :, None], rows[:, None], cols[:, None]]
    return on_mask & ((visible > 0) & (y >= 0) & (x >= 0))[:, None, :]


def part_consistency(prototype_ids, part_hits, num_prototypes: int) -> float:
    """Percent. ``times[j]``: top-k sets holding prototype ``j``; ``count[j, q]``: how often
    part ``q`` lay on its explanation then. Per prototype in some set, the mean over its observed
    parts of ``count / times`` (0 without any); the mean over those prototypes (0 if none)."""
    prototype_ids = np.asarray(prototype_ids, dtype=np.int64)
    part_hits = np.asarray(part_hits) != 0
    num_parts = part_hits.shape[-1]
    times = np.bincount(prototype_ids.ravel(), minlength=num_prototypes)
    slots = prototype_ids[..., None] * num_parts + np.arange(num_parts)
    counts = np.bincount(
        slots.ravel(), weights=part_hits.ravel(), minlength=num_prototypes * num_parts
    ).reshape(num_prototypes, num_parts)
    observed = counts > 0
    coverage = divide(counts, times[:, None], 0.0)
    per_prototype = divide((coverage * observed).sum(axis=1), observed.sum(axis=1), 0.0)
    activated = times > 0
    return float(100.0 * per_prototype[activated].mean()) if activated.any() else 0.0


def mask_part_codes(masks, num_masks, keypoints) -> np.ndarray:
    """int64 ``[N, K]``: ``sum of 2**q`` over the parts ``q`` on each mask, -1 in padded slots.

    Bit ``q`` is part id ``q`` (the reference uses the position among visible parts, §9.13).
    """
    hits = keypoints_on_masks(masks, keypoints)
    if hits.shape[-1] > 62:
        raise ValueError(f"at most 62 parts fit an int64 code, got Q={hits.shape[-1]}")
    codes = hits.astype(np.int64) @ (np.int64(1) << np.arange(hits.shape[-1], dtype=np.int64))
    valid = np.arange(hits.shape[1])[None, :] < np.asarray(num_masks)[:, None]
    return np.where(valid, codes, -1)


def mask_consistency(part_codes, labels, num_classes: int) -> tuple[float, float]:
    """``(mean, std)`` fractions: per class, for each code in it, the fraction of its images
    with a mask of that code (code 0 counts); the mean and population std per class, then
    averaged over the classes that have images (the reference: nan for an empty class)."""
    part_codes = np.asarray(part_codes, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    images = np.broadcast_to(np.arange(len(part_codes))[:, None], part_codes.shape)
    valid = part_codes >= 0
    image_code = np.unique(np.stack([images[valid], part_codes[valid]], axis=1), axis=0)
    class_code, images_with_code = np.unique(
        np.stack([labels[image_code[:, 0]], image_code[:, 1]], axis=1), axis=0, return_counts=True
    )
    class_of_bin = class_code[:, 0]
    fraction = images_with_code / np.bincount(labels, minlength=num_classes)[class_of_bin]
    bins = np.bincount(class_of_bin, minlength=num_classes).astype(np.float64)
    mean = divide(np.bincount(class_of_bin, weights=fraction, minlength=num_classes), bins, 0.0)
    squares = np.bincount(
        class_of_bin, weights=(fraction - mean[class_of_bin]) ** 2, minlength=num_classes
    )
    std = np.sqrt(divide(squares, bins, 0.0))
    return float(mean[bins > 0].mean()), float(std[bins > 0].mean())


class Evaluator:
    name = "complexity"
    title = "Ground truth (top-{k} prototypes per image)"
    rows = (
        ("object_overlap", "object overlap", "%"),
        ("background_overlap", "background overlap", "%"),
        ("iou", "IoU with the object", "%"),
        ("ior", "inside-outside relevance (IOR)", ""),
        ("oirr", "outside/inside relevance ratio", ""),
        ("part_consistency", "part consistency", "%"),
    )
    notes = (("object_mask", "object mask"), ("keypoints", "keypoints"))

    def __init__(self, model):
        self.num_prototypes = model.last_layer.shape[1]
        self.k = min(TOP_K, self.num_prototypes)
        self.per_map: dict[str, list] = {}
        self.ids, self.hits = [], []
        self.object_sources, self.keypoint_sources = set(), set()

    def update(self, chunk) -> None:
        maps = chunk.maps
        self.object_sources |= maps.object_sources
        self.keypoint_sources |= maps.keypoint_sources
        if maps.has_object.any():
            for name, values in object_metrics(chunk.object_sums).items():
                self.per_map.setdefault(name, []).append(values)
        points = maps.has_keypoints
        if points.any():
            self.ids.append(chunk.top_ids[points])
            regions = chunk.explanations.mask[points]
            self.hits.append(keypoints_on_masks(regions, maps.keypoints[points]))

    def result(self) -> dict | None:
        if not self.per_map and not self.ids:
            return None
        group = {"k": self.k}
        if self.per_map:
            values = {name: np.concatenate(parts) for name, parts in self.per_map.items()}
            oirr = values["oirr"][np.isfinite(values["oirr"])]
            group.update(
                num_images=len(values["iou"]),
                object_mask=" + ".join(sorted(self.object_sources)),
                **{
                    name: float(100.0 * values[name].mean())
                    for name in ("object_overlap", "background_overlap", "iou")
                },
                ior=float(values["ior"].mean()),
                oirr=float(oirr.mean()) if oirr.size else float("nan"),
            )
        if self.ids:
            ids = np.concatenate(self.ids)
            group.update(
                part_consistency=part_consistency(
                    ids, np.concatenate(self.hits), self.num_prototypes
                ),
                keypoints=" + ".join(sorted(self.keypoint_sources)),
                num_images_with_keypoints=len(ids),
            )
        return group
