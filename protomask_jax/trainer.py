"""``train_and_evaluate(config, workdir)``: the whole training run, resumable at any step.

Set-up (every check first, cheapest first, and nothing written to the workdir until they
pass; mesh, records, parameters born sharded) → resume → phases → test evaluation. A
phase starts in :func:`enter_phase` (prune, fresh optimizer state, push, save) and trains in
:func:`run_phase` (validation per epoch, best checkpoint, saves on schedule or SIGTERM, stop
on NaN). :func:`start_pruned_run` begins a pruned copy of a finished run; ``inference``
restores one for evaluation and explanations.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from protomask_jax import base, cli, config_checks, inference
from protomask_jax import checkpoint as ckpt
from protomask_jax import phases as phases_lib
from protomask_jax import push as push_lib
from protomask_jax import sharding as sharding_lib
from protomask_jax import steps as steps_lib
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from protomask_jax.evaluators import classification
from protomask_jax.logs import MetricsWriter, ProgressBar, StageProgress
from protomask_jax.models import convert
from protomask_jax.models import protomask as model_lib
from protomask_jax.phases import Phase
from protomask_jax.steps import TrainState

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
    """Loss or parameters became NaN/inf; the message names the step and the last checkpoint."""


# =================================================================== the model on a mesh


def _abstract_train_state(config, mesh, phase: Phase, num_prototypes: int):
    """The restore target: shapes and shardings of ``phase``'s state with ``num_prototypes``."""

    def build():
        model = inference.build_model(config, 0)
        if num_prototypes != model.prototypes.shape[0]:
            model_lib.prune(model, np.arange(num_prototypes))
        _, *state = model_lib.split_model(model)
        return TrainState.create(*state, tx=phases_lib.make_optimizer(phase))

    abstract = jax.eval_shape(build)
    shardings = sharding_lib.tree_shardings(mesh, abstract, sharding_lib.fsdp_min_size(config))
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


# =========================================================================== set-up


@dataclasses.dataclass
class RunContext(inference.ModelOnMesh):
    """What the sections of one training run share."""

    workdir: Path
    train_records: pipeline.RecordSet
    test_records: pipeline.RecordSet
    train_indices: np.ndarray
    val_indices: np.ndarray
    class_weights: jax.Array
    phases: list[Phase]
    steps_per_epoch: int
    writer: MetricsWriter
    manager: Any
    meta: dict[str, Any]


def _initial_state(config, mesh, fresh: bool) -> tuple[TrainState, np.ndarray | None]:
    """Step-0 parameters born sharded (or loaded, then placed), without optimizer state, and
    the class weights an imported ProtoMask brings (None otherwise). ``fresh``: no
    checkpoint will replace them, so say where they come from."""
    key = jax.random.key(config.seed)
    fsdp = sharding_lib.fsdp_min_size(config)

    def init(key):
        return model_lib.split_model(inference.build_model(config, key))[1:]

    imported_weights = None
    if config.model.pretrained or config.model.import_protomask:
        model = inference.build_model(config, key)
        imported_weights = convert.load_pretrained(model, config)
        state = model_lib.split_model(model)[1:]
        state = jax.device_put(state, sharding_lib.tree_shardings(mesh, state, fsdp))
    else:
        if fresh:
            convert.warn_without_pretrained(config)
        shardings = sharding_lib.tree_shardings(mesh, jax.eval_shape(init, key), fsdp)
        state = jax.jit(init, out_shardings=shardings)(key)
    return TrainState.create(*state), imported_weights


def _check_workdir(workdir) -> None:
    """Refuses a workdir that cannot hold a run, before anything is written."""
    if base.is_remote(workdir):
        _check_bucket_workdir(workdir)
        return
    existing = workdir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise base.UserError(f"--workdir {workdir}: {existing} is a file; give a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise base.UserError(
            f"--workdir {workdir}: {existing} is read-only; give a folder you can write to."
        )


