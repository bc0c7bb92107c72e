r"""Evaluates a trained run: ``python -m protomask_jax.evaluate --config C --workdir DIR
[--split] [--checkpoint] [--resolution R] [--techniques a,b]`` (docs/explanations.md).

One pass of the jitted evaluation forward over a split (:func:`run_model`) gives, per image,
the logits ``[N, C]``, the similarity of every prototype's nearest view and the index of that
view (the explanation) ``[N, P]``, and for the top-k prototypes the similarity of every view
``[N, k, K]`` and the embedding of the winning view ``[N, k, D]``. :func:`compute_metrics`
walks the images in chunks (``evaluators.chunk.Chunk``: masks and ground truth in one
``R x R`` frame of the whole image, explanation maps ``[n, k, R, R]`` of the top prototypes:
PRP maps made on the device per chunk, :class:`PrpExplanations`, or the winning views' masks)
through the evaluators of the chosen techniques (``protomask_jax/evaluators/``); their groups
go to ``DIR/eval.json`` and a table on stdout. Continuity and output completeness rerun the
model on a chunk's images perturbed (:func:`run_perturbed`: a photometric change applied by
the host pipeline, or noise outside a box added to the views on the device); ``topk`` also
reads the other split, chunk by chunk, and writes ``DIR/topk.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from protomask_jax import base, cli, config_checks, evaluators, prp
from protomask_jax import sharding as sharding_lib
from protomask_jax import steps as steps_lib
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from protomask_jax.data import views as views_lib
from protomask_jax.evaluators import chunk as chunk_lib
from protomask_jax.evaluators import completeness, frame
from protomask_jax.models import protomask as model_lib

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
TOPK_FILE = "topk.json"
# Images whose masks are held at once: 128 x 11 masks at 224 px is ~70 MB as bool.
CHUNK = 128
DEFAULT_RESOLUTION = 224  # the reference's frame, on every backend
EXPLANATION_TYPES = ("prp", "mask")


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


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) global array as one numpy array."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


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
    """The evaluation forward (no augmentation) of a ``trainer.TrainedModel`` over
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


class PrpExplanations:
    """The chunks' explanation producer for ``explain.explanation_type="prp"``: the PRP maps
    (docs/prp.md) of a chunk's prototypes ``top_ids [n, j]``, on the device in batches of
    ``explain.prp_batch_size`` images made as for the chunk's model pass (perturbation
    included), pasted into the ``R x R`` frame at the winning view's box
    (``FrameMaps.view_boxes``), post-processed as the reference (``from_relevance``)."""

    def __init__(self, trained, record_set: pipeline.RecordSet, resolution: int):
        config, state = trained.config, trained.state
        self.trained, self.record_set = trained, record_set
        self.batch_size = config.explain.prp_batch_size
        sharding_lib.check_batch_divisible(self.batch_size, trained.mesh, "explain.prp_batch_size")
        split = (trained.graphdef, state.params, state.batch_stats, state.constants)
        self.model = prp.canonize(split)
        rule, view_size = config.explain.prp_rule, config.input.view_size
        self.frames = jax.jit(
            functools.partial(_prp_frames, view_size=view_size, rule=rule, resolution=resolution)
        )

    def __call__(self, chunk) -> chunk_lib.ExplanationMaps:
        spec, extras, seed, std = _perturbed_input(self.trained, chunk, chunk.perturbation)
        extras["ids"] = np.asarray(chunk.top_ids, np.int32)
        extras["frame_boxes"] = chunk.maps.view_boxes.astype(np.float32)
        indices, maps = chunk.outputs.record_indices, []
        for batch in _chunk_batches(
            self.trained, self.record_set, indices, spec, self.batch_size, extras
        ):
            real = to_host(batch["weight"]) > 0
            maps.append(to_host(self.frames(self.model, batch, seed, std))[real])
        return chunk_lib.ExplanationMaps.from_relevance(np.concatenate(maps))


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


