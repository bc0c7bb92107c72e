"""Push (prototype projection) and pruning as jitted streaming reductions.

Push moves every prototype onto the embedding of the nearest training view of its class, so
each prototype *is* a view a person can look at (docs/reference.md §5.4). The reference
resets its running minimum at every batch, so a prototype lands on the nearest view of the
*last* batch holding its class (§9.1); we keep one minimum over the whole training set, a
``[P]`` / ``[P, D]`` carry updated by one compiled function per batch
(``train.reference_push_per_batch`` restores the reference). Pruning (§5.5) drops the
prototypes with fewer than ``threshold`` own-class images among their k nearest, by a
streaming top-k merge instead of Python heaps over N x P.

Multi-label (labels multi-hot ``[B, C]``): an image "of" a prototype's class is one whose label
set holds it. The reference's push is single-label only; ours projects a prototype onto the
nearest view of any such image, and pruning counts such images, as the reference's sum of
label vectors does (§5.5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from protomask_jax.models.protomask import ProtoMaskOutput


@dataclasses.dataclass
class PushResult:
    """Where each prototype was projected (the prototype gallery), host arrays. A prototype
    without a training image of its class keeps its vector, with distance +inf and -1 ids."""

    prototypes: np.ndarray  # [P, D] float32, the new prototype vectors
    distance: np.ndarray  # [P] squared distance of the old prototype to its chosen view
    image_id: np.ndarray  # [P] record id of the source image
    view_index: np.ndarray  # [P] view slot k of that image
    mask_index: np.ndarray  # [P] its mask in the record: k mod the number of masks
    box: np.ndarray  # [P, 4] yxyx of the view in the canvas frame

    def to_json(self) -> dict:
        """The gallery without the vectors, for ``push.json`` and the checkpoint metadata."""
        return {
            "distance": [float(d) for d in self.distance],
            "image_id": self.image_id.astype(int).tolist(),
            "view_index": self.view_index.astype(int).tolist(),
            "mask_index": self.mask_index.astype(int).tolist(),
            "box": np.round(self.box.astype(float), 6).tolist(),
            "duplicate_groups": duplicate_groups(self.image_id, self.mask_index, self.prototypes),
        }


def duplicate_groups(image_id, mask_index, prototypes=None) -> list[list[int]]:
    """The prototypes push made into one: groups (ascending, two or more each, ordered by
    their first) linked by the same source image and mask, or by identical vectors (the
    same view reached through two masks of one box). A prototype never projected (image id
    -1) is linked only by its vector. Each group computes one similarity, so all but one of
    its prototypes add nothing."""
    image_id, mask_index = np.asarray(image_id), np.asarray(mask_index)
    parent = list(range(len(image_id)))

    def root(j: int) -> int:
        while parent[j] != j:
            j = parent[j]
        return j

    def link(keys) -> None:
        first: dict = {}
        for j, key in enumerate(keys):
            if key is None:
                continue
            if key in first:
                parent[root(j)] = root(first[key])
            else:
                first[key] = j

    link([(int(i), int(m)) if i >= 0 else None for i, m in zip(image_id, mask_index, strict=True)])
    if prototypes is not None:
        link(np.unique(np.asarray(prototypes), axis=0, return_inverse=True)[1].ravel().tolist())
    groups: dict[int, list[int]] = {}
    for j in range(len(parent)):
        groups.setdefault(root(j), []).append(j)
    return sorted(g for g in groups.values() if len(g) > 1)


def has_class(labels: jax.Array, prototype_class: jax.Array) -> jax.Array:
    """bool ``[B, P]``: image b is of prototype j's class (labels ``[B]`` or multi-hot)."""
    if labels.ndim == 1:
        return labels[:, None] == prototype_class[None, :]
    return jnp.take(labels, prototype_class, axis=1) > 0


def init_push_carry(prototypes: jax.Array) -> dict[str, jax.Array]:
    """The running state of a push: nothing found yet."""
    num_prototypes = prototypes.shape[0]
    return {
        "distance": jnp.full((num_prototypes,), jnp.inf, jnp.float32),
        # a copy: the carry is donated to the update, the caller's prototypes must survive
        "embedding": jnp.array(prototypes, dtype=jnp.float32, copy=True),
        **{
            k: jnp.full((num_prototypes,), -1, jnp.int32)
            for k in ("image_id", "view_index", "mask_index")
        },
        "box": jnp.zeros((num_prototypes, 4), jnp.float32),
    }


