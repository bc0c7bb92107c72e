"""The jitted train step: phases move only their groups, it compiles once, accumulation."""

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
    plan = phases.plan_phases(config, num_train_images=70)  # batch 32 -> 3 steps per epoch
    assert [(p.name, p.first_step, p.num_steps) for p in plan] == [
        ("warmup", 0, 3),
        ("joint", 3, 12),
        ("finetune", 15, 6),
    ]
    joint = plan[1]
    assert joint.learning_rates == {
        "backbone": config.train.backbone_lr,
        "add_on": config.train.addon_lr,
        "prototypes": config.train.prototype_lr,
    }
    # StepLR every lr_step_epochs epochs, counted in optimizer updates (3 steps / 2 per update)
    assert joint.lr_decay_steps == pytest.approx(config.train.lr_step_epochs * 3 / 2)
    assert plan[2].trainable == ("last_layer",) and not plan[2].bn_train
