"""The benchmark suite: the PyTorch ProtoMask is the same model as ours, and the harness runs.

The first tests are correctness tests of both implementations: the torch model of
``benchmarks/torch_protomask.py`` (also the reference of ``test_convert.py``) and the JAX
model (imported from its state_dict with ``models/convert.py``) must agree on views, loss and
gradients, so the throughput comparison compares one model with itself.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common, report, scaling, train_step  # noqa: E402
from benchmarks import torch_protomask as tp  # noqa: E402
from protomask_jax import losses  # noqa: E402
from protomask_jax.data import views as views_lib  # noqa: E402
from protomask_jax.models import convert  # noqa: E402
from protomask_jax.models import protomask as model_lib  # noqa: E402
from protomask_jax.models.resnet import resnet_spec  # noqa: E402

pytestmark = pytest.mark.torch

MICRO = train_step.SHAPES["micro"]


def _torch_model(shape, *, reference_style=False, seed=0, class_weights=None):
    torch.manual_seed(seed)
    return train_step.torch_model(
        shape, reference_style=reference_style, class_weights=class_weights
    )


def _jax_model_from(torch_model, shape, compute_dtype="float32"):
    config = train_step.make_config(shape, compute_dtype)
    # A different seed than the torch model: every value must come from the import.
    model = model_lib.build_model(config, shape.num_classes, nnx.Rngs(params=123))
    weights = convert.read_state_dict(torch_model.state_dict())
    state, _ = convert.protomask_state_from_torch(weights, model)
    nnx.update(model, state)
    return model, config


def _jax_joint_loss(model, config, views, labels, class_weights):
    """The joint-phase loss of ``model`` on ``views`` as a function of its parameters, and
    those parameters (BatchNorm in training mode)."""
    graphdef, params, batch_stats, constants = model_lib.split_model(model)

    def loss_fn(params):
        outputs, _ = model_lib.apply(graphdef, params, batch_stats, constants, views, train=True)
        total, _ = losses.protomask_loss(
            outputs,
            jnp.asarray(labels),
            params["prototypes"][...],
            params["last_layer"][...],
            constants["prototype_class"][...],
            "joint",
            config.loss,
            jnp.asarray(class_weights),
        )
        return total

    return loss_fn, params


def _torch_views(batch, shape):
    """``[B, K, 3, V, V]`` float32 views of a host batch, cropped by the torch model's code."""
    views = tp.crop_views(
        torch.from_numpy(batch["canvas"]), torch.from_numpy(batch["boxes"]), shape.view_size
    )
    return views.unflatten(0, batch["boxes"].shape[:2])


def _jax_views(batch, shape):
    """``[B, K, V, V, 3]`` float32 views of a host batch, un-augmented, as our step crops them."""
    return views_lib.make_views(
        jnp.asarray(batch["canvas"]),
        jnp.asarray(batch["boxes"]),
        None,
        view_size=shape.view_size,
        dtype=jnp.float32,
    )


