"""Output completeness (docs/reference.md §7.6): is the explained region enough for the
prototype, i.e. do its similarity and explanation hold when everything else is noised?

For each rank ``r`` of the top-k prototypes, one perturbed pass (``Chunk.perturbed``) adds
N(0, 0.05) noise, in the normalised input space, to every view pixel whose point in the image
lies outside the bounding box of the clean explanation region of prototype ``r`` (images
``[n]``, boxes ``[n, 4]``, :class:`OutsideBoxNoise`); the changes of that prototype
(``continuity.changes``) are then VLC, VAC, PLC, PSC, PRC, PALC, PAC, as for continuity.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from protomask_jax.evaluators.continuity import changes, explanation_state, summarize

NOISE_STD = 0.05  # the reference's std, in units of the normalised input


def region_boxes(masks) -> np.ndarray:
    """float64 ``[..., 4]`` yxyx, normalised to the frame ``[..., R, R]`` (= to the image),
    half-open: the tight box of each region's pixels; all zero for an empty region."""
    masks = np.asarray(masks) != 0
    size = masks.shape[-1]

    def span(any_along: np.ndarray):
        present = any_along.any(axis=-1)
        first = np.argmax(any_along, axis=-1)
        last = size - 1 - np.argmax(any_along[..., ::-1], axis=-1)
        return np.where(present, first, 0), np.where(present, last + 1, 0)

    (top, bottom), (left, right) = span(masks.any(axis=-1)), span(masks.any(axis=-2))
    return np.stack([top, left, bottom, right], axis=-1) / size


@dataclasses.dataclass(frozen=True, eq=False)
class OutsideBoxNoise:
    """The completeness perturbation of ``n`` images: noise of ``std`` outside ``boxes
    [n, 4]`` (image-normalised yxyx, half-open; an empty box noises the whole image), drawn
    from ``(seed, image id, mask)``."""

    boxes: np.ndarray
    std: float = NOISE_STD
    seed: int = 0


class Evaluator:
    name = "completeness"
    aliases = ("output_completeness",)  # the reference's name

    def __init__(self, model):
        self.terms: dict[str, list] = {}
        self.k = 0

    def update(self, chunk) -> None:
        before = explanation_state(chunk)
        boxes = region_boxes(before["mask"])
        self.k = chunk.top_ids.shape[1]
        for rank in range(self.k):
            noise = OutsideBoxNoise(boxes[:, rank], seed=rank)
            perturbed = chunk.perturbed(noise, chunk.top_ids[:, rank : rank + 1])
            clean = {name: values[:, rank : rank + 1] for name, values in before.items()}
            for name, values in changes(clean, explanation_state(perturbed)).items():
                self.terms.setdefault(name, []).append(values)

    def result(self) -> dict | None:
        if not self.terms:
            return None
        return {"k": self.k, "std": NOISE_STD, **summarize(self.terms)}
