"""ProtoMask's training losses (reference doc §4), pure functions on float32 arrays.

Shapes: B images, C classes, P prototypes of dimension D. ``prototype_class [P]`` int32 is
the class of each prototype (``ProtoMask.prototype_class``); ``last_layer [P, C]`` is the
model's stored kernel (W^T of torch's ``last_layer.weight [C, P]``).

Single-label batches carry ``labels [B]`` int; multi-label batches ``labels [B, C]``
multi-hot (0/1). :func:`protomask_loss` picks the variant from ``labels.ndim``.

Cluster and separation costs are exact masked minima. The reference computes them as
``Dmax - max_j((Dmax - d) * mask)`` with ``Dmax = D``, which equals the masked minimum only
while every distance is at most D (true for embeddings and prototypes in [0, 1]^D, not
guaranteed once prototypes leave that cube during training).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from protomask_jax.models.protomask import ProtoMaskOutput

PHASES = ("warmup", "joint", "finetune")
# The reference's diversity loss is exp(-0.001 * S).
_DIVERSITY_SCALE = 1e-3


# --------------------------------------------------------------------------- classification


def weighted_cross_entropy(
    logits: jax.Array, labels: jax.Array, class_weights: jax.Array | None = None
) -> jax.Array:
    """torch's ``CrossEntropyLoss(weight=w)`` with mean reduction: ``sum w_y nll / sum w_y``.

    Args:
      logits: ``[B, C]``.
      labels: ``[B]`` int class indices.
      class_weights: ``[C]`` or None (plain mean).

    Returns:
      Scalar float32.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    if class_weights is None:
        return jnp.mean(nll)
    weights = class_weights.astype(jnp.float32)[labels]
    return jnp.sum(weights * nll) / jnp.sum(weights)


def multilabel_margin_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """torch's ``MultiLabelMarginLoss(reduction="sum")`` on multi-hot targets.

    For sample b: ``sum_{j positive} sum_{i negative} max(0, 1 - (x[j] - x[i])) / C``,
    summed over the batch. (torch takes the positives as an index list ended by -1; the
    reference builds that list from the multi-hot vector, so only the set matters.)

    Args:
      logits: ``[B, C]``.
      targets: ``[B, C]`` multi-hot 0/1.

    Returns:
      Scalar float32.
    """
    x = logits.astype(jnp.float32)
    positive = targets.astype(jnp.float32)
    # margins[b, j, i] = 1 - (x[b, j] - x[b, i]) for positive j against negative i.
    margins = jax.nn.relu(1.0 - x[:, :, None] + x[:, None, :])
    pair_mask = positive[:, :, None] * (1.0 - positive)[:, None, :]
    return jnp.sum(margins * pair_mask) / x.shape[-1]


# --------------------------------------------------------------------------- cluster / separation


def _masked_min(distances: jax.Array, mask: jax.Array) -> jax.Array:
    """Row-wise min of ``distances [B, P]`` over ``mask [B, P]``; 0 for an empty row."""
    masked = jnp.min(jnp.where(mask, distances, jnp.inf), axis=-1)
    return jnp.where(jnp.any(mask, axis=-1), masked, 0.0)


def cluster_cost(
    min_distances: jax.Array, labels: jax.Array, prototype_class: jax.Array
) -> jax.Array:
    """``mean_b min_{j: class(j) = y_b} d[b, j]``: pulls a prototype of the true class close.

    Args:
      min_distances: ``[B, P]``.
      labels: ``[B]`` int.
      prototype_class: ``[P]`` int.

    Returns:
      Scalar; a sample whose class has no prototype (possible only after pruning)
      contributes 0.
    """
    own = prototype_class[None, :] == labels[:, None]
    return jnp.mean(_masked_min(min_distances.astype(jnp.float32), own))


def separation_cost(
    min_distances: jax.Array, labels: jax.Array, prototype_class: jax.Array
) -> jax.Array:
    """``mean_b min_{j: class(j) != y_b} d[b, j]``; enters the total with a minus sign.

    Args:
      min_distances: ``[B, P]``.
      labels: ``[B]`` int.
      prototype_class: ``[P]`` int.
    """
    other = prototype_class[None, :] != labels[:, None]
    return jnp.mean(_masked_min(min_distances.astype(jnp.float32), other))


def _per_class_min(
    min_distances: jax.Array, prototype_class: jax.Array, num_classes: int
) -> jax.Array:
    """``[B, C]``: the smallest distance over each class's prototypes (+inf if it has none)."""
    per_class = jax.ops.segment_min(
        min_distances.astype(jnp.float32).T, prototype_class, num_segments=num_classes
    )
    return per_class.T