def _check_bucket_workdir(workdir) -> None:
    """A ``gs://`` workdir: its bucket must exist and be readable with this machine's
    credentials; an object of the workdir's name would hide the run."""
    if not str(workdir).startswith("gs://"):
        raise base.UserError(
            f"--workdir {workdir}: only gs:// buckets are supported as a workdir; mount other "
            "stores (s3fs, NFS) and give the mount."
        )
    bucket = base.as_path("gs://" + str(workdir)[len("gs://") :].split("/", 1)[0])
    try:
        found, is_file = bucket.exists(), workdir.is_file()
    except Exception as e:  # auth, network: gcsfs raises many types
        raise base.UserError(
            f"--workdir {workdir}: cannot reach {bucket} ({type(e).__name__}: {e}); check the "
            "machine's credentials (gcloud auth application-default login, or the TPU VM's "
            "service account) and its access to the bucket."
        ) from None
    if not found:
        raise base.UserError(
            f"--workdir {workdir}: bucket {bucket} does not exist or is not visible with these "
            f"credentials; create it (gcloud storage buckets create {bucket}) or fix the name."
        )
    if is_file:
        raise base.UserError(f"--workdir {workdir}: is an object, not a folder; give a folder.")


def scan_records(config) -> tuple[dict, pipeline.RecordSet, pipeline.RecordSet]:
    """``dataset_info.json`` and both splits, each record read once (CRCs, schema, labels,
    image headers) and checked against it: a bad test record is found before training."""
    records_dir, skip = config.dataset.records_dir, config.input.skip_bad_records
    info = records_lib.load_dataset_info(records_dir)
    config_checks.check_dataset_info(config, info)
    log.info("checking the records in %s", records_dir)
    scanned = []
    for split in ("train", "test"):
        record_set = pipeline.RecordSet(
            records_dir, split, skip_bad_records=skip, num_classes=config.dataset.num_classes
        )
        config_checks.check_scanned_split(info, record_set)
        scanned.append(record_set)
    return info, scanned[0], scanned[1]


def records_segmentation(config, info: dict[str, Any]):
    """A copy of ``config`` whose ``segmentation`` says how the records were made
    (``dataset_info.json``: method, its parameters, post-processing) rather than what the
    config file would ask a new export for: training reads the records, and the run's
    config.json (and every table grouping runs by it) must name what it was trained on.
    File paths (SAM checkpoints) stay as given: the records keep only their file names."""
    segmenter = info.get("segmenter") or {}
    if not segmenter.get("method"):
        return config
    config = config.copy_and_resolve_references()
    seg = config.segmentation
    seg.method = segmenter["method"]
    seg.update({k: v for k, v in (info.get("postprocess") or {}).items() if k in seg})
    params = seg.get(seg.method)  # gt has no parameters
    if params is not None:
        stored = segmenter.get("params") or {}
        params.update({k: v for k, v in stored.items() if k in params and k not in base.PATH_KEYS})
    config.lock()
    return config


def _run_to_resume(config, workdir: Path, fingerprint: dict, info: dict) -> dict | None:
    """The metadata of the workdir's latest checkpoint (None: nothing to resume), after
    refusing a run of another config or of other records."""
    if not (workdir / "checkpoints").is_dir():
        return None
    manager = ckpt.manager(workdir / "checkpoints", max_to_keep=None)
    try:
        latest = manager.latest_step()
        meta = None if latest is None else ckpt.read_meta(manager, latest)
    finally:
        manager.close()
    if meta is None:
        return None
    # The segmentation a run records is its records' (checked below with the records); runs
    # saved before that recorded the config file's.
    diffs = ckpt.config_differences(
        {k: v for k, v in meta["fingerprint"].items() if k != "segmentation"},
        {k: v for k, v in fingerprint.items() if k != "segmentation"},
    )
    if diffs:
        raise config_checks.ConfigError(
            f"{workdir} holds a checkpoint of a run with a different config:\n  "
            + "\n  ".join(diffs[:20])
            + "\nUse a new --workdir, or run with the same config to resume."
        )
    records_dir = config.dataset.records_dir
    config_checks.check_same_records(meta.get("records"), info, records_dir, names_only=False)
    return meta


