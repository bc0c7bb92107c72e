"""Checkpoints with orbax: the train state plus the JSON metadata needed to resume exactly.

Items: ``state`` (the whole :class:`~protomask_jax.steps.TrainState`) and ``meta`` (phase,
epoch, step, data iterator state, prototype count, push gallery, best validation accuracy,
resolved config). Resuming needs an abstract target for the recorded phase and prototype
count: optimizer states differ between phases and pruning changes shapes. Inference restores
only the ``WEIGHTS`` (:func:`restore_weights`), so it needs the prototype count alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from protomask_jax import base
from protomask_jax.base import PATH_KEYS

# The parts of a saved TrainState that inference reads (not opt_state).
WEIGHTS = ("step", "params", "batch_stats", "constants")
_MAY_CHANGE_ON_RESUME = {
    "train": ("log_every_steps", "eval_every_epochs", "checkpoint_every_steps", "keep_checkpoints"),
    "input": ("num_workers", "prefetch", "eval_batch_size", "skip_bad_records"),
    "explain": None,  # None: the whole section (evaluation only)
}


def manager(directory: str | Path, *, max_to_keep: int | None, best: bool = False):
    """An orbax ``CheckpointManager`` keeping the ``max_to_keep`` newest checkpoints, or with
    ``best`` those with the highest ``val_accuracy`` metric."""
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
    directory = base.as_path(directory)
    if not base.is_remote(directory):
        directory = directory.absolute()
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(mngr, step: int, state, meta: dict[str, Any], metrics: dict | None = None) -> None:
    """Saves synchronously, replacing a checkpoint at ``step``: entering a phase (push,
    prune) saves again at the step where the previous phase ended."""
    if step in mngr.all_steps():
        mngr.delete(step)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    mngr.save(step, args=args, metrics=metrics, force=True)
    mngr.wait_until_finished()


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """Restores the ``state`` item of ``step`` onto the shapes/shardings of ``abstract_state``."""
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
    )
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
    return mngr.restore(step, args=args)["state"]


def restore_weights(mngr: ocp.CheckpointManager, step: int, abstract: dict[str, Any]) -> dict:
    """The ``WEIGHTS`` fields of ``step``'s ``state`` item onto the shapes/shardings of
    ``abstract`` (a dict of them): the optimizer state on disk is left unread, so inference
    needs no optimizer to describe it."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    state = ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)
    return mngr.restore(step, args=ocp.args.Composite(state=state))["state"]


def best_checkpoint(workdir: Path, phase_name: str):
    """``(manager, step)`` of ``best_<phase>/``'s best checkpoint, or None."""
    if (workdir / f"best_{phase_name}").exists():
        mngr = manager(workdir / f"best_{phase_name}", max_to_keep=1, best=True)
        if mngr.best_step() is not None:
            return mngr, mngr.best_step()
        mngr.close()
    return None


def config_fingerprint(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The resolved config without the keys a resumed run may change (logging, workers)."""
    out = json.loads(json.dumps(config_dict, default=str))
    for section, keys in _MAY_CHANGE_ON_RESUME.items():
        if keys is None:
            out.pop(section, None)
        for key in keys or ():
            out.get(section, {}).pop(key, None)
    return out


def _same_path(a, b) -> bool:
    """A relative and an absolute name of one file are the same setting."""
    return isinstance(a, str) and isinstance(b, str) and os.path.abspath(a) == os.path.abspath(b)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two fingerprints (for a clear refusal)."""
    diffs = []

    def walk(a, b, prefix):
        for key in sorted(set(a) | set(b)):
            x, y = a.get(key, "<absent>"), b.get(key, "<absent>")
            name = f"{prefix}{key}"
            if isinstance(x, dict) and isinstance(y, dict):
                walk(x, y, name + ".")
            elif x != y and not (key in PATH_KEYS and _same_path(x, y)):
                diffs.append(f"{name}: checkpoint {x!r} vs now {y!r}")

    walk(saved, current, "")
    return diffs
