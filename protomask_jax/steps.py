"""The jitted device steps: train (one per phase), evaluate, and the state they carry.

Per batch, one compiled function crops and augments the views from the canvas
(``data/views.py``), runs the network on all B·K views (in ``train.micro_batches`` slices,
one after another, when memory asks), and computes loss, gradients and the update. Shapes
are fixed (one compile); state buffers are donated; metrics stay on device. Under
``mesh.fsdp`` the state is split over ``data`` and each parameter gathered where used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from protomask_jax import losses
from protomask_jax import phases as phases_lib
from protomask_jax import sharding as sharding_lib
from protomask_jax.data import views as views_lib
from protomask_jax.models import protomask as model_lib
from protomask_jax.phases import Phase


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; checkpointed whole)."""

    step: jax.Array  # int32 scalar: global batches consumed
    params: nnx.State  # groups backbone / add_on / prototypes / last_layer
    batch_stats: nnx.State
    constants: nnx.State  # prototype_class
    opt_state: Any  # the current phase's

    @classmethod
    def create(cls, params, batch_stats, constants, tx=None) -> TrainState:
        """Step 0, with ``tx``'s initial optimizer state (none without ``tx``)."""
        opt_state = None if tx is None else tx.init(params)
        return cls(jnp.zeros((), jnp.int32), params, batch_stats, constants, opt_state)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """``config.loss`` as plain values (the coefficients are compile-time constants)."""

    ce: float
    cluster: float
    separation: float
    diversity: float
    l1: float
    class_weighted: bool
    reference_detached_diversity: bool


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the device steps, closed over by jit."""

    view_size: int
    augment: views_lib.AugmentConfig | None
    compute_dtype: Any
    seed: int
    loss: LossConfig
    max_prototypes_per_class: int
    micro_batches: int = 1
    fsdp: int = 0  # > 0: parameters and optimizer state of this many elements split over data

    @classmethod
    def from_config(cls, config, max_prototypes_per_class: int | None = None) -> StepConfig:
        # pruning never raises the count per class, so the configured one bounds it
        return cls(
            view_size=config.input.view_size,
            augment=views_lib.AugmentConfig.from_config(config.input.augment),
            compute_dtype=jnp.dtype(config.model.compute_dtype),
            seed=config.seed,
            loss=LossConfig(**config.loss.to_dict()),
            max_prototypes_per_class=max_prototypes_per_class or config.model.prototypes_per_class,
            micro_batches=config.train.micro_batches,
            fsdp=sharding_lib.fsdp_min_size(config),
        )


# nnx draws parameter-initialisation keys as fold_in(key(seed), n): the augmentation keys are
# folded from a tagged key so they never repeat those.
_AUGMENTATION_TAG = 0x61756720  # "aug "


def augmentation_key(seed: int, step: jax.Array | int) -> jax.Array:
    """The key of training step ``step``'s view augmentation."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _AUGMENTATION_TAG), step)


def device_views(
    batch: dict[str, jax.Array], key: jax.Array | None, step_config: StepConfig
) -> jax.Array:
    """``[B, K, V, V, 3]`` views of a device batch (augmented when ``key`` is given)."""
    return views_lib.make_views(
        batch["canvas"],
        batch["boxes"],
        key,
        view_size=step_config.view_size,
        augment=step_config.augment if key is not None else None,
        masks=batch.get("masks"),
        dtype=step_config.compute_dtype,
    )


def apply_in_micro_batches(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch_stats: nnx.State,
    constants: nnx.State,
    views: jax.Array,
    *,
    train: bool,
    micro_batches: int,
) -> tuple[model_lib.ProtoMaskOutput, nnx.State]:
    """:func:`model_lib.apply` over ``micro_batches`` slices of the batch, one after another,
    for memory: the outputs are the whole batch's, in its order, so the loss is computed
    once over all of it (exact). Each slice's forward is recomputed in the backward pass,
    which then holds one slice's activations instead of the batch's (one more forward pass
    of compute). BatchNorm normalises each slice with its own statistics, and the running
    averages move by the mean of the slices' updates (one update per step)."""
    if micro_batches == 1:
        return model_lib.apply(graphdef, params, batch_stats, constants, views, train=train)
    size = views.shape[0]
    # Image i goes to slice i % M: the batch is split over chips in contiguous blocks, so
    # every chip holds its share of every slice and nothing moves between chips.
    slices = views.reshape(size // micro_batches, micro_batches, *views.shape[1:]).swapaxes(0, 1)

    @jax.checkpoint
    def forward(slice_views):
        return model_lib.apply(graphdef, params, batch_stats, constants, slice_views, train=train)

    outputs, slice_stats = jax.lax.map(forward, slices)
    outputs = jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(size, *x.shape[2:]), outputs)
    if not train:
        return outputs, batch_stats
    new_stats = jax.tree.map(lambda s: jnp.mean(s, axis=0).astype(s.dtype), slice_stats)
    return outputs, new_stats