def _set_up(
    config, workdir: Path, source: dict | None, max_steps: int | None, stop: _StopFlag
) -> tuple[RunContext, TrainState]:
    # Every check runs before anything slow and before anything is written to the workdir.
    config_checks.validate(config)
    if max_steps is not None and max_steps < 1:
        raise base.UserError(f"--max_steps={max_steps}: must be >= 1 (the step to stop after).")
    _check_workdir(workdir)
    convert.check_weights(config)
    sharding_lib.maybe_initialize_distributed()
    mesh = sharding_lib.make_mesh(config)
    sharding_lib.check_batch_divisible(
        config.input.batch_size, mesh, "input.batch_size", config.train.micro_batches
    )
    sharding_lib.check_batch_divisible(config.input.eval_batch_size, mesh, "input.eval_batch_size")
    info, train_records, test_records = scan_records(config)
    config = records_segmentation(config, info)
    stop.check()
    good = train_records.good
    train_positions, val_positions = pipeline.split_train_validation(
        train_records.labels[good], config.input.validation_fraction, config.seed
    )
    train_indices = good[train_positions]
    if len(train_indices) < config.input.batch_size:
        raise config_checks.ConfigError(
            f"config.input.batch_size={config.input.batch_size} is more than the "
            f"{len(train_indices)} training images (after input.validation_fraction); lower it."
        )
    fingerprint = ckpt.config_fingerprint(config.to_dict())
    resumed = _run_to_resume(config, workdir, fingerprint, info)
    reached = None if resumed is None else resumed["step"]
    if max_steps is not None and reached is not None and max_steps <= reached:
        raise base.UserError(
            f"--max_steps={max_steps}: the run in {workdir} is at step {reached} already; give "
            "a larger --max_steps, or leave it out to finish the run."
        )
    state, weights = _initial_state(config, mesh, fresh=resumed is None)
    if weights is None:
        labels = train_records.labels[train_indices]
        if config.dataset.multi_label:
            sets = [train_records.label_sets[i] for i in train_indices]
            labels = pipeline.multi_hot(sets, config.dataset.num_classes)
        weights = pipeline.class_weights(labels, config.dataset.num_classes)
    stop.check()
    # ------------------------------------------------------------ the workdir is written
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(
        **inference.model_on_mesh(config, mesh),
        workdir=workdir,
        train_records=train_records,
        test_records=test_records,
        train_indices=train_indices,
        val_indices=good[val_positions],
        class_weights=jax.device_put(np.float32(weights), sharding_lib.replicated(mesh)),
        phases=phases_lib.plan_phases(config, len(train_indices), pruned=True),
        steps_per_epoch=phases_lib.steps_per_epoch(len(train_indices), config.input.batch_size),
        writer=MetricsWriter(workdir, enabled=jax.process_index() == 0, resumed_step=reached),
        manager=ckpt.manager(workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints),
        meta={
            "config": json.loads(config.to_json()),
            "fingerprint": fingerprint,
            "records": config_checks.records_identity(info),
            "num_prototypes": int(state.params["prototypes"].shape[0]),
            "kept_prototypes": None,
            "pushed": False,
            "pruned": False,
            "push": None,
            "best_val_accuracy": {},
            "multi_label_threshold": None,  # of the last validation (multi-label runs)
            "phase": None,
        },
    )
    if resumed is not None:
        state = _restore(ctx, resumed)
    if jax.process_index() == 0:
        cli.save_run_config(workdir, config, source)
    return ctx, state


def _restore(ctx: RunContext, meta: dict) -> TrainState:
    """The state of the checkpoint ``meta`` describes (the workdir's latest)."""
    ctx.meta.update(meta)
    # The checkpoint holds the optimizer state of the phase that saved it.
    phase = next(p for p in ctx.phases if p.name == meta["phase"])
    abstract = _abstract_train_state(ctx.config, ctx.mesh, phase, meta["num_prototypes"])
    state = ckpt.restore_state(ctx.manager, meta["step"], abstract)
    log.info(
        "resuming from step %d (phase %s, epoch %s)", meta["step"], meta["phase"], meta["epoch"]
    )
    return state


def _save(ctx: RunContext, state, phase: str, manager=None, metrics=None) -> None:
    """Saves ``state`` with the run's metadata in ``manager`` (default: ``checkpoints/``)."""
    step = int(jax.device_get(state.step))
    epoch = step // ctx.steps_per_epoch
    ctx.meta.update(step=step, phase=phase, epoch=epoch, data_state={"batches_consumed": step})
    manager = ctx.manager if manager is None else manager
    ckpt.save(manager, step, state, dict(ctx.meta), metrics=metrics)


def _close(ctx: RunContext) -> None:
    ctx.writer.close()
    ctx.manager.close()


# ======================================================================== evaluation


