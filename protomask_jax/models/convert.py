"""Import PyTorch weights: torchvision/ProtoPNet ResNets and whole quanproto ProtoMask models.

torch is imported only inside the functions that read ``.pth`` files, so the JAX side runs
without it. A state_dict can also be given as a mapping of arrays (numpy or torch tensors).

Name mapping (``models/resnet.py`` mirrors torchvision, so it is a renaming):

    torch                                     ours
    <module>.weight (conv, [O, I, kh, kw])     <module>/kernel [kh, kw, I, O]
    <module>.weight / .bias (BatchNorm)        <module>/scale / bias
    <module>.running_mean / .running_var       <module>/mean / var
    layer1.0.downsample.0 / .1                 layer1/0/downsample/0 / 1

quanproto ProtoMask state_dict (reference doc §12) -> our ProtoMask:

    backbone.*                     backbone (as above)
    add_on_layers.0.weight [D, C_b, 1, 1] -> add_on/kernel [C_b, D]
    add_on_layers.0.bias   [D]            -> add_on/bias
    prototype_vectors      [P, D, 1, 1]   -> prototypes [P, D]
    last_layer.weight      [C, P]         -> last_layer [P, C] (our kernel is W^T)
    classification_loss_fn.weight [C]     -> returned class weights (optional key)

The prototype -> class identity is not in that file. It is taken from an argument, or
defaults to ``j // (P // C)`` — right for an unpruned model; after the reference's pruning
the identity is lost (§9.11) and must be supplied.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from protomask_jax.models.protomask import ProtoMask
from protomask_jax.models.resnet import ResNet

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


class StateDictMismatchError(ValueError):
    """A state_dict does not fit the model: missing, unexpected or wrongly shaped keys."""


# --------------------------------------------------------------------------- files


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected_sha256: str) -> None:
    """Raises ValueError naming both hashes if the file's SHA-256 is not ``expected_sha256``."""
    actual = file_sha256(path)
    if actual.lower() != expected_sha256.strip().lower():
        raise ValueError(
            f"SHA-256 mismatch for {os.fspath(path)}: expected {expected_sha256.strip()}, "
            f"the file has {actual}. The file is corrupt or a different checkpoint; fix the "
            "path or the expected hash in the config."
        )


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; no torch import needed
        return value.detach().cpu().numpy()
    return np.asarray(value)


def read_state_dict(
    source: StateDictSource, *, expected_sha256: str | None = None
) -> dict[str, np.ndarray]:
    """Reads a torch state_dict into numpy arrays.

    Args:
      source: a ``.pth`` path (read with ``torch.load(map_location="cpu",
        weights_only=True)``) or a mapping of name -> tensor/array.
      expected_sha256: if given (and ``source`` is a path), the file must have this hash.

    Returns:
      ``{name: np.ndarray}``.
    """
    if isinstance(source, Mapping):
        if expected_sha256:
            raise ValueError("expected_sha256 applies to a file; got an in-memory state_dict")
        return {str(key): _to_numpy(value) for key, value in source.items()}
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No state_dict file at {path!r}; check the path in the config.")
    if expected_sha256:
        verify_sha256(path, expected_sha256)
    import torch  # lazy: only reading .pth files needs torch

    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"{path} holds a {type(loaded).__name__}, not a state_dict; save the model with "
            "torch.save(model.state_dict(), path)."
        )
    return {str(key): _to_numpy(value) for key, value in loaded.items()}


# --------------------------------------------------------------------------- errors


