"""Push and prune as streaming reductions, against hand-built cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protomask_jax import push as push_lib
from protomask_jax.models.protomask import ProtoMaskOutput


def _batch(labels, image_ids, num_views=2, weight=None, valid=None, num_masks=None):
    b = len(labels)
    return {
        "label": jnp.asarray(labels, jnp.int32),
        "image_id": jnp.asarray(image_ids, jnp.int32),
        "weight": jnp.ones(b, jnp.float32) if weight is None else jnp.asarray(weight, jnp.float32),
        "valid": jnp.ones((b, num_views), bool) if valid is None else jnp.asarray(valid),
        "num_masks": jnp.full(b, num_views, jnp.int32)
        if num_masks is None
        else jnp.asarray(num_masks, jnp.int32),
        "boxes": jnp.arange(b * num_views * 4, dtype=jnp.float32).reshape(b, num_views, 4),
    }


def _outputs(view_distances, embeddings):
    d = jnp.asarray(view_distances, jnp.float32)
    return ProtoMaskOutput(
        logits=jnp.zeros((d.shape[0], 2)),
        min_distances=d.min(axis=1),
        winning_view=d.argmin(axis=1),
        view_distances=d,
        embeddings=jnp.asarray(embeddings, jnp.float32),
    )


# Two prototypes: prototype 0 of class 0, prototype 1 of class 1. D = 1 embeddings whose
# value names the (image, view) they come from, so the chosen source is readable.
PROTOTYPE_CLASS = jnp.array([0, 1], jnp.int32)

# Batch A: image 10 (class 0) has a view at distance 0.1 from prototype 0 — the global best.
BATCH_A = _batch([0, 1], [10, 11])
OUT_A = _outputs(
    [[[0.1, 9.0], [0.5, 9.0]], [[9.0, 0.7], [9.0, 0.3]]],  # [B=2, K=2, P=2]
    [[[100.0], [101.0]], [[110.0], [111.0]]],
)
# Batch B: image 20 (class 0) only reaches 0.4 — worse for prototype 0; image 21 (class 1)
# reaches 0.2 for prototype 1 — better than batch A's 0.3.
BATCH_B = _batch([0, 1], [20, 21])
OUT_B = _outputs(
    [[[0.6, 9.0], [0.4, 9.0]], [[9.0, 0.2], [9.0, 0.8]]],
    [[[200.0], [201.0]], [[210.0], [211.0]]],
)


def _run(reference_per_batch):
    carry = push_lib.init_push_carry(jnp.zeros((2, 1)))
    for out, batch in ((OUT_A, BATCH_A), (OUT_B, BATCH_B)):
        carry = push_lib.push_update(
            carry, out, batch, PROTOTYPE_CLASS, reference_per_batch=reference_per_batch
        )
    return carry


def test_push_takes_the_global_nearest_view():
    carry = _run(reference_per_batch=False)
    # prototype 0: image 10 view 0 (0.1) beats batch B's 0.4; prototype 1: image 21 view 0.
    np.testing.assert_allclose(carry["distance"], [0.1, 0.2])
    np.testing.assert_array_equal(carry["image_id"], [10, 21])
    np.testing.assert_array_equal(carry["view_index"], [0, 0])
    np.testing.assert_allclose(carry["embedding"][:, 0], [100.0, 210.0])
    # box of (image 0, view 0) of batch A and of (image 1, view 0) of batch B
    np.testing.assert_allclose(carry["box"][0], [0, 1, 2, 3])
    np.testing.assert_allclose(carry["box"][1], [8, 9, 10, 11])


def test_reference_per_batch_flag_reproduces_the_bug():
    carry = _run(reference_per_batch=True)
    # The reference resets its minimum every batch: prototype 0 ends on batch B's image 20,
    # view 1 (0.4), although batch A held a nearer view (0.1).
    np.testing.assert_allclose(carry["distance"], [0.4, 0.2])
    np.testing.assert_array_equal(carry["image_id"], [20, 21])
    np.testing.assert_array_equal(carry["view_index"], [1, 0])


def test_push_ignores_other_classes_filler_and_invalid_views():
    # One image of class 1 (wrong class for prototype 0), one filler row of class 0, and an
    # image of class 0 whose nearer view is a cyclic repeat marked invalid.
    batch = _batch(
        [1, 0, 0], [5, -1, 7], weight=[1, 0, 1], valid=[[1, 1], [1, 1], [1, 0]], num_masks=[2, 2, 1]
    )
    out = _outputs(
        [[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.05, 0.5]]],
        [[[1.0], [2.0]], [[3.0], [4.0]], [[5.0], [6.0]]],
    )
    carry = push_lib.push_update(
        push_lib.init_push_carry(jnp.zeros((2, 1))), out, batch, jnp.array([0, 0])
    )
    np.testing.assert_allclose(carry["distance"], [0.5, 0.5])
    np.testing.assert_array_equal(carry["image_id"], [7, 7])
    np.testing.assert_array_equal(carry["mask_index"], [0, 0])


def test_run_push_keeps_prototypes_without_a_class_image():
    prototypes = jnp.array([[7.0], [8.0], [9.0]])
    batches = [BATCH_A, BATCH_B]
    outputs = {id(BATCH_A): OUT_A, id(BATCH_B): OUT_B}

    def forward(batch):
        out = outputs[id(batch)]
        # a third prototype of class 2, never present: distance 9 everywhere
        d = jnp.concatenate(
            [out.view_distances, jnp.full(out.view_distances.shape[:2] + (1,), 9.0)], -1
        )
        return out._replace(view_distances=d)

    result = push_lib.run_push(forward, batches, prototypes, jnp.array([0, 1, 2]))
    np.testing.assert_allclose(result.prototypes[:, 0], [100.0, 210.0, 9.0])
    assert result.image_id.tolist() == [10, 21, -1]
    assert not np.isfinite(result.distance[2])
    gallery = result.to_json()
    assert gallery["image_id"] == [10, 21, -1]
    assert gallery["duplicate_groups"] == []


def test_duplicate_groups_link_one_view_and_identical_vectors():
    # p0..p2 on image 5 mask 2; p4 on mask 3 of image 5, a mask with the same box, so the
    # same vector as p0; p3 and p7 on image 7 mask 2; p5, p6 never projected (image -1),
    # different vectors: not duplicates of each other.
    image_id = [5, 5, 5, 7, 5, -1, -1, 7]
    mask_index = [2, 2, 2, 2, 3, 0, 0, 2]
    a, b = [1.0, 0.0], [0.0, 1.0]
    vectors = np.array([a, a, a, b, a, [3.0, 3.0], [4.0, 3.0], b], np.float32)
    assert push_lib.duplicate_groups(image_id, mask_index, vectors) == [[0, 1, 2, 4], [3, 7]]
    # by source alone p4 (another mask) stays apart
    assert push_lib.duplicate_groups(image_id, mask_index) == [[0, 1, 2], [3, 7]]
    # identical vectors link even prototypes never projected
    vectors[6] = vectors[5]
    assert push_lib.duplicate_groups(image_id, mask_index, vectors)[-1] == [5, 6]


def test_duplicate_groups_of_nine_prototypes_on_one_view():
    # The user's case: 9 of 10 prototypes projected onto one view of image 4.
    groups = push_lib.duplicate_groups([4] * 9 + [8], [1] * 9 + [0])
    assert groups == [list(range(9))]
    assert push_lib.duplicate_groups([1, 2, 3], [0, 0, 0]) == []


def test_prune_keeps_prototypes_whose_nearest_images_share_their_class():
    # 3 prototypes (classes 0, 0, 1); 6 images over two batches; k = 3, threshold = 2.
    labels = np.array([0, 0, 1, 1, 1, 0])
    min_distances = np.array(
        [
            # p0: nearest are images 0, 1 (class 0) and 2 → 2 own → kept
            # p1: nearest are images 2, 3, 4 (class 1) → 0 own → pruned
            # p2: nearest are images 3, 4, 5 → 2 own (class 1) → kept
            [0.1, 5.0, 9.0],
            [0.2, 5.0, 9.0],
            [0.3, 0.1, 9.0],
            [0.9, 0.2, 0.1],
            [0.9, 0.3, 0.2],
            [0.9, 0.9, 0.3],
        ]
    )
    carry = push_lib.init_prune_carry(3, 3)
    for rows in (slice(0, 4), slice(4, 6)):
        batch = {"label": jnp.asarray(labels[rows]), "weight": jnp.ones(len(labels[rows]))}
        carry = push_lib.prune_update(
            carry, jnp.asarray(min_distances[rows]), batch, jnp.array([0, 0, 1])
        )
    keep = push_lib.prototypes_to_keep({k: np.asarray(v) for k, v in carry.items()}, threshold=2)
    assert keep.tolist() == [0, 2]
    # plain computation of the same rule
    for j, cls in enumerate([0, 0, 1]):
        nearest = np.argsort(min_distances[:, j], kind="stable")[:3]
        assert ((labels[nearest] == cls).sum() >= 2) == (j in keep)


@pytest.mark.parametrize("weight", [[1, 0]])
def test_prune_ignores_filler_rows(weight):
    carry = push_lib.prune_update(
        push_lib.init_prune_carry(1, 2),
        jnp.array([[0.5], [0.0]]),
        {"label": jnp.array([0, 0]), "weight": jnp.asarray(weight, jnp.float32)},
        jnp.array([0]),
    )
    np.testing.assert_allclose(np.asarray(carry["distance"])[0], [0.5, np.inf])
    assert np.asarray(carry["own"])[0].tolist() == [True, False]


def test_multi_label_push_and_prune_count_images_whose_label_set_holds_the_class():
    # Prototype 0 of class 0, prototype 1 of class 2. Image 30 holds {0, 1}, image 31 {1, 2},
    # image 32 {2}. Distances make image 31 the nearest for prototype 0 (but it lacks class 0)
    # and image 30 the nearest for prototype 1 (it lacks class 2).
    labels = jnp.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]], jnp.int32)
    batch = _batch(np.zeros(3), [30, 31, 32], num_views=1) | {"label": labels}
    min_distances = np.array([[0.3, 0.1], [0.1, 0.4], [0.9, 0.2]])
    out = _outputs(min_distances[:, None, :], [[[1.0]], [[2.0]], [[3.0]]])
    classes = jnp.array([0, 2])
    carry = push_lib.push_update(push_lib.init_push_carry(jnp.zeros((2, 1))), out, batch, classes)
    assert np.asarray(carry["image_id"]).tolist() == [30, 32]  # nearest image holding the class
    np.testing.assert_allclose(carry["distance"], [0.3, 0.2])
    pruned = push_lib.prune_update(
        push_lib.init_prune_carry(2, 2), jnp.asarray(min_distances), batch, classes
    )
    # k = 2 nearest: prototype 0 -> images 31, 30 (one holds 0); prototype 1 -> 30, 32 (one).
    assert np.asarray(pruned["own"]).tolist() == [[False, True], [False, True]]
    assert push_lib.prototypes_to_keep(jax.device_get(pruned), threshold=1).tolist() == [0, 1]
    assert push_lib.prototypes_to_keep(jax.device_get(pruned), threshold=2).tolist() == []