def gathered(params: nnx.State, mesh, step_config: StepConfig) -> nnx.State:
    """Under FSDP, ``params`` constrained to their placement without it: XLA gathers each
    where it is used and splits the convolutions over the batch (left to itself it split
    them over the kernels' channels and gathered activations instead: 24 GB of temporaries
    per v5e chip at the CUB shape, against 15 GB unsplit). Without FSDP, ``params``."""
    if not step_config.fsdp or mesh is None:
        return params
    return jax.lax.with_sharding_constraint(params, sharding_lib.tree_shardings(mesh, params))


def make_train_step(
    graphdef: nnx.GraphDef,
    phase: Phase,
    tx: optax.GradientTransformation,
    step_config: StepConfig,
    mesh=None,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """The (unjitted) ``step(state, batch, class_weights) -> (state, metrics)`` of one phase;
    metrics (``loss``, its terms, ``accuracy``) stay on device. ``mesh``: the one FSDP
    state is split on (``step_config.fsdp``)."""
    trainable = set(phase.trainable)

    def step(state: TrainState, batch: dict, class_weights: jax.Array):
        # The augmentation key depends only on (seed, step): a resumed run draws the same.
        key = augmentation_key(step_config.seed, state.step)
        views = device_views(batch, key, step_config)
        labels = batch["label"]
        prototype_class = state.constants["prototype_class"][...]

        def loss_fn(params):
            # Frozen groups are constants to autodiff: XLA computes no gradient for them and,
            # when nothing upstream trains, no backward pass through the backbone at all.
            frozen = {k: jax.lax.stop_gradient(v) for k, v in params.items() if k not in trainable}
            params = gathered(nnx.State({**params, **frozen}), mesh, step_config)
            outputs, new_batch_stats = apply_in_micro_batches(
                graphdef,
                params,
                state.batch_stats,
                state.constants,
                views,
                train=phase.bn_train,
                micro_batches=step_config.micro_batches,
            )
            total, terms = losses.protomask_loss(
                outputs,
                labels,
                params["prototypes"][...],
                params["last_layer"][...],
                prototype_class,
                phase.loss_phase,
                step_config.loss,
                class_weights,
                max_prototypes_per_class=step_config.max_prototypes_per_class,
            )
            return total, (terms, new_batch_stats, outputs.logits)

        (total, (terms, batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        accuracy = batch_accuracy(logits, labels)
        metrics = {"loss": total, "accuracy": accuracy, **terms}
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        return new_state, metrics

    return step


def batch_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Top-1 accuracy; multi-hot labels: exact-match accuracy at this batch's threshold
    (mean true-positive + mean true-negative logit) / 2, as the reference logs in training."""
    logits = logits.astype(jnp.float32)
    if labels.ndim == 1:
        return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    positive = labels > 0

    def mean_of_sample_means(mask):
        count = jnp.sum(mask, axis=-1)
        means = jnp.sum(jnp.where(mask, logits, 0.0), axis=-1) / jnp.maximum(count, 1)
        return jnp.sum(jnp.where(count > 0, means, 0.0)) / jnp.maximum(jnp.sum(count > 0), 1)

    threshold = (mean_of_sample_means(positive) + mean_of_sample_means(~positive)) / 2
    return jnp.mean(jnp.all((logits > threshold) == positive, axis=-1).astype(jnp.float32))


def make_eval_step(
    graphdef: nnx.GraphDef, step_config: StepConfig, *, return_views: bool = False, mesh=None
) -> Callable[[nnx.State, nnx.State, nnx.State, dict], model_lib.ProtoMaskOutput]:
    """The (unjitted) ``eval_step(params, batch_stats, constants, batch)``: no augmentation,
    BatchNorm in inference mode; per-view distances and embeddings with ``return_views``."""

    def eval_step(params, batch_stats, constants, batch):
        params = gathered(params, mesh, step_config)
        views = device_views(batch, None, step_config)
        return model_lib.apply(
            graphdef, params, batch_stats, constants, views, train=False, return_views=return_views
        )[0]

    return eval_step


def jit_train_step(
    graphdef: nnx.GraphDef, phase: Phase, step_config: StepConfig, mesh, state: TrainState
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """``phase``'s step jitted as training runs it: the state keeps its shardings (and is
    donated), the batch is split over ``data``, class weights and metrics replicated.
    ``state`` (arrays or ShapeDtypeStructs) gives the tree the shardings follow."""
    state_shardings = sharding_lib.tree_shardings(mesh, state, step_config.fsdp)
    replicated = sharding_lib.replicated(mesh)
    step = make_train_step(graphdef, phase, phases_lib.make_optimizer(phase), step_config, mesh)
    return jax.jit(
        step,
        in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh), replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def jit_eval_step(
    graphdef: nnx.GraphDef, step_config: StepConfig, mesh, *, return_views: bool = False
) -> Callable[[nnx.State, nnx.State, nnx.State, dict], model_lib.ProtoMaskOutput]:
    """:func:`make_eval_step` jitted as evaluation, push and pruning run it: parameters keep
    the placement they have, the batch is split over ``data``."""
    return jax.jit(
        make_eval_step(graphdef, step_config, return_views=return_views, mesh=mesh),
        in_shardings=(None, None, None, sharding_lib.batch_sharding(mesh)),
    )
