"""The jitted train step: phases move only their groups, it compiles once, accumulation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import demo
from protomask_jax import phases, steps
from protomask_jax.models import protomask as model_lib

NUM_CLASSES = 3


def small_config(**train):
    config = demo.get_config()
    config.unlock()
    config.dataset.num_classes = NUM_CLASSES
    config.input.canvas_size = 32
    config.input.view_size = 32
    config.input.num_views = 3
    config.model.backbone = "resnet_micro"
    config.model.prototype_dim = 8
    config.model.prototypes_per_class = 2
    for key, value in train.items():
        config.train[key] = value
    config.lock()
    return config


def make_batch(seed, batch_size=4, num_views=3, canvas=32):
    rng = np.random.default_rng(seed)
    top_left = rng.uniform(0, 0.5, (batch_size, num_views, 2))
    boxes = np.concatenate(
        [top_left, top_left + rng.uniform(0.2, 0.5, (batch_size, num_views, 2))], -1
    )
    return {
        "canvas": jnp.asarray(rng.integers(0, 255, (batch_size, canvas, canvas, 3)), jnp.uint8),
        "boxes": jnp.asarray(boxes, jnp.float32),
        "label": jnp.asarray(rng.integers(0, NUM_CLASSES, batch_size), jnp.int32),
    }


def init_state(config, phase):
    model = model_lib.build_model(config, NUM_CLASSES, nnx.Rngs(params=0))
    graphdef, params, batch_stats, constants = model_lib.split_model(model)
    tx = phases.make_optimizer(phase)
    state = steps.TrainState.create(params, batch_stats, constants, tx)
    step_config = steps.StepConfig.from_config(config, config.model.prototypes_per_class)
    return graphdef, state, jax.jit(steps.make_train_step(graphdef, phase, tx, step_config))


def _group_changed(before, after, group):
    old = jax.tree.leaves(before[group])
    new = jax.tree.leaves(after[group])
    return any(
        not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(old, new, strict=True)
    )


@pytest.mark.parametrize(
    "phase_name, reference_frozen_addon, moving",
    [
        ("joint", False, {"backbone", "add_on", "prototypes"}),
        ("joint", True, {"backbone", "prototypes"}),
        ("finetune", False, {"last_layer"}),
    ],
)
def test_each_phase_moves_exactly_its_groups(phase_name, reference_frozen_addon, moving):
    config = small_config(accumulate_steps=1, reference_frozen_addon=reference_frozen_addon)
    phase = {p.name: p for p in phases.plan_phases(config, 100)}[phase_name]
    _, state, train_step = init_state(config, phase)
    before = jax.device_get(state.params)
    state, metrics = train_step(state, make_batch(0), jnp.ones(NUM_CLASSES))
    after = jax.device_get(state.params)
    changed = {g for g in model_lib.PARAM_GROUPS if _group_changed(before, after, g)}
    assert changed == moving
    assert np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1


def test_finetune_keeps_batchnorm_statistics_fixed_by_default():
    config = small_config(accumulate_steps=1)
    phase = {p.name: p for p in phases.plan_phases(config, 100)}["finetune"]
    _, state, train_step = init_state(config, phase)
    before = jax.device_get(state.batch_stats)
    state, _ = train_step(state, make_batch(1), jnp.ones(NUM_CLASSES))
    after = jax.device_get(state.batch_stats)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)


def test_train_step_compiles_once_for_fixed_shapes():
    config = small_config(accumulate_steps=1)
    phase = phases.plan_phases(config, 100)[0]
    _, state, train_step = init_state(config, phase)
    for seed in range(3):
        state, _ = train_step(state, make_batch(seed), jnp.ones(NUM_CLASSES))
    assert train_step._cache_size() == 1


def test_gradient_accumulation_updates_every_k_batches():
    config = small_config(accumulate_steps=2)
    phase = phases.plan_phases(config, 100)[0]
    _, state, train_step = init_state(config, phase)
    start = jax.device_get(state.params)
    state, _ = train_step(state, make_batch(0), jnp.ones(NUM_CLASSES))
    after_one = jax.device_get(state.params)
    assert not _group_changed(start, after_one, "prototypes")
    state, _ = train_step(state, make_batch(1), jnp.ones(NUM_CLASSES))
    assert _group_changed(start, jax.device_get(state.params), "prototypes")


def test_phase_plan_follows_the_config():
    config = small_config(warmup_epochs=1, joint_epochs=4, finetune_epochs=2, accumulate_steps=2)
    plan = phases.plan_phases(config, num_train_images=70)  # batch 32 -> 2 full steps per epoch
    assert [(p.name, p.first_step, p.num_steps) for p in plan] == [
        ("warmup", 0, 2),
        ("joint", 2, 8),
        ("finetune", 10, 4),
    ]
    joint = plan[1]
    assert joint.learning_rates == {
        "backbone": config.train.backbone_lr,
        "add_on": config.train.addon_lr,
        "prototypes": config.train.prototype_lr,
    }
    assert joint.lr_decay_batches == config.train.lr_step_epochs * 2
    assert plan[2].trainable == ("last_layer",) and not plan[2].bn_train


def test_step_lr_decays_from_the_first_update_that_ends_in_the_decay_epoch():
    # CUB: 338 steps per epoch, StepLR every 35 epochs, 4 batches per update. Update u ends
    # on batch 4u + 3; the first decay comes at epoch 35 = batch 11830, so update 2956 (batch
    # 11827, epoch 34) keeps the rate and update 2957 (batch 11831) has it halved; the second
    # decay at batch 23660 falls between updates 5914 (23659) and 5915 (23663).
    cub = phases.Phase("joint", 0, 33800, {"prototypes": 1.0}, 4, lr_decay_batches=35 * 338)
    cub = dataclasses.replace(cub, lr_gamma=0.5)
    schedule = phases.step_lr(1.0, cub)
    rates = [float(schedule(jnp.int32(u))) for u in (0, 2956, 2957, 5914, 5915)]
    assert rates == [1.0, 1.0, 0.5, 0.5, 0.25]
    # Through the optimizer: constant gradients make each Adam update the rate itself. Three
    # batches per epoch, a decay every epoch, two batches per update: updates 0-3 end on
    # batches 1, 3, 5, 7, in epochs 0, 1, 1, 2.
    phase = phases.Phase("joint", 0, 8, {"prototypes": 0.1}, 2, lr_decay_batches=3, lr_gamma=0.5)
    tx = phases.make_optimizer(phase)
    params = {group: jnp.zeros(()) for group in ("backbone", "add_on", "prototypes", "last_layer")}
    grads = jax.tree.map(jnp.ones_like, params)
    state, moves = tx.init(params), []
    for _ in range(8):
        updates, state = tx.update(grads, state, params)
        moves.append(-float(updates["prototypes"]))
    np.testing.assert_allclose(moves[1::2], [0.1, 0.05, 0.05, 0.025], rtol=1e-4)
    assert moves[0::2] == [0.0] * 4


def test_augmentation_keys_are_not_the_parameter_initialisation_keys():
    rngs = nnx.Rngs(params=jax.random.key(4861))
    init_keys = {tuple(np.asarray(jax.random.key_data(rngs.params())).tolist()) for _ in range(500)}
    augment_keys = {
        tuple(np.asarray(jax.random.key_data(steps.augmentation_key(4861, s))).tolist())
        for s in range(500)
    }
    assert len(init_keys) == len(augment_keys) == 500 and not init_keys & augment_keys


def _micro_batch_setup(micro_batches):
    """A joint-phase step with plain SGD at rate 1 (the update is minus the gradient) and no
    augmentation (views depend on the image alone)."""
    config = small_config(accumulate_steps=1, micro_batches=micro_batches)
    phase = {p.name: p for p in phases.plan_phases(config, 100)}["joint"]
    model = model_lib.build_model(config, NUM_CLASSES, nnx.Rngs(params=0))
    graphdef, params, batch_stats, constants = model_lib.split_model(model)
    tx = optax.sgd(1.0)
    state = steps.TrainState.create(params, batch_stats, constants, tx)
    step_config = dataclasses.replace(
        steps.StepConfig.from_config(config, config.model.prototypes_per_class), augment=None
    )
    return graphdef, state, steps.make_train_step(graphdef, phase, tx, step_config), step_config


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_micro_batches_match_separate_forwards_of_the_interleaved_slices():
    graphdef, state, _, step_config = _micro_batch_setup(2)
    views = steps.device_views(make_batch(3, batch_size=6), None, step_config)
    args = (graphdef, state.params, state.batch_stats, state.constants)
    outputs, stats = steps.apply_in_micro_batches(*args, views, train=True, micro_batches=2)
    # slice m holds images m, m + 2, m + 4
    (even, even_stats), (odd, odd_stats) = (
        model_lib.apply(*args, views[m::2], train=True) for m in (0, 1)
    )
    for name in ("logits", "min_distances", "winning_view"):
        whole = np.asarray(getattr(outputs, name))
        np.testing.assert_allclose(whole[0::2], getattr(even, name), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(whole[1::2], getattr(odd, name), rtol=1e-5, atol=1e-6)
    for got, a, b in zip(_leaves(stats), _leaves(even_stats), _leaves(odd_stats), strict=True):
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-5, atol=1e-7)

    # and the gradient of a function of all outputs is the same through either path
    weights = jax.random.normal(jax.random.key(0), outputs.logits.shape)

    def through_slices(params):
        out, _ = steps.apply_in_micro_batches(
            graphdef, params, state.batch_stats, state.constants, views, train=True, micro_batches=2
        )
        return jnp.sum(out.logits * weights)

    def by_hand(params):
        halves = [
            model_lib.apply(
                graphdef, params, state.batch_stats, state.constants, views[m::2], train=True
            )[0].logits
            for m in (0, 1)
        ]
        return jnp.sum(halves[0] * weights[0::2]) + jnp.sum(halves[1] * weights[1::2])

    for got, want in zip(
        _leaves(jax.grad(through_slices)(state.params)),
        _leaves(jax.grad(by_hand)(state.params)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_micro_batches_of_equal_halves_train_exactly_like_the_whole_batch():
    # Images 2j and 2j + 1 are equal, so each slice's BatchNorm statistics are the batch's:
    # loss and gradient must then be the whole batch's, which holds only if the loss is
    # computed once over all slices' outputs.
    batch = make_batch(4, batch_size=4)
    batch = {k: jnp.repeat(v[:2], 2, axis=0) for k, v in batch.items()}
    results = {}
    for m in (1, 2):
        _, state, step, _ = _micro_batch_setup(m)
        before = state.params
        new_state, metrics = jax.jit(step)(state, batch, jnp.ones(NUM_CLASSES))
        gradient = jax.tree.map(lambda a, b: a - b, before, new_state.params)
        results[m] = (metrics, _leaves(gradient), _leaves(new_state.batch_stats))
    (metrics_1, grad_1, _), (metrics_2, grad_2, _) = results[1], results[2]
    for key in ("loss", "ce", "cluster", "separation", "diversity"):
        np.testing.assert_allclose(float(metrics_2[key]), float(metrics_1[key]), rtol=1e-5)
    assert any(np.abs(g).max() > 1e-4 for g in grad_1)
    for got, want in zip(grad_2, grad_1, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)


def test_micro_batched_step_on_four_devices_matches_one_device():
    from protomask_jax import sharding

    config = small_config(accumulate_steps=1, micro_batches=2)
    phase = {p.name: p for p in phases.plan_phases(config, 100)}["joint"]
    graphdef, state, _ = init_state(config, phase)
    step_config = steps.StepConfig.from_config(config, config.model.prototypes_per_class)
    batch = make_batch(5, batch_size=8)
    results = []
    for devices in (1, 4):
        config.unlock()
        config.mesh.data = devices
        mesh = sharding.make_mesh(config)
        fresh = jax.tree.map(jnp.copy, state)
        step = steps.jit_train_step(graphdef, phase, step_config, mesh, fresh)
        fresh = jax.device_put(fresh, sharding.tree_shardings(mesh, fresh))
        placed = jax.device_put(batch, sharding.batch_sharding(mesh))
        new_state, metrics = step(fresh, placed, jnp.ones(NUM_CLASSES))
        results.append((float(metrics["loss"]), _leaves(new_state.params)))
    # Adam's first step divides by |g|, amplifying the all-reduce's last-bit differences
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    for got, want in zip(results[1][1], results[0][1], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=5e-5)


def test_micro_batches_must_divide_the_batch_per_device():
    from protomask_jax import config_checks, sharding

    config = small_config(micro_batches=3)
    config.unlock()
    config.mesh.data = 4
    mesh = sharding.make_mesh(config)
    with pytest.raises(config_checks.ConfigError, match="train.micro_batches=3"):
        sharding.check_batch_divisible(8, mesh, "input.batch_size", 3)


def test_fsdp_splits_parameters_and_optimizer_state_and_trains_like_replicated():
    from protomask_jax import sharding

    config = small_config(accumulate_steps=1)
    phase = {p.name: p for p in phases.plan_phases(config, 100)}["joint"]
    graphdef, state, _ = init_state(config, phase)
    batches = [make_batch(seed, batch_size=8) for seed in (6, 7)]
    config.unlock()
    config.mesh.data = 4
    mesh = sharding.make_mesh(config)
    results = {}
    # resnet_micro's leaves are small: split every leaf of 64 elements or more
    for fsdp in (0, 64):
        step_config = dataclasses.replace(
            steps.StepConfig.from_config(config, config.model.prototypes_per_class), fsdp=fsdp
        )
        fresh = jax.tree.map(jnp.copy, state)
        fresh = jax.device_put(fresh, sharding.tree_shardings(mesh, fresh, fsdp))
        step = steps.jit_train_step(graphdef, phase, step_config, mesh, fresh)
        for batch in batches:
            fresh, metrics = step(
                fresh, jax.device_put(batch, sharding.batch_sharding(mesh)), jnp.ones(NUM_CLASSES)
            )
        results[fsdp] = (fresh, float(metrics["loss"]))
    sharded, replicated = results[64][0], results[0][0]
    # every leaf of >= 64 elements with an axis 4 divides is held a quarter per device
    kernel = sharded.params["backbone"]["layer1"][0]["conv1"]["kernel"][...]
    assert kernel.shape == (3, 3, 8, 8)
    assert kernel.addressable_shards[0].data.size == kernel.size // 4
    adam_moments = [x for x in jax.tree.leaves(sharded.opt_state) if x.size == kernel.size]
    assert adam_moments and all(
        x.addressable_shards[0].data.size == x.size // 4 for x in adam_moments
    )
    assert all(
        x.addressable_shards[0].data.size == x.size for x in jax.tree.leaves(replicated.params)
    )
    assert results[64][1] == pytest.approx(results[0][1], rel=1e-5)
    for got, want in zip(_leaves(sharded), _leaves(replicated), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=5e-5)
