"""Checkpoints with orbax: the train state plus the JSON metadata needed to resume exactly.

A checkpoint holds two items: ``state`` (the :class:`~protomask_jax.steps.TrainState`
pytree: parameters, BatchNorm statistics, class identity, optimizer state, step) and
``meta`` (JSON: phase, epoch, step, the data iterator state, the number of prototypes, the
push gallery, the best validation accuracy so far, and the resolved config). Restoring
always goes through an abstract target built for the phase and prototype count recorded in
``meta`` — optimizer states differ between phases and pruning changes shapes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE = "state"
META = "meta"


def manager(directory: str | Path, *, max_to_keep: int | None, best: bool = False):
    """An orbax ``CheckpointManager`` for ``directory``.

    Args:
      directory: where step folders live.
      max_to_keep: how many to keep (the newest, or with ``best`` the best).
      best: keep the checkpoints with the highest ``val_accuracy`` metric instead.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        # Synchronous saves: a checkpoint is complete when save() returns, which is what a
        # SIGTERM handler or a NaN stop needs; they are rare enough not to matter for speed.
        enable_async_checkpointing=False,
        best_fn=(lambda metrics: metrics["val_accuracy"]) if best else None,
        best_mode="max",
        keep_checkpoints_without_metrics=False if best else True,
    )
    return ocp.CheckpointManager(
        Path(directory).absolute(), options=options, item_names=(STATE, META)
    )


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    state: Any,
    meta: dict[str, Any],
    metrics: dict[str, float] | None = None,
) -> None:
    """Saves ``state`` and ``meta`` at ``step`` and waits until they are written.

    A checkpoint already at ``step`` is replaced: a phase transition (push, prune) saves
    again at the step where the previous phase ended, with the new state and metadata.
    """
    if step in mngr.all_steps():
        mngr.delete(step)
    mngr.save(
        step,
        args=ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
        ),
        metrics=metrics,
        force=True,
    )
    mngr.wait_until_finished()


def latest_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict | None:
    """The ``meta`` item of the latest (or given) checkpoint, or None if there is none."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    restored = mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return restored[META]


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """Restores the ``state`` item of ``step`` onto the shapes/shardings of ``abstract_state``."""
    target = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if hasattr(x, "shape")
            else x
        ),
        abstract_state,
    )
    restored = mngr.restore(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target)})
    )
    return restored[STATE]


def config_fingerprint(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The parts of a resolved config that a resumed run must share with the original.

    Everything except keys that only change logging, evaluation cadence or workers.
    """
    ignored = {
        ("train", "log_every_steps"),
        ("train", "eval_every_epochs"),
        ("train", "checkpoint_every_steps"),
        ("train", "keep_checkpoints"),
        ("input", "num_workers"),
        ("input", "prefetch"),
        ("input", "eval_batch_size"),
        ("input", "skip_bad_records"),
    }
    out = json.loads(json.dumps(config_dict, default=str))
    for section, key in ignored:
        out.get(section, {}).pop(key, None)
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two fingerprints (for a clear refusal)."""
    diffs = []

    def walk(a, b, prefix):
        for key in sorted(set(a) | set(b)):
            x, y = a.get(key, "<absent>"), b.get(key, "<absent>")
            name = f"{prefix}{key}"
            if isinstance(x, dict) and isinstance(y, dict):
                walk(x, y, name + ".")
            elif x != y:
                diffs.append(f"{name}: checkpoint {x!r} vs now {y!r}")

    walk(saved, current, "")
    return diffs


def log_restored(step: int, meta: dict[str, Any]) -> None:
    logging.info(
        "resuming from step %d (phase %s, epoch %s)", step, meta.get("phase"), meta.get("epoch")
    )