def evaluate_indices(
    ctx: RunContext,
    state,
    record_set,
    indices,
    eval_fn,
    threshold: float | None = None,
    stop: _StopFlag | None = None,
    *,
    label: str,
) -> dict[str, float]:
    """Accuracy of ``state`` on ``indices`` of ``record_set``, gathered over processes, under
    a progress bar named ``label``. Multi-label: exact-match accuracy and samples F1 of
    ``logit > threshold``, the threshold (given, else the reference's (mean TP + mean TN
    logit) / 2 on these images, §7.2) beside. ``stop``: a SIGTERM ends it between two
    batches."""
    if len(indices) == 0:
        return {}
    logits, labels, weights = [], [], []
    with StageProgress(label, len(indices)) as stage:
        for batch in stage.track(ctx.eval_batches(record_set, indices)):
            if stop is not None:
                stop.check()
            logits.append(eval_fn(state.params, state.batch_stats, state.constants, batch).logits)
            labels.append(batch["label"])
            weights.append(batch["weight"])
        logits, labels, weights = (
            np.concatenate(
                [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in xs]
            )
            for xs in (logits, labels, weights)
        )
    keep = weights > 0
    logits, labels = logits[keep], labels[keep]
    if labels.ndim == 1:
        accuracy = float(np.mean(np.argmax(logits, axis=-1) == labels))
        return {"accuracy": accuracy, "num_images": int(keep.sum())}
    if threshold is None:
        threshold = classification.multilabel_threshold(logits, labels)
    scores = classification.multilabel_scores(logits, labels, threshold)
    return {
        "accuracy": scores["accuracy"] / 100,
        "samples_f1": scores["f1"] / 100,
        "threshold": float(threshold),
        "num_images": int(keep.sum()),
    }


def final_evaluation(ctx: RunContext, state, stop: _StopFlag | None = None) -> dict[str, Any]:
    """Test accuracy of the final state and of the last phase's best checkpoint (if any);
    multi-label: at the threshold each one's validation gave (none without validation)."""
    test_records = ctx.test_records
    test_indices = test_records.good
    eval_fn = ctx.eval_fn()
    skipped = {"train": len(ctx.train_records.skipped), "test": len(test_records.skipped)}
    threshold = ctx.meta["multi_label_threshold"]
    results: dict[str, Any] = {
        "final": evaluate_indices(
            ctx, state, test_records, test_indices, eval_fn, threshold, stop, label="test, final"
        ),
        "best_val_accuracy": dict(ctx.meta["best_val_accuracy"]),
        "num_prototypes": int(state.params["prototypes"].shape[0]),
        "skipped_records": skipped,
    }
    best = ckpt.best_checkpoint(ctx.workdir, ctx.phases[-1].name)
    if best is not None:
        best_manager, best_step = best
        # the live state is the target: same shapes and shardings
        best_state = ckpt.restore_state(best_manager, best_step, state)
        threshold = ckpt.read_meta(best_manager, best_step).get("multi_label_threshold")
        label = f"test, best {ctx.phases[-1].name} checkpoint, step {best_step}"
        results["best"] = evaluate_indices(
            ctx, best_state, test_records, test_indices, eval_fn, threshold, stop, label=label
        )
        results["best"]["step"] = int(best_step)
        best_manager.close()
    results["test_accuracy"] = results.get("best", results["final"])["accuracy"]
    return results


# ====================================================================== push, prune


