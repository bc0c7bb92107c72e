"""Import PyTorch weights: torchvision/ProtoPNet ResNets and whole quanproto ProtoMask models.

torch is imported only to read ``.pth`` files; a state_dict may also be a mapping of numpy
arrays or torch tensors. ``models/resnet.py`` mirrors torchvision, so the ResNet mapping is
a renaming::

    torch                                     ours
    <module>.weight (conv, [O, I, kh, kw])     <module>/kernel [kh, kw, I, O]
    <module>.weight / .bias (BatchNorm)        <module>/scale / bias
    <module>.running_mean / .running_var       <module>/mean / var
    layer1.0.downsample.0 / .1                 layer1/0/downsample/0 / 1

A quanproto ProtoMask state_dict (``docs/reference.md`` §12) maps as::

    backbone.*                            backbone (as above)
    add_on_layers.0.weight [D, C_b, 1, 1] add_on/kernel [C_b, D]
    add_on_layers.0.bias   [D]            add_on/bias
    prototype_vectors      [P, D, 1, 1]   prototypes [P, D]
    last_layer.weight      [C, P]         last_layer [P, C]
    classification_loss_fn.weight [C]     returned class weights (optional key)

The prototype -> class identity is not in that file: it is an argument, by default
``j // (P // C)`` — right for an unpruned model; the reference's pruning loses it (§9.11).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from protomask_jax.base import UserError
from protomask_jax.models.protomask import ProtoMask
from protomask_jax.models.resnet import ResNet

log = logging.getLogger(__name__)

StateDictSource = str | os.PathLike | Mapping[str, Any]

# Our leaf name -> torch's, per module kind (conv kernels are the only 4-D leaves).
_TORCH_LEAF_NAME = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
_RESNET_HINT = (
    "Check that model.backbone matches the checkpoint (resnet18/34 have basic blocks, "
    "resnet50/101/152 bottlenecks, and the block counts differ) and that the file is a "
    "torchvision or ProtoPNet ResNet state_dict (keys like 'layer1.0.conv1.weight')."
)
_PROTOMASK_HINT = (
    "Check that the model is built like the checkpoint: model.backbone, "
    "model.prototype_dim (D of 'prototype_vectors') and the number of classes (rows of "
    "'last_layer.weight'); the file must be a quanproto ProtoMask state_dict."
)


class WeightsError(UserError):
    """A weights file is missing, has another SHA-256 or is not a state_dict."""


class StateDictMismatchError(UserError):
    """A state_dict does not fit the model: missing, unexpected or wrongly shaped keys."""


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; no torch import needed
        return value.detach().cpu().numpy()
    return np.asarray(value)


def read_state_dict(
    source: StateDictSource, *, expected_sha256: str | None = None
) -> dict[str, np.ndarray]:
    """``{name: np.ndarray}`` from a mapping or a ``.pth`` file (read with ``torch.load(...,
    weights_only=True)``, after checking ``expected_sha256`` when given)."""
    if isinstance(source, Mapping):
        if expected_sha256:
            raise ValueError("expected_sha256 applies to a file; got an in-memory state_dict")
        return {str(key): _to_numpy(value) for key, value in source.items()}
    path = os.fspath(source)
    digest = check_file(path, expected_sha256)
    import torch  # lazy: only reading .pth files needs torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file it cannot read
        raise WeightsError(
            f"{path} is not a file torch.load(weights_only=True) can read ({type(e).__name__});"
            " check the path in the config (a torch.save(model.state_dict(), path) file)."
        ) from None
    if not isinstance(loaded, Mapping):
        raise WeightsError(
            f"{path} holds a {type(loaded).__name__}, not a state_dict; save the model with "
            "torch.save(model.state_dict(), path)."
        )
    log.info("read %s: sha256 %s, %d tensors", path, digest, len(loaded))
    return {str(key): _to_numpy(value) for key, value in loaded.items()}


def check_file(path: str, expected_sha256: str | None = None) -> str:
    """The SHA-256 of a weights file that exists (and has ``expected_sha256`` if given)."""
    if not os.path.isfile(path):
        raise WeightsError(f"No state_dict file at {path!r}; check the path in the config.")
    actual = file_sha256(path)
    if expected_sha256 and actual != expected_sha256.strip().lower():
        raise WeightsError(
            f"SHA-256 mismatch for {path}: expected {expected_sha256.strip()}, the file has "
            f"{actual}. The file is corrupt or a different checkpoint; fix the path or the "
            "expected hash in the config."
        )
    return actual


def _check_shape(
    state_dict: Mapping[str, np.ndarray],
    key: str,
    expected: tuple[int | None, ...],
    problems: list[str],
) -> np.ndarray | None:
    """The array if present with a matching shape (``None`` matches any size); otherwise a
    line in ``problems``, so that one error lists every mismatch."""
    shown = [-1 if e is None else e for e in expected]
    if key not in state_dict:
        problems.append(f"missing key {key!r}: the model expects shape {shown}")
        return None
    found = tuple(state_dict[key].shape)
    if len(found) != len(expected) or any(
        e is not None and e != f for e, f in zip(expected, found, strict=True)
    ):
        problems.append(
            f"wrong shape for {key!r}: the file has {list(found)}, the model expects {shown}"
        )
        return None
    return state_dict[key]


def _unexpected(state_dict: Mapping[str, np.ndarray], keys: set[str], problems: list[str]):
    for key in sorted(keys):
        shape = list(state_dict[key].shape)
        problems.append(
            f"unexpected key {key!r} with shape {shape}: the model has no such parameter"
        )


def _raise_if_any(problems: list[str], what: str, hint: str) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise StateDictMismatchError(
            f"{what} does not match the model ({len(problems)} problems):\n  "
            + "\n  ".join(problems[:20])
            + f"{more}\n{hint}"
        )


def _prefix_hint(expected_keys: set[str], unexpected_keys: set[str]) -> str:
    """Suggests a key prefix when the file's keys are the expected ones with a prefix."""
    for key in sorted(unexpected_keys):
        for expected in expected_keys:
            if key.endswith("." + expected):
                prefix = key[: -len(expected)]
                return (
                    f" The file's keys carry the prefix {prefix!r} (e.g. {key!r}); "
                    f"pass prefix={prefix!r}"
                    + (
                        " or load it with model.import_protomask (it looks like a whole "
                        "ProtoMask state_dict)."
                        if prefix == "backbone."
                        else "."
                    )
                )
    return ""