def _torch_joint_loss(model, views, labels, amp=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits, min_distances = model(views)
    labels = torch.from_numpy(labels).long()
    return tp.joint_loss(model, logits, min_distances, labels, tp.LossCoefficients())


def test_views_loss_and_gradients_agree_between_torch_and_jax():
    shape = MICRO
    (batch,) = train_step.synthetic_batches(shape, 1, seed=3)
    class_weights = np.array([0.5, 1.0, 2.0], np.float32)
    torch_model = _torch_model(shape, class_weights=torch.from_numpy(class_weights)).train()
    jax_model, config = _jax_model_from(torch_model, shape)

    torch_views, jax_views = _torch_views(batch, shape), _jax_views(batch, shape)
    np.testing.assert_allclose(
        torch_views.numpy(), np.asarray(jax_views).transpose(0, 1, 4, 2, 3), atol=1e-4
    )

    torch_loss = _torch_joint_loss(torch_model, torch_views, batch["label"])
    torch_loss.backward()

    loss_fn, params = _jax_joint_loss(jax_model, config, jax_views, batch["label"], class_weights)
    jax_loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    np.testing.assert_allclose(float(jax_loss), torch_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(grads["prototypes"][...]),
        torch_model.prototype_vectors.grad.numpy()[:, :, 0, 0],
        rtol=1e-3,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(grads["add_on"]["kernel"][...]),
        torch_model.add_on_layers[0].weight.grad.numpy()[:, :, 0, 0].T,
        rtol=1e-3,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(grads["backbone"]["conv1"]["kernel"][...]),
        torch_model.backbone.conv1.weight.grad.numpy().transpose(2, 3, 1, 0),
        rtol=1e-3,
        atol=1e-6,
    )


def _cosine(a, b):
    a = np.concatenate([np.ravel(x) for x in a]).astype(np.float64)
    b = np.concatenate([np.ravel(x) for x in b]).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.slow
def test_bf16_backbone_gradients_are_as_close_to_float32_as_torch_autocast():
    """bfloat16 activations perturb the backbone gradient; ours no more than torch's AMP.

    At random init on noise, ResNet-18 at 128^2, the cosine between the bf16 and the f32
    backbone gradient was 0.942 for us and 0.925 for ``torch.autocast(bfloat16)`` (same
    weights and batch); head and prototype gradients agree to 1e-4 on both sides.
    """
    shape = train_step.SHAPES["cpu"]
    (batch,) = train_step.synthetic_batches(shape, 1, seed=3)
    torch_model = _torch_model(shape).train()
    names = [n for n, _ in torch_model.named_parameters() if n.startswith("backbone.")]

    def torch_backbone_grads(amp):
        torch_model.zero_grad()
        _torch_joint_loss(torch_model, _torch_views(batch, shape), batch["label"], amp).backward()
        grads = dict(torch_model.named_parameters())
        return [grads[n].grad.detach().numpy().copy() for n in names]

    def jax_grads(compute_dtype):
        model, config = _jax_model_from(torch_model, shape, compute_dtype)
        loss_fn, params = _jax_joint_loss(
            model,
            config,
            _jax_views(batch, shape),
            batch["label"],
            np.ones(shape.num_classes, np.float32),
        )
        with jax.default_matmul_precision("highest"):
            return jax.jit(jax.grad(loss_fn))(params)

    torch_cosine = _cosine(torch_backbone_grads(True), torch_backbone_grads(False))
    grads32, grads16 = jax_grads("float32"), jax_grads("bfloat16")
    jax_cosine = _cosine(jax.tree.leaves(grads16["backbone"]), jax.tree.leaves(grads32["backbone"]))
    assert jax_cosine < 0.999, "bf16 should perturb the gradient: is compute_dtype applied?"
    assert jax_cosine > torch_cosine - 0.03, (jax_cosine, torch_cosine)
    assert jax_cosine > 0.85
    for key in ("prototypes", "add_on"):
        assert _cosine(jax.tree.leaves(grads16[key]), jax.tree.leaves(grads32[key])) > 0.999


def test_reference_style_forward_computes_the_same_function():
    """1x1 conv before pooling (the reference) == pooling before the projection (ours)."""
    shape = MICRO
    (batch,) = train_step.synthetic_batches(shape, 1, seed=5)
    pooled_first = _torch_model(shape).eval()
    reference = _torch_model(shape, reference_style=True, seed=9).eval()
    reference.load_state_dict(pooled_first.state_dict())
    views = _torch_views(batch, shape)
    with torch.no_grad():
        expected_logits, expected_distances = pooled_first(views)
        logits, distances = reference(views)
    np.testing.assert_allclose(distances.numpy(), expected_distances.numpy(), rtol=1e-5)
    np.testing.assert_allclose(logits.numpy(), expected_logits.numpy(), rtol=1e-5)


def test_backbone_has_torchvision_resnet50_layout():
    from torchvision.models import resnet50

    ours = tp.TorchResNet.from_spec(resnet_spec("resnet50")).state_dict()
    reference = {
        k: v for k, v in resnet50(weights=None).state_dict().items() if not k.startswith("fc.")
    }
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }


def test_state_dict_has_the_reference_layout():
    shape = MICRO
    class_weights = torch.tensor([0.5, 1.0, 2.0])
    model = _torch_model(shape, class_weights=class_weights)
    exported = model.state_dict()
    channels = model.backbone.out_channels
    num_prototypes = shape.num_classes * shape.prototypes_per_class
    assert exported["add_on_layers.0.weight"].shape == (shape.prototype_dim, channels, 1, 1)
    assert exported["add_on_layers.0.bias"].shape == (shape.prototype_dim,)
    assert exported["prototype_vectors"].shape == (num_prototypes, shape.prototype_dim, 1, 1)
    assert exported["last_layer.weight"].shape == (shape.num_classes, num_prototypes)
    np.testing.assert_array_equal(exported["classification_loss_fn.weight"], class_weights)
    assert "prototype_class" not in exported  # nor by the reference (docs/reference.md §12)
    # Last layer: 1 for the prototype's own class (j // ppc), 0 elsewhere.
    expected = np.zeros((shape.num_classes, num_prototypes), np.float32)
    expected[np.arange(num_prototypes) // shape.prototypes_per_class, np.arange(num_prototypes)] = 1
    np.testing.assert_array_equal(exported["last_layer.weight"].numpy(), expected)


@pytest.mark.parametrize(
    ("backbone", "published_gmacs"),
    # torchvision's model cards ("GFLOPS", counted as multiply-adds) at 224 x 224.
    [("resnet50", 4.09), ("resnet18", 1.81)],
)
def test_analytic_flops_match_published_resnet_counts(backbone, published_gmacs):
    flops = train_step.resnet_forward_flops(resnet_spec(backbone), 224)
    assert flops / 2 / 1e9 == pytest.approx(published_gmacs, rel=0.01)


def test_gradient_bytes_and_batchnorm_count_of_the_cub_model():
    from torchvision.models import resnet18, resnet50

    tv = resnet50(weights=None)
    backbone_params = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    shape = train_step.SHAPES["cub"]
    grads = scaling.trainable_parameter_bytes(shape)
    assert grads["backbone"] == 4 * backbone_params
    assert grads["add_on"] == 4 * (2048 * 1280 + 1280)
    assert grads["prototypes"] == 4 * 2000 * 1280
    for name, model in (("resnet50", tv), ("resnet18", resnet18(weights=None))):
        count = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert scaling.batchnorm_layers(name) == count


def test_base_config_without_ml_collections_reads_the_same_defaults(monkeypatch):
    from configs import common as config_common

    expected = config_common.get_base_config().to_dict()
    # None in sys.modules makes `import ml_collections` fail, as on the GPU machine.
    monkeypatch.setitem(sys.modules, "ml_collections", None)
    config = common.base_config()
    assert isinstance(config, common._AttrDict)
    assert config.to_dict() == expected
    assert config.model.backbone == expected["model"]["backbone"]
    assert sys.modules["ml_collections"] is None  # the stand-in was removed again


@pytest.mark.slow
def test_train_step_harness_end_to_end(tmp_path):
    variants = tuple(v for v in train_step.ALL_VARIANTS if v != "torch_compile_amp_bf16")
    path = train_step.run("micro", variants, out_dir=tmp_path, plot=True)
    assert path == tmp_path / "train_step_micro_cpu.json"
    assert path.with_suffix(".png").stat().st_size > 0
    payload = json.loads(path.read_text())
    assert {"device", "versions", "config", "parity", "flops", "headline", "variants"} <= set(
        payload
    )
    assert payload["parity"]["passed"]
    assert payload["complete"] is True
    assert payload["versions"]["jax"] == jax.__version__
    assert payload["versions"]["torch"] == torch.__version__
    assert set(payload["variants"]) == set(variants)
    for name, figures in payload["variants"].items():
        per_step = figures["timing"]["per_step"]
        assert 0 < per_step["p10"] <= per_step["median"] <= per_step["p90"], name
        assert figures["crops_per_s"] == pytest.approx(
            MICRO.batch_size * MICRO.num_views / figures["step_time_s"]
        )
        assert figures["images_per_s"] > 0 and np.isfinite(figures["final_loss"]), name
    for name in train_step.JAX_VARIANTS:
        assert payload["variants"][name]["compile_s"] > 0
        assert payload["variants"][name]["xla_flops_per_step"] > 0
        assert payload["variants"][name]["peak_memory_bytes"] > 0
    assert payload["flops"]["per_step_used_for_mfu"] > 0
    headline = payload["headline"]
    assert headline["available"] and headline["speedup"] > 0
    assert headline["best_torch_variant"] in ("torch_eager_fp32", "torch_eager_amp_bf16")


def test_train_step_run_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    """A lent GPU's time limit can stop the harness mid-run: the JSON written after each
    variant keeps the finished ones, marked incomplete, and the report says so."""

    def killed(self):
        raise KeyboardInterrupt("time limit")

    monkeypatch.setattr(train_step.TorchVariant, "measure", killed)
    with pytest.raises(KeyboardInterrupt):
        # Timed in TIMING_ORDER, not as listed: jax_bf16 first, then the torch variant.
        train_step.run("micro", ("torch_eager_amp_bf16", "jax_bf16"), out_dir=tmp_path, plot=False)
    payload = json.loads((tmp_path / "train_step_micro_cpu.json").read_text())
    assert payload["complete"] is False
    assert list(payload["variants"]) == ["jax_bf16"]
    assert payload["variants"]["jax_bf16"]["crops_per_s"] > 0
    assert "Incomplete run" in "\n".join(report.train_step_tables(tmp_path))


@pytest.mark.slow
def test_sharded_step_matches_one_device_on_fake_devices():
    if len(jax.devices()) < 2:
        pytest.skip("needs the fake CPU devices of conftest.py")
    shape = train_step.Shape("resnet_micro", 1, 2, 64, 32, 16, 2, 3, warmup=1, steps=1)
    measured = scaling.measure_weak_scaling(shape, seed=0)
    assert [row["devices"] for row in measured["rows"]] == [1, 2, 4, 8]
    assert measured["sharded_vs_single_device_loss"]["passed"]


def test_end_to_end_runs_the_trainer_and_reports_consistent_figures(tmp_path):
    """The micro shape end to end: records, host pipeline, the trainer's loop, the step."""
    from benchmarks import end_to_end

    shape = end_to_end.SHAPES["micro"]
    model = shape.model
    path = end_to_end.run("micro", data_dir=tmp_path / "data", num_workers=0, out_dir=tmp_path)
    assert path == tmp_path / "end_to_end_micro_cpu.json"
    payload = json.loads(path.read_text())
    assert payload["complete"] is True
    host = payload["host"]
    assert host["cpu_count"] == common.cpu_count() and host["os_cpu_count"] == os.cpu_count()
    assert len(host["load_average_at_start"]) == len(host["load_average"]) == 3
    assert 0 < host["host_utilisation"] <= 1 and host["seconds"] > 0

    train_images = shape.images.train_per_class * model.num_classes
    split = payload["records"]["dataset_info"]["splits"]["train"]
    assert split["num_images"] == train_images
    assert split["num_masks"] == 11 * train_images  # 11 masks per image, like CUB's export

    pipeline = payload["host_pipeline"]
    assert [row["num_workers"] for row in pipeline["streams"]] == list(shape.worker_counts)
    assert all(row["images_per_s"] > 0 for row in pipeline["streams"])
    assert all(row["cpu"]["main_process_cores"] > 0 for row in pipeline["streams"])
    costs, target = pipeline["costs"], pipeline["target"]
    assert 0 < costs["decode_s"] < costs["all_s"] and costs["prefitted_s"] > 0
    assert target["images_per_s"] == pytest.approx(6000 / model.num_views)
    assert target["cores_at_single_core_cost"] == pytest.approx(
        target["images_per_s"] * costs["all_s"]
    )
    for row in pipeline["streams"]:
        cpu = row["cpu"]
        cores = cpu["main_process_cores"] + cpu["children_cores"]
        assert row["images_per_cpu_s"] == pytest.approx(row["images_per_s"] / cores)

    loop = payload["loop"]
    assert loop["steps"] == shape.steps and loop["num_workers"] == 0
    assert loop["images_per_s"] == pytest.approx(shape.steps * model.batch_size / loop["seconds"])
    assert loop["views_per_s"] == pytest.approx(loop["images_per_s"] * model.num_views)
    assert 0 <= loop["data_wait_s_per_step"] < loop["step_time_s"]
    assert loop["final_checkpoint_s"] > 0
    cpu = loop["cpu"]
    assert 0 < cpu["host_utilisation"] <= 1 and cpu["main_process_cores"] > 0
    assert cpu["cpu_count"] == common.cpu_count()

    step = payload["step"]
    assert step["variant"] == "jax_bf16_aug"
    assert step["images_per_s"] == pytest.approx(
        model.batch_size / step["timing"]["back_to_back_mean"]
    )
    ratio = payload["ratio"]
    assert ratio["loop_over_step"] == pytest.approx(loop["images_per_s"] / step["images_per_s"])
    assert ratio["cpu_s_per_step_loop_over_step"] == pytest.approx(
        cpu["main_process_cores"] * loop["step_time_s"] / step["process_cpu_s_per_step"]
    )
    assert ratio["loop_over_step_with_checkpoints"] < ratio["loop_over_step"]
    assert "Loop / step" in "\n".join(report.end_to_end_tables(tmp_path))


def test_loop_probe_times_the_stream_and_notes_log_steps(monkeypatch):
    """The probe sees what the trainer does through the two public names it wraps, and
    puts them back afterwards."""
    from benchmarks import end_to_end
    from protomask_jax import logs
    from protomask_jax.data import pipeline

    def slow_stream(*args, **kwargs):
        def batches():
            while True:
                time.sleep(0.02)
                yield {"canvas": np.zeros(1)}

        return batches()

    written = []
    monkeypatch.setattr(pipeline, "train_stream", slow_stream)
    monkeypatch.setattr(logs.MetricsWriter, "write", lambda self, *args: written.append(args))
    original_stream, original_write = pipeline.train_stream, logs.MetricsWriter.write
    probe = end_to_end.LoopProbe()
    with probe.attached():
        stream = pipeline.train_stream()
        for _ in range(3):
            next(stream)
        writer = object.__new__(logs.MetricsWriter)
        writer.write(5, {"train/loss": 1.0}, "joint")
        writer.write(5, {"val/accuracy": 0.5}, "joint")  # not a training step: not noted
    assert probe.batches == 3 and 0.06 <= probe.wait_s < 1.0
    assert list(probe.marks) == [5] and probe.marks[5][1] == probe.wait_s
    assert len(written) == 2  # the trainer's writes still happen
    assert pipeline.train_stream is original_stream
    assert logs.MetricsWriter.write is original_write


def test_cpu_usage_counts_this_process_and_its_children():
    """The CPU time read from /proc for a live child matches what the kernel reports for it
    once it has ended (getrusage), whatever else loads the machine."""
    import resource
    import subprocess

    def children_cpu_s():
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    ended_before = children_cpu_s()
    before = common.cpu_sample()
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.perf_counter() + 1.0
        while time.perf_counter() < deadline:  # this process busy too
            pass
        after = common.cpu_sample()
    finally:
        child.kill()
        child.wait()
    child_cpu_s = children_cpu_s() - ended_before
    usage = common.cpu_usage(before, after)
    assert after.children >= 1 and child_cpu_s > 0.01
    # The child ran a little longer than the sample saw (until the kill); 10 ms ticks.
    seen = usage["children_cores"] * usage["seconds"]
    assert child_cpu_s - 0.1 <= seen <= child_cpu_s + 0.02
    assert usage["main_process_cores"] > 0 and 0 < usage["host_utilisation"] <= 1
    assert usage["seconds"] == pytest.approx(after.wall_s - before.wall_s)


def test_wheelhouse_lists_a_distribution_for_every_module_the_gpu_path_needs():
    import importlib.metadata

    from benchmarks import wheelhouse

    def normal(name):
        return name.lower().replace("_", "-")

    listed = {normal(n) for n in wheelhouse.requirement_names()}
    providers = importlib.metadata.packages_distributions()
    for module in wheelhouse.REQUIRED_MODULES:
        top = module.split(".")[0]
        assert {normal(d) for d in providers[top]} & listed, module
    # The JAX and torch stacks come with the host and are never installed from here.
    assert not listed & {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "numpy"}


def test_wheelhouse_install_is_a_no_op_when_everything_imports(monkeypatch, capsys):
    from benchmarks import wheelhouse

    def no_pip(*args):
        raise AssertionError(f"pip should not run: {args}")

    monkeypatch.setattr(wheelhouse, "_pip", no_pip)
    wheelhouse.install()
    assert "nothing to install" in capsys.readouterr().out