def push_update(
    carry: dict[str, jax.Array],
    outputs: ProtoMaskOutput,
    batch: dict[str, jax.Array],
    prototype_class: jax.Array,
    *,
    reference_per_batch: bool = False,
) -> dict[str, jax.Array]:
    """Folds one batch into the running nearest view of every prototype; ``outputs`` carry
    ``view_distances [B, K, P]`` and ``embeddings [B, K, D]``. ``reference_per_batch``: the
    reference's reset (§9.1), taking this batch's nearest view whenever it holds the class.
    """
    distances = outputs.view_distances.astype(jnp.float32)  # [B, K, P]
    batch_size, num_views, num_prototypes = distances.shape
    own_class = has_class(batch["label"], prototype_class)  # [B, P]
    eligible_image = own_class & (batch["weight"][:, None] > 0)
    eligible = eligible_image[:, None, :] & batch["valid"][:, :, None]  # [B, K, P]
    flat = jnp.where(eligible, distances, jnp.inf).reshape(batch_size * num_views, num_prototypes)
    best_flat = jnp.argmin(flat, axis=0)  # [P]; first minimum = the original, not a repeat
    best_distance = jnp.min(flat, axis=0)
    image = best_flat // num_views
    view = (best_flat % num_views).astype(jnp.int32)
    embeddings = outputs.embeddings.astype(jnp.float32).reshape(batch_size * num_views, -1)
    boxes = batch["boxes"].reshape(batch_size * num_views, 4)
    candidate = {
        "distance": best_distance,
        "embedding": embeddings[best_flat],
        "image_id": batch["image_id"][image].astype(jnp.int32),
        "view_index": view,
        "mask_index": (view % batch["num_masks"][image]).astype(jnp.int32),
        "box": boxes[best_flat],
    }
    nearer = best_distance < carry["distance"]
    take = jnp.any(eligible_image, axis=0) if reference_per_batch else nearer
    return {
        key: jnp.where(take.reshape((-1,) + (1,) * (value.ndim - 1)), candidate[key], value)
        for key, value in carry.items()
    }


def run_push(
    forward: Callable[[dict], ProtoMaskOutput],
    batches: Iterable[dict],
    prototypes: jax.Array,
    prototype_class: jax.Array,
    *,
    reference_per_batch: bool = False,
    update_fn: Callable | None = None,
) -> PushResult:
    """Where each prototype lands, streaming ``batches`` (the training split, unaugmented,
    each image once) through ``forward`` and ``update_fn`` (a jitted :func:`push_update`)."""
    if update_fn is None:
        update_fn = jax.jit(
            lambda c, o, b, pc: push_update(c, o, b, pc, reference_per_batch=reference_per_batch),
            donate_argnums=0,
        )
    carry = init_push_carry(prototypes)
    for batch in batches:
        carry = update_fn(carry, forward(batch), batch, prototype_class)
    carry = dict(jax.device_get(carry))
    return PushResult(prototypes=np.asarray(carry.pop("embedding"), np.float32), **carry)


# ------------------------------------------------------------------------------ prune


def init_prune_carry(num_prototypes: int, k: int) -> dict[str, jax.Array]:
    """The ``[P, k]`` nearest images so far: their distances and whether each is of the
    prototype's class."""
    return {
        "distance": jnp.full((num_prototypes, k), jnp.inf, jnp.float32),
        "own": jnp.zeros((num_prototypes, k), bool),
    }


def prune_update(
    carry: dict[str, jax.Array],
    min_distances: jax.Array,
    batch: dict[str, jax.Array],
    prototype_class: jax.Array,
) -> dict[str, jax.Array]:
    """Merges ``min_distances [B, P]`` into the ``[P, k]`` nearest images so far; filler rows
    (weight 0) never count, ties keep the earlier image."""
    k = carry["distance"].shape[1]
    distances = jnp.where(batch["weight"][:, None] > 0, min_distances, jnp.inf).T  # [P, B]
    own = has_class(batch["label"], prototype_class).T
    all_distances = jnp.concatenate([carry["distance"], distances], axis=1)
    all_own = jnp.concatenate([carry["own"], own], axis=1)
    _, nearest = jax.lax.top_k(-all_distances, k)
    return {
        "distance": jnp.take_along_axis(all_distances, nearest, axis=1),
        "own": jnp.take_along_axis(all_own, nearest, axis=1),
    }


def prototypes_to_keep(carry: dict[str, np.ndarray], threshold: int) -> np.ndarray:
    """Indices of the prototypes with at least ``threshold`` own-class images among their k
    nearest (the reference prunes the others)."""
    own = np.asarray(carry["own"]) & np.isfinite(carry["distance"])
    return np.flatnonzero(own.sum(axis=1) >= threshold)
