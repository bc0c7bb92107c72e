"""Refuses configs that cannot work, naming the key and what to change, before anything is
compiled: values that are well-typed but wrong (K = 0, a negative learning rate, records of
another dataset). Unknown keys are already refused by the locked ml_collections config.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np

from protomask_jax.base import UserError
from protomask_jax.data.records import DATASET_INFO, RecordError, as_path
from protomask_jax.models.resnet import resnet_spec

# The smallest value each key accepts.
_AT_LEAST = {
    0: "train.warmup_lr train.backbone_lr train.addon_lr train.prototype_lr train.finetune_lr "
    "train.warmup_epochs train.joint_epochs train.finetune_epochs train.prune.finetune_epochs",
    1: "input.num_views input.batch_size input.eval_batch_size train.accumulate_steps "
    "train.micro_batches mesh.fsdp_min_size "
    "train.lr_step_epochs train.eval_every_epochs train.log_every_steps "
    "train.checkpoint_every_steps model.prototypes_per_class model.prototype_dim "
    "train.prune.k train.prune.threshold "
    # resume and evaluation read the latest checkpoint
    "train.keep_checkpoints",
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
    i, m, t = config.input, config.model, config.train
    _require(0 <= config.seed < 2**32, "seed", f"must be in [0, 2**32), got {config.seed}")
    for low, keys in _AT_LEAST.items():
        for key in keys.split():
            value = config
            for name in key.split("."):
                value = value[name]
            _require(value >= low, key, f"must be >= {low}, got {value}")
    epochs = [t.warmup_epochs, t.joint_epochs, t.finetune_epochs]
    _require(
        sum(epochs) + (t.prune.finetune_epochs if t.prune.enabled else 0) > 0,
        "train",
        "every phase has 0 epochs; set train.joint_epochs (or warmup_/finetune_epochs) >= 1",
    )
    _require(
        t.prune.threshold <= t.prune.k,
        "train.prune.threshold",
        f"must be <= train.prune.k={t.prune.k} (of the k nearest images), got {t.prune.threshold}",
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
        ("model.remat", m.remat, ("none", "blocks")),
    ):
        _require(value in allowed, key, f"must be one of {allowed}, got {value!r}")
    try:
        resnet_spec(m.backbone)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"config.model.backbone: {e}") from None
    _require(bool(config.dataset.records_dir), "dataset.records_dir", "is empty; set it")


def check_dataset_info(config: Any, info: dict[str, Any]) -> None:
    """The records must be of the dataset the config describes."""
    path = as_path(config.dataset.records_dir) / DATASET_INFO
    found = info.get("num_classes")
    if found != config.dataset.num_classes:
        raise ConfigError(
            f"config.dataset.num_classes={config.dataset.num_classes} but {path} says "
            f"{found} classes; set --config.dataset.num_classes={found} (or point "
            "--config.dataset.records_dir at the export of the intended dataset)."
        )
    if bool(info.get("multi_label", False)) != bool(config.dataset.multi_label):
        raise ConfigError(
            f"config.dataset.multi_label={config.dataset.multi_label} but {path} says "
            f"multi_label={info.get('multi_label')}."
        )


def check_scanned_split(info: dict[str, Any], record_set: Any) -> None:
    """A split's shards must hold what ``dataset_info.json`` says (count, shards, classes)."""
    path = as_path(record_set.records_dir) / DATASET_INFO
    split, found = record_set.split, len(record_set)
    counts = info["splits"].get(split)
    redo = "re-run the export to rewrite it, or restore the file"
    if counts is None:
        raise RecordError(f"{path} has no '{split}' split but its shards are there; {redo}.")
    if found != counts["num_images"] or len(record_set.reader.paths) != counts["num_shards"]:
        raise RecordError(
            f"{path} lists {counts['num_images']} '{split}' images in {counts['num_shards']} "
            f"shards, the folder holds {found} in {len(record_set.reader.paths)}; {redo}."
        )
    seen: set[int] = set()
    for i in record_set.good:
        image_id = int(record_set.image_ids[i])
        if image_id in seen:
            shard, offset = record_set.reader.locate(int(i))
            raise RecordError(
                f"{shard} at byte offset {offset}: image id {image_id} repeats an earlier "
                f"record of '{split}'; re-run the export."
            )
        seen.add(image_id)
    if record_set.skipped or info["multi_label"]:
        return
    scanned = np.bincount(record_set.labels, minlength=info["num_classes"]).tolist()
    if scanned != counts["class_counts"]:
        c = _first_difference(scanned, counts["class_counts"])
        raise RecordError(
            f"{path}: '{split}' has {scanned[c]} images of class {c}, the file says "
            f"{counts['class_counts'][c]}; {redo}."
        )


def _first_difference(a: list, b: list) -> int:
    return next(i for i, (x, y) in enumerate(itertools.zip_longest(a, b)) if x != y)


def records_identity(info: dict[str, Any]) -> dict[str, Any]:
    """What a run remembers of its records, to refuse resuming on others."""
    keep = ("dataset", "class_names", "multi_label", "segmenter", "postprocess")
    identity = {key: info.get(key) for key in keep}
    identity["splits"] = {
        split: {"num_images": c["num_images"], "class_counts": c["class_counts"]}
        for split, c in info["splits"].items()
    }
    return identity


def check_same_records(
    run: dict[str, Any] | None, info: dict[str, Any], records_dir: Any, *, names_only: bool
) -> None:
    """The records must be those the run was trained on: their class names (in order) and,
    unless ``names_only``, their images and masks. ``run`` None (an older run): unchecked."""
    if not run:
        return
    path = as_path(records_dir) / DATASET_INFO
    fix = "point config.dataset.records_dir at the records the run was trained on"
    ours, theirs = info["class_names"], run["class_names"]
    if ours != theirs:
        c = _first_difference(ours, theirs)
        here, there = (names[c] if c < len(names) else None for names in (ours, theirs))
        raise ConfigError(
            f"{path}: class {c} is {here!r} here but {there!r} in the run ({len(theirs)} "
            f"classes); {fix}."
        )
    now = records_identity(info)
    for key in () if names_only else sorted(now):
        if now[key] != run.get(key):
            raise ConfigError(
                f"{path}: {key} differs from the records the run was trained on (run: "
                f"{json.dumps(run.get(key))[:120]}, now: {json.dumps(now[key])[:120]}); {fix}."
            )
