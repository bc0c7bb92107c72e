"""The ProtoMask network: per-view embeddings, prototype distances, min over views, logits.

Data flow for B images of K views each (reference doc §3, §11)::

    views [B, K, H, W, 3] -> fold to [B*K, H, W, 3] -> ResNet -> [B*K, h, w, C_b]
      -> global average pool -> add-on Dense(C_b -> D) -> sigmoid -> z [B, K, D] (float32)
      -> squared L2 to P prototypes [P, D] -> view_distances [B, K, P]
      -> min over views -> min_distances [B, P], winning_view [B, P]
      -> log similarity [B, P] -> logits = similarity @ W^T [B, C]

Parameter groups are the four top-level attributes ``backbone``, ``add_on``, ``prototypes``
and ``last_layer`` (see :func:`param_group_labels`). The prototype -> class identity is the
non-trainable variable ``prototype_class``, part of the model state, so it is checkpointed
and survives pruning (the reference keeps it outside its state_dict and loses it, §9.11).

For a pure, jit-able step split the model once with :func:`split_model` and call
:func:`apply`; params and batch statistics are separate pytrees.
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
    """What the network returns (a pytree; the optional fields are ``None`` unless asked).

    Attributes:
      logits: ``[B, C]`` float32.
      min_distances: ``[B, P]`` float32, squared L2 distance of each prototype to its
        nearest view.
      winning_view: ``[B, P]`` int32, the index k of that nearest view (the explanation).
      view_distances: ``[B, K, P]`` float32 (``return_views=True`` only).
      embeddings: ``[B, K, D]`` float32 (``return_views=True`` only).
    """

    logits: jax.Array
    min_distances: jax.Array
    winning_view: jax.Array
    view_distances: jax.Array | None = None
    embeddings: jax.Array | None = None


def squared_distances(embeddings: jax.Array, prototypes: jax.Array) -> jax.Array:
    """Squared L2 distances ``|z|^2 - 2 z.p + |p|^2``, clamped at 0, in float32.

    One matrix product instead of materialising ``[..., P, D]`` differences. The clamp
    removes the small negative values that rounding produces when z is close to p.

    Args:
      embeddings: ``[..., D]`` (cast to float32).
      prototypes: ``[P, D]`` (cast to float32).

    Returns:
      ``[..., P]`` float32.
    """
    z = embeddings.astype(jnp.float32)
    p = prototypes.astype(jnp.float32)
    cross = jnp.einsum("...d,pd->...p", z, p, precision=_DISTANCE_PRECISION)
    z_sq = jnp.sum(jnp.square(z), axis=-1, keepdims=True)
    p_sq = jnp.sum(jnp.square(p), axis=-1)
    return jnp.maximum(z_sq - 2.0 * cross + p_sq, 0.0)


def squared_distances_explicit(embeddings: jax.Array, prototypes: jax.Array) -> jax.Array:
    """Readable ``sum((z - p)^2)`` over explicit differences; for tests only.

    Args:
      embeddings: ``[N, D]``.
      prototypes: ``[P, D]``.

    Returns:
      ``[N, P]`` float32.
    """
    z = embeddings.astype(jnp.float32)
    p = prototypes.astype(jnp.float32)
    return jnp.sum(jnp.square(z[:, None, :] - p[None, :, :]), axis=-1)


def log_similarity(distances: jax.Array, eps: float) -> jax.Array:
    """ProtoPNet's similarity ``log((d + 1) / (d + eps))``, large when d is small.

    Written as ``log1p((1 - eps) / (d + eps))``, the same value without the rounding of the
    ratio near 1 for large d.

    Why eps defaults to 1e-4 (``model.similarity_eps``) and not the reference's 1e-14: in
    float16 1e-14 underflows to 0, so d = 0 gives log(1/0) = inf; and in any dtype the
    gradient ``-1 / (d + eps)`` reaches 1e14 near d = 0 (after push a prototype sits exactly
    on a view), a scale no optimiser state survives. 1e-4 is ProtoPNet's value and caps the
    similarity at ~9.2 and the gradient at 1e4. Set ``model.similarity_eps=1e-14`` to
    reproduce the reference.
    """
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
    """Initial last-layer kernel ``[P, C]``: 1 for the prototype's own class, else
    ``incorrect_strength``."""
    own_class = jax.nn.one_hot(prototype_class, num_classes, dtype=jnp.float32)
    return own_class + (1.0 - own_class) * incorrect_strength


class ProtoMask(nnx.Module):
    """ProtoMask: a prototype classifier over mask views (reference doc §3).

    Attributes (the four parameter groups and the class identity):
      backbone: :class:`ResNet`.
      add_on: ``nnx.Linear(C_b -> D)`` with bias, torch's default uniform init.
      prototypes: ``nnx.Param [P, D]`` float32, init U[0, 1).
      last_layer: ``nnx.Param [P, C]`` float32 — stored transposed relative to torch's
        ``last_layer.weight [C, P]`` (W), i.e. this is W^T and ``logits = similarity @
        last_layer``. Prototypes are the leading axis of every prototype-indexed array
        (prototypes, last_layer, prototype_class), so pruning and model-axis sharding slice
        the same axis everywhere.
      prototype_class: :class:`PrototypeClass` ``[P]`` int32, ``j // prototypes_per_class``
        at init.
    """

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
        rngs: nnx.Rngs,
    ):
        """Args:
        backbone: ResNet preset name or spec.
        num_classes: C.
        prototypes_per_class: ppc; P = C * ppc. Kept as ``max_prototypes_per_class``
          (pruning only removes prototypes, so no class ever has more).
        prototype_dim: D.
        incorrect_strength: last-layer init for connections to other classes.
        similarity_eps: eps of :func:`log_similarity`.
        compute_dtype: backbone activation dtype; parameters and everything after the
          backbone are float32.
        rngs: initialisation randomness (streams ``params``/default).
        """
        num_prototypes = num_classes * prototypes_per_class
        self.backbone = ResNet(backbone, compute_dtype=compute_dtype, rngs=rngs)
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
        self.max_prototypes_per_class = prototypes_per_class
        self.similarity_eps = float(similarity_eps)

    def embed(self, views: jax.Array, *, train: bool) -> jax.Array:
        """Embeds every view.

        Args:
          views: ``[B, K, H, W, 3]`` normalised views.
          train: BatchNorm in training mode.

        Returns:
          ``[B, K, D]`` float32 in (0, 1).
        """
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
        """Classifies images from their views.

        Args:
          views: ``[B, K, H, W, 3]`` normalised views (any float dtype).
          train: BatchNorm uses batch statistics and updates its running averages (the only
            train/eval difference in this network).
          valid: optional ``[B, K]`` bool; views marked False never win the min. Every image
            needs at least one valid view. With cyclic padding it can be left out: a
            repeated view changes no minimum.
          return_views: also return ``view_distances`` and ``embeddings``.

        Returns:
          :class:`ProtoMaskOutput`.
        """
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
    """Everything after the embeddings: distances, min over views, similarity, logits.

    Args:
      embeddings: ``[B, K, D]``.
      prototypes: ``[P, D]``.
      last_layer: ``[P, C]`` kernel (W^T).
      similarity_eps: eps of :func:`log_similarity`.
      valid: optional ``[B, K]`` bool; invalid views get +inf distance before the min.
      return_views: also return ``view_distances`` and ``embeddings``.

    Returns:
      :class:`ProtoMaskOutput`.
    """
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
    """Builds a randomly initialised ProtoMask from ``config.model``.

    Reads ``model.backbone``, ``model.prototypes_per_class``, ``model.prototype_dim``,
    ``model.incorrect_strength``, ``model.similarity_eps`` and ``model.compute_dtype``.
    Pretrained weights are loaded separately (``models.convert.load_pretrained``) so that
    this function also works under ``nnx.eval_shape`` for sharded initialisation.

    Args:
      config: the full config (an ``ml_collections.ConfigDict``).
      num_classes: C.
      rngs: initialisation randomness.
    """
    model_config = config.model
    return ProtoMask(
        model_config.backbone,
        num_classes,
        prototypes_per_class=model_config.prototypes_per_class,
        prototype_dim=model_config.prototype_dim,
        incorrect_strength=model_config.incorrect_strength,
        similarity_eps=model_config.similarity_eps,
        compute_dtype=model_config.compute_dtype,
        rngs=rngs,
    )


def split_model(model: ProtoMask) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """Splits the model for pure functions: ``(graphdef, params, batch_stats, constants)``.

    ``params`` holds every ``nnx.Param`` (the trainable groups), ``batch_stats`` the
    BatchNorm running averages, ``constants`` the rest (``prototype_class``). Rebuild with
    ``nnx.merge(graphdef, params, batch_stats, constants)``.
    """
    return nnx.split(model, nnx.Param, nnx.BatchStat, ...)


def apply(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch_stats: nnx.State,
    constants: nnx.State,
    views: jax.Array,
    *,
    train: bool,
    valid: jax.Array | None = None,
    return_views: bool = False,
) -> tuple[ProtoMaskOutput, nnx.State]:
    """Pure forward pass, for use inside ``jax.jit`` / ``jax.grad``.

    Args:
      graphdef, params, batch_stats, constants: from :func:`split_model`.
      views: ``[B, K, H, W, 3]``.
      train: Python bool (static): BatchNorm in training mode.
      valid: optional ``[B, K]`` bool.
      return_views: also return per-view distances and embeddings.

    Returns:
      ``(outputs, new_batch_stats)``; ``new_batch_stats`` is ``batch_stats`` unchanged when
      ``train`` is False.
    """
    # copy=True: fresh Variables owned by the current trace, so BatchNorm can update them
    # inside jax.grad / jax.jit and the caller's states are never mutated.
    model = nnx.merge(graphdef, params, batch_stats, constants, copy=True)
    outputs = model(views, train=train, valid=valid, return_views=return_views)
    new_batch_stats = nnx.state(model, nnx.BatchStat) if train else batch_stats
    return outputs, new_batch_stats


def param_group_labels(params: nnx.State) -> nnx.State:
    """Labels each leaf of ``params`` with its group name, for ``optax.multi_transform``.

    Args:
      params: the ``params`` state of :func:`split_model` (or any state of the model).

    Returns:
      A pytree with the structure of ``params`` whose leaves are one of
      ``"backbone"``, ``"add_on"``, ``"prototypes"``, ``"last_layer"``.
    """

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
    """Keeps only the prototypes ``keep_indices`` (rows of ``prototypes``, ``last_layer`` and
    ``prototype_class``; torch's last-layer *columns*).

    Shapes change, so a jitted step recompiles and optimizer state for ``prototypes`` and
    ``last_layer`` must be re-initialised afterwards.

    Args:
      model_or_state: a :class:`ProtoMask` (modified in place and returned) or a state of
        one (full, ``params`` or ``constants``: whichever of the three prototype-indexed
        entries it holds are pruned; a new state is returned).
      keep_indices: ``[P']`` distinct prototype indices, in the order to keep.

    Returns:
      The pruned model or a new pruned state.
    """
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
