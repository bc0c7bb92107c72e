"""PRP heatmaps for the report's panels: which pixels of a view make a prototype match it
(docs/prp.md), drawn over the view crop.

:class:`ViewRelevance`: ``(record, mask indices [J], prototype ids [J]) -> [J, V, V]`` float32
>= 0, the record fitted as the host pipeline does, view ``m`` (= mask ``m``) made without
augmentation in float32, one vjp for the J pairs (``prp.input_relevance``), summed over RGB
and clipped at 0 as ``prp.relevance_maps`` does. The view is the one the panel shows (the
model's winning view, or push's source view), not chosen again. The view's mask is outlined
on the map (``pictures.outline``), so relevance inside and outside the object can be told
apart.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from protomask_jax import prp
from protomask_jax.data import pipeline
from protomask_jax.data import views as views_lib
from protomask_jax.report import pictures

_TOP_PERCENTILE = 99.5  # the colour scale's top: LRP maps are spiky
_MAX_ALPHA = 0.9
_DIM = 0.45  # brightness of the greyed view under the map
MASK_OUTLINE = (0, 229, 255)  # cyan: apart from every colour of the "hot" map and the grey


def _relevance(model, canvas, boxes, masks, prototypes, *, view_size, rule):
    views = views_lib.make_views(
        canvas, boxes, None, view_size=view_size, masks=masks, dtype=jnp.float32
    )[0]
    return jax.nn.relu(jnp.sum(prp.input_relevance(model, views, prototypes, rule), axis=-1))


class ViewRelevance:
    """PRP maps of a restored run (``trainer.TrainedModel``) on one image's views."""

    def __init__(self, trained, rule: prp.PrototypeRule = "reference"):
        state = trained.state
        model = prp.canonize((trained.graphdef, state.params, state.batch_stats, state.constants))
        self.model = jax.device_put(jax.device_get(model), jax.devices()[0])  # a few views
        self.spec = trained.spec
        view_size = trained.config.input.view_size
        self._relevance = jax.jit(functools.partial(_relevance, view_size=view_size, rule=rule))

    def __call__(self, record, mask_indices, prototype_ids) -> np.ndarray:
        example = pipeline.fit_record(record, self.spec, f"image {record.image_id}")
        slots = np.asarray(mask_indices, np.int64)  # slot m shows mask m for m < masks/count
        masks = example["masks"][None, slots] if "masks" in example else None
        prototypes = np.asarray(self.model.prototypes)[np.asarray(prototype_ids)]
        boxes = example["boxes"][None, slots]
        canvas = example["canvas"][None]
        return np.asarray(self._relevance(self.model, canvas, boxes, masks, prototypes))


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
    """The panels' heatmap pictures: a test image's matched views, and once per prototype its
    source view (``gallery.PrototypeSource`` in the training images)."""

    def __init__(self, relevance: ViewRelevance, canvas, sources, train_images):
        self.relevance, self.canvas = relevance, canvas
        self.sources, self.train_images = sources, train_images
        self.drawn: dict[int, str | None] = {}

    def views(self, decoded, mask_indices, prototype_ids, size: str) -> list[np.ndarray]:
        maps = self.relevance(decoded.record, mask_indices, prototype_ids)
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
