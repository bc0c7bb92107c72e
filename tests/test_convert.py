"""Weight import: our converted models reproduce plain-torch models written in the tests."""

import hashlib

import jax
import numpy as np
import pytest
from flax import nnx

from protomask_jax.models import convert
from protomask_jax.models.protomask import ProtoMask, split_model
from protomask_jax.models.resnet import ResNet, ResNetSpec

torch = pytest.importorskip("torch")
from benchmarks.torch_protomask import TorchProtoMask, TorchResNet, randomize  # noqa: E402

BASIC = ResNetSpec("basic", (1, 2), (8, 16), stem_width=8)
BOTTLENECK = ResNetSpec("bottleneck", (2, 1), (4, 8), stem_width=8)


def _torch_resnet(spec: ResNetSpec, seed: int = 0) -> TorchResNet:
    torch.manual_seed(seed)
    return randomize(
        TorchResNet(spec.block, spec.blocks_per_stage, spec.widths, spec.stem_width), seed
    )


def _our_features(backbone: ResNet, images_nchw: np.ndarray) -> np.ndarray:
    graphdef, state = nnx.split(backbone)

    @jax.jit
    def forward(state, images):
        return nnx.merge(graphdef, state)(images, train=False)

    return np.asarray(forward(state, images_nchw.transpose(0, 2, 3, 1)))