def _mean_over_selected_classes(class_min: jax.Array, selected: jax.Array) -> jax.Array:
    """``mean_b`` of the mean of ``class_min [B, C]`` over ``selected [B, C]`` classes that
    have prototypes (a sample with none selected contributes 0)."""
    selected = selected & jnp.isfinite(class_min)
    total = jnp.sum(jnp.where(selected, class_min, 0.0), axis=-1)
    count = jnp.sum(selected, axis=-1)
    return jnp.mean(total / jnp.maximum(count, 1))


def multilabel_cluster_cost(
    min_distances: jax.Array, targets: jax.Array, prototype_class: jax.Array
) -> jax.Array:
    """Per positive label, the min distance over its prototypes; mean over the positive
    labels of a sample; mean over the batch (reference §4).

    Args:
      min_distances: ``[B, P]``.
      targets: ``[B, C]`` multi-hot.
      prototype_class: ``[P]`` int.
    """
    class_min = _per_class_min(min_distances, prototype_class, targets.shape[-1])
    return _mean_over_selected_classes(class_min, targets > 0)


def multilabel_separation_cost(
    min_distances: jax.Array, targets: jax.Array, prototype_class: jax.Array
) -> jax.Array:
    """As :func:`multilabel_cluster_cost` over the negative labels of each sample."""
    class_min = _per_class_min(min_distances, prototype_class, targets.shape[-1])
    return _mean_over_selected_classes(class_min, targets <= 0)


# --------------------------------------------------------------------------- diversity


def _safe_norm(squared: jax.Array) -> jax.Array:
    """``sqrt`` whose gradient is 0 (not NaN) where ``squared`` is 0 (the diagonal pairs)."""
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _class_spread(
    prototypes: jax.Array,
    prototype_class: jax.Array,
    classes: jax.Array,
    max_prototypes_per_class: int,
) -> jax.Array:
    """``S = sum over ordered pairs (i, i') of the class's prototypes of ||p_i - p_i'||_2``.

    Args:
      prototypes: ``[P, D]``.
      prototype_class: ``[P]`` int.
      classes: ``[N]`` int, the classes to evaluate.
      max_prototypes_per_class: static bound M on prototypes per class.

    Returns:
      ``[N]`` float32; NaN for a class with more than M prototypes (a bound that is too
      small would otherwise silently drop pairs; NaN is caught by the trainer's checks).
    """

    def members(c):
        is_member = prototype_class == c
        indices = jnp.nonzero(is_member, size=max_prototypes_per_class, fill_value=0)[0]
        return indices, jnp.sum(is_member)

    indices, counts = jax.vmap(members)(classes)  # [N, M], [N]
    slot_used = jnp.arange(max_prototypes_per_class)[None, :] < counts[:, None]
    vectors = prototypes.astype(jnp.float32)[indices]  # [N, M, D]
    differences = vectors[:, :, None, :] - vectors[:, None, :, :]  # [N, M, M, D]
    norms = _safe_norm(jnp.sum(jnp.square(differences), axis=-1))
    pair_used = slot_used[:, :, None] & slot_used[:, None, :]
    spread = jnp.sum(jnp.where(pair_used, norms, 0.0), axis=(1, 2))
    return jnp.where(counts > max_prototypes_per_class, jnp.nan, spread)


def diversity_loss(
    prototypes: jax.Array,
    prototype_class: jax.Array,
    labels: jax.Array,
    *,
    max_prototypes_per_class: int,
    reference_detached: bool = False,
) -> jax.Array:
    """``mean_b exp(-0.001 S_b)``, S_b the summed pairwise L2 distance between the
    prototypes of sample b's class: pushes a class's prototypes apart.

    Single-label (``labels [B]``) follows the reference. Multi-label (``labels [B, C]``) is
    our extension — the reference's multi-label path crashes (§4): per sample, the mean of
    ``exp(-0.001 S_c)`` over its positive classes.

    Args:
      prototypes: ``[P, D]``.
      prototype_class: ``[P]`` int.
      labels: ``[B]`` int or ``[B, C]`` multi-hot.
      max_prototypes_per_class: static upper bound on the prototypes of one class (the
        model's ``max_prototypes_per_class``, which pruning does not change).
      reference_detached: no gradient, as in the reference where ``.item()`` detaches the
        term (§9.3) so it only shifts the logged loss.

    Returns:
      Scalar float32.
    """
    if labels.ndim == 1:
        spread = _class_spread(prototypes, prototype_class, labels, max_prototypes_per_class)
        loss = jnp.mean(jnp.exp(-_DIVERSITY_SCALE * spread))
    else:
        num_classes = labels.shape[-1]
        spread = _class_spread(
            prototypes, prototype_class, jnp.arange(num_classes), max_prototypes_per_class
        )
        class_loss = jnp.exp(-_DIVERSITY_SCALE * spread)  # [C]
        positive = (labels > 0).astype(jnp.float32)
        per_sample = positive @ class_loss / jnp.maximum(jnp.sum(positive, axis=-1), 1.0)
        loss = jnp.mean(per_sample)
    return jax.lax.stop_gradient(loss) if reference_detached else loss


