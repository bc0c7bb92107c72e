"""``train_and_evaluate(config, workdir)``: the whole training run, resumable at any step.

Sections follow the run: set-up → data → model and state → phases (push before
fine-tuning, prune before its own fine-tune) → final test evaluation. The command line in
``train.py`` only parses flags and calls this function; tests and benchmarks call it too.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from protomask_jax import checkpoint as ckpt
from protomask_jax import config_checks
from protomask_jax import phases as phases_lib
from protomask_jax import push as push_lib
from protomask_jax import sharding as sharding_lib
from protomask_jax import steps as steps_lib
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from protomask_jax.logs import MetricsWriter, ProgressBar
from protomask_jax.models import convert
from protomask_jax.models import protomask as model_lib

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last checkpoint."""


@dataclasses.dataclass
class RunContext:
    """What the phases share: data, mesh, model definition and bookkeeping."""

    config: Any
    workdir: Path
    mesh: Any
    spec: pipeline.PipelineSpec
    train_records: pipeline.RecordSet
    train_indices: np.ndarray
    val_indices: np.ndarray
    class_weights: jax.Array
    graphdef: Any
    step_config: steps_lib.StepConfig
    steps_per_epoch: int
    writer: MetricsWriter
    manager: Any
    meta: dict[str, Any]


# =============================================================================== set-up


def _device_batches(
    iterator: Iterator[dict], mesh, prefetch: int
) -> Iterator[dict[str, jax.Array]]:
    """Global device arrays from process-local batches, ``prefetch`` batches ahead."""
    queue: collections.deque = collections.deque()
    for local in iterator:
        queue.append(sharding_lib.global_batch(mesh, local))
        if len(queue) > prefetch:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def _batch_shardings(mesh, spec: pipeline.PipelineSpec) -> dict[str, Any]:
    keys = ["canvas", "boxes", "valid", "num_masks", "label", "image_id", "weight"]
    if spec.with_masks:
        keys.append("masks")
    return {key: sharding_lib.batch_sharding(mesh) for key in keys}


def _init_model_state(config, num_classes: int, mesh):
    """Builds the model with its parameters born sharded (or loaded, then placed).

    Returns:
      ``(graphdef, params, batch_stats, constants, imported_class_weights)``.
    """
    key = jax.random.key(config.seed)

    def init(key):
        model = model_lib.build_model(config, num_classes, nnx.Rngs(params=key))
        return model_lib.split_model(model)[1:]

    abstract_model = nnx.eval_shape(
        lambda: model_lib.build_model(config, num_classes, nnx.Rngs(params=0))
    )
    graphdef = model_lib.split_model(abstract_model)[0]
    imported_weights = None
    if config.model.pretrained or config.model.import_protomask:
        model = model_lib.build_model(config, num_classes, nnx.Rngs(params=key))
        imported_weights = convert.load_pretrained(model, config)
        state = model_lib.split_model(model)[1:]
        shardings = sharding_lib.tree_shardings(mesh, state)
        state = jax.device_put(state, shardings)
    else:
        abstract = jax.eval_shape(init, key)
        shardings = sharding_lib.tree_shardings(mesh, abstract)
        state = jax.jit(init, out_shardings=shardings)(key)
    params, batch_stats, constants = state
    return graphdef, params, batch_stats, constants, imported_weights


def _new_train_state(params, batch_stats, constants, tx, step: int, mesh):
    opt_state = tx.init(params)
    state = steps_lib.TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        batch_stats=batch_stats,
        constants=constants,
        opt_state=opt_state,
    )
    return jax.device_put(state, sharding_lib.tree_shardings(mesh, state))


