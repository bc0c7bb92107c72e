"""Sharding over 8 fake CPU devices gives the same training, push and evaluation as one."""

import json

import jax
import numpy as np
import pytest
from test_train import final_state_leaves, tiny_config

from protomask_jax import inference, sharding, trainer
from protomask_jax.config_checks import ConfigError

pytestmark = pytest.mark.slow


def test_mesh_from_config():
    config = tiny_config("unused")
    config.unlock()
    config.mesh.data, config.mesh.model = -1, 2
    mesh = sharding.make_mesh(config)
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    config.mesh.data, config.mesh.model = 1, 1
    assert dict(sharding.make_mesh(config).shape) == {"data": 1, "model": 1}
    config.mesh.data = 16
    with pytest.raises(ConfigError, match="config.mesh.data=16"):
        sharding.make_mesh(config)
    # a global batch of 12 cannot be split over a data axis of 8
    config.mesh.data = -1
    config.mesh.model = 1
    mesh = sharding.make_mesh(config)
    sharding.check_batch_divisible(16, mesh, "input.batch_size")
    with pytest.raises(ConfigError, match=r"config.input.batch_size=12 .* \(8\)"):
        sharding.check_batch_divisible(12, mesh, "input.batch_size")


def test_eight_device_run_matches_one_device(tiny_records, tmp_path):
    assert jax.device_count() == 8, "conftest asks XLA for 8 CPU devices"
    # fsdp: parameters and optimizer state split over the 8 devices too (resnet_micro's
    # leaves are small: every leaf of 64 elements or more), stopped and resumed
    runs = {}
    for name, devices, fsdp in (("d1", 1, False), ("d8", 8, False), ("fsdp", 8, True)):
        mesh = {"mesh.data": devices, "mesh.fsdp": fsdp, "mesh.fsdp_min_size": 64}
        config = tiny_config(tiny_records, **mesh)
        if fsdp:  # stopped and resumed: the checkpoint is restored into the split state
            stopped = trainer.train_and_evaluate(config, tmp_path / name, max_steps=3)
            assert stopped == {"stopped_at_step": 3}
        runs[name] = trainer.train_and_evaluate(config, tmp_path / name)
    for name in ("d8", "fsdp"):
        # Same predictions on the test set and on validation (evaluation is sharded too) ...
        assert runs[name]["final"] == runs["d1"]["final"], name
        assert runs[name]["best_val_accuracy"] == runs["d1"]["best_val_accuracy"], name
        # ... the same push (a sharded streaming reduction) ...
        push = {d: json.loads((tmp_path / d / "push.json").read_text()) for d in ("d1", name)}
        assert push[name]["image_id"] == push["d1"]["image_id"]
        assert push[name]["view_index"] == push["d1"]["view_index"]
        np.testing.assert_allclose(
            push[name]["distance"], push["d1"]["distance"], rtol=1e-4, atol=1e-6
        )
        # ... and the same parameters, up to the order of floating-point sums in the
        # all-reduce of gradients and BatchNorm statistics. Adam divides by sqrt(v), which
        # amplifies those last-bit differences in small gradients: tolerance rtol 1e-3,
        # atol 5e-5 (values ~0.1).
        _, one = final_state_leaves(tmp_path / "d1")
        _, other = final_state_leaves(tmp_path / name)
        for a, b in zip(one, other, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=5e-5)


def test_model_axis_splits_prototypes_and_trains_like_one_device(tiny_records, tmp_path):
    """``mesh.model = 2``: prototypes, their class identity and the last layer's prototype
    axis are split over ``model`` (batches over ``data = 4``), through push and pruning."""
    runs, trained = {}, {}
    for name, mesh in {"one": {"mesh.data": 1}, "split": {"mesh.data": 4, "mesh.model": 2}}.items():
        config = tiny_config(tiny_records, **mesh)
        config.unlock()
        # keeps 6 of 8 prototypes: a count the model axis divides
        config.train.prune.update(enabled=True, k=5, threshold=2, finetune_epochs=1)
        config.lock()
        runs[name] = trainer.train_and_evaluate(config, tmp_path / name)
        trained[name] = inference.restore_trained(config, tmp_path / name, which="latest")
    split = trained["split"].state
    assert dict(trained["split"].mesh.shape) == {"data": 4, "model": 2}
    assert split.params["prototypes"][...].sharding.spec == jax.sharding.PartitionSpec(
        "model", None
    )
    assert split.params["last_layer"][...].sharding.spec == jax.sharding.PartitionSpec(
        "model", None
    )
    assert split.constants["prototype_class"][...].sharding.spec == jax.sharding.PartitionSpec(
        "model"
    )
    # the same pruning decision and the same predictions as one device
    assert trained["split"].meta["kept_prototypes"] == trained["one"].meta["kept_prototypes"]
    assert runs["split"]["final"] == runs["one"]["final"]
    assert runs["split"]["test_accuracy"] == runs["one"]["test_accuracy"]
    np.testing.assert_allclose(
        np.asarray(split.params["prototypes"][...]),
        np.asarray(trained["one"].state.params["prototypes"][...]),
        rtol=1e-3,
        atol=5e-5,
    )


def test_prototype_count_the_model_axis_does_not_divide_is_replicated():
    config = tiny_config("unused", **{"mesh.data": 4, "mesh.model": 2})
    mesh = sharding.make_mesh(config)
    tree = {
        "prototypes": jax.ShapeDtypeStruct((8, 3), np.float32),
        "pruned": {"prototypes": jax.ShapeDtypeStruct((7, 3), np.float32)},
        "backbone": {"kernel": jax.ShapeDtypeStruct((8, 3), np.float32)},
    }
    specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(mesh, tree))
    P = jax.sharding.PartitionSpec
    assert specs == {
        "prototypes": P("model", None),
        "pruned": {"prototypes": P()},
        "backbone": {"kernel": P()},
    }
    # and a pruned state of 7 prototypes can be placed on that mesh
    placed = jax.device_put(
        np.ones((7, 3), np.float32), sharding.tree_shardings(mesh, tree)["pruned"]["prototypes"]
    )
    assert placed.shape == (7, 3)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"JAX_NUM_PROCESSES": "2"}, "Set both JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
        ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two' must be"),
    ],
)
def test_hand_launch_variables_are_checked_before_joining(monkeypatch, env, message):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        sharding.maybe_initialize_distributed()
    assert not jax.distributed.is_initialized()