def push_prototypes(ctx: RunContext, state: TrainState) -> TrainState:
    """Projects every prototype onto its nearest training view (one streaming pass), writes
    the gallery to ``push.json`` and the metadata, and logs validation accuracy after it."""
    start = time.perf_counter()
    forward = ctx.eval_fn(return_views=True)
    with StageProgress("push, training images", len(ctx.train_indices)) as stage:
        result = push_lib.run_push(
            lambda batch: forward(state.params, state.batch_stats, state.constants, batch),
            stage.track(ctx.eval_batches(ctx.train_records, ctx.train_indices)),
            state.params["prototypes"][...],
            state.constants["prototype_class"][...],
            reference_per_batch=ctx.config.train.reference_push_per_batch,
        )
    old = state.params["prototypes"][...]
    new = jax.device_put(jnp.asarray(result.prototypes, old.dtype), old.sharding)
    # Replace the one leaf and keep the tree's structure (and thus the step's shardings).
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: new if path[0].key == "prototypes" else leaf, state.params
    )
    state = state.replace(params=params)
    log.info(
        "push: %d prototypes projected in %.1f s (%d without an image of their class)",
        len(result.distance),
        time.perf_counter() - start,
        int(np.sum(~np.isfinite(result.distance))),
    )
    gallery = result.to_json()
    groups = gallery["duplicate_groups"]
    if groups:
        log.warning(
            "push: %d of %d prototypes share their view with another, in groups %s (push.json "
            "duplicate_groups): all but one of each group are redundant",
            sum(map(len, groups)),
            len(result.distance),
            groups,
        )
    base.write_json_atomic(ctx.workdir / "push.json", gallery)
    ctx.meta.update(pushed=True, push=gallery)
    if len(ctx.val_indices):
        val = evaluate_indices(
            ctx,
            state,
            ctx.train_records,
            ctx.val_indices,
            ctx.eval_fn(),
            label="validation after push",
        )
        step = int(jax.device_get(state.step))
        ctx.writer.write(step, {"val/accuracy_after_push": val["accuracy"]}, "push")
    return state


def prune_prototypes(ctx: RunContext, state: TrainState) -> TrainState:
    """Drops prototypes whose k nearest training images are mostly of other classes; the
    result has host parameters and no optimizer state."""
    config = ctx.config
    forward = ctx.eval_fn()
    update = jax.jit(push_lib.prune_update, donate_argnums=0)
    num_prototypes = state.params["prototypes"].shape[0]
    prototype_class = state.constants["prototype_class"][...]
    carry = push_lib.init_prune_carry(num_prototypes, config.train.prune.k)
    with StageProgress("prune, training images", len(ctx.train_indices)) as stage:
        for batch in stage.track(ctx.eval_batches(ctx.train_records, ctx.train_indices)):
            outputs = forward(state.params, state.batch_stats, state.constants, batch)
            carry = update(carry, outputs.min_distances, batch, prototype_class)
        carry = jax.device_get(carry)
    keep = push_lib.prototypes_to_keep(carry, config.train.prune.threshold)
    if len(keep) == 0:
        raise config_checks.ConfigError(
            f"config.train.prune: no prototype has {config.train.prune.threshold} images of its "
            f"class among its {config.train.prune.k} nearest; pruning would remove all "
            f"{num_prototypes}. Lower train.prune.threshold or disable pruning."
        )
    log.info("prune: kept %d of %d prototypes", len(keep), num_prototypes)
    ctx.meta.update(pruned=True, kept_prototypes=keep.tolist(), num_prototypes=len(keep))
    return state.replace(
        params=model_lib.prune(jax.device_get(state.params), keep),
        constants=model_lib.prune(jax.device_get(state.constants), keep),
        opt_state=None,
    )


# ============================================================================ phases


def enter_phase(ctx: RunContext, phase: Phase, state: TrainState) -> TrainState:
    """The saved state ``phase`` starts from: pruned, a fresh optimizer state (as the
    reference's per-phase optimizers; it depends only on shapes, so push may follow), pushed."""
    if phase.name == phases_lib.PRUNE_FINETUNE and not ctx.meta["pruned"]:
        state = prune_prototypes(ctx, state)
    state = state.replace(opt_state=phases_lib.make_optimizer(phase).init(state.params))
    state = jax.device_put(
        state, sharding_lib.tree_shardings(ctx.mesh, state, sharding_lib.fsdp_min_size(ctx.config))
    )
    if phase.name == phases_lib.FINETUNE and ctx.config.train.push and not ctx.meta["pushed"]:
        state = push_prototypes(ctx, state)
    _save(ctx, state, phase.name)
    return state


class _Stopped(Exception):
    """SIGTERM arrived while there was nothing to save (start-up, final evaluation)."""