def _abstract_train_state(ctx: RunContext, phase: phases_lib.Phase, num_prototypes: int):
    """Shapes and shardings of the train state of ``phase`` with ``num_prototypes``."""
    config = ctx.config
    num_classes = config.dataset.num_classes

    def build():
        model = model_lib.build_model(config, num_classes, nnx.Rngs(params=0))
        if num_prototypes != model.prototypes.shape[0]:
            model_lib.prune(model, np.arange(num_prototypes))
        _, params, batch_stats, constants = model_lib.split_model(model)
        tx = phases_lib.make_optimizer(phase)
        return steps_lib.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            constants=constants,
            opt_state=tx.init(params),
        )

    abstract = jax.eval_shape(build)
    shardings = sharding_lib.tree_shardings(ctx.mesh, abstract)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


# =========================================================================== evaluation


def evaluate_indices(
    ctx: RunContext,
    state: steps_lib.TrainState,
    record_set: pipeline.RecordSet,
    indices: np.ndarray,
    eval_fn,
) -> dict[str, float]:
    """Accuracy and loss-free statistics of ``state`` on ``indices`` of ``record_set``."""
    if len(indices) == 0:
        return {}
    logits, labels, weights = [], [], []
    for batch in eval_batches(ctx.config, ctx.mesh, ctx.spec, record_set, indices):
        outputs = eval_fn(state.params, state.batch_stats, state.constants, batch)
        logits.append(outputs.logits)
        labels.append(batch["label"])
        weights.append(batch["weight"])
    logits, labels, weights = (
        np.concatenate([np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in xs])
        for xs in (logits, labels, weights)
    )
    keep = weights > 0
    predictions = np.argmax(logits[keep], axis=-1)
    return {"accuracy": float(np.mean(predictions == labels[keep])), "num_images": int(keep.sum())}


def eval_batches(config, mesh, spec, record_set, indices) -> Iterator[dict[str, jax.Array]]:
    """Device batches of one unaugmented pass over ``indices`` (last batch zero-weight padded)."""
    stream = pipeline.eval_stream(
        record_set,
        indices,
        spec,
        global_batch=config.input.eval_batch_size,
        num_workers=config.input.num_workers,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    try:
        yield from _device_batches(stream, mesh, config.input.prefetch)
    finally:
        stream.close()


def _make_eval_fn(ctx: RunContext, return_views: bool = False):
    # Parameters keep the placement they have (None); the batch is sharded over `data`.
    return jax.jit(
        steps_lib.make_eval_step(ctx.graphdef, ctx.step_config, return_views=return_views),
        in_shardings=(None, None, None, _batch_shardings(ctx.mesh, ctx.spec)),
    )


# ================================================================================ push


def push_prototypes(ctx: RunContext, state: steps_lib.TrainState):
    """Projects every prototype onto its nearest training view (one streaming pass)."""
    config = ctx.config
    forward = _make_eval_fn(ctx, return_views=True)
    start = time.perf_counter()
    result = push_lib.run_push(
        lambda batch: forward(state.params, state.batch_stats, state.constants, batch),
        eval_batches(config, ctx.mesh, ctx.spec, ctx.train_records, ctx.train_indices),
        state.params["prototypes"][...],
        state.constants["prototype_class"][...],
        reference_per_batch=config.train.reference_push_per_batch,
    )
    old = state.params["prototypes"][...]
    new = jax.device_put(jnp.asarray(result.prototypes, old.dtype), old.sharding)
    # Replace the one leaf and keep the tree's structure (and thus the step's shardings).
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: new if path[0].key == "prototypes" else leaf, state.params
    )
    log.info(
        "push: %d prototypes projected in %.1f s (%d without an image of their class)",
        len(result.distance),
        time.perf_counter() - start,
        int(np.sum(~np.isfinite(result.distance))),
    )
    return state.replace(params=params), result


