r"""Evaluates a trained run: ``python -m protomask_jax.evaluate --config C --workdir DIR
[--split] [--checkpoint] [--resolution R] [--techniques a,b]`` (docs/explanations.md).

One pass of the jitted evaluation forward over a split (``inference.run_model``) gives, per
image, the logits ``[N, C]``, the similarity of every prototype's nearest view and the index
of that view (the explanation) ``[N, P]``, and for the top-k prototypes the similarity of
every view ``[N, k, K]`` and the embedding of the winning view ``[N, k, D]``.
:func:`compute_metrics` walks the images in chunks (``evaluators.chunk.Chunk``: masks and
ground truth in one ``R x R`` frame of the whole image, explanation maps ``[n, k, R, R]`` of
the top prototypes from the run's ``inference.Explainer``: PRP maps made on the device per
chunk, or the winning views' masks) through the evaluators of the chosen techniques
(``protomask_jax/evaluators/``); their groups go to ``DIR/eval.json`` (:func:`write_eval`
merges them into the groups an earlier evaluation of the same checkpoint, split and frame
left there; a family whose ground truth the records lack is listed under ``not_computed``
with the reason) and a table on stdout.
Continuity and output completeness rerun the model on a chunk's images perturbed
(``inference.run_perturbed``: a photometric change applied by the host pipeline, or noise
outside a box added to the views on the device); ``topk`` also reads the other split, chunk
by chunk, and writes ``DIR/topk.json``.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

from protomask_jax import base, cli, config_checks, evaluators, inference
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from protomask_jax.evaluators import chunk as chunk_lib
from protomask_jax.evaluators import frame

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
TOPK_FILE = "topk.json"
NOT_COMPUTED = "not_computed"  # eval.json: {family: why it has no group}
NO_INPUT = "no image of the split had what it needs"  # an evaluator that names nothing
# What every group of one eval.json was computed on: evaluations that agree on these merge.
CONTEXT_KEYS = (
    "split",
    "checkpoint",
    "dataset",
    "num_images",
    "num_classes",
    "num_prototypes",
    "resolution",
    "explanation_type",
    "prp_rule",
)
# Images whose masks are held at once: 128 x 11 masks at 224 px is ~70 MB as bool.
CHUNK = 128
DEFAULT_RESOLUTION = 224  # the reference's frame, on every backend


def compute_metrics(
    outputs: inference.EvalOutputs,
    arrays: inference.ModelArrays,
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
    allows, and under :data:`NOT_COMPUTED` why the others have none (the evaluator's
    ``missing``).

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
    groups, skipped = {}, {}
    for evaluator in active:
        begin = time.perf_counter()
        group = evaluator.result()
        seconds[evaluator.name] += time.perf_counter() - begin
        if group is None:
            skipped[evaluator.name] = getattr(evaluator, "missing", NO_INPUT)
        else:
            groups[evaluator.name] = group
    log.info("metric families (wall s): %s", {k: round(v, 2) for k, v in seconds.items()})
    for name, reason in skipped.items():
        log.warning("%s not computed: %s", name, reason)
    return groups | ({NOT_COMPUTED: skipped} if skipped else {})


def merge_eval(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """``new`` over ``old``: each family ``new`` evaluated (a group or a :data:`NOT_COMPUTED`
    reason) replaces its entry, the other families of ``old`` are kept. None when ``old``
    was computed on something else (:data:`CONTEXT_KEYS` differ): its groups cannot sit
    under ``new``'s header."""
    if old is None:
        return new
    if any(old.get(key) != new.get(key) for key in CONTEXT_KEYS):
        return None
    new_reasons, old_reasons = new.get(NOT_COMPUTED, {}), old.get(NOT_COMPUTED, {})
    evaluated = set(new_reasons) | {name for name in evaluators.TECHNIQUES if name in new}
    merged = {k: v for k, v in new.items() if k not in evaluators.TECHNIQUES and k != NOT_COMPUTED}
    reasons = {}
    for name in evaluators.TECHNIQUES:
        source = new if name in evaluated else old
        if name in source:
            merged[name] = source[name]
        reason = (new_reasons if name in evaluated else old_reasons).get(name)
        if reason is not None:
            reasons[name] = reason
    return merged | ({NOT_COMPUTED: reasons} if reasons else {})


def write_eval(workdir: str | Path, results: dict[str, Any]) -> dict[str, Any]:
    """Merges ``results`` into ``workdir/eval.json`` (:func:`merge_eval`) and returns what it
    wrote. An eval.json of another evaluation (or one that does not parse) is first copied
    to ``eval.replaced-<time>.json`` beside it, so no result is lost."""
    path = base.as_path(workdir) / EVAL_FILE
    old, readable = None, True
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            readable = False
        readable = readable and isinstance(old, dict)
    merged = merge_eval(old, results) if readable else None
    if merged is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = path.with_name(f"eval.replaced-{stamp}.json")
        for n in itertools.count(1):
            if not backup.exists():
                break
            backup = path.with_name(f"eval.replaced-{stamp}-{n}.json")
        backup.write_bytes(path.read_bytes())
        what = "another evaluation" if readable else "a damaged file"
        log.warning("%s held %s; kept as %s, written anew", path, what, backup.name)
        merged = results
    else:
        kept = [name for name in evaluators.TECHNIQUES if name in merged and name not in results]
        if kept:
            log.info("%s: kept the earlier %s groups", path, ", ".join(kept))
    base.write_json_atomic(path, merged)
    return merged