class _StopFlag:
    """Set by SIGTERM (TPU VM preemption, ``kill``) at any time of the run. The training
    loop then saves and returns; start-up and the final evaluation, with nothing to save,
    stop at their next :meth:`check` (never inside jax: an exception raised from the
    handler in the middle of an XLA compilation crashed the interpreter at exit)."""

    requested = False
    training = False

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside some test runners)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True
        saving = "saving a checkpoint and stopping" if self.training else "stopping"
        log.warning("SIGTERM received: %s (every completed step is saved).", saving)

    def check(self) -> None:
        if self.requested:
            raise _Stopped

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _host_metrics(pending: list[dict]) -> dict[str, float]:
    fetched = jax.device_get(pending)
    return {key: float(np.mean([m[key] for m in fetched])) for key in fetched[0]}


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _diverged(ctx: RunContext, what: str, step: int, phase) -> TrainingDiverged:
    last_saved, where = ctx.manager.latest_step(), "no checkpoint was saved yet"
    if last_saved is not None:
        where = f"the last good checkpoint is step {last_saved} in {ctx.manager.directory}"
    return TrainingDiverged(
        f"{what} at step {step} (phase {phase.name}, epoch {(step - 1) // ctx.steps_per_epoch}); "
        f"nothing later was saved and {where}. Lower the learning rates (config.train.*_lr) "
        "or check the records; rerunning the same command resumes from that checkpoint."
    )


def _compile_train_step(ctx: RunContext, phase: Phase, state):
    return steps_lib.jit_train_step(ctx.graphdef, phase, ctx.step_config, ctx.mesh, state)


def _validate(ctx: RunContext, phase: Phase, state, step: int, eval_fn) -> None:
    """Validation accuracy; a new best for the phase is kept in ``best_<phase>/``."""
    label = f"{phase.name} validation, epoch {step // ctx.steps_per_epoch - 1}"
    val = evaluate_indices(ctx, state, ctx.train_records, ctx.val_indices, eval_fn, label=label)
    ctx.writer.write(step, {"val/accuracy": val["accuracy"]}, phase.name)
    ctx.meta["multi_label_threshold"] = val.get("threshold")
    if val["accuracy"] <= ctx.meta["best_val_accuracy"].get(phase.name, -1.0):
        return
    ctx.meta["best_val_accuracy"][phase.name] = val["accuracy"]
    best_manager = ckpt.manager(ctx.workdir / f"best_{phase.name}", max_to_keep=1, best=True)
    _save(ctx, state, phase.name, best_manager, metrics={"val_accuracy": val["accuracy"]})
    best_manager.close()


