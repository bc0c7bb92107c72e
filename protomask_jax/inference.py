r"""A finished run's model at work: restored, run over records, and explained; what
``evaluate``, ``predict``, ``explain`` and the report share (training uses the model on a
mesh and the device batches too).

    checkpoint --restore_trained--> TrainedModel (params, batch_stats, constants on the run's
        mesh; the optimizer state in the checkpoint is not read, and no optimizer is built)
    records --eval_batches--> device batches --eval_forward (jitted, unaugmented views)-->
        EvalOutputs: logits [N, C], similarities and winning views [N, P], the top-k
        prototypes' view similarities [N, k, K] and winning embeddings [N, k, D]
        (run_model; run_perturbed: the same under a continuity/completeness perturbation)
    Explainer (explainer(trained, ...): the run's explain.explanation_type)
        .chunk_maps(chunk)  -> ExplanationMaps [n, k, R, R] in the image frame (metrics)
        .view_maps(record, masks [J], prototypes [J]) -> [J, V, V] on the views the panels
            show, or None where the mask is the explanation
        "mask": the winning view's mask; "prp": PRP relevance (docs/prp.md), per chunk on the
        device in batches of explain.prp_batch_size, per panel on one device.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from protomask_jax import base, config_checks, prp
from protomask_jax import checkpoint as ckpt
from protomask_jax import phases as phases_lib
from protomask_jax import sharding as sharding_lib
from protomask_jax import steps as steps_lib
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from protomask_jax.data import views as views_lib
from protomask_jax.evaluators import chunk as chunk_lib
from protomask_jax.evaluators import completeness
from protomask_jax.models import protomask as model_lib

# The phases whose best-on-validation checkpoint restore_trained prefers, last first.
BEST_PHASES = (phases_lib.PRUNE_FINETUNE, phases_lib.FINETUNE, phases_lib.JOINT)
EXPLANATION_TYPES = ("prp", "mask")


# =================================================================== the model on a mesh


@dataclasses.dataclass
class ModelOnMesh:
    """What the jitted forward and the evaluation stream need besides the parameters."""

    config: Any
    graphdef: Any
    mesh: Any
    step_config: steps_lib.StepConfig
    spec: pipeline.PipelineSpec
    # One jitted function per return_views, kept: validation, push, pruning and the final
    # test would otherwise each compile the forward again.
    _eval_fns: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def eval_fn(self, return_views: bool = False):
        """A jitted ``(params, batch_stats, constants, batch) -> ProtoMaskOutput``."""
        if return_views not in self._eval_fns:
            self._eval_fns[return_views] = steps_lib.jit_eval_step(
                self.graphdef, self.step_config, self.mesh, return_views=return_views
            )
        return self._eval_fns[return_views]

    def eval_batches(self, record_set, indices) -> Iterator[dict[str, jax.Array]]:
        """Device batches of one unaugmented pass over ``indices`` (zero-weight filler last)."""
        batch_size = self.config.input.eval_batch_size
        stream = pipeline.eval_stream(
            record_set, indices, self.spec, global_batch=batch_size, **stream_args(self.config)
        )
        try:
            yield from device_batches(stream, self.mesh, self.config.input.prefetch)
        finally:
            stream.close()


def model_on_mesh(config, mesh) -> dict[str, Any]:
    """The :class:`ModelOnMesh` fields of ``config`` on ``mesh``."""
    abstract_model = nnx.eval_shape(lambda: build_model(config, 0))
    return dict(
        config=config,
        graphdef=model_lib.split_model(abstract_model)[0],
        mesh=mesh,
        step_config=steps_lib.StepConfig.from_config(config),
        spec=pipeline.PipelineSpec.from_config(config),
    )


def stream_args(config) -> dict[str, int]:
    return dict(
        num_workers=config.input.num_workers,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def build_model(config, key):
    return model_lib.build_model(config, config.dataset.num_classes, nnx.Rngs(params=key))


def device_batches(iterator, mesh, prefetch: int) -> Iterator[dict[str, jax.Array]]:
    """Global device arrays from process-local batches, ``prefetch`` batches ahead."""
    queue: collections.deque = collections.deque()
    for local in iterator:
        queue.append(sharding_lib.global_batch(mesh, local))
        if len(queue) > prefetch:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) global array as one numpy array."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ======================================================================== restoring


@dataclasses.dataclass
class TrainedModel(ModelOnMesh):
    """A model restored from a workdir: the state (``opt_state`` None), its checkpoint
    metadata (push gallery, kept prototypes, ...) and which checkpoint it is
    (``"best_joint step 12"``)."""

    state: steps_lib.TrainState
    meta: dict[str, Any]
    checkpoint: str


def _abstract_weights(config, mesh, num_prototypes: int) -> dict[str, Any]:
    """Shapes and shardings of the ``step``, ``params``, ``batch_stats`` and ``constants`` a
    checkpoint's state holds, with ``num_prototypes`` prototypes (pruning changes shapes)."""

    def build():
        model = build_model(config, 0)
        if num_prototypes != model.prototypes.shape[0]:
            model_lib.prune(model, np.arange(num_prototypes))
        state = steps_lib.TrainState.create(*model_lib.split_model(model)[1:])
        return {name: getattr(state, name) for name in ckpt.WEIGHTS}

    abstract = jax.eval_shape(build)
    shardings = sharding_lib.tree_shardings(mesh, abstract)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def restore_trained(config, workdir: str | Path, which: str = "best") -> TrainedModel:
    """The model a run left in ``workdir``; ``which="best"``: the best-on-validation checkpoint
    of the last phase that has one (what the test accuracy reports), else the latest."""
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    workdir = base.as_path(workdir)
    manager = ckpt.manager(workdir / "checkpoints", max_to_keep=None)
    step, source = manager.latest_step(), "checkpoints"
    if step is None:
        raise FileNotFoundError(
            f"{workdir / 'checkpoints'} holds no checkpoint; train first with "
            f"`python -m protomask_jax.train --config <config> --workdir {workdir}`."
        )
    for phase_name in BEST_PHASES if which == "best" else ():
        best = ckpt.best_checkpoint(workdir, phase_name)
        if best is not None:
            (manager, step), source = best, f"best_{phase_name}"
            break
    meta = ckpt.read_meta(manager, step)
    records_dir = config.dataset.records_dir
    if (records_lib.as_path(records_dir) / records_lib.DATASET_INFO).is_file():
        info = records_lib.load_dataset_info(records_dir)
        config_checks.check_same_records(meta.get("records"), info, records_dir, names_only=True)
    mesh = sharding_lib.make_mesh(config)
    abstract = _abstract_weights(config, mesh, meta["num_prototypes"])
    weights = ckpt.restore_weights(manager, step, abstract)
    return TrainedModel(
        **model_on_mesh(config, mesh),
        state=steps_lib.TrainState(**weights, opt_state=None),
        meta=meta,
        checkpoint=f"{source} step {step}",
    )


