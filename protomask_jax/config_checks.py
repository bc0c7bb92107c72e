"""Refuses configs that cannot work, with a message that says what to change.

ml_collections already refuses unknown keys when a config is locked (and lists the valid
ones); these checks catch values that are well-typed but wrong (K = 0, a negative learning
rate, a dataset whose records disagree with the config) before anything is compiled.
"""

from __future__ import annotations

from typing import Any

from protomask_jax.models.resnet import resnet_spec


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what to do."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def validate(config: Any) -> None:
    """Checks the values ``train_and_evaluate`` relies on."""
    i, t, m = config.input, config.train, config.model
    _require(
        i.num_views >= 1, "input.num_views", f"must be >= 1 (K views per image), got {i.num_views}"
    )
    _require(i.view_size >= 8, "input.view_size", f"must be >= 8 pixels, got {i.view_size}")
    _require(i.canvas_size >= 8, "input.canvas_size", f"must be >= 8 pixels, got {i.canvas_size}")
    _require(i.batch_size >= 1, "input.batch_size", f"must be >= 1, got {i.batch_size}")
    _require(
        i.eval_batch_size >= 1, "input.eval_batch_size", f"must be >= 1, got {i.eval_batch_size}"
    )
    _require(
        i.fill_background in ("original", "mask"),
        "input.fill_background",
        f"must be 'original' or 'mask', got {i.fill_background!r}",
    )
    _require(
        0.0 <= i.validation_fraction < 1.0,
        "input.validation_fraction",
        f"must be in [0, 1), got {i.validation_fraction}",
    )
    for key in ("warmup_lr", "backbone_lr", "addon_lr", "prototype_lr", "finetune_lr"):
        value = t[key]
        _require(value >= 0, f"train.{key}", f"learning rates must be >= 0, got {value}")
    for key in ("warmup_epochs", "joint_epochs", "finetune_epochs"):
        _require(t[key] >= 0, f"train.{key}", f"must be >= 0, got {t[key]}")
    _require(t.accumulate_steps >= 1, "train.accumulate_steps", "must be >= 1")
    _require(t.lr_step_epochs >= 1, "train.lr_step_epochs", "must be >= 1")
    _require(t.eval_every_epochs >= 1, "train.eval_every_epochs", "must be >= 1")
    _require(t.log_every_steps >= 1, "train.log_every_steps", "must be >= 1")
    _require(t.checkpoint_every_steps >= 1, "train.checkpoint_every_steps", "must be >= 1")
    _require(m.prototypes_per_class >= 1, "model.prototypes_per_class", "must be >= 1")
    _require(m.prototype_dim >= 1, "model.prototype_dim", "must be >= 1")
    _require(m.similarity_eps > 0, "model.similarity_eps", "must be > 0")
    _require(
        m.compute_dtype in ("float32", "bfloat16", "float16"),
        "model.compute_dtype",
        f"must be float32, bfloat16 or float16, got {m.compute_dtype!r}",
    )
    try:
        resnet_spec(m.backbone)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"config.model.backbone: {e}") from None
    _require(
        config.dataset.num_classes >= 2,
        "dataset.num_classes",
        f"must be >= 2, got {config.dataset.num_classes}",
    )
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
