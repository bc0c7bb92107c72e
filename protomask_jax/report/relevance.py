"""PRP heatmaps for the report: which pixels of a view make a prototype match it (docs/prp.md),
drawn over the view crop.

:class:`ViewRelevance` maps ``(record, mask indices [J], prototype ids [J])`` to relevance
``[J, V, V]`` float32 >= 0: the record fitted into the canvas as the host pipeline does
(``pipeline.fit_record``), view ``m`` of mask ``m`` cut without augmentation in float32, one
vjp for the J (view, prototype) pairs (``prp.input_relevance``), summed over RGB and clipped
at 0 as ``prp.relevance_maps`` does. The view is the one the panel shows (the model's winning
view, or the view push projected the prototype onto), not chosen again.
:class:`Heatmaps` draws them for the panels. Pictures: ``images/{id}_r{rank}_prp.png`` and
``prototypes/p{j:04d}_prp.png``.
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

_MAX_ALPHA = 0.9  # opacity of the colour map at the top of its scale
_TOP_PERCENTILE = 99.5
_DIM = 0.45  # brightness of the greyed view under the map


def _relevance(model, canvas, boxes, masks, prototypes, *, view_size, rule):
    views = views_lib.make_views(
        canvas, boxes, None, view_size=view_size, masks=masks, dtype=jnp.float32
    )[0]
    relevance = prp.input_relevance(model, views, prototypes, rule)
    return jax.nn.relu(jnp.sum(relevance, axis=-1))


class ViewRelevance:
    """PRP maps of a restored run (``trainer.TrainedModel``) on one image's views."""

    def __init__(self, trained, rule: prp.PrototypeRule = "reference"):
        state = trained.state
        model = prp.canonize((trained.graphdef, state.params, state.batch_stats, state.constants))
        # One device: a few views at a time, not worth a mesh.
        self.model = jax.device_put(jax.device_get(model), jax.devices()[0])
        self.spec = trained.spec
        view_size = trained.config.input.view_size
        self._relevance = jax.jit(functools.partial(_relevance, view_size=view_size, rule=rule))

    def __call__(self, record, mask_indices, prototype_ids) -> np.ndarray:
        example = pipeline.fit_record(record, self.spec, f"image {record.image_id}")
        slots = np.asarray(mask_indices, np.int64)  # slot m shows mask m for m < num_masks
        masks = example["masks"][None, slots] if "masks" in example else None
        prototypes = np.asarray(self.model.prototypes)[np.asarray(prototype_ids)]
        maps = self._relevance(
            self.model, example["canvas"][None], example["boxes"][None, slots], masks, prototypes
        )
        return np.asarray(maps)


def heatmap_overlay(view: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """The view picture ``uint8 [h, w, 3]``, dimmed, under the relevance ``[V, V]`` (resized
    bilinearly) in the ``hot`` colours, more opaque where it is higher. The scale tops out at
    the map's 99.5th percentile: LRP maps are spiky, a few pixels would wash out the rest."""
    import matplotlib

    height, width = view.shape[:2]
    top = float(np.percentile(relevance, _TOP_PERCENTILE))
    scaled = np.asarray(relevance, np.float32) / top if top > 0 else np.zeros_like(relevance)
    resized = np.asarray(Image.fromarray(scaled).resize((width, height), Image.BILINEAR))
    resized = np.clip(resized, 0.0, 1.0)[..., None]
    colours = matplotlib.colormaps["hot"](resized[..., 0])[..., :3] * 255.0
    base = _DIM * (0.5 * view + 0.5 * view.mean(axis=-1, keepdims=True))
    alpha = _MAX_ALPHA * resized**0.6  # faint relevance stays visible
    return np.clip((1 - alpha) * base + alpha * colours, 0, 255).astype(np.uint8)


class Heatmaps:
    """The panels' PRP pictures: per test image its matched views, and once per prototype
    its source view (``gallery.PrototypeSource``, from the training images)."""

    def __init__(self, relevance: ViewRelevance, canvas, sources, train_images):
        self.relevance, self.canvas = relevance, canvas
        self.sources, self.train_images = sources, train_images
        self.drawn: dict[int, str | None] = {}

    def views(self, decoded, mask_indices, prototype_ids, size: str) -> list[np.ndarray]:
        maps = self.relevance(decoded.record, mask_indices, prototype_ids)
        return [
            heatmap_overlay(decoded.view(m, size), r)
            for m, r in zip(mask_indices, maps, strict=True)
        ]

    def source(self, j: int) -> str | None:
        """Prototype ``j``'s source view under its map (None: never projected)."""
        if j not in self.drawn:
            source = self.sources[j]
            self.drawn[j] = None
            if source.image_id is not None:
                decoded = self.train_images.get(source.image_id)
                (picture,) = self.views(decoded, [source.mask_index], [j], "match_view")
                self.drawn[j] = self.canvas.save(picture, f"prototypes/p{j:04d}_prp.png")
        return self.drawn[j]


def hstack(left: np.ndarray, right: np.ndarray, gap: int = 6) -> np.ndarray:
    """Two pictures side by side, ``right`` scaled to ``left``'s height, white between."""
    height = left.shape[0]
    width = max(1, round(right.shape[1] * height / right.shape[0]))
    right = np.asarray(Image.fromarray(right).resize((width, height), Image.LANCZOS))
    white = np.full((height, gap, 3), 255, np.uint8)
    return np.concatenate([left, white, right], axis=1)
