"""Refuses configs that cannot work, naming the key and what to change, before anything is
compiled: values that are well-typed but wrong (K = 0, a negative learning rate, records of
another dataset). Unknown keys are already refused by the locked ml_collections config.
"""

from __future__ import annotations

from typing import Any

from protomask_jax.cli import UserError
from protomask_jax.models.resnet import resnet_spec

# The smallest value each key accepts.
_AT_LEAST = {
    0: "train.warmup_lr train.backbone_lr train.addon_lr train.prototype_lr train.finetune_lr "
    "train.warmup_epochs train.joint_epochs train.finetune_epochs train.prune.finetune_epochs",
    1: "input.num_views input.batch_size input.eval_batch_size train.accumulate_steps "
    "train.lr_step_epochs train.eval_every_epochs train.log_every_steps "
    "train.checkpoint_every_steps model.prototypes_per_class model.prototype_dim "
    "train.prune.k train.prune.threshold",
    2: "dataset.num_classes",
    8: "input.view_size input.canvas_size",
}


class ConfigError(UserError):
    """A config value is invalid; the message names the key and what to do."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def validate(config: Any) -> None:
    """Checks the values ``train_and_evaluate`` relies on."""
    i, m = config.input, config.model
    for low, keys in _AT_LEAST.items():
        for key in keys.split():
            value = config
            for name in key.split("."):
                value = value[name]
            _require(value >= low, key, f"must be >= {low}, got {value}")
    prune = config.train.prune
    _require(
        prune.threshold <= prune.k,
        "train.prune.threshold",
        f"must be <= train.prune.k={prune.k} (of the k nearest images), got {prune.threshold}",
    )
    _require(m.similarity_eps > 0, "model.similarity_eps", "must be > 0")
    _require(
        0.0 <= i.validation_fraction < 1.0,
        "input.validation_fraction",
        f"must be in [0, 1), got {i.validation_fraction}",
    )
    for key, value, allowed in (
        ("input.fill_background", i.fill_background, ("original", "mask")),
        ("model.compute_dtype", m.compute_dtype, ("float32", "bfloat16", "float16")),
    ):
        _require(value in allowed, key, f"must be one of {allowed}, got {value!r}")
    try:
        resnet_spec(m.backbone)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"config.model.backbone: {e}") from None
    _require(bool(config.dataset.records_dir), "dataset.records_dir", "is empty; set it")


def check_dataset_info(config: Any, info: dict[str, Any]) -> None:
    """The records must be of the dataset the config describes."""
    records_dir = config.dataset.records_dir
    if info.get("num_classes") != config.dataset.num_classes:
        raise ConfigError(
            f"config.dataset.num_classes={config.dataset.num_classes} but the records in "
            f"{records_dir} hold {info.get('num_classes')} classes (dataset_info.json); fix "
            "the config or point dataset.records_dir at the right export."
        )
    if bool(info.get("multi_label", False)) != bool(config.dataset.multi_label):
        raise ConfigError(
            f"config.dataset.multi_label={config.dataset.multi_label} but {records_dir} says "
            f"multi_label={info.get('multi_label')}."
        )