class _Problems:
    """Collects every mismatch so one error lists them all."""

    def __init__(self):
        self.lines: list[str] = []

    def missing(self, key: str, expected_shape: tuple[int, ...]) -> None:
        self.lines.append(f"missing key {key!r}: the model expects shape {list(expected_shape)}")

    def unexpected(self, key: str, shape: tuple[int, ...]) -> None:
        self.lines.append(
            f"unexpected key {key!r} with shape {list(shape)}: the model has no such parameter"
        )

    def wrong_shape(self, key: str, found: tuple[int, ...], expected: tuple[int, ...]) -> None:
        self.lines.append(
            f"wrong shape for {key!r}: the file has {list(found)}, "
            f"the model expects {list(expected)}"
        )

    def raise_if_any(self, what: str, hint: str, extra_hint: str = "") -> None:
        if not self.lines:
            return
        shown = self.lines[:20]
        more = len(self.lines) - len(shown)
        listing = "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
        raise StateDictMismatchError(
            f"{what} does not match the model ({len(self.lines)} problems):\n  {listing}\n"
            f"{hint}{extra_hint}"
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


# --------------------------------------------------------------------------- ResNet


def _is_ignored_resnet_key(key: str) -> bool:
    # The classifier head is not part of a feature extractor; BatchNorm's step counter only
    # matters for momentum=None, which torchvision does not use.
    return key.startswith("fc.") or key.endswith(".num_batches_tracked")


def _convert_resnet(
    state_dict: Mapping[str, np.ndarray],
    backbone: ResNet,
    prefix: str,
    problems: _Problems,
) -> tuple[nnx.State, set[str]]:
    """Builds the backbone state from ``state_dict`` keys under ``prefix``.

    Returns the new state and the set of file keys consumed (used or ignored).
    """
    flat = []
    consumed = set()
    for path, variable in nnx.to_flat_state(nnx.state(backbone, nnx.Any(nnx.Param, nnx.BatchStat))):
        *module_path, leaf = path
        key = prefix + ".".join(str(part) for part in module_path) + "." + _TORCH_LEAF_NAME[leaf]
        ours = tuple(variable.shape)
        expected = (ours[3], ours[2], ours[0], ours[1]) if leaf == "kernel" else ours
        if key not in state_dict:
            problems.missing(key, expected)
            continue
        consumed.add(key)
        value = state_dict[key]
        if tuple(value.shape) != expected:
            problems.wrong_shape(key, tuple(value.shape), expected)
            continue
        if leaf == "kernel":
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
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
    """Converts a torchvision/ProtoPNet ResNet state_dict to the backbone's state.

    Args:
      state_dict: ``{name: array}`` (see :func:`read_state_dict`); ``fc.*`` and
        ``*.num_batches_tracked`` are ignored.
      backbone: the target :class:`ResNet` (gives names and shapes; not modified).
      prefix: strip this from the file's keys (e.g. ``"module."``); other keys are
        unexpected.

    Returns:
      An ``nnx.State`` for ``nnx.update(backbone, state)``.

    Raises:
      StateDictMismatchError: listing every missing, unexpected or wrongly shaped key.
    """
    problems = _Problems()
    state, consumed = _convert_resnet(state_dict, backbone, prefix, problems)
    unexpected = set(state_dict) - consumed
    for key in sorted(unexpected):
        problems.unexpected(key, tuple(state_dict[key].shape))
    expected_keys = {
        ".".join(str(p) for p in path[:-1]) + "." + _TORCH_LEAF_NAME[path[-1]]
        for path, _ in nnx.to_flat_state(nnx.state(backbone, nnx.Any(nnx.Param, nnx.BatchStat)))
    }
    problems.raise_if_any(
        "ResNet state_dict", _RESNET_HINT, _prefix_hint(expected_keys, unexpected)
    )
    return state


def load_torch_resnet(
    backbone: ResNet,
    source: StateDictSource,
    *,
    expected_sha256: str | None = None,
    prefix: str = "",
) -> None:
    """Loads torchvision/ProtoPNet ResNet weights into ``backbone`` in place.

    Args:
      backbone: the :class:`ResNet` to fill.
      source: ``.pth`` path or state_dict mapping.
      expected_sha256: verify the file first (see :func:`verify_sha256`).
      prefix: strip this from the file's keys.
    """
    state_dict = read_state_dict(source, expected_sha256=expected_sha256)
    try:
        state = resnet_state_from_torch(state_dict, backbone, prefix=prefix)
    except StateDictMismatchError as error:
        raise StateDictMismatchError(f"{_describe(source)}: {error}") from None
    nnx.update(backbone, state)


# --------------------------------------------------------------------------- ProtoMask


def _check_shape(
    state_dict: Mapping[str, np.ndarray],
    key: str,
    expected: tuple[int | None, ...],
    problems: _Problems,
) -> np.ndarray | None:
    """Returns the array if present with a matching shape (``None`` entries match any size)."""
    if key not in state_dict:
        problems.missing(key, tuple(-1 if e is None else e for e in expected))
        return None
    value = state_dict[key]
    found = tuple(value.shape)
    if len(found) != len(expected) or any(
        e is not None and e != f for e, f in zip(expected, found, strict=True)
    ):
        problems.wrong_shape(key, found, tuple(-1 if e is None else e for e in expected))
        return None
    return value


def protomask_state_from_torch(
    state_dict: Mapping[str, np.ndarray],
    model: ProtoMask,
    *,
    prototype_class: np.ndarray | None = None,
) -> tuple[nnx.State, np.ndarray | None]:
    """Converts a quanproto ProtoMask state_dict to the model's full state.

    The number of prototypes P is taken from the file (it may differ from the model's after
    the reference's pruning); backbone, D and C must match the model.

    Args:
      state_dict: ``{name: array}`` (see :func:`read_state_dict`).
      model: the target :class:`ProtoMask` (gives names and shapes; not modified).
      prototype_class: ``[P]`` class of each prototype; default ``j // (P // C)``, which
        requires P divisible by C.

    Returns:
      ``(state, class_weights)``: an ``nnx.State`` for ``nnx.update(model, state)`` and the
      ``[C]`` float32 cross-entropy class weights (None if the file has none).

    Raises:
      StateDictMismatchError: listing every missing, unexpected or wrongly shaped key.
    """
    problems = _Problems()
    backbone_state, consumed = _convert_resnet(state_dict, model.backbone, "backbone.", problems)
    backbone_channels, prototype_dim = model.add_on.kernel.shape
    num_classes = model.num_classes
    add_on_weight = _check_shape(
        state_dict, "add_on_layers.0.weight", (prototype_dim, backbone_channels, 1, 1), problems
    )
    add_on_bias = _check_shape(state_dict, "add_on_layers.0.bias", (prototype_dim,), problems)
    prototypes = _check_shape(
        state_dict, "prototype_vectors", (None, prototype_dim, 1, 1), problems
    )
    num_prototypes = None if prototypes is None else prototypes.shape[0]
    last_layer = _check_shape(
        state_dict, "last_layer.weight", (num_classes, num_prototypes), problems
    )
    consumed |= {
        "add_on_layers.0.weight",
        "add_on_layers.0.bias",
        "prototype_vectors",
        "last_layer.weight",
    }
    class_weights = None
    if "classification_loss_fn.weight" in state_dict:
        class_weights = _check_shape(
            state_dict, "classification_loss_fn.weight", (num_classes,), problems
        )
        consumed.add("classification_loss_fn.weight")
    for key in sorted(set(state_dict) - consumed):
        problems.unexpected(key, tuple(state_dict[key].shape))
    problems.raise_if_any("ProtoMask state_dict", _PROTOMASK_HINT)

    prototype_class = _resolve_prototype_class(prototype_class, num_prototypes, num_classes)
    state = nnx.state(model)
    new_state = nnx.State(dict(state.items()))
    new_state["backbone"] = backbone_state
    new_state["add_on"] = nnx.State(
        {
            "kernel": state["add_on"]["kernel"].copy(
                jnp.asarray(add_on_weight[:, :, 0, 0].T, jnp.float32)
            ),
            "bias": state["add_on"]["bias"].copy(jnp.asarray(add_on_bias, jnp.float32)),
        }
    )
    new_state["prototypes"] = state["prototypes"].copy(
        jnp.asarray(prototypes[:, :, 0, 0], jnp.float32)
    )
    new_state["last_layer"] = state["last_layer"].copy(jnp.asarray(last_layer.T, jnp.float32))
    new_state["prototype_class"] = state["prototype_class"].copy(
        jnp.asarray(prototype_class, jnp.int32)
    )
    if class_weights is not None:
        class_weights = np.asarray(class_weights, np.float32)
    return new_state, class_weights


def _resolve_prototype_class(
    prototype_class: np.ndarray | None, num_prototypes: int, num_classes: int
) -> np.ndarray:
    if prototype_class is None:
        if num_prototypes % num_classes:
            raise ValueError(
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
    """Loads a whole quanproto ProtoMask state_dict into ``model`` in place.

    Args:
      model: the :class:`ProtoMask` to fill (its P follows the file).
      source: ``.pth`` path or state_dict mapping.
      expected_sha256: verify the file first.
      prototype_class: see :func:`protomask_state_from_torch`.

    Returns:
      The ``[C]`` class weights stored with the reference's loss, or None.
    """
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
    """Applies ``config.model.pretrained`` or ``config.model.import_protomask`` to ``model``.

    ``model.pretrained`` (verified against ``model.pretrained_sha256`` when set) fills the
    backbone; ``model.import_protomask`` fills the whole model. Setting both is an error.

    Returns:
      Class weights from an imported ProtoMask state_dict, else None.
    """
    model_config = config.model
    if model_config.pretrained and model_config.import_protomask:
        raise ValueError(
            "Set only one of model.pretrained (backbone weights) and model.import_protomask "
            "(a whole ProtoMask, backbone included)."
        )
    if model_config.import_protomask:
        return load_quanproto_protomask(model, model_config.import_protomask)
    if model_config.pretrained:
        load_torch_resnet(
            model.backbone,
            model_config.pretrained,
            expected_sha256=model_config.pretrained_sha256 or None,
        )
    return None


def _describe(source: StateDictSource) -> str:
    return os.fspath(source) if not isinstance(source, Mapping) else "in-memory state_dict"
