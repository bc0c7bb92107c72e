"""Continuity (docs/reference.md §7.5): do explanations and decisions survive a small,
fixed photometric change of the image?

The perturbed pass (``Chunk.perturbed``) sees every image after :class:`ImagePerturbation`,
applied on the host to the image fitted into the canvas, before any view is cut from it. Per
image and top-k prototype of the clean pass (``[n, k]``), :func:`changes` compares the two
passes: explanation regions ``S`` and values ``A`` (VLC, VAC), winning view (PLC), peak
similarity (PSC), rank among all prototypes (PRC), views over half the similarity range and
the view similarities ``[n, k, K]`` (PALC, PAC); per image the sorted logits (CAC), the rank
of the clean prediction (CRC) and the part keypoints inside ``S`` (stability). The output
completeness family reuses :func:`explanation_state` and :func:`changes`.
"""

from __future__ import annotations

import io

import jax.numpy as jnp
import numpy as np
from PIL import Image

from protomask_jax.data import views as views_lib
from protomask_jax.evaluators.chunk import divide
from protomask_jax.evaluators.complexity import keypoints_on_masks
from protomask_jax.evaluators.contrastivity import (
    activation_change,
    min_max_view_masks,
    sorted_maps,
)

# The reference's fixed perturbation (albumentations ColorJitter, GaussNoise, Blur,
# ImageCompression with these parameters).
JITTER_FACTOR = 1.125  # brightness, contrast and saturation
HUE_SHIFT = 0.05  # turns of the colour circle (18 degrees)
NOISE_VARIANCE = 5.0  # grey levels squared
BLUR_SIZE = 3
JPEG_QUALITY = 90
SEED = 0
_GREY_WEIGHTS = (4899, 9617, 1868)  # OpenCV's RGB -> grey in 14-bit fixed point


def _grey(image: np.ndarray) -> np.ndarray:
    """OpenCV's uint8 grey: ``0.299 R + 0.587 G + 0.114 B`` rounded, in fixed point."""
    weighted = image.astype(np.int64) @ np.array(_GREY_WEIGHTS, np.int64)
    return ((weighted + (1 << 13)) >> 14).astype(np.uint8)