def run_phase(
    ctx: RunContext, phase: Phase, state: TrainState, stop: _StopFlag, max_steps: int | None
) -> tuple[TrainState, bool]:
    """Trains through ``phase`` from ``state.step``; returns (state, finished)."""
    config, t, spe = ctx.config, ctx.config.train, ctx.steps_per_epoch
    train_step = _compile_train_step(ctx, phase, state)
    eval_fn = ctx.eval_fn()
    step = int(jax.device_get(state.step))
    stream = pipeline.train_stream(
        ctx.train_records,
        ctx.train_indices,
        ctx.spec,
        global_batch=config.input.batch_size,
        seed=config.seed,
        start_batch=step,
        **inference.stream_args(config),
    )
    batches = inference.device_batches(stream, ctx.mesh, config.input.prefetch)
    progress = ProgressBar(phase.name, spe, config.input.batch_size)
    pending: list[dict] = []
    try:
        while step < phase.end_step:
            if step % spe == 0 or not progress.in_epoch:
                progress.start_epoch(step // spe, step % spe)
            state, metrics = train_step(state, next(batches), ctx.class_weights)
            pending.append(metrics)
            step += 1
            progress.advance()
            epoch_done = step % spe == 0
            if epoch_done or step % t.log_every_steps == 0:
                values = _host_metrics(pending)
                pending = []
                if not math.isfinite(values["loss"]):
                    raise _diverged(ctx, f"loss became {values['loss']}", step, phase)
                progress.set_metrics(values)
                ctx.writer.write(step, {f"train/{k}": v for k, v in values.items()}, phase.name)
            if epoch_done:
                progress.end_epoch()
                due = (step // spe) % t.eval_every_epochs == 0
                if (due or step == phase.end_step) and len(ctx.val_indices):
                    _validate(ctx, phase, state, step, eval_fn)
            stopping = stop.requested or step == max_steps
            # Phases are whole epochs: the phase's last step always ends an epoch.
            if stopping or step == phase.end_step or step % t.checkpoint_every_steps == 0:
                # Never save a state that has gone bad: the last checkpoint stays good.
                if pending and not math.isfinite(_host_metrics(pending)["loss"]):
                    raise _diverged(ctx, "the loss became NaN/inf", step, phase)
                if not bool(_all_finite(state.params)):
                    raise _diverged(ctx, "parameters became NaN/inf", step, phase)
                _save(ctx, state, phase.name)
            if stopping:
                return state, False
    finally:
        progress.close()
        stream.close()
    return state, True


# ============================================================================== run


def train_and_evaluate(
    config, workdir: str | Path, *, max_steps: int | None = None, source: dict | None = None
) -> dict:
    """Trains ProtoMask as ``config`` says and returns (and writes) the test results.

    A workdir holding a checkpoint is resumed (same next batch, same parameters as if never
    stopped); one of another config is refused. ``max_steps`` stops after saving at that
    global step, returning ``{"stopped_at_step": n}``; a later call resumes, as after
    SIGTERM. ``source`` (the config file and overrides of the command) goes to
    ``config.json`` with the config.
    """
    workdir = base.as_path(workdir)
    with _StopFlag() as stop:
        try:
            return _run(config, workdir, max_steps, source, stop)
        except _Stopped:
            return {"stopped_at_step": _latest_step(workdir)}


def _latest_step(workdir: Path) -> int:
    if not (workdir / "checkpoints").is_dir():
        return 0
    manager = ckpt.manager(workdir / "checkpoints", max_to_keep=None)
    step = manager.latest_step()
    manager.close()
    return step or 0


def _run(config, workdir: Path, max_steps: int | None, source, stop: _StopFlag) -> dict:
    started = time.time()
    ctx, state = _set_up(config, workdir, source, max_steps, stop)
    try:
        stop.check()
        stop.training = True
        for phase in ctx.phases:
            if int(jax.device_get(state.step)) >= phase.end_step:
                continue
            if ctx.meta["phase"] != phase.name:
                state = enter_phase(ctx, phase, state)
            state, finished = run_phase(ctx, phase, state, stop, max_steps)
            if not finished:
                return {"stopped_at_step": int(jax.device_get(state.step))}
        stop.training = False
        stop.check()
        results = final_evaluation(ctx, state, stop)
        step = int(jax.device_get(state.step))
        ctx.writer.write(step, {"test/accuracy": results["test_accuracy"]}, "test")
        results["train_time_s"] = time.time() - started
        results["workdir"] = str(workdir)
        if jax.process_index() == 0:
            base.write_json_atomic(workdir / "results.json", results)
        return results
    finally:
        _close(ctx)


def start_pruned_run(config, workdir: str | Path, out_dir: str | Path, which: str = "best"):
    """Starts ``out_dir`` as a run of ``config`` (pruning enabled) at the end of its last phase
    before pruning, holding ``which`` checkpoint of the finished, unpruned run in ``workdir``
    (only read). Training ``out_dir`` then prunes, fine-tunes the last layer and evaluates
    (``python -m protomask_jax.prune``); one already started is left to resume."""
    out_manager = ckpt.manager(base.as_path(out_dir) / "checkpoints", max_to_keep=None)
    try:
        if out_manager.latest_step() is not None:
            return
        trained = inference.restore_trained(config, workdir, which)
        if trained.meta.get("pruned"):
            raise base.UserError(f"{workdir} is already pruned; prune the run it came from")
        records = pipeline.RecordSet(
            config.dataset.records_dir, "train", skip_bad_records=config.input.skip_bad_records
        )
        train, _ = pipeline.split_train_validation(
            records.labels[records.good], config.input.validation_fraction, config.seed
        )
        plan = phases_lib.plan_phases(config, len(train), pruned=True)
        step = plan[-1].first_step  # where prune_finetune starts
        meta = dict(
            trained.meta,
            config=json.loads(config.to_json()),
            fingerprint=ckpt.config_fingerprint(config.to_dict()),
            step=step,
            epoch=step // phases_lib.steps_per_epoch(len(train), config.input.batch_size),
            data_state={"batches_consumed": step},
        )
        # Resuming restores the optimizer structure of the saved phase; its values never
        # matter, as entering prune_finetune starts a fresh optimizer state.
        saved_phase = next((p for p in plan if p.name == meta["phase"]), plan[-1])
        opt_state = phases_lib.make_optimizer(saved_phase).init(trained.state.params)
        step_array = jnp.full_like(trained.state.step, step)
        state = trained.state.replace(step=step_array, opt_state=opt_state)
        ckpt.save(out_manager, step, state, meta)
    finally:
        out_manager.close()
