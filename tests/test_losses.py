"""Losses against plain numpy loops and torch's own loss modules."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from protomask_jax import losses
from protomask_jax.models.protomask import ProtoMaskOutput

B, C, D = 5, 4, 6
# Unsorted class identity with unequal class sizes, as after pruning; class 3 has 3 members.
PROTOTYPE_CLASS = np.array([1, 0, 3, 2, 0, 1, 3, 2, 3])
P = len(PROTOTYPE_CLASS)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _torch():
    return pytest.importorskip("torch")


# ----------------------------------------------------------------------------- classification


def test_weighted_cross_entropy_matches_numpy_and_torch(rng):
    logits = rng.normal(size=(B, C)).astype(np.float32) * 3
    labels = rng.integers(0, C, size=B)
    weights = rng.uniform(0.5, 2.0, size=C).astype(np.float32)

    log_probs = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
    nll = -log_probs[np.arange(B), labels]
    expected = np.sum(weights[labels] * nll) / np.sum(weights[labels])
    result = losses.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), weights)
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    np.testing.assert_allclose(
        losses.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
        nll.mean(),
        rtol=1e-6,
    )

    torch = _torch()
    torch_loss = torch.nn.CrossEntropyLoss(weight=torch.from_numpy(weights))(
        torch.from_numpy(logits), torch.from_numpy(labels)
    )
    np.testing.assert_allclose(result, torch_loss.item(), rtol=1e-6)


def test_multilabel_margin_loss_matches_torch(rng):
    torch = _torch()
    logits = rng.normal(size=(B, C)).astype(np.float32)
    targets = (rng.random(size=(B, C)) < 0.4).astype(np.int64)
    targets[0] = 0  # no positives
    targets[1] = 1  # no negatives
    # The reference's conversion: positive indices in descending order, then -1 padding.
    torch_targets = -np.ones((B, C), np.int64)
    for b in range(B):
        positives = np.flatnonzero(targets[b])[::-1]
        torch_targets[b, : len(positives)] = positives
    expected = torch.nn.MultiLabelMarginLoss(reduction="sum")(
        torch.from_numpy(logits), torch.from_numpy(torch_targets)
    )
    result = losses.multilabel_margin_loss(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(result, expected.item(), rtol=1e-6)


# ----------------------------------------------------------------------------- cluster / separation


def test_cluster_and_separation_match_numpy_loops(rng):
    distances = rng.uniform(0, 10, size=(B, P)).astype(np.float32)
    labels = rng.integers(0, C, size=B)
    expected_cluster = np.mean(
        [
            min(distances[b, j] for j in range(P) if PROTOTYPE_CLASS[j] == labels[b])
            for b in range(B)
        ]
    )
    expected_separation = np.mean(
        [
            min(distances[b, j] for j in range(P) if PROTOTYPE_CLASS[j] != labels[b])
            for b in range(B)
        ]
    )
    cluster, separation = losses.cluster_and_separation(
        jnp.asarray(distances), jnp.asarray(labels), jnp.asarray(PROTOTYPE_CLASS)
    )
    np.testing.assert_allclose(cluster, expected_cluster, rtol=1e-6)
    np.testing.assert_allclose(separation, expected_separation, rtol=1e-6)


def test_cluster_is_exact_above_the_reference_dmax(rng):
    # The reference's Dmax trick returns Dmax when every own-class distance exceeds Dmax = D;
    # the masked min stays exact.
    distances = np.full((1, P), 3.0 * D, np.float32)
    distances[0, PROTOTYPE_CLASS == 0] = [2.0 * D, 2.5 * D]
    cost, _ = losses.cluster_and_separation(
        jnp.asarray(distances), jnp.array([0]), jnp.asarray(PROTOTYPE_CLASS)
    )
    np.testing.assert_allclose(cost, 2.0 * D)


def test_a_class_without_prototypes_contributes_zero_to_cluster():
    # After pruning a class can lose every prototype: its samples add 0, not +inf.
    prototype_class = jnp.array([1, 1, 2])
    distances = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    cluster, separation = losses.cluster_and_separation(
        distances, jnp.array([0, 1]), prototype_class
    )
    np.testing.assert_allclose(cluster, (0.0 + 4.0) / 2)
    np.testing.assert_allclose(separation, (1.0 + 6.0) / 2)
    targets = jnp.array([[1, 0, 0], [0, 1, 1]])
    cluster, separation = losses.cluster_and_separation(distances, targets, prototype_class)
    np.testing.assert_allclose(cluster, (0.0 + (4.0 + 6.0) / 2) / 2)
    np.testing.assert_allclose(separation, ((1.0 + 3.0) / 2 + 0.0) / 2)


def test_multilabel_cluster_and_separation_match_numpy_loops(rng):
    distances = rng.uniform(0, 10, size=(B, P)).astype(np.float32)
    targets = (rng.random(size=(B, C)) < 0.5).astype(np.int32)
    targets[0] = [1, 0, 0, 0]
    targets[1] = [0, 1, 1, 1]

    def class_min(b, c):
        return min(distances[b, j] for j in range(P) if PROTOTYPE_CLASS[j] == c)

    def expected(select):
        per_sample = []
        for b in range(B):
            chosen = [class_min(b, c) for c in range(C) if select(targets[b, c])]
            per_sample.append(np.mean(chosen) if chosen else 0.0)
        return np.mean(per_sample)

    cluster, separation = losses.cluster_and_separation(
        jnp.asarray(distances), jnp.asarray(targets), jnp.asarray(PROTOTYPE_CLASS)
    )
    np.testing.assert_allclose(cluster, expected(lambda t: t == 1), rtol=1e-6)
    np.testing.assert_allclose(separation, expected(lambda t: t == 0), rtol=1e-6)


# ----------------------------------------------------------------------------- diversity


def _numpy_diversity(prototypes, labels):
    values = []
    for b in range(len(labels)):
        members = np.flatnonzero(PROTOTYPE_CLASS == labels[b])
        spread = sum(
            np.linalg.norm(prototypes[i] - prototypes[k])
            for i, k in itertools.product(members, members)
        )
        values.append(np.exp(-0.001 * spread))
    return np.mean(values)


def test_diversity_matches_numpy_and_has_gradient(rng):
    prototypes = rng.random(size=(P, D)).astype(np.float32)
    prototypes[8] = prototypes[2]  # two coincident prototypes of class 3: norm 0
    labels = np.array([3, 0, 2, 3, 1])

    @functools.partial(jax.jit, static_argnames="detached")
    def diversity(p, detached=False):
        return losses.diversity_loss(
            p,
            jnp.asarray(PROTOTYPE_CLASS),
            jnp.asarray(labels),
            max_prototypes_per_class=3,
            reference_detached=detached,
        )

    np.testing.assert_allclose(
        diversity(jnp.asarray(prototypes)), _numpy_diversity(prototypes, labels), rtol=1e-6
    )
    grad = jax.jit(jax.grad(diversity))(jnp.asarray(prototypes))
    assert jnp.all(jnp.isfinite(grad))
    assert jnp.all(jnp.any(grad != 0, axis=1))  # every prototype's class is in the batch
    detached = jax.jit(jax.grad(lambda p: diversity(p, detached=True)))(jnp.asarray(prototypes))
    assert jnp.all(detached == 0)


def test_diversity_with_too_small_bound_is_nan_not_silent(rng):
    prototypes = jnp.asarray(rng.random(size=(P, D)).astype(np.float32))
    result = losses.diversity_loss(
        prototypes, jnp.asarray(PROTOTYPE_CLASS), jnp.array([3]), max_prototypes_per_class=2
    )
    assert jnp.isnan(result)


def test_multilabel_diversity_averages_positive_classes(rng):
    prototypes = rng.random(size=(P, D)).astype(np.float32)
    targets = np.array([[1, 0, 1, 0], [0, 0, 0, 1]])
    result = losses.diversity_loss(
        jnp.asarray(prototypes),
        jnp.asarray(PROTOTYPE_CLASS),
        jnp.asarray(targets),
        max_prototypes_per_class=3,
    )
    per_class = [_numpy_diversity(prototypes, [c]) for c in range(C)]
    expected = np.mean([np.mean([per_class[0], per_class[2]]), per_class[3]])
    np.testing.assert_allclose(result, expected, rtol=1e-6)


# ----------------------------------------------------------------------------- L1 and total


def test_l1_matches_numpy(rng):
    kernel = rng.normal(size=(P, C)).astype(np.float32)  # [P, C] = W^T
    weight = kernel.T  # torch's [C, P]
    identity = np.zeros((P, C))
    identity[np.arange(P), PROTOTYPE_CLASS] = 1
    expected = np.sum(np.abs(weight) * (1 - identity.T))
    np.testing.assert_allclose(
        losses.l1_cost(jnp.asarray(kernel), jnp.asarray(PROTOTYPE_CLASS)), expected, rtol=1e-6
    )


def test_protomask_loss_combines_terms_with_reference_coefficients(rng):
    config_loss = common.get_base_config().loss
    outputs = ProtoMaskOutput(
        logits=jnp.asarray(rng.normal(size=(B, C)).astype(np.float32)),
        min_distances=jnp.asarray(rng.uniform(0, 5, size=(B, P)).astype(np.float32)),
        winning_view=jnp.zeros((B, P), jnp.int32),
    )
    labels = jnp.asarray(rng.integers(0, C, size=B))
    prototypes = jnp.asarray(rng.random(size=(P, D)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(P, C)).astype(np.float32))
    cls = jnp.asarray(PROTOTYPE_CLASS)
    weights = jnp.asarray(rng.uniform(0.5, 2, size=C).astype(np.float32))

    total, terms = losses.protomask_loss(
        outputs,
        labels,
        prototypes,
        kernel,
        cls,
        "joint",
        config_loss,
        weights,
        max_prototypes_per_class=3,
    )
    ce = losses.weighted_cross_entropy(outputs.logits, labels, weights)
    np.testing.assert_allclose(terms["ce"], ce)
    np.testing.assert_allclose(
        terms["diversity"], _numpy_diversity(np.asarray(prototypes), np.asarray(labels)), rtol=1e-6
    )
    np.testing.assert_allclose(
        total,
        ce + 0.8 * terms["cluster"] - 0.2 * terms["separation"] + 0.2 * terms["diversity"],
        rtol=1e-6,
    )

    total_ft, terms_ft = losses.protomask_loss(
        outputs, labels, prototypes, kernel, cls, "finetune", config_loss, weights
    )
    assert set(terms_ft) == {"ce", "l1"}
    np.testing.assert_allclose(total_ft, ce + 1e-3 * losses.l1_cost(kernel, cls), rtol=1e-6)

    with pytest.raises(ValueError, match="class_weights"):
        losses.protomask_loss(outputs, labels, prototypes, kernel, cls, "joint", config_loss)
    with pytest.raises(ValueError, match="phase"):
        losses.protomask_loss(
            outputs, labels, prototypes, kernel, cls, "fine_tune", config_loss, weights
        )
