"""The ProtoMask network: per-view embeddings, prototype distances, min over views, logits.

B images of K views each (``docs/reference.md`` §3)::

    views [B, K, H, W, 3] -> fold to [B*K, H, W, 3] -> ResNet -> [B*K, h, w, C_b]
      -> global average pool -> add-on Dense(C_b -> D) -> sigmoid -> z [B, K, D] (float32)
      -> squared L2 to P prototypes [P, D] -> view_distances [B, K, P]
      -> min over views -> min_distances [B, P], winning_view [B, P]
      -> log similarity [B, P] -> logits = similarity @ last_layer [B, C]

The parameter groups are the attributes ``backbone``, ``add_on``, ``prototypes`` and
``last_layer`` (``[P, C]``, torch's ``last_layer.weight`` transposed: prototypes lead every
prototype-indexed array, so pruning and model-axis sharding slice one axis). The class of
each prototype, ``prototype_class``, is model state: checkpointed, and kept by pruning
(the reference loses it, §9.11). Jitted steps use :func:`split_model` and :func:`apply`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from protomask_jax.models.resnet import ResNet, ResNetSpec

PARAM_GROUPS = ("backbone", "add_on", "prototypes", "last_layer")

# Distances are small differences of large numbers (|z|^2 ~ D/3 for z in (0, 1)^D); the
# cross term must not run in TF32/bf16 on accelerators, which would swamp d near 0.
_DISTANCE_PRECISION = jax.lax.Precision.HIGHEST


class PrototypeClass(nnx.Variable):
    """Non-trainable ``[P]`` int32: the class each prototype belongs to."""


class ProtoMaskOutput(NamedTuple):
    """A pytree; the per-view fields are ``None`` unless ``return_views``."""

    logits: jax.Array  # [B, C] float32
    min_distances: jax.Array  # [B, P] float32: squared L2 to the nearest view
    winning_view: jax.Array  # [B, P] int32: the index of that view (the explanation)
    view_distances: jax.Array | None = None  # [B, K, P] float32
    embeddings: jax.Array | None = None  # [B, K, D] float32


def squared_distances(embeddings: jax.Array, prototypes: jax.Array) -> jax.Array:
    """``[..., D]``, ``[P, D]`` -> ``[..., P]`` float32 ``|z|^2 - 2 z.p + |p|^2`` clamped at 0:
    one matrix product instead of ``[..., P, D]`` differences; the clamp removes the small
    negative values rounding leaves when z is close to p."""
    z = embeddings.astype(jnp.float32)
    p = prototypes.astype(jnp.float32)
    cross = jnp.einsum("...d,pd->...p", z, p, precision=_DISTANCE_PRECISION)
    z_sq = jnp.sum(jnp.square(z), axis=-1, keepdims=True)
    p_sq = jnp.sum(jnp.square(p), axis=-1)
    return jnp.maximum(z_sq - 2.0 * cross + p_sq, 0.0)


def squared_distances_explicit(embeddings: jax.Array, prototypes: jax.Array) -> jax.Array:
    """``sum((z - p)^2)`` over explicit differences, ``[N, D]``, ``[P, D]`` -> ``[N, P]``;
    for tests."""
    z = embeddings.astype(jnp.float32)
    p = prototypes.astype(jnp.float32)
    return jnp.sum(jnp.square(z[:, None, :] - p[None, :, :]), axis=-1)


def log_similarity(distances: jax.Array, eps: float) -> jax.Array:
    """ProtoPNet's ``log((d + 1) / (d + eps))`` as ``log1p((1 - eps) / (d + eps))``, which does
    not round the ratio near 1 for large d. Why eps is 1e-4, not the reference's 1e-14:
    ``docs/reference.md`` §3 (1e-14 underflows in float16 and lets the gradient reach 1e14)."""
    return jnp.log1p((1.0 - eps) / (distances + eps))


def _torch_default_uniform(fan_in: int) -> nnx.Initializer:
    """torch's Conv2d/Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def last_layer_init(
    prototype_class: jax.Array, num_classes: int, incorrect_strength: float
) -> jax.Array:
    """``[P, C]``: 1 for the prototype's own class, else ``incorrect_strength``."""
    own_class = jax.nn.one_hot(prototype_class, num_classes, dtype=jnp.float32)
    return own_class + (1.0 - own_class) * incorrect_strength