def _is_ignored_resnet_key(key: str) -> bool:
    # The classifier head is not part of a feature extractor; BatchNorm's step counter only
    # matters for momentum=None, which torchvision does not use.
    return key.startswith("fc.") or key.endswith(".num_batches_tracked")


def _torch_keys(backbone: ResNet) -> list[tuple[tuple, nnx.Variable, str]]:
    """(state path, variable, torchvision key) of every leaf of the backbone."""
    state = nnx.state(backbone, nnx.Any(nnx.Param, nnx.BatchStat))
    return [
        (path, variable, ".".join(map(str, path[:-1])) + "." + _TORCH_LEAF_NAME[path[-1]])
        for path, variable in nnx.to_flat_state(state)
    ]


def _convert_resnet(
    state_dict: Mapping[str, np.ndarray], backbone: ResNet, prefix: str, problems: list[str]
) -> tuple[nnx.State, set[str]]:
    """The backbone state from the keys under ``prefix``, and the file keys it consumed
    (used or ignored)."""
    flat, consumed = [], set()
    for path, variable, name in _torch_keys(backbone):
        key, ours = prefix + name, tuple(variable.shape)
        is_kernel = path[-1] == "kernel"
        expected = (ours[3], ours[2], ours[0], ours[1]) if is_kernel else ours
        consumed.add(key)
        value = _check_shape(state_dict, key, expected, problems)
        if value is not None:
            value = value.transpose(2, 3, 1, 0) if is_kernel else value  # OIHW -> HWIO
            flat.append((path, variable.copy(jnp.asarray(value, jnp.float32))))
    consumed |= {
        key
        for key in state_dict
        if key.startswith(prefix) and _is_ignored_resnet_key(key[len(prefix) :])
    }
    return nnx.from_flat_state(flat), consumed