@dataclasses.dataclass
class ModelArrays:
    """The trained head on the host: ``last_layer W [C, P]`` (the model stores ``W^T``),
    ``prototypes [P, D]``, ``prototype_class`` int32 ``[P]``; a multi-label run's decision
    threshold on the logits, if it has one (else the classification family derives it)."""

    last_layer: np.ndarray
    prototypes: np.ndarray
    prototype_class: np.ndarray
    multi_label_threshold: float | None = None


def model_arrays(trained) -> ModelArrays:
    params, constants = trained.state.params, trained.state.constants
    return ModelArrays(
        last_layer=to_host(params["last_layer"][...]).T.astype(np.float32),
        prototypes=to_host(params["prototypes"][...]).astype(np.float32),
        prototype_class=to_host(constants["prototype_class"][...]).astype(np.int32),
        multi_label_threshold=trained.meta.get("multi_label_threshold"),  # from validation
    )


# ================================================================ the eval forward


@dataclasses.dataclass
class EvalOutputs:
    """One forward pass over N real images, host arrays in record order: ``record_indices``,
    ``image_ids``, ``labels`` int64 ``[N]``; ``logits [N, C]``; ``min_distances`` and
    log-``similarities`` of each prototype's nearest view ``[N, P]``; ``winning_view`` int32
    ``[N, P]`` (view ``k`` shows mask ``k % num_masks``); ``num_masks`` int32 ``[N]``, the masks
    the views showed (``min(masks/count, num_views)``). From :func:`run_model` also, for the
    ``k`` prototypes explained (``top_ids`` int32 ``[N, k]``: the most similar, ties to the
    lower index): the log-similarity of every view ``top_view_similarities [N, k, K]`` and the
    embedding of the winning view ``top_embeddings [N, k, D]``."""

    record_indices: np.ndarray
    image_ids: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    min_distances: np.ndarray
    similarities: np.ndarray
    winning_view: np.ndarray
    num_masks: np.ndarray
    top_ids: np.ndarray | None = None
    top_view_similarities: np.ndarray | None = None
    top_embeddings: np.ndarray | None = None

    def take(self, rows) -> EvalOutputs:
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return EvalOutputs(**{k: None if v is None else v[rows] for k, v in values.items()})


