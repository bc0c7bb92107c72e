"""The jitted train step: phases move only their groups, it compiles once, accumulation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
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