def resnet_state_from_torch(
    state_dict: Mapping[str, np.ndarray], backbone: ResNet, *, prefix: str = ""
) -> nnx.State:
    """The state of ``backbone`` (not modified) for ``nnx.update``, from a torchvision or
    ProtoPNet state_dict; ``fc.*`` and ``*.num_batches_tracked`` are ignored, ``prefix``
    (e.g. ``"module."``) is stripped. Every mismatch is listed in one
    :class:`StateDictMismatchError`."""
    problems: list[str] = []
    state, consumed = _convert_resnet(state_dict, backbone, prefix, problems)
    unexpected = set(state_dict) - consumed
    _unexpected(state_dict, unexpected, problems)
    expected_keys = {name for _, _, name in _torch_keys(backbone)}
    hint = _RESNET_HINT + _prefix_hint(expected_keys, unexpected)
    _raise_if_any(problems, "ResNet state_dict", hint)
    return state


def load_torch_resnet(
    backbone: ResNet,
    source: StateDictSource,
    *,
    expected_sha256: str | None = None,
    prefix: str = "",
) -> None:
    """Loads torchvision/ProtoPNet ResNet weights into ``backbone`` in place."""
    state_dict = read_state_dict(source, expected_sha256=expected_sha256)
    try:
        state = resnet_state_from_torch(state_dict, backbone, prefix=prefix)
    except StateDictMismatchError as error:
        raise StateDictMismatchError(f"{_describe(source)}: {error}") from None
    nnx.update(backbone, state)


def protomask_state_from_torch(
    state_dict: Mapping[str, np.ndarray],
    model: ProtoMask,
    *,
    prototype_class: np.ndarray | None = None,
) -> tuple[nnx.State, np.ndarray | None]:
    """``(state, class_weights)``: the full state of ``model`` (not modified) for
    ``nnx.update``, and the ``[C]`` cross-entropy class weights if the file has them.

    P is taken from the file (the reference's pruning may have changed it); backbone, D and
    C must match the model. ``prototype_class`` ``[P]`` defaults to ``j // (P // C)``."""
    problems: list[str] = []
    backbone_state, consumed = _convert_resnet(state_dict, model.backbone, "backbone.", problems)
    backbone_channels, prototype_dim = model.add_on.kernel.shape
    num_classes = model.num_classes
    found = {
        key: _check_shape(state_dict, key, shape, problems)
        for key, shape in (
            ("add_on_layers.0.weight", (prototype_dim, backbone_channels, 1, 1)),
            ("add_on_layers.0.bias", (prototype_dim,)),
            ("prototype_vectors", (None, prototype_dim, 1, 1)),
        )
    }
    prototypes = found["prototype_vectors"]
    num_prototypes = None if prototypes is None else prototypes.shape[0]
    expected = {"last_layer.weight": (num_classes, num_prototypes)}
    if "classification_loss_fn.weight" in state_dict:
        expected["classification_loss_fn.weight"] = (num_classes,)
    for key, shape in expected.items():
        found[key] = _check_shape(state_dict, key, shape, problems)
    consumed |= set(found)
    _unexpected(state_dict, set(state_dict) - consumed, problems)
    _raise_if_any(problems, "ProtoMask state_dict", _PROTOMASK_HINT)

    prototype_class = _resolve_prototype_class(prototype_class, num_prototypes, num_classes)
    state = nnx.state(model)
    new_state = nnx.State(dict(state.items()))

    def like(variable: nnx.Variable, value: np.ndarray, dtype=jnp.float32) -> nnx.Variable:
        return variable.copy(jnp.asarray(value, dtype))

    new_state["backbone"] = backbone_state
    add_on = state["add_on"]
    new_state["add_on"] = nnx.State(
        {
            "kernel": like(add_on["kernel"], found["add_on_layers.0.weight"][:, :, 0, 0].T),
            "bias": like(add_on["bias"], found["add_on_layers.0.bias"]),
        }
    )
    new_state["prototypes"] = like(state["prototypes"], prototypes[:, :, 0, 0])
    new_state["last_layer"] = like(state["last_layer"], found["last_layer.weight"].T)
    new_state["prototype_class"] = like(state["prototype_class"], prototype_class, jnp.int32)
    class_weights = found.get("classification_loss_fn.weight")
    if class_weights is not None:
        class_weights = np.asarray(class_weights, np.float32)
    return new_state, class_weights