def prune_prototypes(ctx: RunContext, state: steps_lib.TrainState) -> tuple[Any, np.ndarray]:
    """Drops prototypes whose k nearest training images are mostly of other classes."""
    config = ctx.config
    forward = _make_eval_fn(ctx)
    update = jax.jit(push_lib.prune_update, donate_argnums=0)
    num_prototypes = state.params["prototypes"].shape[0]
    carry = push_lib.init_prune_carry(num_prototypes, config.train.prune.k)
    for batch in eval_batches(config, ctx.mesh, ctx.spec, ctx.train_records, ctx.train_indices):
        outputs = forward(state.params, state.batch_stats, state.constants, batch)
        carry = update(carry, outputs.min_distances, batch)
    keep = push_lib.prototypes_to_keep(
        jax.device_get(carry),
        np.asarray(state.constants["prototype_class"][...]),
        config.train.prune.threshold,
    )
    if len(keep) == 0:
        raise config_checks.ConfigError(
            f"config.train.prune: no prototype has {config.train.prune.threshold} images of its "
            f"class among its {config.train.prune.k} nearest; pruning would remove all "
            f"{num_prototypes}. Lower train.prune.threshold or disable pruning."
        )
    params = model_lib.prune(jax.device_get(state.params), keep)
    constants = model_lib.prune(jax.device_get(state.constants), keep)
    log.info("prune: kept %d of %d prototypes", len(keep), num_prototypes)
    return (params, state.batch_stats, constants), keep


# ================================================================================ loop