def compute_metrics(
    outputs: EvalOutputs,
    arrays: ModelArrays,
    record_set: pipeline.RecordSet,
    *,
    num_views: int,
    resolution: int,
    num_parts: int = 0,
    techniques: Sequence[str] | None = None,
    explain: Callable | None = None,
    run: Callable | None = None,
    chunk_size: int = CHUNK,
    other_splits: Sequence[tuple[pipeline.RecordSet, Any]] = (),
    options: dict | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The eval.json groups of ``techniques`` (default: ``evaluators.DEFAULT``) that the data
    allows.

    ``num_parts``: Q for keypoints derived from part maps. ``explain``: the producer of the
    chunks' explanation maps (default: the winning views' masks). ``run``: the chunks'
    perturbed-pass hook (``Chunk.run``), needed by continuity and completeness.
    ``other_splits``: ``(record set, its outputs in chunks)`` for the families that read every
    split; ``options``: per family, the keyword arguments of its evaluator.
    """
    active = evaluators.build(techniques, arrays, options)
    explain = explain or chunk_lib.mask_explanations
    seconds = dict.fromkeys((evaluator.name for evaluator in active), 0.0)
    starts = range(0, len(outputs.labels), chunk_size)
    chunks = (outputs.take(slice(start, start + chunk_size)) for start in starts)
    passes = [(record_set, chunks, active, explain, run)]
    every_split = [e for e in active if getattr(e, "every_split", False)]
    for other, other_chunks in other_splits if every_split else ():  # outputs and maps only
        passes.append((other, other_chunks, every_split, chunk_lib.mask_explanations, None))
    for split_set, chunks, families, producer, hook in passes:
        render = functools.partial(
            frame.render_frame_maps,
            split_set,
            num_views=num_views,
            resolution=resolution,
            num_parts=num_parts,
        )
        bar = tqdm(chunks, f"metrics ({split_set.split})", unit="chunk", disable=not progress)
        for rows in bar:
            chunk = chunk_lib.Chunk(rows, render, producer, hook, split=split_set.split)
            for evaluator in families:
                begin = time.perf_counter()
                evaluator.update(chunk)  # the first family to ask pays for shared maps
                seconds[evaluator.name] += time.perf_counter() - begin
    groups = {}
    for evaluator in active:
        begin = time.perf_counter()
        groups[evaluator.name] = evaluator.result()
        seconds[evaluator.name] += time.perf_counter() - begin
    log.info("metric families (wall s): %s", {k: round(v, 2) for k, v in seconds.items()})
    return {name: group for name, group in groups.items() if group is not None}


def _nan_to_none(value: Any) -> Any:
    """JSON has no nan/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(v) for key, v in value.items()}
    return value


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


def _chunked_outputs(trained, record_set, chunk_size: int):
    """The evaluation forward over every good record of ``record_set``, chunk by chunk."""
    forward, indices = eval_forward(trained), record_set.good
    for start in range(0, len(indices), chunk_size):
        part = indices[start : start + chunk_size]
        yield _collect(trained, forward, trained.eval_batches(record_set, part), record_set, part)