def _lookup(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    """A per-value table, clipped to [0, 255] and truncated (albumentations' uint8 LUTs)."""
    return np.clip(table, 0, 255).astype(np.uint8)[image]


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    return _lookup(image, np.arange(256) * factor)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    return _lookup(image, np.arange(256) * factor + _grey(image).mean() * (1 - factor))


def saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grey image, rounded to nearest (OpenCV's addWeighted)."""
    blend = image * factor + _grey(image)[..., None].astype(np.float64) * (1 - factor)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def hue(image: np.ndarray, shift: float) -> np.ndarray:
    """Rotates the HSV hue by ``shift`` turns, keeping value and chroma: the training
    augmentation's rotation, in floating point (OpenCV's uint8 path first rounds the hue to
    2-degree steps)."""
    rotated = views_lib._shift_hue(jnp.asarray(image, jnp.float32) / 255.0, shift)
    return np.clip(np.rint(np.asarray(rotated) * 255.0), 0, 255).astype(np.uint8)


def gaussian_noise(image: np.ndarray, rng: np.random.Generator, variance: float) -> np.ndarray:
    """Per-pixel, per-channel N(0, variance), then clipped and truncated to uint8."""
    noisy = image + rng.normal(0.0, np.sqrt(variance), image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def box_blur(image: np.ndarray, size: int = BLUR_SIZE) -> np.ndarray:
    """Mean over a ``size x size`` window, borders mirrored without repeating the edge pixel
    (OpenCV's default), rounded to nearest."""
    half = size // 2
    padded = np.pad(image.astype(np.float64), ((half, half), (half, half), (0, 0)), "reflect")
    height, width = image.shape[:2]
    total = sum(
        padded[dy : dy + height, dx : dx + width] for dy in range(size) for dx in range(size)
    )
    return np.clip(np.rint(total / size**2), 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


class ImagePerturbation:
    """The continuity perturbation of one fitted image ``uint8 [h, w, 3]`` (the host pipeline's
    ``PipelineSpec.image_transform``): brightness, contrast, saturation (x1.125) and hue
    (+0.05 turns) in a random order, Gaussian noise, a 3 x 3 blur, JPEG at quality 90. The
    order and the noise are drawn from ``(seed, image_id)``, so a pass is reproducible."""

    def __init__(self, seed: int = SEED):
        self.seed = seed

    def __call__(self, image: np.ndarray, image_id: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, int(image_id)))
        jitter = (
            lambda x: brightness(x, JITTER_FACTOR),
            lambda x: contrast(x, JITTER_FACTOR),
            lambda x: saturation(x, JITTER_FACTOR),
            lambda x: hue(x, HUE_SHIFT),
        )
        for index in rng.permutation(len(jitter)):  # albumentations shuffles the order
            image = jitter[index](image)
        image = gaussian_noise(image, rng, NOISE_VARIANCE)
        return jpeg(box_blur(image))


# ------------------------------------------------------------------------------- the changes


def rank_of(scores, ids) -> np.ndarray:
    """int64 ``[n, r]``: the place of prototypes ``ids [n, r]`` when ``scores [n, P]`` are
    sorted in descending order, ties broken by index (0 = the most similar)."""
    scores, ids = np.asarray(scores), np.asarray(ids)
    target = np.take_along_axis(scores, ids, axis=1)[..., None]
    index = np.arange(scores.shape[1])
    higher = scores[:, None, :] > target
    tied_before = (scores[:, None, :] == target) & (index < ids[..., None])
    return np.count_nonzero(higher | tied_before, axis=-1)


def explanation_state(chunk) -> dict[str, np.ndarray]:
    """What :func:`changes` compares, per image and top-k prototype ``[n, k, ...]``."""
    ids, outputs = chunk.top_ids, chunk.outputs
    state = {
        "mask": chunk.explanations.mask,
        "values": sorted_maps(chunk.explanations),
        # the winning view's mask: a cyclic repeat of a mask is the same location
        "view": np.take_along_axis(outputs.winning_view, ids, axis=1) % outputs.num_masks[:, None],
        "score": np.take_along_axis(np.asarray(outputs.similarities), ids, axis=1),
        "rank": rank_of(outputs.similarities, ids),
    }
    if getattr(outputs, "top_view_similarities", None) is not None:
        state["view_similarities"] = np.asarray(outputs.top_view_similarities)
    return state


def _iou_change(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """``1 - |a ∩ b| / |a ∪ b|`` over the trailing axes after ``[n, r]``; 0 if both empty."""
    first = first.reshape(*first.shape[:2], -1)
    second = second.reshape(*second.shape[:2], -1)
    union = np.count_nonzero(first | second, axis=-1)
    return 1.0 - divide(np.count_nonzero(first & second, axis=-1), union, 1.0)


def changes(before: dict, after: dict) -> dict[str, np.ndarray]:
    """float64 ``[n, r]`` per (image, prototype): the clean state ``before`` against the
    perturbed ``after`` (:func:`explanation_state`, the same prototypes)."""
    terms = {
        "vlc": _iou_change(before["mask"] != 0, after["mask"] != 0),
        "vac": activation_change(before["values"], after["values"]),
        "plc": np.abs(before["view"] - after["view"]).astype(np.float64),
        "psc": divide(np.abs(before["score"] - after["score"]), before["score"], 0.0),
        "prc": np.abs(before["rank"] - after["rank"]).astype(np.float64),
    }
    if "view_similarities" in before and "view_similarities" in after:
        similarities = before["view_similarities"], after["view_similarities"]
        terms["palc"] = _iou_change(*(min_max_view_masks(s) for s in similarities))
        terms["pac"] = activation_change(*(-np.sort(-s, axis=-1) for s in similarities))
    return terms


def stability(before_masks, after_masks, keypoints) -> np.ndarray:
    """float64 ``[n, k]``: ``1 -`` (parts in exactly one of the regions) / (parts in either);
    nan where no part lies in either (the reference leaves those out)."""
    first = keypoints_on_masks(before_masks, keypoints)
    second = keypoints_on_masks(after_masks, keypoints)
    either = np.count_nonzero(first | second, axis=-1)
    return 1.0 - divide(np.count_nonzero(first ^ second, axis=-1), either, np.nan)


PERCENT = ("vlc", "vac", "psc", "palc", "pac", "cac", "stability")


def summarize(terms: dict[str, list]) -> dict[str, float]:
    """Means over all (image, prototype) terms, nan left out; the reference's percentages."""
    group = {}
    for name, parts in terms.items():
        values = np.concatenate([np.ravel(part) for part in parts])
        values = values[np.isfinite(values)]
        mean = float(values.mean()) if values.size else float("nan")
        group[name] = 100.0 * mean if name in PERCENT else mean
    return group


class Evaluator:
    name = "continuity"

    def __init__(self, model):
        self.terms: dict[str, list] = {}
        self.k = 0

    def _add(self, name: str, values) -> None:
        self.terms.setdefault(name, []).append(values)

    def update(self, chunk) -> None:
        perturbed = chunk.perturbed(ImagePerturbation())
        self.k = chunk.top_ids.shape[1]
        for name, values in changes(explanation_state(chunk), explanation_state(perturbed)).items():
            self._add(name, values)
        before, after = chunk.outputs.logits, perturbed.outputs.logits
        self._add("cac", activation_change(-np.sort(-before, axis=1), -np.sort(-after, axis=1)))
        if np.ndim(chunk.outputs.labels) == 1:  # the reference: single-label only
            prediction = np.argmax(before, axis=1)[:, None]
            self._add("crc", rank_of(after, prediction)[:, 0].astype(np.float64))
        points = chunk.maps.has_keypoints
        if points.any():
            masks = chunk.explanations.mask[points], perturbed.explanations.mask[points]
            self._add("stability", stability(*masks, chunk.maps.keypoints[points]))

    def result(self) -> dict | None:
        if not self.terms:
            return None
        return {
            "k": self.k,
            "num_images": len(np.concatenate(self.terms["cac"])),
            **summarize(self.terms),
        }