# --------------------------------------------------------------------------- last layer


def l1_cost(last_layer: jax.Array, prototype_class: jax.Array) -> jax.Array:
    """``sum_{c, j} |W[c, j]| (1 - I[j, c])``: L1 of the connections to other classes.

    Args:
      last_layer: ``[P, C]`` (the model's kernel, W^T).
      prototype_class: ``[P]`` int.
    """
    num_classes = last_layer.shape[-1]
    other_class = prototype_class[:, None] != jnp.arange(num_classes)[None, :]
    return jnp.sum(jnp.where(other_class, jnp.abs(last_layer.astype(jnp.float32)), 0.0))


# --------------------------------------------------------------------------- total


def protomask_loss(
    outputs: ProtoMaskOutput,
    labels: jax.Array,
    prototypes: jax.Array,
    last_layer_w: jax.Array,
    prototype_class: jax.Array,
    phase: str,
    config_loss: Any,
    class_weights: jax.Array | None = None,
    *,
    max_prototypes_per_class: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The reference's total loss for one phase, with every term for logging.

    warmup / joint: ``ce * CE + cluster * clst - separation * sep + diversity * div``;
    finetune: ``ce * CE + l1 * L1`` (coefficients from ``config.loss``; reference values
    1, 0.8, 0.2, 0.2, 1e-3).

    Args:
      outputs: the model's outputs (``logits``, ``min_distances`` are read).
      labels: ``[B]`` int (single-label) or ``[B, C]`` multi-hot (multi-label: the
        classification term is :func:`multilabel_margin_loss`, which takes no weights).
      prototypes: ``[P, D]``.
      last_layer_w: ``[P, C]`` model kernel.
      prototype_class: ``[P]`` int.
      phase: ``"warmup"``, ``"joint"`` or ``"finetune"`` (static).
      config_loss: ``config.loss`` (``ce``, ``cluster``, ``separation``, ``diversity``,
        ``l1``, ``class_weighted``, ``reference_detached_diversity``).
      class_weights: ``[C]``; required when ``config_loss.class_weighted`` is True.
      max_prototypes_per_class: static bound for the diversity term; pass the model's
        ``max_prototypes_per_class``. Defaults to P // C, right for an unpruned model.

    Returns:
      ``(total, terms)``; terms are the unweighted values of what enters the total:
      ``ce, cluster, separation, diversity`` (warmup/joint) or ``ce, l1`` (finetune).
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    num_prototypes, num_classes = last_layer_w.shape
    if max_prototypes_per_class is None:
        max_prototypes_per_class = max(num_prototypes // num_classes, 1)
    multi_label = labels.ndim == 2

    if multi_label:
        ce = multilabel_margin_loss(outputs.logits, labels)
    else:
        if config_loss.class_weighted and class_weights is None:
            raise ValueError(
                "loss.class_weighted is True but no class_weights were given; pass the "
                "training split's weights or set --config.loss.class_weighted=False"
            )
        weights = class_weights if config_loss.class_weighted else None
        ce = weighted_cross_entropy(outputs.logits, labels, weights)

    if phase == "finetune":
        l1 = l1_cost(last_layer_w, prototype_class)
        total = config_loss.ce * ce + config_loss.l1 * l1
        return total, dict(ce=ce, l1=l1)

    if multi_label:
        cluster = multilabel_cluster_cost(outputs.min_distances, labels, prototype_class)
        separation = multilabel_separation_cost(outputs.min_distances, labels, prototype_class)
    else:
        cluster = cluster_cost(outputs.min_distances, labels, prototype_class)
        separation = separation_cost(outputs.min_distances, labels, prototype_class)
    diversity = diversity_loss(
        prototypes,
        prototype_class,
        labels,
        max_prototypes_per_class=max_prototypes_per_class,
        reference_detached=config_loss.reference_detached_diversity,
    )
    total = (
        config_loss.ce * ce
        + config_loss.cluster * cluster
        - config_loss.separation * separation
        + config_loss.diversity * diversity
    )
    return total, dict(ce=ce, cluster=cluster, separation=separation, diversity=diversity)
