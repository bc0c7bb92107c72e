"""ProtoMask's training losses (docs/reference.md §4), pure functions on float32 arrays.

B images, C classes, P prototypes of dimension D; ``prototype_class [P]`` int32;
``last_layer [P, C]`` is the model's kernel (W^T of torch's ``[C, P]`` weight). Labels are
``[B]`` int (single-label) or ``[B, C]`` multi-hot (multi-label).

Cluster and separation costs are exact masked minima. The reference's
``Dmax - max_j((Dmax - d) * mask)`` with ``Dmax = D`` equals them only while every distance
is at most D (true inside [0, 1]^D, not once prototypes leave it).
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


def weighted_cross_entropy(
    logits: jax.Array, labels: jax.Array, class_weights: jax.Array | None = None
) -> jax.Array:
    """torch's ``CrossEntropyLoss(weight=w)``, mean reduction: ``sum w_y nll / sum w_y``."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    if class_weights is None:
        return jnp.mean(nll)
    weights = class_weights.astype(jnp.float32)[labels]
    return jnp.sum(weights * nll) / jnp.sum(weights)


def multilabel_margin_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """torch's ``MultiLabelMarginLoss(reduction="sum")`` on multi-hot ``targets [B, C]``:
    ``sum_b sum_{j pos} sum_{i neg} max(0, 1 - (x[j] - x[i])) / C``."""
    x = logits.astype(jnp.float32)
    positive = targets.astype(jnp.float32)
    margins = jax.nn.relu(1.0 - x[:, :, None] + x[:, None, :])  # [B, j, i]
    pair_mask = positive[:, :, None] * (1.0 - positive)[:, None, :]
    return jnp.sum(margins * pair_mask) / x.shape[-1]


def _masked_min(distances: jax.Array, mask: jax.Array) -> jax.Array:
    """Row-wise min of ``distances [B, N]`` over ``mask [B, N]``; 0 for an empty row."""
    masked = jnp.min(jnp.where(mask, distances, jnp.inf), axis=-1)
    return jnp.where(jnp.any(mask, axis=-1), masked, 0.0)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Row-wise mean of ``values [B, C]`` over ``mask [B, C]``; 0 for an empty row."""
    total = jnp.sum(jnp.where(mask, values, 0.0), axis=-1)
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1)


def cluster_and_separation(
    min_distances: jax.Array, labels: jax.Array, prototype_class: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Batch means of the distance to the own class (cluster) and to the others (separation);
    multi-label (§4) averages each class's nearest over the positive or negative classes."""
    distances = min_distances.astype(jnp.float32)
    if labels.ndim == 1:
        own = prototype_class[None, :] == labels[:, None]
        other = prototype_class[None, :] != labels[:, None]
        return jnp.mean(_masked_min(distances, own)), jnp.mean(_masked_min(distances, other))
    num_classes = labels.shape[-1]
    class_min = jax.ops.segment_min(distances.T, prototype_class, num_segments=num_classes).T
    has_prototypes = jnp.isfinite(class_min)  # [B, C]
    positive = labels > 0
    cluster = _masked_mean(class_min, positive & has_prototypes)
    separation = _masked_mean(class_min, ~positive & has_prototypes)
    return jnp.mean(cluster), jnp.mean(separation)


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
    """``[N]`` summed L2 distances over ordered pairs of each class's prototypes; NaN (the
    trainer stops) rather than silently dropped pairs above ``max_prototypes_per_class``."""

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
    """``mean_b exp(-0.001 S_b)``, S_b the spread of sample b's class. Multi-label (ours; the
    reference's crashes, §4) averages over the positive classes. ``reference_detached``
    drops the gradient as the reference's ``.item()`` does (§9.3)."""
    if labels.ndim == 1:
        spread = _class_spread(prototypes, prototype_class, labels, max_prototypes_per_class)
        loss = jnp.mean(jnp.exp(-_DIVERSITY_SCALE * spread))
    else:
        classes = jnp.arange(labels.shape[-1])
        spread = _class_spread(prototypes, prototype_class, classes, max_prototypes_per_class)
        class_loss = jnp.exp(-_DIVERSITY_SCALE * spread)  # [C]
        positive = (labels > 0).astype(jnp.float32)
        per_sample = positive @ class_loss / jnp.maximum(jnp.sum(positive, axis=-1), 1.0)
        loss = jnp.mean(per_sample)
    return jax.lax.stop_gradient(loss) if reference_detached else loss


def l1_cost(last_layer: jax.Array, prototype_class: jax.Array) -> jax.Array:
    """``sum_{c, j} |W[c, j]| (1 - I[j, c])``: L1 of the connections to other classes."""
    num_classes = last_layer.shape[-1]
    other_class = prototype_class[:, None] != jnp.arange(num_classes)[None, :]
    return jnp.sum(jnp.where(other_class, jnp.abs(last_layer.astype(jnp.float32)), 0.0))


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
    """``(total, unweighted terms)``: warmup / joint ``ce*CE + cluster*clst - separation*sep
    + diversity*div``, finetune ``ce*CE + l1*L1``; coefficients from ``config.loss``. The
    multi-label margin loss takes no class weights. ``max_prototypes_per_class`` defaults to
    P // C, right only before pruning."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    num_prototypes, num_classes = last_layer_w.shape
    if max_prototypes_per_class is None:
        max_prototypes_per_class = max(num_prototypes // num_classes, 1)

    if labels.ndim == 2:
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
        return config_loss.ce * ce + config_loss.l1 * l1, dict(ce=ce, l1=l1)

    cluster, separation = cluster_and_separation(outputs.min_distances, labels, prototype_class)
    diversity = diversity_loss(
        prototypes,
        prototype_class,
        labels,
        max_prototypes_per_class=max_prototypes_per_class,
        reference_detached=config_loss.reference_detached_diversity,
    )
    c = config_loss
    total = c.ce * ce + c.cluster * cluster - c.separation * separation + c.diversity * diversity
    return total, dict(ce=ce, cluster=cluster, separation=separation, diversity=diversity)