class _StopFlag:
    """Set by SIGTERM (TPU VM preemption, ``kill``): the loop saves and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside some test runners)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _host_metrics(pending: list[dict]) -> dict[str, float]:
    fetched = jax.device_get(pending)
    return {key: float(np.mean([m[key] for m in fetched])) for key in fetched[0]}


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _diverged(ctx: RunContext, what: str, step: int, phase, last_saved) -> TrainingDiverged:
    where = (
        f"the last good checkpoint is step {last_saved} in {ctx.manager.directory}"
        if last_saved is not None
        else "no checkpoint was saved yet"
    )
    return TrainingDiverged(
        f"{what} at step {step} (phase {phase.name}, epoch {(step - 1) // ctx.steps_per_epoch}); "
        f"nothing later was saved and {where}. Lower the learning rates (config.train.*_lr) "
        "or check the records; rerunning the same command resumes from that checkpoint."
    )


def _meta(ctx: RunContext, step: int, phase: str, **updates) -> dict[str, Any]:
    ctx.meta.update(updates)
    ctx.meta.update(
        step=step,
        phase=phase,
        epoch=step // ctx.steps_per_epoch,
        data_state={"batches_consumed": step},
    )
    return dict(ctx.meta)


def _save(ctx: RunContext, state, phase_name: str, **updates) -> None:
    step = int(jax.device_get(state.step))
    ckpt.save(ctx.manager, step, state, _meta(ctx, step, phase_name, **updates))


def run_phase(
    ctx: RunContext,
    phase: phases_lib.Phase,
    state: steps_lib.TrainState,
    stop: _StopFlag,
    max_steps: int | None,
) -> tuple[steps_lib.TrainState, bool]:
    """Trains through ``phase`` from ``state.step``; returns (state, finished)."""
    config = ctx.config
    tx = phases_lib.make_optimizer(phase)
    state_shardings = sharding_lib.tree_shardings(ctx.mesh, state)
    replicated = sharding_lib.replicated(ctx.mesh)
    train_step = jax.jit(
        steps_lib.make_train_step(ctx.graphdef, phase, tx, ctx.step_config),
        in_shardings=(state_shardings, _batch_shardings(ctx.mesh, ctx.spec), replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_fn = _make_eval_fn(ctx)
    step = int(jax.device_get(state.step))
    stream = pipeline.train_stream(
        ctx.train_records,
        ctx.train_indices,
        ctx.spec,
        global_batch=config.input.batch_size,
        seed=config.seed,
        start_batch=step,
        num_workers=config.input.num_workers,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    batches = _device_batches(stream, ctx.mesh, config.input.prefetch)
    spe = ctx.steps_per_epoch
    progress = ProgressBar(phase.name, spe, config.input.batch_size)
    pending: list[dict] = []
    last_saved = ctx.manager.latest_step()
    try:
        while step < phase.end_step:
            if step % spe == 0 or progress.total is None:
                progress.start_epoch(step // spe, step % spe)
            batch = next(batches)
            state, metrics = train_step(state, batch, ctx.class_weights)
            pending.append(metrics)
            step += 1
            epoch_done = step % spe == 0
            log_now = step % config.train.log_every_steps == 0 or epoch_done
            progress.advance()
            if log_now:
                values = _host_metrics(pending)
                pending = []
                if not math.isfinite(values["loss"]):
                    raise _diverged(ctx, f"loss became {values['loss']}", step, phase, last_saved)
                progress.set_metrics(values)
                ctx.writer.write(step, {f"train/{k}": v for k, v in values.items()}, phase.name)
            if epoch_done:
                progress.end_epoch()
                epoch = step // spe
                last_of_phase = step == phase.end_step
                if (epoch % config.train.eval_every_epochs == 0 or last_of_phase) and len(
                    ctx.val_indices
                ):
                    val = evaluate_indices(ctx, state, ctx.train_records, ctx.val_indices, eval_fn)
                    ctx.writer.write(step, {"val/accuracy": val["accuracy"]}, phase.name)
                    best = ctx.meta["best_val_accuracy"].get(phase.name, -1.0)
                    if val["accuracy"] > best:
                        ctx.meta["best_val_accuracy"][phase.name] = val["accuracy"]
                        best_manager = ckpt.manager(
                            ctx.workdir / f"best_{phase.name}", max_to_keep=1, best=True
                        )
                        ckpt.save(
                            best_manager,
                            step,
                            state,
                            _meta(ctx, step, phase.name),
                            metrics={"val_accuracy": val["accuracy"]},
                        )
                        best_manager.close()
            checkpoint_due = step % config.train.checkpoint_every_steps == 0 or (
                epoch_done and step == phase.end_step
            )
            if checkpoint_due or stop.requested or step == max_steps:
                # Never save a state that has gone bad: the last checkpoint stays good.
                if pending and not math.isfinite(_host_metrics(pending)["loss"]):
                    raise _diverged(ctx, "the loss became NaN/inf", step, phase, last_saved)
                if not bool(_all_finite(state.params)):
                    raise _diverged(ctx, "parameters became NaN/inf", step, phase, last_saved)
                _save(ctx, state, phase.name)
                last_saved = step
            if stop.requested or step == max_steps:
                return state, False
    finally:
        progress.close()
        stream.close()
    return state, True


def _plan(ctx_config, num_train: int) -> list[phases_lib.Phase]:
    return phases_lib.plan_phases(ctx_config, num_train, pruned=True)


def train_and_evaluate(config, workdir: str | Path, *, max_steps: int | None = None) -> dict:
    """Trains ProtoMask as ``config`` says, evaluates it, and returns the final metrics.

    A workdir that already holds a checkpoint is resumed from it (same next batch, same
    parameters as if never stopped); one made with a different config is refused.

    Args:
      config: the full config (see ``configs/common.py``).
      workdir: output folder (checkpoints, metrics.jsonl, TensorBoard events, push.json,
        results.json).
      max_steps: stop (after saving a checkpoint) once this global step is reached; for
        tests and benchmarks. A later call resumes.

    Returns:
      A dict with the final test/validation accuracies and where the outputs are, or
      ``{"stopped_at_step": n}`` when stopped early.
    """
    # ------------------------------------------------------------------ set-up
    config_checks.validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sharding_lib.maybe_initialize_distributed()
    mesh = sharding_lib.make_mesh(config)
    sharding_lib.check_batch_divisible(config.input.batch_size, mesh, "input.batch_size")
    sharding_lib.check_batch_divisible(config.input.eval_batch_size, mesh, "input.eval_batch_size")
    started = time.time()

    # -------------------------------------------------------------------- data
    records_dir = config.dataset.records_dir
    info = records_lib.load_dataset_info(records_dir)
    config_checks.check_dataset_info(config, info)
    num_classes = config.dataset.num_classes
    train_records = pipeline.RecordSet(
        records_dir, "train", skip_bad_records=config.input.skip_bad_records
    )
    good = train_records.good
    train_positions, val_positions = pipeline.split_train_validation(
        train_records.labels[good], config.input.validation_fraction, config.seed
    )
    train_indices, val_indices = good[train_positions], good[val_positions]
    spec = pipeline.PipelineSpec.from_config(config)
    weights = pipeline.class_weights(train_records.labels[train_indices], num_classes)

    # ---------------------------------------------------------- model and state
    graphdef, params, batch_stats, constants, imported_weights = _init_model_state(
        config, num_classes, mesh
    )
    if imported_weights is not None:
        weights = np.asarray(imported_weights, np.float32)
    class_weights = jax.device_put(jnp.asarray(weights), sharding_lib.replicated(mesh))
    manager = ckpt.manager(workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints)
    fingerprint = ckpt.config_fingerprint(config.to_dict())
    ctx = RunContext(
        config=config,
        workdir=workdir,
        mesh=mesh,
        spec=spec,
        train_records=train_records,
        train_indices=train_indices,
        val_indices=val_indices,
        class_weights=class_weights,
        graphdef=graphdef,
        step_config=steps_lib.StepConfig.from_config(
            config, max_prototypes_per_class=config.model.prototypes_per_class
        ),
        steps_per_epoch=phases_lib.steps_per_epoch(len(train_indices), config.input.batch_size),
        writer=MetricsWriter(workdir, enabled=jax.process_index() == 0),
        manager=manager,
        meta={
            "config": json.loads(config.to_json()),
            "fingerprint": fingerprint,
            "num_prototypes": int(params["prototypes"].shape[0]),
            "kept_prototypes": None,
            "pushed": False,
            "pruned": False,
            "push": None,
            "best_val_accuracy": {},
        },
    )
    phases = _plan(config, len(train_indices))
    if not phases:
        raise ValueError("every phase has 0 epochs: set config.train.joint_epochs etc.")

    # ------------------------------------------------------------------ resume
    state = None
    latest = manager.latest_step()
    if latest is not None:
        meta = ckpt.latest_meta(manager, latest)
        diffs = ckpt.config_differences(meta["fingerprint"], fingerprint)
        if diffs:
            raise config_checks.ConfigError(
                f"{workdir} holds a checkpoint of a run with a different config:\n  "
                + "\n  ".join(diffs[:20])
                + "\nUse a new --workdir, or run with the same config to resume."
            )
        ctx.meta.update(meta)
        phase = phases_lib.phase_at(phases, latest) or phases[-1]
        if latest == phase.first_step and meta["phase"] != phase.name:
            phase = [p for p in phases if p.name == meta["phase"]][0]
        abstract = _abstract_train_state(ctx, phase, meta["num_prototypes"])
        state = ckpt.restore_state(manager, latest, abstract)
        ckpt.log_restored(latest, meta)

    # ------------------------------------------------------------------ phases
    with _StopFlag() as stop:
        for phase in phases:
            step = phase.first_step if state is None else int(jax.device_get(state.step))
            if step >= phase.end_step:
                continue
            resumed_in_phase = state is not None and ctx.meta["phase"] == phase.name
            if not resumed_in_phase:
                if state is not None:
                    params, batch_stats, constants = (
                        state.params,
                        state.batch_stats,
                        state.constants,
                    )
                tx = phases_lib.make_optimizer(phase)
                if phase.name == phases_lib.PRUNE_FINETUNE and not ctx.meta["pruned"]:
                    unpruned = _new_train_state(params, batch_stats, constants, tx, step, mesh)
                    (params, batch_stats, constants), keep = prune_prototypes(ctx, unpruned)
                    ctx.meta.update(
                        pruned=True,
                        kept_prototypes=keep.tolist(),
                        num_prototypes=len(keep),
                    )
                # A fresh optimizer state per phase (as the reference's per-phase optimizers);
                # it depends only on shapes, so push may replace the prototypes afterwards.
                state = _new_train_state(params, batch_stats, constants, tx, step, mesh)
                if (
                    phase.name == phases_lib.FINETUNE
                    and config.train.push
                    and not ctx.meta["pushed"]
                ):
                    state, result = push_prototypes(ctx, state)
                    gallery = result.to_json()
                    records_lib.write_json_atomic(workdir / "push.json", gallery)
                    ctx.meta.update(pushed=True, push=gallery)
                    if len(val_indices):
                        val = evaluate_indices(
                            ctx, state, train_records, val_indices, _make_eval_fn(ctx)
                        )
                        ctx.writer.write(step, {"val/accuracy_after_push": val["accuracy"]}, "push")
                ctx.meta["phase"] = phase.name
                _save(ctx, state, phase.name)
            state, finished = run_phase(ctx, phase, state, stop, max_steps)
            if not finished:
                ctx.writer.close()
                manager.close()
                return {"stopped_at_step": int(jax.device_get(state.step))}

    # ------------------------------------------------------------ final evaluation
    results = final_evaluation(ctx, state, phases[-1].name)
    results["train_time_s"] = time.time() - started
    results["workdir"] = str(workdir)
    if jax.process_index() == 0:
        records_lib.write_json_atomic(workdir / "results.json", results)
    ctx.writer.close()
    manager.close()
    return results


def final_evaluation(ctx: RunContext, state, last_phase: str) -> dict[str, Any]:
    """Test accuracy of the final state and of the best-on-validation checkpoint."""
    test_records = pipeline.RecordSet(
        ctx.config.dataset.records_dir, "test", skip_bad_records=ctx.config.input.skip_bad_records
    )
    test_indices = test_records.good
    eval_fn = _make_eval_fn(ctx)
    results: dict[str, Any] = {
        "final": evaluate_indices(ctx, state, test_records, test_indices, eval_fn),
        "best_val_accuracy": dict(ctx.meta["best_val_accuracy"]),
        "num_prototypes": int(state.params["prototypes"].shape[0]),
        "skipped_records": {
            "train": len(ctx.train_records.skipped),
            "test": len(test_records.skipped),
        },
    }
    best_dir = ctx.workdir / f"best_{last_phase}"
    if best_dir.exists():
        best_manager = ckpt.manager(best_dir, max_to_keep=1, best=True)
        best_step = best_manager.best_step()
        if best_step is not None:
            # restore_state takes the shapes and shardings of the live state as its target
            best_state = ckpt.restore_state(best_manager, best_step, state)
            results["best"] = evaluate_indices(ctx, best_state, test_records, test_indices, eval_fn)
            results["best"]["step"] = int(best_step)
        best_manager.close()
    results["test_accuracy"] = results.get("best", results["final"])["accuracy"]
    ctx.writer.write(
        int(jax.device_get(state.step)), {"test/accuracy": results["test_accuracy"]}, "test"
    )
    return results


# ========================================================================== inference


@dataclasses.dataclass
class TrainedModel:
    """A trained model restored from a workdir, ready for evaluation and explanations.

    Attributes:
      config: the config it was trained with (the one passed in).
      graphdef: the model's graph definition.
      state: the restored :class:`~protomask_jax.steps.TrainState`.
      meta: the checkpoint metadata (phase, step, push gallery, kept prototypes, ...).
      mesh: the device mesh the state lives on.
      step_config: static step settings (view size, dtype, ...).
      spec: the host pipeline spec.
      checkpoint: which checkpoint was restored (``best_<phase>`` or ``checkpoints``) and step.
    """

    config: Any
    graphdef: Any
    state: steps_lib.TrainState
    meta: dict[str, Any]
    mesh: Any
    step_config: steps_lib.StepConfig
    spec: pipeline.PipelineSpec
    checkpoint: str

    def eval_fn(self, return_views: bool = False):
        """A jitted ``(params, batch_stats, constants, batch) -> ProtoMaskOutput``."""
        return jax.jit(
            steps_lib.make_eval_step(self.graphdef, self.step_config, return_views=return_views),
            in_shardings=(None, None, None, _batch_shardings(self.mesh, self.spec)),
        )

    def eval_batches(self, record_set, indices) -> Iterator[dict[str, jax.Array]]:
        """Device batches of one unaugmented pass over ``indices`` of ``record_set``."""
        return eval_batches(self.config, self.mesh, self.spec, record_set, indices)


def restore_trained(config, workdir: str | Path, which: str = "best") -> TrainedModel:
    """Restores the model a finished (or stopped) run left in ``workdir``.

    Args:
      config: the run's config.
      workdir: the run's output folder.
      which: ``"best"`` — the best-on-validation checkpoint of the last phase that has one
        (what the run's test accuracy reports), falling back to the latest; ``"latest"``.

    Returns:
      A :class:`TrainedModel`.
    """
    workdir = Path(workdir)
    mesh = sharding_lib.make_mesh(config)
    manager = ckpt.manager(workdir / "checkpoints", max_to_keep=None)
    latest = manager.latest_step()
    if latest is None:
        raise FileNotFoundError(
            f"{workdir / 'checkpoints'} holds no checkpoint; train first with "
            f"`python -m protomask_jax.train --config <config> --workdir {workdir}`."
        )
    meta = ckpt.latest_meta(manager, latest)
    source_manager, step, source = manager, latest, "checkpoints"
    if which == "best":
        for phase_name in (phases_lib.PRUNE_FINETUNE, phases_lib.FINETUNE, phases_lib.JOINT):
            best_dir = workdir / f"best_{phase_name}"
            if not best_dir.exists():
                continue
            best_manager = ckpt.manager(best_dir, max_to_keep=1, best=True)
            if best_manager.best_step() is not None:
                source_manager, step = best_manager, best_manager.best_step()
                meta = ckpt.latest_meta(best_manager, step)
                source = f"best_{phase_name}"
                break
    elif which != "latest":
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    # Only the phase's optimizer *structure* matters for restoring, not its step counts.
    plan = phases_lib.plan_phases(config, 1, pruned=True)
    phase = next((p for p in plan if p.name == meta["phase"]), plan[-1])
    graphdef = model_lib.split_model(
        nnx.eval_shape(
            lambda: model_lib.build_model(config, config.dataset.num_classes, nnx.Rngs(params=0))
        )
    )[0]
    ctx = RunContext(
        config=config,
        workdir=workdir,
        mesh=mesh,
        spec=pipeline.PipelineSpec.from_config(config),
        train_records=None,
        train_indices=np.zeros(0, np.int64),
        val_indices=np.zeros(0, np.int64),
        class_weights=None,
        graphdef=graphdef,
        step_config=steps_lib.StepConfig.from_config(
            config, max_prototypes_per_class=config.model.prototypes_per_class
        ),
        steps_per_epoch=1,
        writer=None,
        manager=manager,
        meta={},
    )
    abstract = _abstract_train_state(ctx, phase, meta["num_prototypes"])
    state = ckpt.restore_state(source_manager, step, abstract)
    return TrainedModel(
        config=config,
        graphdef=graphdef,
        state=state,
        meta=meta,
        mesh=mesh,
        step_config=ctx.step_config,
        spec=ctx.spec,
        checkpoint=f"{source} step {step}",
    )