@pytest.mark.parametrize("spec", [BASIC, BOTTLENECK], ids=["basic", "bottleneck"])
def test_converted_resnet_matches_torch(spec):
    torch_model = _torch_resnet(spec)
    images = np.random.default_rng(0).normal(size=(2, 3, 35, 35)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images)).numpy().transpose(0, 2, 3, 1)

    backbone = ResNet(spec, rngs=nnx.Rngs(1))
    convert.load_torch_resnet(backbone, torch_model.state_dict())
    ours = _our_features(backbone, images)

    # An odd input size (35) exercises torch's symmetric padding on every stride-2 layer;
    # 'SAME' padding would shift the maps and fail by O(1).
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_converted_torchvision_resnet_matches(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    torch_model = randomize(getattr(torchvision.models, name)(weights=None), 0)
    images = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
    features = torch.nn.Sequential(*list(torch_model.children())[:-2])  # drop avgpool, fc
    with torch.no_grad():
        expected = features(torch.from_numpy(images)).numpy().transpose(0, 2, 3, 1)

    backbone = ResNet(name, rngs=nnx.Rngs(0))
    # The full torchvision state_dict, fc.* and num_batches_tracked included.
    convert.load_torch_resnet(backbone, torch_model.state_dict())
    np.testing.assert_allclose(_our_features(backbone, images), expected, atol=1e-4, rtol=1e-4)


def _torch_protomask(num_classes=3, ppc=2, dim=6, eps=1e-4) -> TorchProtoMask:
    torch.manual_seed(3)
    model = TorchProtoMask(_torch_resnet(BASIC, seed=4), num_classes, ppc, dim, eps)
    with torch.no_grad():
        # Random last layer (not the identity init) so the test sees the transpose.
        model.last_layer.weight.copy_(torch.randn(model.last_layer.weight.shape))
        model.classification_loss_fn.weight.copy_(torch.rand(num_classes) + 0.5)
    return model.eval()


def _our_protomask(num_classes=3, ppc=2, dim=6, eps=1e-4) -> ProtoMask:
    return ProtoMask(
        BASIC,
        num_classes,
        prototypes_per_class=ppc,
        prototype_dim=dim,
        similarity_eps=eps,
        rngs=nnx.Rngs(0),
    )


def _our_logits(model: ProtoMask, views_nkchw: np.ndarray):
    graphdef, params, batch_stats, constants = split_model(model)

    @jax.jit
    def forward(params, batch_stats, constants, views):
        return nnx.merge(graphdef, params, batch_stats, constants)(views, train=False)

    outputs = forward(params, batch_stats, constants, views_nkchw.transpose(0, 1, 3, 4, 2))
    return np.asarray(outputs.logits), np.asarray(outputs.min_distances)


def test_quanproto_protomask_import_reproduces_logits():
    torch_model = _torch_protomask()
    state_dict = torch_model.state_dict()
    assert "classification_loss_fn.weight" in state_dict  # the reference's layout (§12)
    views = np.random.default_rng(1).normal(size=(2, 3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected_logits, expected_distances = torch_model(torch.from_numpy(views))

    model = _our_protomask()
    class_weights = convert.load_quanproto_protomask(model, state_dict)
    logits, min_distances = _our_logits(model, views)

    np.testing.assert_allclose(min_distances, expected_distances.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logits, expected_logits.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(class_weights, torch_model.classification_loss_fn.weight.numpy())
    np.testing.assert_array_equal(model.prototype_class[...], [0, 0, 1, 1, 2, 2])


def test_quanproto_import_of_pruned_checkpoint_needs_prototype_class():
    torch_model = _torch_protomask()
    keep = [0, 2, 3, 5, 4]  # 5 prototypes for 3 classes: pruned
    state_dict = dict(torch_model.state_dict())
    state_dict["prototype_vectors"] = state_dict["prototype_vectors"][keep]
    state_dict["last_layer.weight"] = state_dict["last_layer.weight"][:, keep]

    with pytest.raises(ValueError, match="prototype_class"):
        convert.load_quanproto_protomask(_our_protomask(), state_dict)

    model = _our_protomask()
    identity = np.array([0, 1, 1, 2, 2])
    convert.load_quanproto_protomask(model, state_dict, prototype_class=identity)
    assert model.prototypes.shape == (5, 6) and model.last_layer.shape == (5, 3)
    np.testing.assert_array_equal(model.prototype_class[...], identity)
    np.testing.assert_allclose(
        model.last_layer[...], state_dict["last_layer.weight"].numpy().T, rtol=0, atol=0
    )


def test_missing_key_is_named():
    state_dict = dict(_torch_resnet(BASIC).state_dict())
    del state_dict["layer2.0.downsample.1.running_var"]
    with pytest.raises(convert.StateDictMismatchError) as error:
        convert.load_torch_resnet(ResNet(BASIC, rngs=nnx.Rngs(0)), state_dict)
    message = str(error.value)
    assert "missing key 'layer2.0.downsample.1.running_var'" in message
    assert "[16]" in message and "model.backbone" in message


def test_unexpected_key_is_named():
    state_dict = dict(_torch_resnet(BASIC).state_dict())
    state_dict["layer3.0.conv1.weight"] = torch.zeros(32, 16, 3, 3)
    with pytest.raises(convert.StateDictMismatchError) as error:
        convert.load_torch_resnet(ResNet(BASIC, rngs=nnx.Rngs(0)), state_dict)
    assert "unexpected key 'layer3.0.conv1.weight' with shape [32, 16, 3, 3]" in str(error.value)


def test_wrong_shape_names_key_and_both_shapes():
    state_dict = dict(_torch_resnet(BASIC).state_dict())
    state_dict["conv1.weight"] = torch.zeros(8, 3, 5, 5)
    with pytest.raises(convert.StateDictMismatchError) as error:
        convert.load_torch_resnet(ResNet(BASIC, rngs=nnx.Rngs(0)), state_dict)
    assert (
        "wrong shape for 'conv1.weight': the file has [8, 3, 5, 5], the model expects [8, 3, 7, 7]"
        in str(error.value)
    )


def test_protomask_wrong_prototype_dim_is_named():
    state_dict = _torch_protomask(dim=6).state_dict()
    with pytest.raises(convert.StateDictMismatchError) as error:
        convert.load_quanproto_protomask(_our_protomask(dim=5), state_dict)
    message = str(error.value)
    assert (
        "'add_on_layers.0.weight': the file has [6, 16, 1, 1], the model expects [5, 16, 1, 1]"
        in message
    )
    assert "'prototype_vectors'" in message and "model.prototype_dim" in message


def test_whole_protomask_file_given_as_backbone_suggests_import():
    state_dict = _torch_protomask().state_dict()
    with pytest.raises(convert.StateDictMismatchError, match="import_protomask"):
        convert.load_torch_resnet(ResNet(BASIC, rngs=nnx.Rngs(0)), state_dict)


def test_file_load_with_sha256(tmp_path, caplog):
    torch_model = _torch_resnet(BASIC)
    path = tmp_path / "backbone.pth"
    torch.save(torch_model.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    backbone = ResNet(BASIC, rngs=nnx.Rngs(0))
    with caplog.at_level("INFO", logger="protomask_jax"):
        convert.load_torch_resnet(backbone, path, expected_sha256=digest.upper())
    # What was loaded is logged: the file's hash and its tensor count.
    count = len(torch_model.state_dict())
    assert f"sha256 {digest}, {count} tensors" in caplog.text
    np.testing.assert_array_equal(backbone.bn1.var[...], torch_model.bn1.running_var.numpy())
    np.testing.assert_array_equal(
        backbone.conv1.kernel[...], torch_model.conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
    )

    wrong = "0" * 64
    with pytest.raises(ValueError) as error:
        convert.load_torch_resnet(backbone, path, expected_sha256=wrong)
    assert wrong in str(error.value) and digest in str(error.value)


def test_load_pretrained_from_config(tmp_path):
    from configs import common

    torch_model = _torch_protomask()
    path = tmp_path / "protomask.pth"
    torch.save(torch_model.state_dict(), path)
    config = common.get_base_config()
    config.model.import_protomask = str(path)

    model = _our_protomask()
    class_weights = convert.load_pretrained(model, config)
    np.testing.assert_array_equal(class_weights, torch_model.classification_loss_fn.weight.numpy())
    np.testing.assert_array_equal(
        model.prototypes[...], torch_model.prototype_vectors.detach().numpy()[:, :, 0, 0]
    )

    config.model.pretrained = str(path)
    with pytest.raises(ValueError, match="only one"):
        convert.load_pretrained(model, config)


def test_weights_mistakes_are_user_errors_and_random_weights_are_announced(tmp_path, caplog):
    from configs import common
    from protomask_jax.base import UserError

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    for path, sha, message in (
        (tmp_path / "missing.pth", "", "No state_dict file"),
        (garbage, "0" * 64, "SHA-256 mismatch"),
        (garbage, "", "torch.load"),
    ):
        with pytest.raises(UserError, match=message):
            convert.read_state_dict(path, expected_sha256=sha)
    config = common.get_base_config()
    for backbone, warned in (("resnet50", True), ("resnet_micro", False)):
        config.model.backbone = backbone
        caplog.clear()
        convert.warn_without_pretrained(config)
        assert ("starts from random weights" in caplog.text) == warned
