"""Complexity (docs/reference.md §7.7): the top-k explanations against the ground truth.

Per explanation (region ``S``, relevance ``A``, object mask ``G``; ``chunk.ObjectSums``): object
and background overlap, IoU, IOR, OIRR. Over the split: how consistently each prototype's
explanations cover the same parts (keypoints ``[N, Q, 3]`` ``(y, x, visible)``, normalised).
"""

from __future__ import annotations

import numpy as np

from protomask_jax.evaluators.chunk import TOP_K, ObjectSums, divide


def object_metrics(sums: ObjectSums) -> dict[str, np.ndarray]:
    """float64 ``[n, k]`` each; empty cases as the reference. IOR: mean nonzero ``A`` inside
    ``G`` minus outside (0 for a side without any), over the peak of ``A``. OIRR: outside over
    inside mean, inf with nothing inside (the evaluator averages the finite ones)."""
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


def keypoints_on_masks(masks, keypoints) -> np.ndarray:
    """bool ``[N, M, Q]``: part ``q``'s keypoint lies on mask ``m`` of ``[N, M, R, R]``, at
    pixel ``min(floor(y R), R - 1)``. Unlike the reference (§9.13) only visible points with
    ``y, x >= 0`` count (its ``(-1, -1)`` padding hits the last pixel), by part id."""
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
    """Percent: mean over prototypes in some top-k set of the mean over their observed parts
    of how often the part lay on their explanation per appearance (0 without parts)."""
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


class Evaluator:
    name = "complexity"
    missing = (
        "needs an object region (gt/object_mask, gt/part_map or object boxes) or keypoints in "
        "the records; none of the split's records has one"
    )

    def __init__(self, model):
        self.num_prototypes = model.last_layer.shape[1]
        self.k = min(TOP_K, self.num_prototypes)
        self.per_map: dict[str, list] = {}
        self.ids, self.hits, self.whole_frame = [], [], []
        self.object_sources, self.keypoint_sources = set(), set()

    def update(self, chunk) -> None:
        maps = chunk.maps
        self.object_sources |= maps.object_sources
        self.keypoint_sources |= maps.keypoint_sources
        if maps.has_object.any():
            for name, values in object_metrics(chunk.object_sums).items():
                self.per_map.setdefault(name, []).append(values)
            if not chunk.explanations.binary:  # a 95th percentile of 0 selects every pixel
                regions = chunk.explanations.mask[maps.has_object]
                self.whole_frame.append(regions.all(axis=(-2, -1)))
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
            if self.whole_frame:
                group["whole_frame_regions"] = float(100 * np.concatenate(self.whole_frame).mean())
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