def _nan_to_none(value: Any) -> Any:
    """JSON has no nan/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(v) for key, v in value.items()}
    return value


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
    ``split``, merges the groups into ``workdir/eval.json`` (nan/inf as null;
    :func:`write_eval`) and returns that file's content; with the ``topk`` technique also
    writes ``workdir/topk.json`` (over the train and the test split)."""
    inference.check_explain_config(config)
    workdir, resolution = base.as_path(workdir), int(resolution)
    if resolution < 4:
        raise base.UserError(f"--resolution must be >= 4 pixels, got {resolution}")
    techniques = evaluators.check(techniques)  # before the slow part
    info = records_lib.load_dataset_info(config.dataset.records_dir)
    config_checks.check_dataset_info(config, info)
    trained = inference.restore_trained(config, workdir, which=checkpoint)
    skip = config.input.skip_bad_records
    record_set = pipeline.RecordSet(config.dataset.records_dir, split, skip_bad_records=skip)
    outputs = inference.run_model(trained, record_set, progress=progress)
    arrays = inference.model_arrays(trained)
    run, batch = None, config.input.eval_batch_size
    chunk_size = max(1, CHUNK // batch) * batch  # whole batches for the perturbed passes
    if set(techniques) & set(evaluators.PERTURBED):
        run = functools.partial(
            inference.run_perturbed, trained, record_set, inference.eval_forward(trained)
        )
    kind = config.explain.explanation_type
    explain = inference.explainer(trained, record_set, resolution).chunk_maps
    other_splits = []
    if "topk" in techniques:  # the reference lists both splits' images
        other = "train" if split == "test" else "test"
        other_set = pipeline.RecordSet(config.dataset.records_dir, other, skip_bad_records=skip)
        other_splits.append((other_set, inference.chunked_outputs(trained, other_set, chunk_size)))
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
        results = write_eval(workdir, results)
        if top_images is not None:
            payload = {"checkpoint": trained.checkpoint, "k": metrics["topk"]["k"]}
            base.write_json_atomic(workdir / TOPK_FILE, payload | {"prototypes": top_images})
    return results


def load_eval(workdir: str | Path) -> dict[str, Any] | None:
    """``workdir/eval.json`` if it exists."""
    path = base.as_path(workdir) / EVAL_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _format_value(value, unit: str) -> str:
    if value is None:  # nan in the computation, null in eval.json
        return "n/a"
    if isinstance(value, int):
        return f"{value:d}"
    return f"{value:.2f}" if unit == "%" else f"{value:.4f}"


class _Blank(dict):
    """Formats a title's ``{k}`` as ``k`` when there is no group to fill it from."""

    def __missing__(self, key: str) -> str:
        return key


def sections(results: dict[str, Any]) -> list[tuple[str, list[tuple[str, str, str]], list[str]]]:
    """``(title, [(label, value, unit)], [note])`` per family of eval.json, in display order;
    a family under :data:`NOT_COMPUTED` has no rows and the note ``not computed: <why>``."""
    out = []
    reasons = results.get(NOT_COMPUTED) or {}
    for name in evaluators.TECHNIQUES:
        group, (title, table) = results.get(name) or {}, evaluators.TABLES[name]
        shown = [(key, unit, label) for key, unit, label in table if key in group]
        rows = [(label, _format_value(group[key], u), u) for key, u, label in shown if u != "note"]
        notes = [f"{label}: {group[key]}" for key, unit, label in shown if unit == "note"]
        if rows:
            out.append((title.format(**group), rows, notes))
        elif name in reasons:
            out.append((title.format_map(_Blank()), [], [f"not computed: {reasons[name]}"]))
    return out


def format_table(results: dict[str, Any]) -> str:
    """The metrics of :func:`evaluate` as an aligned text table for a person."""
    lines = [
        f"{results.get('dataset', '')} / {results['split']}: {results['num_images']} images, "
        f"{results['num_prototypes']} prototypes, {results['checkpoint']}, "
        f"mask frame {results['resolution']}x{results['resolution']}"
        + "".join(f", {k} {results[k]}" for k in ("explanation_type", "prp_rule") if k in results)
    ]
    for title, rows, notes in sections(results):
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
        name = str(base.as_path(workdir) / cli.RUN_CONFIG)
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
    return f"{format_table(results)}\n\nwritten: {base.as_path(FLAGS.workdir) / EVAL_FILE}"


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
