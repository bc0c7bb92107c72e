"""ProtoMask network: distances, min over views, cyclic padding, pure apply, groups, prune."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common
from protomask_jax import losses
from protomask_jax.models import protomask as pm

NUM_CLASSES, PPC, DIM = 3, 2, 8


@pytest.fixture(scope="module")
def model():
    return pm.ProtoMask(
        "resnet_micro", NUM_CLASSES, prototypes_per_class=PPC, prototype_dim=DIM, rngs=nnx.Rngs(0)
    )


def _views(seed, batch=2, num_views=3, size=32):
    return jax.random.normal(jax.random.key(seed), (batch, num_views, size, size, 3))


_apply = jax.jit(pm.apply, static_argnums=0, static_argnames=("train", "return_views"))


# ----------------------------------------------------------------------------- distances


def test_fused_distances_match_explicit_in_float32():
    z = jax.random.uniform(jax.random.key(0), (40, 64))
    p = jax.random.uniform(jax.random.key(1), (30, 64))
    p = p.at[0].set(z[0])  # an exact hit: d = 0 must come out as 0, not negative
    fused = pm.squared_distances(z, p)
    explicit = pm.squared_distances_explicit(z, p)

    # The fused form subtracts |z|^2 + |p|^2 ~ 2 D/3 = 43 (for D = 64) from 2 z.p; float32
    # rounding of those sums is ~1e-7 relative, so we allow 1e-5 relative to that scale.
    scale = jnp.sum(z**2, -1)[:, None] + jnp.sum(p**2, -1)[None, :]
    assert jnp.all(jnp.abs(fused - explicit) <= 1e-5 * scale)
    assert fused.dtype == jnp.float32 and jnp.all(fused >= 0)
    assert fused[0, 0] < 1e-4


def test_fused_distances_with_bfloat16_embeddings():
    z32 = jax.random.uniform(jax.random.key(2), (40, 64))
    p = jax.random.uniform(jax.random.key(3), (30, 64))
    z16 = z32.astype(jnp.bfloat16)
    fused = pm.squared_distances(z16, p)
    assert fused.dtype == jnp.float32

    # Computed in float32 from the bf16 values: as exact as the float32 case.
    exact_on_rounded = pm.squared_distances_explicit(z16.astype(jnp.float32), p)
    scale = jnp.sum(z32**2, -1)[:, None] + jnp.sum(p**2, -1)[None, :]
    assert jnp.all(jnp.abs(fused - exact_on_rounded) <= 1e-5 * scale)

    # Against the unrounded embeddings the error is the bf16 rounding of z itself: each
    # coordinate moves by at most 2^-9 relative (8 significant bits), so by Cauchy-Schwarz
    # |d(z16) - d(z32)| <= 2 |z - p| |dz| + |dz|^2 with |dz| <= 2^-9 |z|: a looser bound of
    # about 2^-8 sqrt(d) |z|, far above float32 rounding.
    explicit32 = pm.squared_distances_explicit(z32, p)
    dz = 2.0**-9 * jnp.linalg.norm(z32, axis=-1)[:, None]
    bound = 2 * jnp.sqrt(explicit32) * dz + dz**2 + 1e-5 * scale
    error = jnp.abs(fused - explicit32)
    assert jnp.all(error <= bound)
    assert jnp.max(error) > 1e-3  # the rounding is really visible at this size


def test_min_over_views_and_winning_view_on_hand_built_example():
    # Two prototypes in 2-D, three views per image; distances worked out by hand.
    prototypes = jnp.array([[0.0, 0.0], [1.0, 1.0]])
    embeddings = jnp.array(
        [
            [[1.0, 1.0], [0.0, 0.0], [0.5, 0.5]],  # d to p0: 2, 0, .5; to p1: 0, 2, .5
            [[0.5, 0.0], [1.0, 0.0], [0.0, 1.0]],  # d to p0: .25, 1, 1; to p1: 1.25, 1, 1
        ]
    )
    last_layer = jnp.array([[1.0, -0.5], [0.25, 2.0]])  # [P, C]
    eps = 1e-4
    out = pm.prototype_head(
        embeddings, prototypes, last_layer, similarity_eps=eps, return_views=True
    )
    np.testing.assert_allclose(
        out.view_distances, [[[2, 0], [0, 2], [0.5, 0.5]], [[0.25, 1.25], [1, 1], [1, 1]]]
    )
    np.testing.assert_allclose(out.min_distances, [[0, 0], [0.25, 1]])
    np.testing.assert_array_equal(out.winning_view, [[1, 0], [0, 1]])
    assert out.winning_view.dtype == jnp.int32
    similarity = np.log((np.array([[0, 0], [0.25, 1]]) + 1) / (np.array([[0, 0], [0.25, 1]]) + eps))
    np.testing.assert_allclose(out.logits, similarity @ np.asarray(last_layer), rtol=1e-6)

    # Invalid views never win: hide view 1 of image 0 and view 0 of image 1.
    valid = jnp.array([[True, False, True], [False, True, True]])
    masked = pm.prototype_head(embeddings, prototypes, last_layer, similarity_eps=eps, valid=valid)
    np.testing.assert_allclose(masked.min_distances, [[0.5, 0], [1, 1]])
    np.testing.assert_array_equal(masked.winning_view, [[2, 0], [1, 1]])


def test_similarity_is_finite_with_finite_gradient_at_zero_distance():
    values, grads = jax.vmap(jax.value_and_grad(lambda d: pm.log_similarity(d, 1e-4)))(
        jnp.array([0.0, 1e-8, 1.0])
    )
    assert jnp.all(jnp.isfinite(values)) and jnp.all(jnp.isfinite(grads))
    np.testing.assert_allclose(values[0], np.log(1 / 1e-4), rtol=1e-6)
    np.testing.assert_allclose(values[2], np.log(2 / (1 + 1e-4)), rtol=1e-6)
    np.testing.assert_allclose(pm.log_similarity(jnp.float32(0.0), 1e-14), np.log(1e14), rtol=1e-6)


# ----------------------------------------------------------------------------- network


def test_init_follows_the_reference(model):
    _, params, _, constants = pm.split_model(model)
    num_prototypes = NUM_CLASSES * PPC
    np.testing.assert_array_equal(constants["prototype_class"][...], [0, 0, 1, 1, 2, 2])
    expected_last = np.zeros((num_prototypes, NUM_CLASSES))
    expected_last[np.arange(num_prototypes), np.arange(num_prototypes) // PPC] = 1
    np.testing.assert_array_equal(params["last_layer"][...], expected_last)
    prototypes = params["prototypes"][...]
    assert prototypes.shape == (num_prototypes, DIM) and jnp.all(
        (prototypes >= 0) & (prototypes < 1)
    )
    bound = 1 / np.sqrt(model.backbone.out_channels)
    for name in ("kernel", "bias"):
        values = params["add_on"][name][...]
        assert jnp.all(jnp.abs(values) <= bound) and jnp.max(jnp.abs(values)) > 0.5 * bound

    shifted = pm.ProtoMask(
        "resnet_micro",
        2,
        prototypes_per_class=1,
        prototype_dim=4,
        incorrect_strength=-0.5,
        rngs=nnx.Rngs(0),
    )
    np.testing.assert_array_equal(shifted.last_layer[...], [[1, -0.5], [-0.5, 1]])


def test_cyclic_padding_of_views_leaves_logits_unchanged(model):
    graphdef, params, batch_stats, constants = pm.split_model(model)
    originals = _views(5, batch=2, num_views=2)
    padded = jnp.concatenate([originals, originals[:, :1]], axis=1)  # K = 3: v0 v1 v0
    out_k2, _ = _apply(graphdef, params, batch_stats, constants, originals, train=False)
    out_k3, _ = _apply(graphdef, params, batch_stats, constants, padded, train=False)
    valid = jnp.array([[True, True, False]] * 2)
    out_masked, _ = _apply(
        graphdef, params, batch_stats, constants, padded, train=False, valid=valid
    )
    np.testing.assert_allclose(out_k3.logits, out_k2.logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out_k3.min_distances, out_k2.min_distances, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out_masked.logits, out_k2.logits, rtol=1e-6, atol=1e-6)
    assert jnp.all(out_masked.winning_view < 2)


def test_apply_outputs_and_batch_statistics(model):
    graphdef, params, batch_stats, constants = pm.split_model(model)
    views = _views(6)
    out, new_stats = _apply(
        graphdef, params, batch_stats, constants, views, train=True, return_views=True
    )
    assert out.logits.shape == (2, NUM_CLASSES)
    assert out.min_distances.shape == (2, NUM_CLASSES * PPC)
    assert out.view_distances.shape == (2, 3, NUM_CLASSES * PPC)
    assert out.embeddings.shape == (2, 3, DIM) and out.embeddings.dtype == jnp.float32
    np.testing.assert_allclose(out.min_distances, jnp.min(out.view_distances, axis=1))
    np.testing.assert_allclose(
        out.view_distances,
        pm.squared_distances_explicit(
            out.embeddings.reshape(-1, DIM), params["prototypes"][...]
        ).reshape(2, 3, -1),
        rtol=1e-5,
        atol=1e-5,
    )
    # Train mode moves the running averages; eval mode returns them untouched.
    old_mean = batch_stats["backbone"]["bn1"]["mean"][...]
    assert not np.allclose(new_stats["backbone"]["bn1"]["mean"][...], old_mean)
    _, same_stats = _apply(graphdef, params, new_stats, constants, views, train=False)
    np.testing.assert_array_equal(
        same_stats["backbone"]["bn1"]["mean"][...], new_stats["backbone"]["bn1"]["mean"][...]
    )
    # The caller's states are not modified in place.
    np.testing.assert_array_equal(batch_stats["backbone"]["bn1"]["mean"][...], old_mean)


def test_param_group_labels_drive_multi_transform(model):
    graphdef, params, batch_stats, constants = pm.split_model(model)
    labels = pm.param_group_labels(params)
    label_of = {
        jax.tree_util.keystr(path): label
        for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]
    }
    assert set(label_of.values()) == set(pm.PARAM_GROUPS)
    assert all(label == key.split("'")[1] for key, label in label_of.items())

    # Only the prototypes move when the other groups are frozen.
    tx = optax.multi_transform(
        {
            "prototypes": optax.sgd(0.1),
            "backbone": optax.set_to_zero(),
            "add_on": optax.set_to_zero(),
            "last_layer": optax.set_to_zero(),
        },
        labels,
    )
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new_params = optax.apply_updates(params, updates)
    for group in pm.PARAM_GROUPS:
        changed = [
            not np.array_equal(a, b)
            for a, b in zip(
                jax.tree.leaves(new_params[group]), jax.tree.leaves(params[group]), strict=True
            )
        ]
        assert all(changed) if group == "prototypes" else not any(changed)


def test_train_step_compiles_once(model):
    graphdef, params, batch_stats, constants = pm.split_model(model)
    config = common.get_base_config()
    trace_count = 0

    @functools.partial(jax.jit, donate_argnums=())
    def loss_and_grads(params, batch_stats, constants, views, labels, class_weights):
        nonlocal trace_count
        trace_count += 1

        def loss_fn(params):
            outputs, new_stats = pm.apply(
                graphdef, params, batch_stats, constants, views, train=True
            )
            total, terms = losses.protomask_loss(
                outputs,
                labels,
                params["prototypes"][...],
                params["last_layer"][...],
                constants["prototype_class"][...],
                "joint",
                config.loss,
                class_weights,
            )
            return total, new_stats

        (total, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return total, grads, new_stats

    class_weights = jnp.ones(NUM_CLASSES)
    first = loss_and_grads(
        params, batch_stats, constants, _views(7), jnp.array([0, 2]), class_weights
    )
    second = loss_and_grads(
        params, first[2], constants, _views(8), jnp.array([1, 1]), class_weights
    )
    assert trace_count == 1
    assert float(first[0]) != float(second[0])
    grad_norms = {g: optax.tree.norm(first[1][g]) for g in pm.PARAM_GROUPS}
    assert all(np.isfinite(v) for v in grad_norms.values())
    assert all(value > 0 for value in grad_norms.values())


def test_build_model_reads_config():
    config = common.get_base_config()
    config.model.backbone = "resnet_micro"
    config.model.prototype_dim = 5
    config.model.prototypes_per_class = 3
    config.model.incorrect_strength = -0.5
    config.model.similarity_eps = 1e-14
    config.model.compute_dtype = "bfloat16"
    model = pm.build_model(config, num_classes=4, rngs=nnx.Rngs(0))
    assert model.prototypes.shape == (12, 5) and model.last_layer.shape == (12, 4)
    assert model.similarity_eps == 1e-14 and model.max_prototypes_per_class == 3
    assert model.backbone.compute_dtype == jnp.bfloat16
    assert float(jnp.min(model.last_layer[...])) == -0.5


def test_prune_model_and_state(model):
    graphdef, params, batch_stats, constants = pm.split_model(model)
    views = _views(9)
    full, _ = _apply(graphdef, params, batch_stats, constants, views, train=False)
    keep = np.array([5, 0, 3])

    pruned_params = pm.prune(params, keep)
    pruned_constants = pm.prune(constants, keep)
    np.testing.assert_array_equal(pruned_constants["prototype_class"][...], [2, 0, 1])
    np.testing.assert_array_equal(pruned_params["prototypes"][...], params["prototypes"][...][keep])
    pruned, _ = _apply(graphdef, pruned_params, batch_stats, pruned_constants, views, train=False)
    np.testing.assert_allclose(pruned.min_distances, full.min_distances[:, keep], rtol=1e-6)
    similarity = pm.log_similarity(full.min_distances[:, keep], model.similarity_eps)
    np.testing.assert_allclose(
        pruned.logits, similarity @ params["last_layer"][...][keep], rtol=1e-5, atol=1e-6
    )
    assert params["prototypes"].shape[0] == NUM_CLASSES * PPC  # the input state is untouched

    module = nnx.merge(graphdef, params, batch_stats, constants, copy=True)
    pm.prune(module, keep)
    np.testing.assert_array_equal(module.prototype_class[...], [2, 0, 1])
    assert module.last_layer.shape == (3, NUM_CLASSES)
    with pytest.raises(ValueError, match="duplicates"):
        pm.prune(params, [1, 1])
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        pm.prune(params, [6])
