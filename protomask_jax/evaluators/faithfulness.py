"""Explanation faithfulness: do the explanations of a decision lie on the part that decides
the class? New here (definition and how to read it: docs/metrics.md); needs the decisive parts
of the synthetic parts world.

Per image: similarities ``s [P]``, ``W [C, P]``, masks ``[K, R, R]`` of which ``num_masks``
were shown, decisive-part mask ``G [R, R]``. The ``k`` prototypes adding most to the predicted
class's logit (``s_j W[pred, j]``, ties to the lower index) are explained by their winning
views' masks; a mask hits when more than half of it lies on ``G``. With a saliency method
(PRP) also by their relevance maps ``[k, R, R]``: the share of each map's mass on ``G``,
against the same chance (relevance spread evenly over a random one of the image's masks).
"""

from __future__ import annotations

import numpy as np

from protomask_jax.evaluators.chunk import divide, inside_counts, mask_index, top_indices

K = 3  # explanations per image


def faithfulness_per_image(outputs, last_layer, masks, decisive_masks, k=K) -> dict:
    """float64 ``[N]`` terms: ``hit_rate`` and ``overlap`` (mean hit and mean ``|m ∩ G| / |m|``
    of the k chosen masks), ``chance_hit_rate`` and ``chance_overlap`` (the same means over the
    image's shown masks), ``correct``. Concatenate them over chunks, then :func:`summarize`.
    ``outputs``: similarities, logits, labels, winning views, num_masks of the N images."""
    num_masks = np.asarray(outputs.num_masks, dtype=np.int64)
    predictions = np.argmax(np.asarray(outputs.logits, dtype=np.float64), axis=1)
    size, inside = inside_counts(masks, decisive_masks)
    fraction = divide(inside, size, 0.0)  # an empty mask has fraction 0: it never hits
    index = mask_index(outputs.winning_view, num_masks, contribution_ids(outputs, last_layer, k))
    chosen = np.take_along_axis(fraction, index, axis=1)
    shown = np.arange(fraction.shape[1])[None, :] < num_masks[:, None]
    return {
        "hit_rate": (chosen > 0.5).mean(axis=1),
        "overlap": chosen.mean(axis=1),
        "chance_hit_rate": ((fraction > 0.5) & shown).sum(axis=1) / num_masks,
        "chance_overlap": np.where(shown, fraction, 0.0).sum(axis=1) / num_masks,
        "correct": _holds(outputs.labels, predictions).astype(np.float64),
    }


def _holds(labels, predictions) -> np.ndarray:
    """bool ``[N]``: the prediction is the label, or among a multi-hot label's classes."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels[np.arange(len(predictions)), predictions] > 0
    return predictions == labels


def contribution_ids(outputs, last_layer, k=K) -> np.ndarray:
    """int ``[N, k]``: the prototypes adding most to the predicted class's logit."""
    predictions = np.argmax(np.asarray(outputs.logits, dtype=np.float64), axis=1)
    weights = np.asarray(last_layer, np.float64)[predictions]
    return top_indices(np.asarray(outputs.similarities, np.float64) * weights, k)


def relevance_terms(maps, decisive_masks) -> dict[str, np.ndarray]:
    """float64 ``[N]``: ``relevance_mass``, the mean share of the maps' ``[N, k, R, R]`` mass on
    ``G [N, R, R]`` (0 for an all-zero map), and ``relevance_rate``, of maps with over half."""
    flat = np.asarray(maps, np.float64).reshape(*np.shape(maps)[:2], -1)
    region = np.asarray(decisive_masks).reshape(len(flat), -1, 1).astype(np.float64)
    share = divide((flat @ region)[..., 0], flat.sum(axis=-1), 0.0)
    return {"relevance_rate": (share > 0.5).mean(axis=1), "relevance_mass": share.mean(axis=1)}


def summarize(per_image: dict[str, np.ndarray]) -> dict[str, float]:
    """Percent means; ``rate_correct`` over the correctly classified images (nan if none)."""
    correct = np.asarray(per_image["correct"]) > 0
    hit_rate = np.asarray(per_image["hit_rate"], dtype=np.float64)
    relevance = {
        name: float(100.0 * np.mean(per_image[name]))
        for name in ("relevance_rate", "relevance_mass")
        if name in per_image
    }
    return {
        "rate": float(100.0 * hit_rate.mean()),
        "chance_rate": float(100.0 * np.mean(per_image["chance_hit_rate"])),
        "overlap": float(100.0 * np.mean(per_image["overlap"])),
        "chance_overlap": float(100.0 * np.mean(per_image["chance_overlap"])),
        "rate_correct": float(100.0 * hit_rate[correct].mean()) if correct.any() else float("nan"),
        "num_correct": int(correct.sum()),
        **relevance,
    }


class Evaluator:
    name = "faithfulness"
    missing = (
        "needs the parts that decide each image's class (gt/part_map + gt/decisive_parts); "
        "only the synthetic parts world's records carry them"
    )

    def __init__(self, model):
        self.last_layer = model.last_layer
        self.k = min(K, self.last_layer.shape[1])
        self.terms = []

    def update(self, chunk) -> None:
        maps, rows = chunk.maps, chunk.maps.has_decisive
        if rows.any():
            outputs, masks = chunk.outputs.take(rows), maps.masks[rows]
            terms = faithfulness_per_image(
                outputs, self.last_layer, masks, maps.decisive_masks[rows], self.k
            )
            ids = contribution_ids(chunk.outputs, self.last_layer, self.k)
            explained = chunk.for_prototypes(ids).explanations
            if not explained.binary:  # the whole maps, not only their top 5 %
                whole = explained.relevance if explained.maps is None else explained.maps
                terms |= relevance_terms(whole[rows], maps.decisive_masks[rows])
            self.terms.append(terms)

    def result(self) -> dict | None:
        if not self.terms:
            return None
        terms = {key: np.concatenate([t[key] for t in self.terms]) for key in self.terms[0]}
        return {"k": self.k, "num_images": len(terms["correct"]), **summarize(terms)}