def evaluate(
    config,
    workdir: str | Path,
    *,
    split: str = "test",
    checkpoint: str = "best",
    resolution: int = DEFAULT_RESOLUTION,
    techniques: Sequence[str] | None = None,
    config_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluates the ``checkpoint`` (``best`` or ``latest``) a run left in ``workdir`` on
    ``split`` and writes ``workdir/eval.json`` (nan/inf as null), which it returns; with the
    ``topk`` technique also ``workdir/topk.json`` (over the train and the test split)."""
    from protomask_jax import trainer

    check_explain_config(config)
    workdir, resolution = Path(workdir), int(resolution)
    if resolution < 4:
        raise base.UserError(f"--resolution must be >= 4 pixels, got {resolution}")
    techniques = evaluators.check(techniques)  # before the slow part
    info = records_lib.load_dataset_info(config.dataset.records_dir)
    config_checks.check_dataset_info(config, info)
    trained = trainer.restore_trained(config, workdir, which=checkpoint)
    skip = config.input.skip_bad_records
    record_set = pipeline.RecordSet(config.dataset.records_dir, split, skip_bad_records=skip)
    outputs = run_model(trained, record_set, progress=progress)
    arrays = model_arrays(trained)
    run, batch = None, config.input.eval_batch_size
    chunk_size = max(1, CHUNK // batch) * batch  # whole batches for the perturbed passes
    if set(techniques) & set(evaluators.PERTURBED):
        run = functools.partial(run_perturbed, trained, record_set, eval_forward(trained))
    kind = config.explain.explanation_type
    explain = PrpExplanations(trained, record_set, resolution) if kind == "prp" else None
    other_splits = []
    if "topk" in techniques:  # the reference lists both splits' images
        other = "train" if split == "test" else "test"
        other_set = pipeline.RecordSet(config.dataset.records_dir, other, skip_bad_records=skip)
        other_splits.append((other_set, _chunked_outputs(trained, other_set, chunk_size)))
    metrics = compute_metrics(
        outputs,
        arrays,
        record_set,
        num_views=config.input.num_views,
        resolution=resolution,
        num_parts=len(info.get("part_names") or []),
        techniques=techniques,
        explain=explain,
        run=run,
        chunk_size=chunk_size,
        other_splits=other_splits,
        options={"topk": {"k": config.explain.top_images}},
        progress=progress,
    )
    explained_by = {"explanation_type": kind}
    if kind == "prp":
        explained_by["prp_rule"] = config.explain.prp_rule
    top_images = (metrics.get("topk") or {}).pop("prototypes", None)
    results = _nan_to_none(
        {
            "split": split,
            "checkpoint": trained.checkpoint,
            "config": config_name or "",
            "dataset": info.get("dataset", config.dataset.name),
            "num_images": int(len(outputs.labels)),
            "num_classes": int(config.dataset.num_classes),
            "num_prototypes": int(arrays.last_layer.shape[1]),
            "resolution": resolution,
            **explained_by,
            **metrics,
        }
    )
    if jax.process_index() == 0:
        base.write_json_atomic(workdir / EVAL_FILE, results)
        if top_images is not None:
            payload = {"checkpoint": trained.checkpoint, "k": metrics["topk"]["k"]}
            base.write_json_atomic(workdir / TOPK_FILE, payload | {"prototypes": top_images})
    return results


def load_eval(workdir: str | Path) -> dict[str, Any] | None:
    """``workdir/eval.json`` if it exists."""
    path = Path(workdir) / EVAL_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _format_value(value, unit: str) -> str:
    if value is None:  # nan in the computation, null in eval.json
        return "n/a"
    if isinstance(value, int):
        return f"{value:d}"
    return f"{value:.2f}" if unit == "%" else f"{value:.4f}"


def _sections(results: dict[str, Any]):
    """``(title, [(label, value, unit)], [note])`` per group of eval.json, in display order."""
    for name in evaluators.TECHNIQUES:
        group, (title, table) = results.get(name) or {}, evaluators.TABLES[name]
        shown = [(key, unit, label) for key, unit, label in table if key in group]
        rows = [(label, _format_value(group[key], u), u) for key, u, label in shown if u != "note"]
        notes = [f"{label}: {group[key]}" for key, unit, label in shown if unit == "note"]
        if rows:
            yield title.format(**group), rows, notes


def table_rows(results: dict[str, Any]) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The metric sections of eval.json as ``(title, [(label, value, unit)])``."""
    return [(title, rows) for title, rows, _ in _sections(results)]


def format_table(results: dict[str, Any]) -> str:
    """The metrics of :func:`evaluate` as an aligned text table for a person."""
    lines = [
        f"{results.get('dataset', '')} / {results['split']}: {results['num_images']} images, "
        f"{results['num_prototypes']} prototypes, {results['checkpoint']}, "
        f"mask frame {results['resolution']}x{results['resolution']}"
        + "".join(f", {k} {results[k]}" for k in ("explanation_type", "prp_rule") if k in results)
    ]
    for title, rows, notes in _sections(results):
        lines += ["", title, "-" * 64]
        lines += [f"  {label:<44}{text:>10} {unit}" for label, text, unit in rows]
        lines += [f"  {note}" for note in notes]
    return "\n".join(lines)


# ============================================================================= CLI


def define_run_flags(action: str) -> None:
    """The flags every tool on a finished run takes; ``action`` ends their help texts."""
    from absl import flags

    cli.define_config_flag(
        cli.DEFAULT_CONFIG,
        "Leave out to use the run's own config (WORKDIR/config.json); a config file given here "
        "must agree with the run on the model.",
    )
    flags.DEFINE_string("workdir", None, "The training run's output folder.")
    flags.DEFINE_enum("split", "test", ["test", "train"], f"Split to {action}.")
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], f"Checkpoint to {action}.")


def run_tool(argv: list[str], tool: Callable[[Any, str], str]) -> None:
    """``tool(config, config_name)`` on the run's config with this command's overrides, printing
    what it returns (use under ``cli.run``: a user's mistake prints one line and exits 2)."""
    from absl import app, flags
    from ml_collections import config_flags

    from protomask_jax.logs import setup_cli_logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    workdir = flags.FLAGS.workdir
    if not workdir:
        raise app.UsageError("--workdir is required (the training run's output folder)")
    setup_cli_logging()
    config = cli.run_config(workdir, flags.FLAGS["config"])
    name = config_flags.get_config_filename(flags.FLAGS["config"])
    if Path(name).resolve() == Path(cli.DEFAULT_CONFIG):
        name = str(Path(workdir) / cli.RUN_CONFIG)
    print(tool(config, name))


def _evaluate_tool(config, config_name: str) -> str:
    from absl import flags

    FLAGS = flags.FLAGS
    results = evaluate(
        config,
        FLAGS.workdir,
        split=FLAGS.split,
        checkpoint=FLAGS.checkpoint,
        resolution=FLAGS.resolution,
        techniques=FLAGS.techniques,
        config_name=config_name,
    )
    return f"{format_table(results)}\n\nwritten: {Path(FLAGS.workdir) / EVAL_FILE}"


if __name__ == "__main__":
    from absl import flags

    define_run_flags("evaluate")
    flags.DEFINE_integer(
        "resolution", DEFAULT_RESOLUTION, "Mask frame R of the pixel metrics (the reference's)."
    )
    flags.DEFINE_list(
        "techniques",
        list(evaluators.DEFAULT),
        f"Metric families to compute, from {list(evaluators.TECHNIQUES)}.",
    )
    cli.run(lambda argv: run_tool(argv, _evaluate_tool))