def _resolve_prototype_class(
    prototype_class: np.ndarray | None, num_prototypes: int, num_classes: int
) -> np.ndarray:
    if prototype_class is None:
        if num_prototypes % num_classes:
            raise StateDictMismatchError(
                f"The checkpoint has {num_prototypes} prototypes for {num_classes} classes "
                "(not a multiple: it was pruned), and the reference does not save which class "
                "each prototype belongs to. Pass prototype_class=[P] explicitly."
            )
        return np.arange(num_prototypes) // (num_prototypes // num_classes)
    prototype_class = np.asarray(prototype_class)
    if prototype_class.shape != (num_prototypes,):
        raise ValueError(
            f"prototype_class has shape {prototype_class.shape}, the checkpoint has "
            f"{num_prototypes} prototypes; give one class index per prototype."
        )
    if prototype_class.min() < 0 or prototype_class.max() >= num_classes:
        raise ValueError(f"prototype_class values must lie in [0, {num_classes})")
    return prototype_class


def load_quanproto_protomask(
    model: ProtoMask,
    source: StateDictSource,
    *,
    expected_sha256: str | None = None,
    prototype_class: np.ndarray | None = None,
) -> np.ndarray | None:
    """Loads a whole quanproto ProtoMask state_dict into ``model`` in place (its P follows
    the file); returns the class weights stored with the reference's loss, or None."""
    state_dict = read_state_dict(source, expected_sha256=expected_sha256)
    try:
        state, class_weights = protomask_state_from_torch(
            state_dict, model, prototype_class=prototype_class
        )
    except StateDictMismatchError as error:
        raise StateDictMismatchError(f"{_describe(source)}: {error}") from None
    nnx.update(model, state)
    return class_weights


def load_pretrained(model: ProtoMask, config: Any) -> np.ndarray | None:
    """Applies ``model.pretrained`` (backbone weights, verified against
    ``model.pretrained_sha256`` when set) or ``model.import_protomask`` (the whole model, whose
    class weights are returned) to ``model``."""
    check_weights(config)
    model_config = config.model
    if model_config.import_protomask:
        return load_quanproto_protomask(model, model_config.import_protomask)
    if model_config.pretrained:
        load_torch_resnet(
            model.backbone,
            model_config.pretrained,
            expected_sha256=model_config.pretrained_sha256 or None,
        )
    return None


def check_weights(config: Any) -> None:
    """The weights files ``config.model`` names exist and have their given SHA-256: a check
    that runs before anything slow, so a mistake costs seconds."""
    model_config = config.model
    if model_config.pretrained and model_config.import_protomask:
        raise WeightsError(
            "Set only one of model.pretrained (backbone weights) and model.import_protomask "
            "(a whole ProtoMask, backbone included)."
        )
    if model_config.import_protomask:
        check_file(model_config.import_protomask)
    if model_config.pretrained:
        check_file(model_config.pretrained, model_config.pretrained_sha256 or None)


def warn_without_pretrained(config: Any) -> None:
    """Warns that a ResNet with published ImageNet weights starts from random ones."""
    if config.model.backbone in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        log.warning(
            "model.pretrained is empty: the %s backbone starts from random weights. For "
            "ImageNet weights pass --config.model.pretrained=<torchvision .pth file> "
            "(docs/datasets.md, 'Weights').",
            config.model.backbone,
        )


def _describe(source: StateDictSource) -> str:
    return os.fspath(source) if not isinstance(source, Mapping) else "in-memory state_dict"