def _noise_outside(views, batch, std, seed) -> jax.Array:
    """``views [B, K, V, V, 3]`` plus N(0, std) at every view pixel whose centre, mapped into
    the canvas through its view box, lies outside ``batch["noise_box"] [B, 4]`` (canvas yxyx,
    half-open). The noise is drawn from ``(seed, image id, mask)``: the cyclic repeats of a
    mask stay identical views, so padding changes nothing, as in the clean pass."""
    num_views, size = views.shape[1:3]
    centres = (jnp.arange(size) + 0.5) / size
    boxes, region = batch["boxes"][..., None], batch["noise_box"][:, None, :, None]
    y = boxes[:, :, 0] + centres * (boxes[:, :, 2] - boxes[:, :, 0])  # [B, K, V]
    x = boxes[:, :, 1] + centres * (boxes[:, :, 3] - boxes[:, :, 1])
    rows = (y >= region[:, :, 0]) & (y < region[:, :, 2])
    cols = (x >= region[:, :, 1]) & (x < region[:, :, 3])
    outside = ~(rows[..., :, None] & cols[..., None, :])
    masks = jnp.arange(num_views) % batch["num_masks"][:, None]  # [B, K]
    fold = jax.vmap(jax.random.fold_in)
    image_keys = fold(jnp.broadcast_to(jax.random.key(seed), masks.shape[:1]), batch["image_id"])
    keys = jax.vmap(fold)(jnp.broadcast_to(image_keys[:, None], masks.shape), masks)
    noise = jax.vmap(jax.vmap(lambda key: jax.random.normal(key, views.shape[2:])))(keys)
    return (views.astype(jnp.float32) + std * noise * outside[..., None]).astype(views.dtype)


def eval_forward(trained) -> Callable:
    """A jitted ``(params, batch_stats, constants, batch, seed, noise_std) -> dict`` of device
    arrays: the :class:`EvalOutputs` fields of the batch. ``batch`` may carry ``ids [B, k]``
    (the prototypes to explain; default the ``k = min(5, P)`` most similar) and ``noise_box
    [B, 4]`` (then :func:`_noise_outside`)."""
    graphdef, step_config = trained.graphdef, trained.step_config
    eps = trained.config.model.similarity_eps

    def forward(params, batch_stats, constants, batch, seed, noise_std):
        views = steps_lib.device_views(batch, None, step_config)
        if "noise_box" in batch:
            views = _noise_outside(views, batch, noise_std, seed)
        out, _ = model_lib.apply(
            graphdef, params, batch_stats, constants, views, train=False, return_views=True
        )
        ids = batch.get("ids")
        if ids is None:
            similarity = model_lib.log_similarity(out.min_distances, eps)
            ids = jax.lax.top_k(similarity, min(chunk_lib.TOP_K, similarity.shape[1]))[1]
        view_distances = jnp.take_along_axis(out.view_distances, ids[:, None, :], axis=2)
        winning = jnp.take_along_axis(out.winning_view, ids, axis=1)
        return {
            "logits": out.logits,
            "min_distances": out.min_distances,
            "winning_view": out.winning_view,
            "top_ids": ids.astype(jnp.int32),
            "top_view_similarities": model_lib.log_similarity(
                jnp.swapaxes(view_distances, 1, 2), eps
            ),
            "top_embeddings": jnp.take_along_axis(out.embeddings, winning[..., None], axis=1),
        }

    return jax.jit(forward)


