"""ResNet backbone: shapes, torch's BatchNorm / max-pool semantics, dtypes, torchvision layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from protomask_jax.models import resnet
from protomask_jax.models.resnet import BatchNorm, ResNet

torch = pytest.importorskip("torch")


def _forward(model, images, train=False):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, images):
        module = nnx.merge(graphdef, state)
        return module(images, train=train), nnx.state(module)

    return run(state, images)


@pytest.mark.parametrize(
    "name, size, expected_shape",
    [("resnet_micro", 32, (2, 4, 4, 16)), ("resnet_tiny", 64, (2, 4, 4, 64))],
)
def test_preset_output_shape(name, size, expected_shape):
    model = ResNet(name, rngs=nnx.Rngs(0))
    features, _ = _forward(model, jnp.ones((2, size, size, 3)))
    assert features.shape == expected_shape
    assert model.out_channels == expected_shape[-1]


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_standard_presets_have_torchvision_parameters(name):
    torchvision = pytest.importorskip("torchvision")
    reference = getattr(torchvision.models, name)(weights=None).state_dict()
    abstract = nnx.eval_shape(lambda: ResNet(name, rngs=nnx.Rngs(0)))
    ours = {
        ".".join(map(str, path)): variable.shape
        for path, variable in nnx.to_flat_state(nnx.state(abstract))
    }
    leaf = {
        "kernel": "weight",
        "scale": "weight",
        "bias": "bias",
        "mean": "running_mean",
        "var": "running_var",
    }
    renamed = {}
    for key, shape in ours.items():
        module, name_ = key.rsplit(".", 1)
        renamed[f"{module}.{leaf[name_]}"] = (
            (shape[3], shape[2], shape[0], shape[1]) if name_ == "kernel" else shape
        )
    expected = {
        key: tuple(value.shape)
        for key, value in reference.items()
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked")
    }
    assert renamed == expected
    assert abstract.out_channels == (512 if name in ("resnet18", "resnet34") else 2048)


def test_batchnorm_train_mode_matches_torch():
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.normal(size=(4, 5, 6, 7))).astype(np.float32)
    torch_bn = torch.nn.BatchNorm2d(7)  # momentum 0.1, eps 1e-5
    with torch.no_grad():
        torch_bn.weight.copy_(torch.from_numpy(rng.normal(size=7).astype(np.float32)))
        torch_bn.bias.copy_(torch.from_numpy(rng.normal(size=7).astype(np.float32)))
    ours = BatchNorm(7)
    ours.scale[...] = jnp.asarray(torch_bn.weight.detach().numpy())
    ours.bias[...] = jnp.asarray(torch_bn.bias.detach().numpy())

    torch_bn.train()
    expected = torch_bn(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
    result, state = _forward(ours, x, train=True)

    np.testing.assert_allclose(result, expected.transpose(0, 2, 3, 1), atol=1e-5)
    # torch updates running_var with the unbiased batch variance.
    np.testing.assert_allclose(state["mean"][...], torch_bn.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(state["var"][...], torch_bn.running_var.numpy(), rtol=1e-5)


def test_max_pool_pads_with_minus_infinity_like_torch():
    x = -1.0 - np.random.default_rng(1).random(size=(1, 7, 7, 2)).astype(np.float32)
    expected = torch.nn.MaxPool2d(3, 2, 1)(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    result = resnet._max_pool_3x3_s2(jnp.asarray(x))
    # All inputs are negative: zero padding would put 0 on the border.
    np.testing.assert_array_equal(result, expected.numpy().transpose(0, 2, 3, 1))


def test_bfloat16_compute_keeps_float32_parameters_and_statistics():
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    model32 = ResNet("resnet_micro", rngs=nnx.Rngs(0))
    model16 = ResNet("resnet_micro", compute_dtype="bfloat16", rngs=nnx.Rngs(0))
    features32, _ = _forward(model32, images, train=True)
    features16, state16 = _forward(model16, images, train=True)

    assert features16.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(state16)} == {jnp.dtype(jnp.float32)}
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per op); a handful of layers
    # accumulate to a few percent of the feature scale.
    scale = float(jnp.std(features32))
    error = float(jnp.max(jnp.abs(features16.astype(jnp.float32) - features32)))
    assert error < 0.1 * scale


def test_batchnorm_in_bfloat16_matches_float32_math():
    # Activations far from zero mean: the case where normalising in bfloat16 loses bits
    # (x * m and the shift nearly cancel, and so do the direct and batch-statistic terms of
    # the backward pass). Our BatchNorm computes in float32 and rounds only its output.
    rng = np.random.default_rng(2)
    x16 = jnp.asarray(8.0 + rng.normal(size=(64, 4, 4, 3)), jnp.bfloat16)
    # A cotangent with a large common part, exactly representable in bfloat16 (the
    # cotangent of a bfloat16 activation is itself bfloat16).
    cotangent = jnp.asarray(1.0 + 0.02 * rng.normal(size=x16.shape), jnp.bfloat16).astype(
        jnp.float32
    )
    bn = BatchNorm(3)
    graphdef, state = nnx.split(bn)

    @jax.jit
    def output_and_grad(x, state):
        def loss(x):
            y = nnx.merge(graphdef, state, copy=True)(x, train=True)
            return jnp.sum(y.astype(jnp.float32) * cotangent), y

        (_, y), grad = jax.value_and_grad(loss, has_aux=True)(x)
        return y, grad

    y16, grad16 = output_and_grad(x16, state)
    y32, grad32 = output_and_grad(x16.astype(jnp.float32), state)

    # Output: one bfloat16 rounding (relative 2^-9) of values of size ~3.
    assert float(jnp.max(jnp.abs(y16.astype(jnp.float32) - y32))) <= 2**-9 * 4
    # Gradient: one bfloat16 rounding of the float32 result. (Normalising in bfloat16 errs
    # by ~2^-9 of the direct term |cotangent * m| ~ 1, about 30x the centred gradient here.)
    error = float(jnp.max(jnp.abs(grad16.astype(jnp.float32) - grad32)))
    assert error <= 2**-8 * float(jnp.max(jnp.abs(grad32)))


def test_block_remat_gives_the_same_loss_gradients_and_statistics():
    """remat="blocks" recomputes activations in the backward pass: same numbers, one
    checkpoint per residual block (the memory it saves on a TPU: tests/test_aot.py)."""
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))

    def loss_and_grads(remat):
        model = ResNet("resnet_micro", remat=remat, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, rest):
            module = nnx.merge(graphdef, params, rest, copy=True)
            out = module(images, train=True)
            return jnp.mean(jnp.square(out)), nnx.state(module, nnx.BatchStat)

        grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (value, stats), grads = grad_fn(params, rest)
        forward = str(jax.make_jaxpr(loss)(params, rest))
        return value, stats, grads, forward.count(" remat2[")

    plain, plain_stats, plain_grads, plain_checkpoints = loss_and_grads("none")
    remat, remat_stats, remat_grads, remat_checkpoints = loss_and_grads("blocks")
    np.testing.assert_allclose(remat, plain, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(remat_stats), jax.tree.leaves(plain_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    blocks = sum(resnet.resnet_spec("resnet_micro").blocks_per_stage)
    assert (plain_checkpoints, remat_checkpoints) == (0, blocks)
    with pytest.raises(ValueError, match="remat must be one of"):
        ResNet("resnet_micro", remat="everything", rngs=nnx.Rngs(0))