class ProtoMask(nnx.Module):
    """``add_on``: Dense with torch's default init; ``prototypes`` ``[P, D]`` init U[0, 1);
    P = C * ppc; everything after the backbone (``compute_dtype``) is float32."""

    def __init__(
        self,
        backbone: str | ResNetSpec,
        num_classes: int,
        *,
        prototypes_per_class: int,
        prototype_dim: int,
        incorrect_strength: float = 0.0,
        similarity_eps: float = 1e-4,
        compute_dtype: jnp.dtype | str = jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        num_prototypes = num_classes * prototypes_per_class
        self.backbone = ResNet(backbone, compute_dtype=compute_dtype, remat=remat, rngs=rngs)
        backbone_channels = self.backbone.out_channels
        self.add_on = nnx.Linear(
            backbone_channels,
            prototype_dim,
            use_bias=True,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=_torch_default_uniform(backbone_channels),
            bias_init=_torch_default_uniform(backbone_channels),
            rngs=rngs,
        )
        self.prototypes = nnx.Param(
            jax.random.uniform(rngs.params(), (num_prototypes, prototype_dim), jnp.float32)
        )
        prototype_class = jnp.arange(num_prototypes, dtype=jnp.int32) // prototypes_per_class
        self.prototype_class = PrototypeClass(prototype_class)
        self.last_layer = nnx.Param(
            last_layer_init(prototype_class, num_classes, incorrect_strength)
        )
        self.num_classes = num_classes
        # Pruning only removes prototypes, so no class ever has more.
        self.max_prototypes_per_class = prototypes_per_class
        self.similarity_eps = float(similarity_eps)

    def embed(self, views: jax.Array, *, train: bool) -> jax.Array:
        """``[B, K, H, W, 3]`` normalised views -> ``[B, K, D]`` float32 in (0, 1)."""
        batch, num_views = views.shape[:2]
        feature_map = self.backbone(views.reshape((-1, *views.shape[2:])), train=train)
        # The reference applies the 1x1 conv to every pixel, then average-pools, then the
        # sigmoid. A 1x1 conv is affine per pixel, so it commutes with the mean: pooling
        # first and applying a Dense layer gives the same z at 1/(h*w) of the FLOPs
        # (1/49 at 7x7).
        pooled = jnp.mean(feature_map, axis=(1, 2), dtype=jnp.float32)
        embeddings = jax.nn.sigmoid(self.add_on(pooled))
        return embeddings.reshape((batch, num_views, -1))

    def __call__(
        self,
        views: jax.Array,
        *,
        train: bool,
        valid: jax.Array | None = None,
        return_views: bool = False,
    ) -> ProtoMaskOutput:
        """``valid`` ``[B, K]``: views marked False never win the min; cyclic padding needs none."""
        embeddings = self.embed(views, train=train)
        return prototype_head(
            embeddings,
            self.prototypes[...],
            self.last_layer[...],
            similarity_eps=self.similarity_eps,
            valid=valid,
            return_views=return_views,
        )


def prototype_head(
    embeddings: jax.Array,
    prototypes: jax.Array,
    last_layer: jax.Array,
    *,
    similarity_eps: float,
    valid: jax.Array | None = None,
    return_views: bool = False,
) -> ProtoMaskOutput:
    """Everything after the embeddings ``[B, K, D]``: distances to ``prototypes`` ``[P, D]``,
    min over views (invalid ones at +inf), similarity, logits (``last_layer`` ``[P, C]``)."""
    view_distances = squared_distances(embeddings, prototypes)
    candidates = view_distances
    if valid is not None:
        candidates = jnp.where(valid[:, :, None], view_distances, jnp.inf)
    min_distances = jnp.min(candidates, axis=1)
    winning_view = jnp.argmin(candidates, axis=1).astype(jnp.int32)
    similarity = log_similarity(min_distances, similarity_eps)
    logits = jnp.dot(similarity, last_layer, precision=_DISTANCE_PRECISION)
    return ProtoMaskOutput(
        logits=logits,
        min_distances=min_distances,
        winning_view=winning_view,
        view_distances=view_distances if return_views else None,
        embeddings=embeddings.astype(jnp.float32) if return_views else None,
    )


def build_model(config: Any, num_classes: int, rngs: nnx.Rngs) -> ProtoMask:
    """A randomly initialised ProtoMask; weights come separately (``convert.load_pretrained``),
    so this also runs under ``nnx.eval_shape`` for sharded initialisation."""
    model_config = config.model
    return ProtoMask(
        model_config.backbone,
        num_classes,
        prototypes_per_class=model_config.prototypes_per_class,
        prototype_dim=model_config.prototype_dim,
        incorrect_strength=model_config.incorrect_strength,
        similarity_eps=model_config.similarity_eps,
        compute_dtype=model_config.compute_dtype,
        remat=model_config.get("remat", "none"),
        rngs=rngs,
    )


def split_model(model: ProtoMask) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """``(graphdef, params, batch_stats, constants)``: every ``nnx.Param``, the BatchNorm
    running averages, the rest (``prototype_class``); ``nnx.merge`` rebuilds the model."""
    return nnx.split(model, nnx.Param, nnx.BatchStat, ...)


def apply(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch_stats: nnx.State,
    constants: nnx.State,
    views: jax.Array,
    *,
    train: bool,
    **options: Any,
) -> tuple[ProtoMaskOutput, nnx.State]:
    """:meth:`ProtoMask.__call__` as a pure function for ``jax.jit`` / ``jax.grad``:
    ``(outputs, new_batch_stats)``, the latter ``batch_stats`` itself unless ``train``."""
    # copy=True: fresh Variables owned by the current trace, so BatchNorm can update them
    # inside jax.grad / jax.jit and the caller's states are never mutated.
    model = nnx.merge(graphdef, params, batch_stats, constants, copy=True)
    outputs = model(views, train=train, **options)
    new_batch_stats = nnx.state(model, nnx.BatchStat) if train else batch_stats
    return outputs, new_batch_stats


def param_group_labels(params: nnx.State) -> nnx.State:
    """The pytree of ``params`` with each leaf replaced by its group name (one of
    ``PARAM_GROUPS``), for ``optax.multi_transform``."""

    def label(path, _leaf):
        group = path[0].key
        if group not in PARAM_GROUPS:
            raise ValueError(
                f"Parameter {jax.tree_util.keystr(path)} is in no group {PARAM_GROUPS}"
            )
        return group

    return jax.tree_util.tree_map_with_path(label, params)


_PROTOTYPE_INDEXED = ("prototypes", "last_layer", "prototype_class")


def prune(model_or_state: ProtoMask | nnx.State, keep_indices: Sequence[int] | np.ndarray):
    """Keeps the prototypes ``keep_indices`` (distinct, in that order) in ``prototypes``,
    ``last_layer`` and ``prototype_class``: a model in place, or a (full, ``params`` or
    ``constants``) state into a new one. Shapes change: a jitted step recompiles, and the
    optimizer state of ``prototypes`` and ``last_layer`` must be initialised again."""
    if isinstance(model_or_state, ProtoMask):
        num_prototypes = model_or_state.prototypes.shape[0]
    else:
        present = [name for name in _PROTOTYPE_INDEXED if name in model_or_state]
        if not present:
            raise ValueError(f"prune: the state holds none of {_PROTOTYPE_INDEXED}")
        num_prototypes = model_or_state[present[0]].shape[0]
    keep = np.asarray(keep_indices)
    if keep.ndim != 1 or not np.issubdtype(keep.dtype, np.integer):
        raise ValueError(
            f"prune: keep_indices must be a 1-D integer array, got {keep.dtype}{keep.shape}"
        )
    if keep.size and (keep.min() < 0 or keep.max() >= num_prototypes):
        raise ValueError(
            f"prune: keep_indices must lie in [0, {num_prototypes}), got {keep.min()}..{keep.max()}"
        )
    if np.unique(keep).size != keep.size:
        raise ValueError("prune: keep_indices contains duplicates")

    if isinstance(model_or_state, ProtoMask):
        for name in _PROTOTYPE_INDEXED:
            variable = getattr(model_or_state, name)
            variable.set_value(variable[...][keep])
        return model_or_state
    pruned = nnx.State(dict(model_or_state.items()))
    for name in present:
        variable = model_or_state[name]
        pruned[name] = variable.copy(variable[...][keep])
    return pruned