def _collect(trained, forward, batches, record_set, indices, seed=0, std=0.0) -> EvalOutputs:
    """The outputs of ``forward`` over ``batches`` (the images ``indices``, in order)."""
    state, columns = trained.state, []
    for batch in batches:
        out = forward(state.params, state.batch_stats, state.constants, batch, seed, std)
        columns.append(out | {k: batch[k] for k in ("label", "image_id", "weight", "num_masks")})
    arrays = {key: np.concatenate([to_host(c[key]) for c in columns]) for key in columns[0]}
    real = arrays.pop("weight") > 0
    arrays = {key: value[real] for key, value in arrays.items()}
    image_ids = arrays.pop("image_id").astype(np.int64)
    if not np.array_equal(image_ids, record_set.image_ids[indices]):
        raise RuntimeError(
            f"evaluation stream of {record_set.records_dir} returned images in an unexpected "
            f"order (first ids {image_ids[:5].tolist()}, expected "
            f"{record_set.image_ids[indices][:5].tolist()})"
        )
    similarity = model_lib.log_similarity(
        arrays["min_distances"], trained.config.model.similarity_eps
    )
    return EvalOutputs(
        record_indices=indices,
        image_ids=image_ids,
        labels=arrays.pop("label").astype(np.int64),
        similarities=np.asarray(similarity, np.float32),
        **arrays,
    )


