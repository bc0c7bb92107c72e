"""PRP heatmaps for the report's panels: which pixels of a view make a prototype match it
(docs/prp.md), drawn over the view crop.

The maps come from ``inference.Explainer.view_maps`` (``[J, V, V]`` float32 >= 0 on the
views the panel shows: the model's winning view, or push's source view, not chosen again);
this module colours them, outlines the view's mask on them (``pictures.outline``, so
relevance inside and outside the object can be told apart) and saves the pictures.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from protomask_jax.report import pictures

_TOP_PERCENTILE = 99.5  # the colour scale's top: LRP maps are spiky
_MAX_ALPHA = 0.9
_DIM = 0.45  # brightness of the greyed view under the map
MASK_OUTLINE = (0, 229, 255)  # cyan: apart from every colour of the "hot" map and the grey


def heatmap_overlay(view: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """The view picture ``uint8 [h, w, 3]``, greyed and dimmed, under the relevance ``[V, V]``
    (resized bilinearly) in the ``hot`` colours, more opaque where it is higher."""
    import matplotlib

    top = float(np.percentile(relevance, _TOP_PERCENTILE))
    scaled = np.asarray(relevance, np.float32) / top if top > 0 else np.zeros_like(relevance)
    size = (view.shape[1], view.shape[0])
    level = np.clip(np.asarray(Image.fromarray(scaled).resize(size, Image.BILINEAR)), 0, 1)
    colours = matplotlib.colormaps["hot"](level)[..., :3] * 255.0
    base = _DIM * (0.5 * view + 0.5 * view.mean(axis=-1, keepdims=True))
    alpha = _MAX_ALPHA * level[..., None] ** 0.6  # faint relevance stays visible
    return np.clip((1 - alpha) * base + alpha * colours, 0, 255).astype(np.uint8)


class Heatmaps:
    """The panels' heatmap pictures by an explainer whose ``view_maps`` gives maps (PRP): a
    test image's matched views, and once per prototype its source view
    (``gallery.PrototypeSource`` in the training images)."""

    def __init__(self, explainer, canvas, sources, train_images):
        self.explainer, self.canvas = explainer, canvas
        self.sources, self.train_images = sources, train_images
        self.drawn: dict[int, str | None] = {}

    def views(self, decoded, mask_indices, prototype_ids, size: str) -> list[np.ndarray]:
        maps = self.explainer.view_maps(decoded.record, mask_indices, prototype_ids)
        drawn = []
        for m, relevance in zip(mask_indices, maps, strict=True):
            picture = heatmap_overlay(decoded.view(m, size), relevance)
            mask = decoded.view_mask(m, size)
            if mask is not None:
                picture = pictures.outline(picture, mask, MASK_OUTLINE)
            drawn.append(picture)
        return drawn

    def source(self, j: int) -> str | None:
        """``prototypes/p{j:04d}_prp.png`` (None: never projected)."""
        source = self.sources[j]
        if j not in self.drawn and source.image_id is not None:
            decoded = self.train_images.get(source.image_id)
            (picture,) = self.views(decoded, [source.mask_index], [j], "match_view")
            self.drawn[j] = self.canvas.save(picture, f"prototypes/p{j:04d}_prp.png")
        return self.drawn.get(j)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 6) -> np.ndarray:
    """``right`` scaled to ``left``'s height beside it, white between."""
    width = max(1, round(right.shape[1] * left.shape[0] / right.shape[0]))
    right = np.asarray(Image.fromarray(right).resize((width, left.shape[0]), Image.LANCZOS))
    return np.concatenate([left, np.full((left.shape[0], gap, 3), 255, np.uint8), right], 1)