def run_model(
    trained,
    record_set: pipeline.RecordSet,
    record_indices: Sequence[int] | np.ndarray | None = None,
    *,
    progress: bool = True,
) -> EvalOutputs:
    """The evaluation forward (no augmentation) of a :class:`TrainedModel` over
    ``record_indices`` (default: every good record), in that order."""
    config = trained.config
    indices = np.asarray(record_set.good if record_indices is None else record_indices, np.int64)
    if len(indices) == 0:
        raise base.UserError(f"no images to evaluate in split '{record_set.split}'")
    sharding_lib.check_batch_divisible(
        config.input.eval_batch_size, trained.mesh, "input.eval_batch_size"
    )
    batches = tqdm(
        trained.eval_batches(record_set, indices),
        total=-(-len(indices) // config.input.eval_batch_size),
        desc=f"evaluating {record_set.split}",
        unit="batch",
        disable=not progress,
        leave=False,
    )
    return _collect(trained, eval_forward(trained), batches, record_set, indices)


def chunked_outputs(trained, record_set, chunk_size: int) -> Iterator[EvalOutputs]:
    """The evaluation forward over every good record of ``record_set``, chunk by chunk."""
    forward, indices = eval_forward(trained), record_set.good
    for start in range(0, len(indices), chunk_size):
        part = indices[start : start + chunk_size]
        yield _collect(trained, forward, trained.eval_batches(record_set, part), record_set, part)


def _perturbed_input(trained, chunk, perturbation):
    """``(host pipeline spec, per-image extras, seed, noise std)`` of ``chunk``'s images under
    ``perturbation``: ``completeness.OutsideBoxNoise`` on the device, else a host
    ``image_transform`` (``continuity.ImagePerturbation``; None: the clean images)."""
    if isinstance(perturbation, completeness.OutsideBoxNoise):
        boxes = zip(perturbation.boxes, chunk.maps.sizes, strict=True)
        canvas = trained.spec.canvas_size
        noise_box = [views_lib.fit_box_to_canvas(box, h, w, canvas) for box, (h, w) in boxes]
        return trained.spec, {"noise_box": np.stack(noise_box)}, perturbation.seed, perturbation.std
    spec = trained.spec
    if perturbation is not None:
        spec = dataclasses.replace(spec, image_transform=perturbation)
    return spec, {}, 0, 0.0


def _chunk_batches(trained, record_set, indices, spec, global_size: int, extras: dict):
    """Global device batches of the images ``indices`` with the host arrays ``extras``
    (``[n, ...]`` per image, zero rows for the last batch's filler) added to them."""
    local_size = global_size // jax.process_count()
    filler = -len(indices) % global_size
    extras = {
        k: np.concatenate([v, np.zeros_like(v[:1]).repeat(filler, 0)]) for k, v in extras.items()
    }
    stream = pipeline.eval_stream(
        record_set,
        indices,
        spec,
        global_batch=global_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    try:
        for step, local in enumerate(stream):  # this process's rows of global batch `step`
            start = step * global_size + jax.process_index() * local_size
            local |= {k: v[start : start + local_size] for k, v in extras.items()}
            yield sharding_lib.global_batch(trained.mesh, local)
    finally:
        stream.close()


def run_perturbed(trained, record_set, forward, chunk, top_ids, perturbation) -> EvalOutputs:
    """``forward`` (:func:`eval_forward`) of ``chunk``'s images under ``perturbation``,
    explaining ``top_ids``."""
    indices = chunk.outputs.record_indices
    spec, extras, seed, std = _perturbed_input(trained, chunk, perturbation)
    extras["ids"] = np.asarray(top_ids, np.int32)
    batch_size = trained.config.input.eval_batch_size
    batches = _chunk_batches(trained, record_set, indices, spec, batch_size, extras)
    return _collect(trained, forward, batches, record_set, indices, seed, std)


# ======================================================================= explainers


def check_explain_config(config) -> None:
    """Refuses an unknown ``explain.explanation_type`` or ``explain.prp_rule``."""
    for key, value, allowed in (
        ("explanation_type", config.explain.explanation_type, EXPLANATION_TYPES),
        ("prp_rule", config.explain.prp_rule, ("reference", "channelwise")),
    ):
        if value not in allowed:
            raise config_checks.ConfigError(
                f"config.explain.{key}: must be one of {allowed}, got {value!r}"
            )


class Explainer:
    """What explains why prototype ``j`` matched a view (module docstring): the same two
    questions for both kinds, asked by the metrics per chunk and by the panels per view."""

    kind: str = ""

    def chunk_maps(self, chunk) -> chunk_lib.ExplanationMaps:
        """The maps ``[n, k, R, R]`` of ``chunk.top_ids`` on ``chunk``'s images (perturbation
        included), in the chunk's ``R x R`` frame."""
        raise NotImplementedError

    def view_maps(self, record, mask_indices, prototype_ids) -> np.ndarray | None:
        """float32 ``[J, V, V]`` >= 0 on ``record``'s views of masks ``mask_indices [J]`` for
        prototypes ``prototype_ids [J]``; None: the view's mask is the explanation."""
        raise NotImplementedError


class MaskExplainer(Explainer):
    """ProtoMask's own explanation: the winning view's mask (``A = S``)."""

    kind = "mask"

    def chunk_maps(self, chunk) -> chunk_lib.ExplanationMaps:
        return chunk_lib.mask_explanations(chunk)

    def view_maps(self, record, mask_indices, prototype_ids) -> None:
        return None


def _prp_frames(model, batch, seed, noise_std, *, view_size, rule, resolution):
    """PRP maps ``[B, j, R, R]`` of prototypes ``batch["ids"] [B, j]`` on their winning views
    (float32, no augmentation), pasted at those views' ``frame_boxes [B, K, 4]``."""
    masks = batch.get("masks")
    views = views_lib.make_views(
        batch["canvas"], batch["boxes"], None, view_size=view_size, masks=masks, dtype=jnp.float32
    )
    if "noise_box" in batch:  # the completeness pass's noise (its model pass draws the same)
        views = _noise_outside(views, batch, noise_std, seed)
    maps, winners = prp.relevance_maps(
        model, views, batch["ids"], batch["valid"], prototype_rule=rule
    )
    boxes = jnp.take_along_axis(batch["frame_boxes"], winners[..., None], axis=1)
    return prp.paste_into_frame(maps, boxes, resolution)


def _view_relevance(model, canvas, boxes, masks, prototypes, *, view_size, rule):
    views = views_lib.make_views(
        canvas, boxes, None, view_size=view_size, masks=masks, dtype=jnp.float32
    )[0]
    return jax.nn.relu(jnp.sum(prp.input_relevance(model, views, prototypes, rule), axis=-1))


class PrpExplainer(Explainer):
    """PRP relevance (docs/prp.md) of a :class:`TrainedModel`, ``explain.prp_rule``.

    Per chunk (needs ``record_set`` and the frame ``resolution``): on the device in batches
    of ``explain.prp_batch_size`` images made as for the chunk's model pass, pasted into the
    frame at the winning view's box (``FrameMaps.view_boxes``), post-processed as the
    reference (``from_relevance``). Per view: the record fitted as the host pipeline does,
    the views shown (the model's winning view, or push's source view, not chosen again) made
    without augmentation in float32, one vjp for the J pairs on one device, summed over RGB
    and clipped at 0 as ``prp.relevance_maps`` does."""

    kind = "prp"

    def __init__(self, trained, record_set: pipeline.RecordSet | None = None, resolution=None):
        config, state = trained.config, trained.state
        self.trained, self.record_set, self.resolution = trained, record_set, resolution
        self.rule, view_size = config.explain.prp_rule, config.input.view_size
        self.batch_size = config.explain.prp_batch_size
        if record_set is not None:
            sharding_lib.check_batch_divisible(
                self.batch_size, trained.mesh, "explain.prp_batch_size"
            )
        self.model = prp.canonize(
            (trained.graphdef, state.params, state.batch_stats, state.constants)
        )
        self._frames = jax.jit(
            functools.partial(
                _prp_frames, view_size=view_size, rule=self.rule, resolution=resolution
            )
        )
        self._relevance = jax.jit(
            functools.partial(_view_relevance, view_size=view_size, rule=self.rule)
        )

    def chunk_maps(self, chunk) -> chunk_lib.ExplanationMaps:
        if self.record_set is None or self.resolution is None:
            raise ValueError("chunk maps need the explainer built with a record set and resolution")
        spec, extras, seed, std = _perturbed_input(self.trained, chunk, chunk.perturbation)
        extras["ids"] = np.asarray(chunk.top_ids, np.int32)
        extras["frame_boxes"] = chunk.maps.view_boxes.astype(np.float32)
        indices, maps = chunk.outputs.record_indices, []
        for batch in _chunk_batches(
            self.trained, self.record_set, indices, spec, self.batch_size, extras
        ):
            real = to_host(batch["weight"]) > 0
            maps.append(to_host(self._frames(self.model, batch, seed, std))[real])
        return chunk_lib.ExplanationMaps.from_relevance(np.concatenate(maps))

    @functools.cached_property
    def _one_device_model(self):
        return jax.device_put(jax.device_get(self.model), jax.devices()[0])  # a few views

    def view_maps(self, record, mask_indices, prototype_ids) -> np.ndarray:
        model = self._one_device_model
        example = pipeline.fit_record(record, self.trained.spec, f"image {record.image_id}")
        slots = np.asarray(mask_indices, np.int64)  # slot m shows mask m for m < masks/count
        masks = example["masks"][None, slots] if "masks" in example else None
        prototypes = np.asarray(model.prototypes)[np.asarray(prototype_ids)]
        boxes = example["boxes"][None, slots]
        canvas = example["canvas"][None]
        return np.asarray(self._relevance(model, canvas, boxes, masks, prototypes))


def explainer(trained, record_set=None, resolution: int | None = None) -> Explainer:
    """The run's explainer (``explain.explanation_type``); ``record_set`` and ``resolution``
    (the metrics' frame) are what PRP needs for :meth:`Explainer.chunk_maps`."""
    check_explain_config(trained.config)
    if trained.config.explain.explanation_type == "mask":
        return MaskExplainer()
    return PrpExplainer(trained, record_set, resolution)
